"""Reducers: how a round's decoded uploads become one gradient.

The reducer seam (``docs/architecture.md``): a reducer gives each upload its
integer weight, adds decoded uploads, writes the reduced gradient into the
optimizer's ``.grad`` tensors, and resets for the next round. ``streaming``
reducers (sum, mean, weighted mean) keep memory flat in the number of nodes;
a reducer that needs every upload of the round at once (a coordinate-wise
median, Krum) says ``streaming = False`` and holds them within the staging
budget. A new rule is one class and one line in ``REDUCERS``.

The streaming rules differ only in the weight and the divisor; the sum itself
is a *kernel* (``SUMS``): ``float64`` (exact products, rounding order-dependent
only in float64's last bits), ``float32`` (half the memory) or ``reproducible``
(``fedgrad.server.binned``: bitwise the same for every arrival order).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch

from fedgrad.codec import Layout
from fedgrad.codec_base import Chunk
from fedgrad.errors import InvalidArgument
from fedgrad.server.staging import StagedUpload

__all__ = [
    "MAX_EXACT_WEIGHT",
    "REDUCERS",
    "SUMS",
    "PlainSum",
    "Reducer",
    "StreamingReducer",
    "accumulate_for",
    "make_reducer",
    "vector_norm",
]

# Products n * g stay exact in float64 while n < 2**29 (24-bit float32 mantissa + 29 <= 53).
MAX_EXACT_WEIGHT = 1 << 29


class SumKernel(Protocol):
    """A running per-element sum of weighted values over the model's flat elements."""

    nbytes: int

    def add(self, first: int, values: np.ndarray, weight: float, overwrite: bool) -> None:
        """Add ``weight * values`` at elements [first, first+len); ``overwrite`` on the first."""
        ...

    def scatter(self, indices: np.ndarray, values: np.ndarray, weight: float) -> None:
        """Add ``weight * values`` at ``indices`` (strictly increasing, a sparse upload's)."""
        ...

    def zero(self) -> None:
        """Make every sum zero (before a round's first add is a sparse one)."""
        ...

    def result_into(self, first: int, out: torch.Tensor, divisor: float) -> None:
        """Write the sums of elements [first, first+out.numel()) / divisor into ``out``."""
        ...

    def reset(self) -> None:
        """Forget everything added (the next add overwrites)."""
        ...


#: Elements a sum kernel divides into its output at once (``result_into``).
DIVIDE_BLOCK = 1 << 18


class PlainSum:
    """A float64 (or float32) running sum; the round's first upload overwrites."""

    def __init__(self, numel: int, dtype: type = np.float64) -> None:
        self.total: np.ndarray = np.zeros(numel, dtype=dtype)
        self.nbytes = self.total.nbytes
        self._empty = True
        self._local = threading.local()

    def add(self, first: int, values: np.ndarray, weight: float, overwrite: bool) -> None:
        target = self.total[first : first + values.size]
        if overwrite:  # exact: n * g of a float32/16 g and n < 2**29 fits float64
            np.multiply(values, weight, out=target, dtype=target.dtype)
        elif weight == 1:
            np.add(target, values, out=target)
        else:
            scaled = self._scratch(values.size)
            np.multiply(values, weight, out=scaled, dtype=target.dtype)
            np.add(target, scaled, out=target)
        self._empty = False

    def scatter(self, indices: np.ndarray, values: np.ndarray, weight: float) -> None:
        # Unique indices (the codec checked): a fancy-index add is exact, no np.add.at.
        products = np.multiply(values, weight, dtype=self.total.dtype)
        self.total[indices] += products
        self._empty = False

    def zero(self) -> None:
        self.total.fill(0)
        self._empty = False

    def _scratch(self, size: int) -> np.ndarray:
        # One buffer per reduce thread, reused across chunks: no 1 MiB allocation per chunk.
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.size < size:
            buffer = self._local.buffer = np.empty(size, dtype=self.total.dtype)
        return buffer[:size]

    def result_into(self, first: int, out: torch.Tensor, divisor: float) -> None:
        if self._empty:  # nothing added since the reset: the totals are stale
            out.zero_()
            return
        # Block by block: into a float32 ``out``, torch.div makes a float64 quotient of
        # its whole input first (2x the tensor); per block it is 2 MiB. Same bits.
        flat, dest = torch.from_numpy(self.total[first : first + out.numel()]), out.view(-1)
        for start in range(0, dest.numel(), DIVIDE_BLOCK):
            end = start + DIVIDE_BLOCK
            torch.div(flat[start:end], divisor, out=dest[start:end])

    def reset(self) -> None:
        # No fill: every complete upload covers every element, so the first add overwrites
        # (saves a pass over the 2x-model-size buffer per round).
        self._empty = True


