"""Staging and reduction of gradient uploads, without grpc.

An upload is staged chunk by chunk (each chunk checked for position and
finiteness as it arrives) and committed to the accumulator only once it is
complete, so a failed or cancelled upload leaves no trace. The accumulator is
float64 whatever the wire dtype: products ``n_i * g_i`` of float32/16
gradients and integer weights below 2**29 are exact in float64, so arrival
order only matters through the rounding of the sums themselves, which float64
makes vanishingly rare for float32 models (see README, "Determinism").
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from fedgrad.codec import ChunkCursor, Layout, decode_floats
from fedgrad.errors import InvalidArgument

__all__ = ["Accumulator", "StagedUpload"]

# Products n * g stay exact in float64 while n < 2**29 (24-bit float32 mantissa + 29 <= 53).
MAX_EXACT_WEIGHT = 1 << 29


def _all_finite(values: np.ndarray) -> bool:
    # isfinite().all() measured ~15x faster than a float64 sum over a 1 MiB chunk.
    return bool(np.isfinite(values).all())


@dataclass
class StagedUpload:
    """The validated chunks of one upload in flight."""

    layout: Layout
    chunk_bytes: int
    chunks: list[tuple[int, bytes, int, int]] = field(default_factory=list)
    cursor: ChunkCursor = field(init=False)

    def __post_init__(self) -> None:
        self.cursor = ChunkCursor(self.layout, self.chunk_bytes)

    def add(
        self, tensor: int, offset: int, raw: bytes, start: int = 0, length: int | None = None
    ) -> None:
        """Validate and stage the next chunk, whose data is ``raw[start:start+length]``.

        Raises:
            InvalidArgument: the chunk is out of order, misaligned, oversized or not finite.
        """
        length = len(raw) - start if length is None else length
        position = self.cursor.check(tensor, offset, length)
        for run, run_offset, nbytes in self.layout.run_segments(position, length):
            at = start + run.start + run_offset - position
            if not _all_finite(decode_floats(raw, at, nbytes, run.dtype)):
                first = self.layout.locate(run.start + run_offset)[0]
                raise InvalidArgument(
                    f"non-finite value (NaN or Inf) in the chunk at flat byte {position}"
                    f" (tensor {first}, {self.layout.specs[first].name!r} or after)"
                )
        # Move the cursor only now: a refused chunk must not count as received.
        self.cursor.position = position + length
        self.chunks.append((position, raw, start, length))

    @property
    def nbytes(self) -> int:
        return self.cursor.position

    def complete(self) -> None:
        """Raise InvalidArgument unless every byte of the flat stream arrived."""
        if not self.cursor.complete:
            raise InvalidArgument(
                f"upload ended after {self.cursor.position} of {self.layout.total} bytes"
            )


class Accumulator:
    """A running sum of weighted gradients over one flat stream (float64 by default).

    ``dtype=np.float32`` halves the memory; its sums then depend on arrival order
    in the last bits, and weights above 2**24 are no longer exact.
    """

    def __init__(self, layout: Layout, workers: int = 1, dtype: type = np.float64) -> None:
        self.layout = layout
        self.workers = max(1, workers)
        self._executor: ThreadPoolExecutor | None = None
        self.total: np.ndarray = np.zeros(layout.numel, dtype=dtype)
        self.weight = 0.0
        self.count = 0
        self._first_elements = [0] * len(layout.specs)
        for i in range(1, len(layout.specs)):
            self._first_elements[i] = self._first_elements[i - 1] + layout.specs[i - 1].numel

    def reset(self) -> None:
        """Forget every committed upload (start a new round).

        No fill: a complete upload covers every element, so the round's first commit
        overwrites the old totals (saves a pass over the 2x-model-size buffer per round).
        """
        self.weight = 0.0
        self.count = 0

    def commit(self, staged: StagedUpload, weight: int) -> None:
        """Add a complete upload times ``weight``. Not thread-safe: one commit at a time.

        Chunks cover disjoint elements, so they are split between worker threads
        (numpy releases the GIL); the sum per element is the same whatever the split.
        """
        staged.complete()
        if not 1 <= weight < MAX_EXACT_WEIGHT:
            raise InvalidArgument(f"weight {weight} is outside [1, {MAX_EXACT_WEIGHT})")
        chunks, overwrite = staged.chunks, self.count == 0
        if self.workers > 1 and len(chunks) >= 2 * self.workers:
            parts = [chunks[i :: self.workers] for i in range(self.workers)]
            for future in [
                self._pool().submit(self._add_chunks, staged.layout, p, weight, overwrite)
                for p in parts
            ]:
                future.result()
        else:
            self._add_chunks(staged.layout, chunks, weight, overwrite)
        self.weight += weight
        self.count += 1

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="fedgrad-reduce")
        return self._executor

    def close(self) -> None:
        """Stop the worker threads."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def _add_chunks(
        self,
        layout: Layout,
        chunks: list[tuple[int, bytes, int, int]],
        weight: int,
        overwrite: bool,
    ) -> None:
        dtype = self.total.dtype
        scratch = np.empty(0, dtype=dtype)
        for position, raw, start, length in chunks:
            for run, run_offset, nbytes in layout.run_segments(position, length):
                at = start + run.start + run_offset - position
                values = decode_floats(raw, at, nbytes, run.dtype)
                first = run.first_element + run_offset // run.itemsize
                target = self.total[first : first + values.size]
                if overwrite:  # exact: n * g of a float32/16 g and n < 2**29 fits float64
                    np.multiply(values, weight, out=target, dtype=dtype)
                    continue
                if weight == 1:
                    np.add(target, values, out=target)
                    continue
                if scratch.size < values.size:
                    scratch = np.empty(values.size, dtype=dtype)
                scaled = scratch[: values.size]
                np.multiply(values, weight, out=scaled, dtype=dtype)
                np.add(target, scaled, out=target)

    def _totals(self) -> torch.Tensor:
        if self.count == 0:
            self.total.fill(0.0)  # nothing committed since the last reset
        return torch.from_numpy(self.total)

    def result(self, divisor: float) -> Iterator[torch.Tensor]:
        """Yield total / divisor per manifest entry, one tensor at a time."""
        flat = self._totals()
        for spec, element in zip(self.layout.specs, self._first_elements, strict=True):
            yield (flat[element : element + spec.numel] / divisor).reshape(spec.shape)

    def result_into(
        self, outputs: list[torch.Tensor], divisor: float, indices: list[int] | None = None
    ) -> None:
        """Write total / divisor into ``outputs`` (any float dtype).

        ``outputs[k]`` receives manifest entry ``indices[k]`` (every entry, in order, if None).
        """
        flat = self._totals()
        wanted = range(len(self.layout.specs)) if indices is None else indices
        for i, out in zip(wanted, outputs, strict=True):
            spec, element = self.layout.specs[i], self._first_elements[i]
            torch.div(flat[element : element + spec.numel].view(spec.shape), divisor, out=out)
