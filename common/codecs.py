"""Upload codecs: how a node's update is laid out as payload bytes, and read back.

The codec seam sits between the wire and the reducer (``docs/architecture.md``).
The upload header declares the codec by name (``UploadHeader.codec``, with its
parameters after a colon, as in ``topk:0.01``); the codec then defines the
payload's geometry (a ``Layout`` whose chunks the aggregator checks in order),
validates every chunk, and decodes chunks into float values per element of the
model for the reducer. The payload's length is the codec's, declared in the
header (``UploadHeader.payload_bytes``), not the manifest's: a codec may send
fewer bytes than the model has (int8 with scales, top-k indices and values).

Here: ``identity`` (each tensor in its manifest dtype) and the dtype casts
``float16``, ``bfloat16``, ``float32`` and ``float64`` (every tensor in that
dtype; the node rounds to nearest even, the aggregator widens exactly). A new codec is one class and one
registry line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

from fedgrad.codec import Layout, TensorSpec, byte_view, decode_floats
from fedgrad.errors import InvalidArgument

__all__ = ["CODECS", "CastCodec", "Codec", "codec_for", "codec_names"]


class Codec(Protocol):
    """One upload encoding for one manifest."""

    #: The name the header carries (with parameters, e.g. ``topk:0.01``).
    name: str
    #: Geometry of the payload: the chunks' (tensor, offset) address this layout.
    layout: Layout

    def check(self, position: int, raw: bytes, start: int, length: int) -> None:
        """Validate payload bytes ``raw[start:start+length]`` at flat ``position``.

        Raises:
            InvalidArgument: the bytes can never decode (non-finite value, bad index, ...).
        """
        ...

    def decode(
        self, position: int, raw: bytes, start: int, length: int
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first model element, values) for validated payload bytes at ``position``."""
        ...

    def encode(self, tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """Return the payload of ``tensors`` as byte views, one per payload tensor."""
        ...


def _all_finite(values: np.ndarray) -> bool:
    # isfinite().all() measured ~15x faster than a float64 sum over a 1 MiB chunk.
    return bool(np.isfinite(values).all())


class CastCodec:
    """Each tensor's raw little-endian bytes, in its own dtype or one wire dtype for all."""

    def __init__(self, specs: Sequence[TensorSpec], wire_dtype: torch.dtype | None = None) -> None:
        self.name = "identity" if wire_dtype is None else str(wire_dtype).removeprefix("torch.")
        self.wire_dtype = wire_dtype
        self.layout = Layout(specs, wire_dtype)

    def check(self, position: int, raw: bytes, start: int, length: int) -> None:
        for run, run_offset, nbytes in self.layout.run_segments(position, length):
            at = start + run.start + run_offset - position
            values = decode_floats(raw, at, nbytes, run.dtype)
            if not _all_finite(values):
                bad = int(np.argmin(np.isfinite(values)))  # the error path only: find it
                tensor, offset = self.layout.locate(run.start + run_offset + bad * run.itemsize)
                raise InvalidArgument(
                    f"non-finite value (NaN or Inf) at element {offset // run.itemsize} of"
                    f" tensor {tensor} ({self.layout.specs[tensor].name!r}), in the chunk at"
                    f" flat byte {position}"
                )

    def decode(
        self, position: int, raw: bytes, start: int, length: int
    ) -> Iterator[tuple[int, np.ndarray]]:
        # One segment per dtype run, not per tensor: thousands of small tensors of one
        # dtype decode as one array (the per-tensor cost the benchmark measures).
        for run, run_offset, nbytes in self.layout.run_segments(position, length):
            at = start + run.start + run_offset - position
            yield (
                run.first_element + run_offset // run.itemsize,
                decode_floats(raw, at, nbytes, run.dtype),
            )

    def encode(self, tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
        cast = [
            t.detach().to(device="cpu", dtype=self.wire_dtype or t.dtype).contiguous()
            for t in tensors
        ]
        return [byte_view(t) for t in cast]


def _cast(dtype: torch.dtype | None) -> Callable[[Sequence[TensorSpec], str], Codec]:
    def factory(specs: Sequence[TensorSpec], params: str) -> Codec:
        if params:
            raise InvalidArgument(
                f"codec {dtype or 'identity'} takes no parameters, got {params!r}"
            )
        return CastCodec(specs, dtype)

    return factory


#: Codec name -> factory(manifest specs, parameter text after the colon or "").
CODECS: dict[str, Callable[[Sequence[TensorSpec], str], Codec]] = {
    "identity": _cast(None),
    "float16": _cast(torch.float16),
    "bfloat16": _cast(torch.bfloat16),
    "float32": _cast(torch.float32),
    "float64": _cast(torch.float64),
}


def codec_names() -> tuple[str, ...]:
    """Return the names of the registered codecs."""
    return tuple(CODECS)


def codec_for(declared: str, specs: Sequence[TensorSpec]) -> Codec:
    """Return the codec a header declares (``""`` means ``identity``) for a manifest.

    Raises:
        InvalidArgument: unknown codec, or parameters it does not take.
    """
    name, _, params = (declared or "identity").partition(":")
    factory = CODECS.get(name)
    if factory is None:
        raise InvalidArgument(
            f"unknown codec {declared!r} in the upload header (known: {', '.join(CODECS)})"
        )
    return factory(specs, params)
