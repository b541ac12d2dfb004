"""Reading a parameter stream into tensors' bytes (one aggregator's, or one shard's)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from fedgrad.codec import ChunkCursor, Layout, write_chunk
from fedgrad.errors import TaskError
from fedgrad.framing import ChunkView, decode_chunk
from fedgrad.proto import fedgrad_pb2 as pb

__all__ = ["read_header", "receive_chunks"]


def read_header(stream: Iterator[bytes], who: str = "aggregator") -> pb.ParameterHeader:
    """Return the stream's first message, which must be its ParameterHeader."""
    first = pb.ParameterMessage.FromString(next(stream))
    if first.WhichOneof("kind") != "header":
        raise TaskError(f"{who} sent a chunk before the ParameterHeader")
    return first.header


def receive_chunks(
    stream: Iterator[bytes], layout: Layout, views: list[Any], chunk_bytes: int, who: str
) -> None:
    """Write the chunks after the header into ``views`` (byte views laid out as ``layout``).

    Raises:
        TaskError: the stream ended before the last byte.
        InvalidArgument: a chunk out of place (``ChunkCursor``).
    """
    cursor = ChunkCursor(layout, max(chunk_bytes, 1))
    with torch.no_grad():
        for raw in stream:
            view = decode_chunk(raw)
            if view is None:
                c = pb.ParameterMessage.FromString(raw).chunk
                view = ChunkView(c.data, c.tensor, c.offset, 0, len(c.data))
            start = cursor.advance(view.tensor, view.offset, view.data_len)
            write_chunk(views, layout, start, view.raw, view.data_start, view.data_len)
    if not cursor.complete:
        raise TaskError(f"{who} ended after {cursor.position} of {layout.total} bytes")
