"""The lossy upload codecs: ``int8``, ``topk`` (sparse) and ``powersgd`` (factored).

Their byte layouts are in ``docs/protocol.md`` ("Codecs"); each class's docstring says
what the aggregator refuses. Registered in ``fedgrad.codecs.CODECS``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedgrad.codec import Layout, TensorSpec, byte_view, decode_floats
from fedgrad.codec_base import DTYPES, Chunk, all_finite, check_range, dtype_limit, located
from fedgrad.errors import InvalidArgument
from fedgrad.parsing import CodecSpec

__all__ = ["Int8Codec", "PowerSGDCodec", "TopKCodec"]


class Int8Codec:
    """``int8[:BLOCK]``: per tensor, blocks of BLOCK values (the last may be shorter), each
    a little-endian float32 scale followed by its values as int8; a value is q * scale.

    The node takes scale = max|x| / 127 over the block and q = x / scale rounded to
    nearest (or stochastically), clamped to [-127, 127]. The aggregator refuses a scale
    that is not finite or above float32's max / 127 (q * scale would overflow).
    """

    sparse = False
    splittable = True

    def __init__(self, specs: Sequence[TensorSpec], spec: CodecSpec, stochastic: bool) -> None:
        self.name, self.block, self.stochastic = spec.text, spec.block, stochastic
        self.unit = 4 + self.block
        frames = [(s.numel + 4 * _blocks(s.numel, self.block), self.unit) for s in specs]
        self.layout = Layout(specs, frames=frames)

    def _segments(
        self, position: int, raw: bytes, start: int, length: int
    ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """Yield (tensor, first block, scales (blocks,), q (blocks, B) or tail) per segment."""
        layout = self.layout
        for tensor, offset, nbytes in layout.tensor_segments(position, length):
            at = start + layout.starts[tensor] + offset - position
            whole, tail = divmod(nbytes, self.unit)
            first_block = offset // self.unit
            if whole:
                grid = np.frombuffer(raw, np.uint8, whole * self.unit, at).reshape(whole, -1)
                yield tensor, first_block, grid[:, :4].copy().view(np.float32)[:, 0], grid[:, 4:]
            if tail:
                rest = np.frombuffer(raw, np.uint8, tail, at + whole * self.unit)
                yield tensor, first_block + whole, rest[:4].copy().view(np.float32), rest[4:][None]

    def check(self, position: int, raw: bytes, start: int, length: int, carry: Any = None) -> Any:
        for tensor, first_block, scales, _q in self._segments(position, raw, start, length):
            # |q| <= 128 (int8 holds -128): 128 |scale| must fit the tensor's dtype, in float64.
            limit = dtype_limit(self.layout.specs[tensor].dtype)
            with np.errstate(invalid="ignore"):  # a signalling NaN's cast is refused below
                wide = np.abs(scales.astype(np.float64))
            good = np.isfinite(wide) & (wide * 128 <= limit)
            if not good.all():
                block = first_block + int(np.argmin(good))
                raise InvalidArgument(
                    f"int8 scale {float(scales[block - first_block])!r} of block {block} is not"
                    f" finite or so large that q * scale overflows the tensor's dtype (128 x"
                    f" scale must be at most {limit:.6g}), at "
                    + located(self, tensor, block * self.block, position)
                )
        return None

    def decode(self, chunks: Sequence[Chunk]) -> Iterator[tuple[Any, np.ndarray]]:
        firsts = self.layout.first_elements
        for position, raw, start, length in chunks:
            for tensor, first_block, scales, q in self._segments(position, raw, start, length):
                values = q.view(np.int8) * scales[:, None]  # float32, exact products
                yield firsts[tensor] + first_block * self.block, values.reshape(-1)

    def encode(
        self, tensors: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> list[np.ndarray]:
        return [self._encode(t, generator) for t in tensors]

    def _encode(self, t: torch.Tensor, generator: torch.Generator | None) -> np.ndarray:
        flat = t.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
        n, b = flat.numel(), self.block
        blocks = _blocks(n, b)
        grid = torch.zeros(blocks * b, dtype=torch.float32)
        grid[:n] = flat
        grid = grid.view(blocks, b)
        scale = grid.abs().amax(dim=1) / 127
        scaled = grid / torch.where(scale > 0, scale, 1.0)[:, None]
        if self.stochastic:
            noise = torch.rand(scaled.shape, generator=generator, dtype=torch.float32)
            q = torch.floor(scaled + noise)
        else:
            q = torch.round(scaled)  # half to even
        q = q.clamp_(-127, 127).to(torch.int8)
        out = np.empty((blocks, 4 + b), np.uint8)
        out[:, :4] = scale.numpy().view(np.uint8).reshape(blocks, 4)
        out[:, 4:] = q.numpy().view(np.uint8)
        return out.reshape(-1)[: n + 4 * blocks]


def _blocks(numel: int, block: int) -> int:
    return -(-numel // block)


class TopKCodec:
    """``topk:FRACTION[,DTYPE]``: per tensor, k = min(numel, ceil(numel * FRACTION)) pairs
    (uint32 index into the flattened tensor, value in DTYPE or the tensor's dtype), little-
    endian, interleaved, indices strictly increasing. Elements not sent are zero.
    """

    sparse = True
    splittable = True

    def __init__(self, specs: Sequence[TensorSpec], spec: CodecSpec) -> None:
        assert spec.fraction is not None
        self.name, self.fraction = spec.text, spec.fraction
        self.values = [DTYPES[spec.values] if spec.values else s.dtype for s in specs]
        for s in specs:
            if s.numel > 1 << 32:
                raise InvalidArgument(
                    f"topk indexes tensors with uint32: {s.name!r} has {s.numel} elements"
                )
        self.ks = [min(s.numel, math.ceil(s.numel * self.fraction)) for s in specs]
        self.units = [4 + d.itemsize for d in self.values]
        self.pairs = [_pair_dtype(d) for d in self.values]
        frames = [(k * unit, unit) for k, unit in zip(self.ks, self.units, strict=True)]
        self.layout = Layout(specs, frames=frames)

    def _segments(
        self, position: int, raw: bytes, start: int, length: int
    ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """Yield (tensor, first pair, indices, values widened) of each tensor segment."""
        layout = self.layout
        for tensor, offset, nbytes in layout.tensor_segments(position, length):
            at = start + layout.starts[tensor] + offset - position
            unit = self.units[tensor]
            pairs = np.frombuffer(raw, self.pairs[tensor], nbytes // unit, at)
            values = pairs["v"]
            if self.values[tensor] == torch.bfloat16:
                values = (values.astype(np.uint32) << 16).view(np.float32)
            yield tensor, offset // unit, pairs["i"], values

    def check(self, position: int, raw: bytes, start: int, length: int, carry: Any = None) -> Any:
        for tensor, first, index, values in self._segments(position, raw, start, length):
            numel = self.layout.specs[tensor].numel
            before = carry[1] if carry is not None and carry[0] == tensor else -1
            if first > 0 and before < 0:  # the tensor's earlier pairs came in an earlier chunk
                raise InvalidArgument(f"topk pairs of tensor {tensor} arrived out of order")
            wide = index.astype(np.int64)
            steps = np.diff(wide, prepend=before)
            if not (steps > 0).all():
                bad = int(np.argmin(steps > 0))
                raise InvalidArgument(
                    f"topk index {int(wide[bad])} of pair {first + bad} does not increase"
                    f" strictly (after {int(wide[bad - 1]) if bad else before}) in tensor"
                    f" {tensor} ({self.layout.specs[tensor].name!r}): indices must be"
                    " unique and sorted"
                )
            if wide[-1] >= numel:
                raise InvalidArgument(
                    f"topk index {int(wide[-1])} is out of range for tensor {tensor}"
                    f" ({self.layout.specs[tensor].name!r}, {numel} elements)"
                )
            if not all_finite(values):
                bad = int(np.argmin(np.isfinite(values)))
                raise InvalidArgument(
                    "non-finite value (NaN or Inf) at "
                    + located(self, tensor, int(wide[bad]), position)
                )
            with np.errstate(invalid="ignore"):
                big = np.abs(values.astype(np.float64)) > dtype_limit(
                    self.layout.specs[tensor].dtype
                )
            if big.any():
                check_range(self, tensor, values[big][:1], int(wide[big][0]), position)
            carry = (tensor, int(wide[-1]))
        return carry

    def decode(self, chunks: Sequence[Chunk]) -> Iterator[tuple[Any, np.ndarray]]:
        firsts = self.layout.first_elements
        for position, raw, start, length in chunks:
            for tensor, _first, index, values in self._segments(position, raw, start, length):
                yield index.astype(np.int64) + firsts[tensor], values

    def encode(
        self, tensors: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> list[np.ndarray]:
        views = []
        for t, k, dtype, pair in zip(tensors, self.ks, self.values, self.pairs, strict=True):
            flat = t.detach().to("cpu").reshape(-1)
            index = torch.sort(_top(flat.abs(), k)).values
            out = np.empty(k, pair)
            out["i"] = index.numpy()
            out["v"] = _raw(flat[index].to(dtype))
            views.append(out.view(np.uint8))
        return views


def _top(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Return the indices of the ``k`` largest of ``magnitude`` (ties: torch.topk's pick).

    A full ``torch.topk`` over millions of elements costs ~75 ms per 2.5M here; a strided
    sample first finds a threshold that about 2k elements pass, and topk runs on those
    (~10 ms). If fewer than k pass, the full topk decides. Deterministic: no randomness.
    """
    n = magnitude.numel()
    if k >= n:
        return torch.arange(n)
    if 16 * k >= n or n < 1 << 16:
        return torch.topk(magnitude, k, sorted=False).indices
    stride = max(1, k // 64)  # a sample with ~64 x n / k elements, ~128 of them above
    sample = magnitude[::stride]
    take = max(1, -(-2 * k * sample.numel() // n))
    threshold = torch.topk(sample, take, sorted=False).values.min()
    candidates = torch.from_numpy(np.flatnonzero((magnitude >= threshold).numpy()))
    if candidates.numel() < k:
        return torch.topk(magnitude, k, sorted=False).indices
    return candidates[torch.topk(magnitude[candidates], k, sorted=False).indices]


def _pair_dtype(dtype: torch.dtype) -> np.dtype:
    value = {2: "<u2", 4: "<f4", 8: "<f8"}[dtype.itemsize]
    if dtype == torch.float16:
        value = "<f2"
    return np.dtype([("i", "<u4"), ("v", value)])


def _raw(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as numpy (bfloat16 as its uint16 bits)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


@dataclass(frozen=True)
class _Factored:
    """A tensor PowerSGD sends as factors: an m x n matrix of rank r."""

    m: int
    n: int
    r: int


class PowerSGDCodec:
    """``powersgd:RANK[,DTYPE]``: a tensor of two or more dimensions, seen as the m x n
    matrix (m = shape[0]), with (m + n) * RANK < m * n, is sent as P (m x RANK) then Q
    (n x RANK), row-major, in DTYPE (or its own dtype), and decodes as P Q^T; every other
    tensor is sent as it is, in DTYPE. The aggregator refuses non-finite factors and a
    tensor whose RANK * max|P| * max|Q| exceeds its dtype's range.

    The node keeps Q as the next round's warm start (Vogels et al. 2019): P = M Q,
    orthonormalized, then Q = M^T P, for M the update plus the error-feedback residual.
    """

    sparse = False
    splittable = False  # P Q^T needs both factors of a tensor

    def __init__(self, specs: Sequence[TensorSpec], spec: CodecSpec) -> None:
        self.name, self.rank = spec.text, spec.rank
        self.values = [DTYPES[spec.values] if spec.values else s.dtype for s in specs]
        self.shapes: list[_Factored | None] = []
        for s in specs:
            m = s.shape[0] if len(s.shape) >= 2 else 0
            n = s.numel // m if m else 0
            factored = m and n and (m + n) * self.rank < m * n
            self.shapes.append(_Factored(m, n, self.rank) if factored else None)
        frames = []
        for s, shape, dtype in zip(specs, self.shapes, self.values, strict=True):
            count = s.numel if shape is None else (shape.m + shape.n) * shape.r
            frames.append((count * dtype.itemsize, dtype.itemsize))
        self.layout = Layout(specs, frames=frames)
        #: Node side: each factored tensor's last Q (the warm start).
        self.memory: dict[int, torch.Tensor] = {}

    def check(self, position: int, raw: bytes, start: int, length: int, carry: Any = None) -> Any:
        layout = self.layout
        for tensor, offset, nbytes in layout.tensor_segments(position, length):
            at = start + layout.starts[tensor] + offset - position
            values = decode_floats(raw, at, nbytes, self.values[tensor])
            if not all_finite(values):
                bad = int(np.argmin(np.isfinite(values)))
                raise InvalidArgument(
                    "non-finite factor value (NaN or Inf) at payload element"
                    f" {offset // self.values[tensor].itemsize + bad} of tensor {tensor}"
                    f" ({layout.specs[tensor].name!r}), in the chunk at payload byte {position}"
                )
            shape = self.shapes[tensor]
            if shape is None:
                check_range(self, tensor, values, offset // self.values[tensor].itemsize, position)
            if shape is None or not values.size:
                continue
            # Running max |P| and max |Q| of this tensor (its bytes may span chunks).
            p_end = shape.m * shape.r * self.values[tensor].itemsize
            big_p, big_q = carry[1:] if carry is not None and carry[0] == tensor else (0.0, 0.0)
            split = max(0, min(nbytes, p_end - offset)) // self.values[tensor].itemsize
            big_p = max(big_p, float(np.abs(values[:split]).max(initial=0.0)))
            big_q = max(big_q, float(np.abs(values[split:]).max(initial=0.0)))
            carry = (tensor, big_p, big_q)
            if offset + nbytes == layout.nbytes[tensor]:
                limit = dtype_limit(layout.specs[tensor].dtype)  # P Q^T lands in the tensor's dtype
                if shape.r * big_p * big_q > limit:
                    raise InvalidArgument(
                        f"powersgd factors of tensor {tensor} ({layout.specs[tensor].name!r})"
                        f" are too large: rank {shape.r} x max|P| {big_p:.3g} x max|Q|"
                        f" {big_q:.3g} exceeds {limit:.3g}, P Q^T could overflow"
                    )
        return carry

    def decode(self, chunks: Sequence[Chunk]) -> Iterator[tuple[Any, np.ndarray]]:
        layout, firsts = self.layout, self.layout.first_elements
        pending: dict[int, list[np.ndarray]] = {}
        for position, raw, start, length in chunks:
            for tensor, offset, nbytes in layout.tensor_segments(position, length):
                at = start + layout.starts[tensor] + offset - position
                values = decode_floats(raw, at, nbytes, self.values[tensor])
                shape = self.shapes[tensor]
                if shape is None:
                    yield firsts[tensor] + offset // self.values[tensor].itemsize, values
                    continue
                parts = pending.setdefault(tensor, [])
                parts.append(values)
                if offset + nbytes == layout.nbytes[tensor]:
                    factors = np.concatenate(pending.pop(tensor))
                    if factors.dtype.itemsize < 4:  # float16: no half-precision matmul
                        factors = factors.astype(np.float32)
                    p = factors[: shape.m * shape.r].reshape(shape.m, shape.r)
                    q = factors[shape.m * shape.r :].reshape(shape.n, shape.r)
                    yield firsts[tensor], (p @ q.T).reshape(-1)
        if pending:
            raise InvalidArgument(f"powersgd factors of tensors {sorted(pending)} are incomplete")

    def encode(
        self, tensors: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> list[np.ndarray]:
        views = []
        for i, (t, shape, dtype) in enumerate(zip(tensors, self.shapes, self.values, strict=True)):
            x = t.detach().to("cpu")
            if shape is None:
                views.append(byte_view(x.to(dtype).contiguous()))
                continue
            work = torch.float64 if x.dtype == torch.float64 else torch.float32
            matrix = x.to(work).reshape(shape.m, shape.n)
            q = self.memory.get(i)
            if q is None or q.shape != (shape.n, shape.r):
                q = torch.randn(shape.n, shape.r, generator=generator, dtype=work)
            p = torch.linalg.qr(matrix @ q.to(work)).Q
            q = matrix.T @ p
            self.memory[i] = q
            factors = torch.cat([p.reshape(-1), q.reshape(-1)]).to(dtype)
            views.append(byte_view(factors.contiguous()))
        return views
