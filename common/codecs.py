"""Upload codecs: how a node's update is laid out as payload bytes, and read back.

The codec seam sits between the wire and the reducer (``docs/architecture.md``).
The upload header declares the codec by name (``UploadHeader.codec``, with its
parameters after a colon, as in ``topk:0.01``); the codec then defines the
payload's geometry (a ``Layout`` whose chunks the aggregator checks in order),
validates every chunk, and decodes chunks into float values per element of the
model for the reducer. The payload's length is the codec's, derived from the
manifest and the declared parameters alone (``UploadHeader.payload_bytes``
repeats it): a codec may send fewer bytes than the model has.

The codecs (byte layouts in ``docs/protocol.md``, "Codecs"):

* ``identity`` and the dtype casts ``float16``, ``bfloat16``, ``float32``, ``float64``;
* ``int8[:BLOCK]``: blocks of BLOCK values, each a float32 scale and BLOCK int8s;
* ``topk:FRACTION[,DTYPE]``: the largest ``ceil(FRACTION * numel)`` entries of each
  tensor as (uint32 index, value) pairs, indices strictly increasing (a *sparse* codec:
  it decodes to (element indices, values), not to a dense run);
* ``powersgd:RANK[,DTYPE]``: factors P (m x r) and Q (n x r) of each matrix-shaped
  tensor where they are smaller than it, decoded as P Q^T; other tensors as they are.

A chunk's ``check`` runs as it arrives, before anything counts; a codec whose rule
spans chunks (top-k's increasing indices, PowerSGD's factor bound) carries what it
needs from one chunk to the next of the same upload (``carry``). A new codec is one
class and one registry line. The casts and the registry are here, int8, top-k and
PowerSGD in ``fedgrad.lossy``, the ``Codec`` protocol and the shared checks in
``fedgrad.codec_base``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from fedgrad.codec import Layout, TensorSpec, byte_view, decode_floats
from fedgrad.codec_base import Chunk, Codec, all_finite, check_range, dtype_limit, located
from fedgrad.errors import ConfigError, InvalidArgument
from fedgrad.lossy import Int8Codec, PowerSGDCodec, TopKCodec
from fedgrad.parsing import CodecSpec, parse_codec

__all__ = [
    "CODECS",
    "CastCodec",
    "Chunk",
    "Codec",
    "Int8Codec",
    "PowerSGDCodec",
    "TopKCodec",
    "codec_for",
    "codec_names",
    "decode_dense",
]


class CastCodec:
    """Each tensor's raw little-endian bytes, in its own dtype or one wire dtype for all."""

    sparse = False
    splittable = True

    def __init__(self, specs: Sequence[TensorSpec], wire_dtype: torch.dtype | None = None) -> None:
        self.name = "identity" if wire_dtype is None else str(wire_dtype).removeprefix("torch.")
        self.wire_dtype = wire_dtype
        self.layout = Layout(specs, wire_dtype)
        # A wire dtype wider than some tensor's (float32 for a float16 model) can carry
        # finite values that tensor cannot hold: those tensors' values are range-checked.
        self.narrow = wire_dtype is not None and any(
            dtype_limit(s.dtype) < dtype_limit(wire_dtype) for s in self.layout.specs
        )

    def check(self, position: int, raw: bytes, start: int, length: int, carry: Any = None) -> Any:
        if self.narrow:
            layout = self.layout
            for tensor, offset, nbytes in layout.tensor_segments(position, length):
                at = start + layout.starts[tensor] + offset - position
                values = decode_floats(raw, at, nbytes, layout.dtypes[tensor])
                check_range(self, tensor, values, offset // layout.itemsizes[tensor], position)
        for run, run_offset, nbytes in self.layout.run_segments(position, length):
            at = start + run.start + run_offset - position
            values = decode_floats(raw, at, nbytes, run.dtype)
            if not all_finite(values):
                bad = int(np.argmin(np.isfinite(values)))  # the error path only: find it
                tensor, offset = self.layout.locate(run.start + run_offset + bad * run.itemsize)
                raise InvalidArgument(
                    "non-finite value (NaN or Inf) at "
                    + located(self, tensor, offset // run.itemsize, position)
                )
        return None

    def decode(self, chunks: Sequence[Chunk]) -> Iterator[tuple[Any, np.ndarray]]:
        # One segment per dtype run, not per tensor: thousands of small tensors of one
        # dtype decode as one array (the per-tensor cost the benchmark measures).
        for position, raw, start, length in chunks:
            for run, run_offset, nbytes in self.layout.run_segments(position, length):
                at = start + run.start + run_offset - position
                yield (
                    run.first_element + run_offset // run.itemsize,
                    decode_floats(raw, at, nbytes, run.dtype),
                )

    def encode(
        self, tensors: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> list[np.ndarray]:
        cast = [
            t.detach().to(device="cpu", dtype=self.wire_dtype or t.dtype).contiguous()
            for t in tensors
        ]
        return [byte_view(t) for t in cast]


def _cast(dtype: torch.dtype | None) -> Callable[[Sequence[TensorSpec], CodecSpec, bool], Codec]:
    def factory(specs: Sequence[TensorSpec], spec: CodecSpec, stochastic: bool) -> Codec:
        return CastCodec(specs, dtype)

    return factory


#: Codec name -> factory(manifest specs, parsed spec, stochastic rounding on the node).
CODECS: dict[str, Callable[[Sequence[TensorSpec], CodecSpec, bool], Codec]] = {
    "identity": _cast(None),
    "float16": _cast(torch.float16),
    "bfloat16": _cast(torch.bfloat16),
    "float32": _cast(torch.float32),
    "float64": _cast(torch.float64),
    "int8": Int8Codec,
    "topk": lambda specs, spec, stochastic: TopKCodec(specs, spec),
    "powersgd": lambda specs, spec, stochastic: PowerSGDCodec(specs, spec),
}


def codec_names() -> tuple[str, ...]:
    """Return the names of the registered codecs."""
    return tuple(CODECS)


def codec_for(declared: str, specs: Sequence[TensorSpec], *, stochastic: bool = False) -> Codec:
    """Return the codec a header declares (``""`` means ``identity``) for a manifest.

    ``stochastic`` (the node's ``--rounding stochastic``) changes how int8 rounds, not
    what its bytes mean.

    Raises:
        InvalidArgument: unknown codec, or parameters it does not take.
    """
    try:
        spec = parse_codec(declared or "identity")
    except ConfigError as e:
        raise InvalidArgument(f"{e} in the upload header") from None
    return CODECS[spec.name](specs, spec, stochastic)


def decode_dense(codec: Codec, views: Sequence[np.ndarray]) -> np.ndarray:
    """Return what the aggregator decodes from ``codec.encode``'s views, per element.

    The node's error feedback keeps the difference between what it meant to send and
    this, so both sides agree on what was sent to the last bit.
    """
    payload = b"".join(v.data for v in views)
    dtype = np.float64 if any(s.dtype == torch.float64 for s in codec.layout.specs) else np.float32
    dense = np.zeros(codec.layout.numel, dtype)
    for where, values in codec.decode([(0, payload, 0, len(payload))]):
        if codec.sparse:
            dense[where] = values
        else:
            dense[where : where + values.size] = values
    return dense
