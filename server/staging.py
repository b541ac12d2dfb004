"""Uploads in flight: their header and their validated chunks, nothing counted yet.

An upload is staged chunk by chunk, each chunk checked for position (in order,
element-aligned, within the declared payload) and content (by its codec) as it
arrives. Only a complete upload can be counted, so a failed or cancelled upload
leaves no trace. The staged chunks are the received message bytes themselves:
chunk data is read in place (``fedgrad.framing``), never copied.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedgrad.codec import ChunkCursor
from fedgrad.codecs import Codec
from fedgrad.errors import InvalidArgument

__all__ = ["StagedUpload", "UploadTicket", "check_metrics"]

#: Metrics one upload header may carry, and the longest metric name.
MAX_METRICS, MAX_METRIC_NAME = 64, 128


def check_metrics(metrics: dict[str, float]) -> None:
    """Raise InvalidArgument unless the header's metrics are few, named briefly, finite."""
    if len(metrics) > MAX_METRICS:
        raise InvalidArgument(f"{len(metrics)} metrics in the header; at most {MAX_METRICS}")
    for name, value in metrics.items():
        if len(name) > MAX_METRIC_NAME or not math.isfinite(value):
            raise InvalidArgument(
                f"metric {name[:MAX_METRIC_NAME]!r} = {value}: names up to"
                f" {MAX_METRIC_NAME} chars, finite values"
            )


@dataclass
class StagedUpload:
    """The validated chunks of one upload in flight."""

    codec: Codec
    chunk_bytes: int
    chunks: list[tuple[int, bytes, int, int]] = field(default_factory=list)
    cursor: ChunkCursor = field(init=False)
    #: What the codec's check of the last chunk handed on to the next (``Codec.check``).
    carry: object = None
    #: Called, from the reducer's thread, with the payload bytes of each chunk it has
    #: added and let go (``consume``); None: the chunks stay until the upload is dropped.
    on_consumed: Callable[[int], None] | None = None
    #: Payload bytes of its chunks it holds against the intake's staging budget.
    held: int = 0

    def __post_init__(self) -> None:
        self.cursor = ChunkCursor(self.codec.layout, self.chunk_bytes)

    def add(
        self, tensor: int, offset: int, raw: bytes, start: int = 0, length: int | None = None
    ) -> None:
        """Validate and stage the next chunk, whose data is ``raw[start:start+length]``.

        Raises:
            InvalidArgument: out of order, misaligned, oversized, or refused by the codec.
        """
        length = len(raw) - start if length is None else length
        position = self.cursor.check(tensor, offset, length)
        carry = self.codec.check(position, raw, start, length, self.carry)
        # Move the cursor only now: a refused chunk must not count as received.
        self.cursor.position = position + length
        self.carry = carry
        self.chunks.append((position, raw, start, length))

    def consume(self, index: int) -> None:
        """Let chunk ``index`` go: the reducer has added it (and reads it no more)."""
        chunk = self.chunks[index]
        if self.on_consumed is None or chunk is None:
            return
        self.chunks[index] = None  # type: ignore[call-overload]
        self.on_consumed(chunk[3])

    @property
    def nbytes(self) -> int:
        """Payload bytes staged so far."""
        return self.cursor.position

    def complete(self) -> None:
        """Raise InvalidArgument unless every byte of the declared payload arrived."""
        if not self.cursor.complete:
            raise InvalidArgument(
                f"upload ended after {self.cursor.position} of {self.codec.layout.total} bytes"
            )


@dataclass(eq=False)
class UploadTicket:
    """One upload between its header and its end: who, which round, what it weighs."""

    node_id: str
    round: int
    upload_id: str
    weight: int
    metrics: dict[str, float]
    staged: StagedUpload | None  # None for a repeat of an upload already counted
    counted: bool = False  # counted in the round; its add may still be running
    #: The node's buffers after its computation (``fedgrad.buffers.unpack``), if it sent them.
    buffers: list[np.ndarray] | None = None
    #: A relay's pre-weighted partial sum (``UploadHeader.presummed``): added as it is.
    presummed: bool = False
    #: It holds one of the intake's staging slots (given back when its add begins).
    slot: bool = False

    @property
    def duplicate(self) -> bool:
        return self.staged is None