class ReproducibleSum:
    """``fedgrad.server.binned.BinnedSum`` behind the kernel interface."""

    def __init__(self, numel: int) -> None:
        from fedgrad.server.binned import BinnedSum

        self._sum = BinnedSum(numel)
        self.nbytes = self._sum.nbytes

    def add(self, first: int, values: np.ndarray, weight: float, overwrite: bool) -> None:
        if isinstance(weight, int):
            self._sum.add(first, values, weight)
        else:  # a staleness-scaled weight: the product rounds once, alike in every order
            self._sum.add(first, np.multiply(values, weight, dtype=np.float64), 1)

    def scatter(self, indices: np.ndarray, values: np.ndarray, weight: float) -> None:
        # The bins add contiguous runs: spread the pairs over their span, zeros between
        # (an added zero changes no bin; spans of one upload never overlap).
        if not indices.size:
            return
        low = int(indices[0])
        dense = np.zeros(int(indices[-1]) - low + 1, values.dtype)
        dense[indices - low] = values
        self.add(low, dense, weight, False)

    def zero(self) -> None:
        pass  # elements no add covered read as zero

    def result_into(self, first: int, out: torch.Tensor, divisor: float) -> None:
        dest = out.view(-1)
        exact = np.empty(min(dest.numel(), DIVIDE_BLOCK), dtype=np.float64)
        for start in range(0, dest.numel(), DIVIDE_BLOCK):
            block = exact[: min(DIVIDE_BLOCK, dest.numel() - start)]
            self._sum.result_into(first + start, block, divisor)
            dest[start : start + block.size].copy_(torch.from_numpy(block))

    def reset(self) -> None:
        self._sum.reset()


#: Sum kernels by ``--accumulate`` name.
SUMS: dict[str, Callable[[int], SumKernel]] = {
    "float64": lambda numel: PlainSum(numel, np.float64),
    "float32": lambda numel: PlainSum(numel, np.float32),
    "reproducible": ReproducibleSum,
}


class Reducer(Protocol):
    """The reduction rule of a round."""

    name: str
    streaming: bool
    count: int

    def weight(self, num_samples: int) -> int:
        """Return the integer weight of an upload of ``num_samples`` samples.

        Raises:
            InvalidArgument: the sample count cannot be weighted.
        """
        ...

    def add(self, upload: StagedUpload, weight: int, scale: float = 1.0, key: str = "") -> float:
        """Add a complete, counted upload of node ``key``; return its L2 norm. One at a time.

        ``scale`` in (0, 1] multiplies the upload (async staleness); the divisor of a
        mean counts ``weight`` unscaled.
        """
        ...

    def result_into(self, outputs: Sequence[torch.Tensor], indices: Sequence[int]) -> None:
        """Write the reduced gradient of manifest entries ``indices`` into ``outputs``."""
        ...

    def reset(self) -> None:
        """Start a new round."""
        ...

    def close(self) -> None:
        """Free threads and files."""
        ...


