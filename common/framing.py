"""Hand-framed chunk messages: one copy to encode, none to decode.

``GradientMessage`` and ``ParameterMessage`` carry a ``Chunk`` in field 2, so
a chunk message is ``0x12 len(Chunk) [0x08 tensor] [0x10 offset] 0x1a len(data) data``
in protobuf's wire format. Encoding it by hand joins the header and the tensor
bytes once (protobuf would copy twice: into a bytes field, then into the
message); decoding it by hand leaves ``data`` in place inside the received
bytes, so ``numpy.frombuffer`` reads the tensor values with no copy at all.
Anything other than this exact shape (the header message, unknown fields,
repeated fields) falls back to the generated protobuf parser, so every valid
encoding is still accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["ChunkView", "chunk_message_size", "decode_chunk", "encode_chunk"]

_CHUNK_FIELD = 0x12  # field 2, length-delimited
_TENSOR, _OFFSET, _DATA = 0x08, 0x10, 0x1A


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(raw: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated or overlong varint")


def chunk_message_size(tensor: int, offset: int, size: int) -> int:
    """Return ``len(encode_chunk(tensor, offset, pieces))`` for ``size`` data bytes."""
    body = 3 + len(_varint(tensor)) + len(_varint(offset)) + len(_varint(size)) + size
    return 1 + len(_varint(body)) + body


def encode_chunk(tensor: int, offset: int, pieces: Sequence[Any]) -> bytes:
    """Return a serialized chunk message whose data is the concatenation of ``pieces``.

    Args:
        tensor, offset: where the data begins (see ``Chunk`` in the .proto).
        pieces: buffers (bytes, memoryview, uint8 numpy views) joined in order.
    """
    size = sum(len(p) for p in pieces)
    body = (
        bytes((_TENSOR,))
        + _varint(tensor)
        + bytes((_OFFSET,))
        + _varint(offset)
        + bytes((_DATA,))
        + _varint(size)
    )
    head = bytes((_CHUNK_FIELD,)) + _varint(len(body) + size) + body
    return b"".join(
        [head, *(p.data if hasattr(p, "data") and not isinstance(p, bytes) else p for p in pieces)]
    )


class ChunkView:
    """A decoded chunk whose data stays inside the received message bytes."""

    __slots__ = ("data_len", "data_start", "offset", "raw", "tensor")

    def __init__(
        self, raw: bytes, tensor: int, offset: int, data_start: int, data_len: int
    ) -> None:
        self.raw, self.tensor, self.offset = raw, tensor, offset
        self.data_start, self.data_len = data_start, data_len


def decode_chunk(raw: bytes) -> ChunkView | None:
    """Decode a chunk message in its canonical shape, or return None to fall back to protobuf."""
    end = len(raw)
    if end < 2 or raw[0] != _CHUNK_FIELD:
        return None
    try:
        length, pos = _read_varint(raw, 1, end)
        if pos + length != end:
            return None
        tensor = offset = 0
        data: tuple[int, int] | None = None
        seen: set[int] = set()
        while pos < end:
            tag = raw[pos]
            if tag in seen:
                return None
            seen.add(tag)
            pos += 1
            if tag == _TENSOR:
                tensor, pos = _read_varint(raw, pos, end)
            elif tag == _OFFSET:
                offset, pos = _read_varint(raw, pos, end)
            elif tag == _DATA:
                size, pos = _read_varint(raw, pos, end)
                if pos + size > end:
                    return None
                data = (pos, size)
                pos += size
            else:
                return None
    except ValueError:
        return None
    if data is None or tensor >= 1 << 32:
        return None
    return ChunkView(raw, tensor, offset, data[0], data[1])