class StreamingReducer:
    """Sum, mean or weighted mean: weighted adds into a sum kernel, one division at the end.

    Chunks cover disjoint elements, so an add is split between worker threads
    (numpy releases the GIL); the sum per element is the same whatever the split.
    """

    streaming = True

    def __init__(
        self,
        name: str,
        layout: Layout,
        accumulate: str = "float64",
        workers: int = 1,
        clip: float | None = None,
        max_samples: int = 0,
    ) -> None:
        self.name, self.layout = name, layout
        self.clip, self.max_samples = clip, max_samples
        self.sum: SumKernel = SUMS[accumulate](layout.numel)
        self.workers = max(1, workers)
        self._pool: ThreadPoolExecutor | None = None
        self.count = 0
        self.total_weight = 0
        self.first_elements = layout.first_elements

    def weight(self, num_samples: int) -> int:
        if self.name != "weighted-mean":
            return 1
        if not 1 <= num_samples < MAX_EXACT_WEIGHT:
            raise InvalidArgument(
                f"num_samples must be in [1, {MAX_EXACT_WEIGHT - 1}] for the weighted mean,"
                f" got {num_samples}"
            )
        return min(num_samples, self.max_samples) if self.max_samples else num_samples

    def add(
        self,
        upload: StagedUpload,
        weight: int,
        scale: float = 1.0,
        key: str = "",
        presummed: bool = False,
    ) -> float:
        """Add ``weight * scale * values``; the divisor counts ``weight`` only.

        ``presummed``: the values are already a weighted sum (a relay's, of total weight
        ``weight``): they are added as they are, and the divisor counts ``weight``.

        ``scale`` (async mode's staleness factor s(tau), in (0, 1]) shrinks a stale
        upload without renormalizing it away (FedBuff). At 1 the product stays the
        exact integer one. With ``clip``, an upload whose L2 norm exceeds it is scaled
        down to it first (one more decoding pass, only then).

        Returns:
            The upload's L2 norm (before clipping).
        """
        upload.complete()
        if not 1 <= weight < MAX_EXACT_WEIGHT:
            raise InvalidArgument(f"weight {weight} is outside [1, {MAX_EXACT_WEIGHT})")
        if not 0 < scale <= 1:
            raise InvalidArgument(f"staleness scale {scale} is outside (0, 1]")
        norm = None
        if self.clip is not None:
            norm = upload_norm(upload)
            if norm > self.clip:
                scale *= self.clip / norm
        factor: float = 1.0 if presummed else (weight if scale == 1 else weight * scale)
        count, overwrite = len(upload.chunks), self.count == 0
        if overwrite and upload.codec.sparse:  # a sparse upload leaves elements out: zero first
            self.sum.zero()
            overwrite = False
        if upload.codec.splittable and self.workers > 1 and count >= 2 * self.workers:
            parts = [range(i, count, self.workers) for i in range(self.workers)]
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fedgrad-reduce")
            futures = [self._pool.submit(self._add, upload, p, factor, overwrite) for p in parts]
            added = math.hypot(*(future.result() for future in futures))
        else:
            added = self._add(upload, range(count), factor, overwrite)
        self.total_weight += weight
        self.count += 1
        return norm if norm is not None else added

    def _add(self, upload: StagedUpload, indices: range, weight: float, overwrite: bool) -> float:
        """Add the chunks at ``indices``; return the L2 norm of the values added (statistics).

        A splittable codec decodes each chunk on its own, so each chunk is let go as soon
        as it is added (``StagedUpload.consume``): the staging budget frees up while the
        add runs, and the next upload's chunks can arrive meanwhile.
        """
        codec, norm = upload.codec, 0.0
        batches: Iterable[tuple[Sequence[Chunk], int | None]] = (
            (([upload.chunks[i]], i) for i in indices)
            if codec.splittable
            else [(upload.chunks, None)]
        )
        for chunks, index in batches:
            for where, values in codec.decode(chunks):
                if codec.sparse:
                    self.sum.scatter(where, values, weight)
                else:
                    self.sum.add(where, values, weight, overwrite)
                norm = math.hypot(norm, vector_norm(values))  # values are in cache: cheap
            del chunks
            if index is not None:
                upload.consume(index)
        return norm

    @property
    def divisor(self) -> float:
        return 1.0 if self.name == "sum" else float(self.total_weight)

    def result_into(self, outputs: Sequence[torch.Tensor], indices: Sequence[int]) -> None:
        divisor = self.divisor
        for i, out in zip(indices, outputs, strict=True):
            self.sum.result_into(self.first_elements[i], out, divisor)

    def reset(self) -> None:
        self.sum.reset()
        self.count = 0
        self.total_weight = 0

    def close(self) -> None:
        """Stop the worker threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


#: Reduction rule name -> reducer class, built as ``cls(name, layout, accumulate, workers)``.
REDUCERS: dict[str, type[StreamingReducer]] = {
    "weighted-mean": StreamingReducer,
    "mean": StreamingReducer,
    "sum": StreamingReducer,
}


def vector_norm(values: np.ndarray) -> float:
    """Return the L2 norm of ``values``; never raises or warns (huge values give inf)."""
    if values.dtype.itemsize < 4:  # float16 squares overflow at 256
        values = values.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        square = float(np.dot(values, values))
    if math.isfinite(square):
        return math.sqrt(square)
    # The squares overflowed (values near the dtype's limit): scale first, exactly.
    top = float(np.abs(values).max())
    scaled = values.astype(np.float64) / top
    return top * math.sqrt(float(np.dot(scaled, scaled)))


def upload_norm(upload: StagedUpload) -> float:
    """Return the L2 norm of a staged upload's decoded values."""
    norm = 0.0
    for _where, values in upload.codec.decode(upload.chunks):
        norm = math.hypot(norm, vector_norm(values))
    return norm


def accumulate_for(accumulate: str, layout: Layout) -> str:
    """Return the sum kernel ``accumulate`` names; "auto" picks the model's default.

    float64 models get the reproducible sum (a float64 sum of float64 products rounds in
    an arrival-dependent order); float32/16 models the float64 sum of exact products.
    """
    if accumulate != "auto":
        return accumulate
    wide = any(s.dtype.itemsize == 8 for s in layout.specs)
    return "reproducible" if wide else "float64"


def make_reducer(
    name: str,
    layout: Layout,
    accumulate: str,
    workers: int,
    *,
    clip: float | None = None,
    max_samples: int = 0,
    budget_bytes: int = 256 << 20,
    spill_dir: str | None = None,
) -> Reducer:
    """Return the reducer ``--reduce name`` over ``layout``.

    Streaming rules use the ``accumulate`` sum kernel over ``workers`` threads; robust
    rules (``fedgrad.server.robust``) hold the round's uploads within ``budget_bytes``
    and spill the rest to ``spill_dir``. ``clip`` bounds each upload's L2 norm for
    every rule; ``max_samples`` caps the weighted mean's sample counts.
    """
    if name in REDUCERS:
        return REDUCERS[name](name, layout, accumulate, workers, clip, max_samples)
    from fedgrad.server.robust import RobustReducer

    return RobustReducer(name, layout, budget_bytes, spill_dir, clip)
