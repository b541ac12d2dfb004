"""Uploads in flight: their header and their validated chunks, nothing counted yet.

An upload is staged chunk by chunk, each chunk checked for position (in order,
element-aligned, within the declared payload) and content (by its codec) as it
arrives. Only a complete upload can be counted, so a failed or cancelled upload
leaves no trace. The staged chunks are the received message bytes themselves:
chunk data is read in place (``fedgrad.framing``), never copied; or, for an upload a
shard holds past its memory share (``StagedUpload.spill``), chunk data written to an
unlinked temporary file as it arrives and read back one chunk at a time by the add.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedgrad.codec import ChunkCursor
from fedgrad.codecs import Codec
from fedgrad.errors import InvalidArgument, ResourceExhausted

__all__ = ["SpilledChunks", "StagedUpload", "UploadTicket", "check_metrics"]

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


class SpilledChunks(Sequence[tuple[int, bytes, int, int]]):
    """The chunks of one upload in an unlinked temporary file (gone with the process too).

    A drop-in for the list of ``(position, raw, start, length)`` chunks: ``append``
    writes the chunk's data and keeps its place; reading chunk ``i`` reads its data back
    (``os.pread``), so what the process holds is the chunk being added, not the upload.
    """

    def __init__(self, directory: str | None) -> None:
        self.directory = directory or tempfile.gettempdir()
        try:
            self._file = tempfile.TemporaryFile(dir=self.directory, prefix="fedgrad-part-")
        except OSError as exc:
            raise ResourceExhausted(
                f"cannot stage an upload in {self.directory} ({exc.strerror}): set --spill-dir"
                f" to a writable folder"
            ) from None
        self._places: list[tuple[int, int, int]] = []  # (position, file offset, length)
        self._forgotten: set[int] = set()
        self._end = 0

    def append(self, chunk: tuple[int, bytes, int, int]) -> None:
        position, raw, start, length = chunk
        view = memoryview(raw)[start : start + length]
        fd, at = self._file.fileno(), self._end
        try:
            while view:  # pwrite at the end of what was kept: a failed write leaves no trace
                written = os.pwrite(fd, view, at)
                view, at = view[written:], at + written
        except OSError as exc:
            raise ResourceExhausted(
                f"cannot stage an upload in {self.directory} ({exc.strerror}): free space"
                f" there or set --spill-dir; retry later"
            ) from None
        self._places.append((position, self._end, length))
        self._end = at

    def __len__(self) -> int:
        return len(self._places)

    def __getitem__(self, index: int) -> tuple[int, bytes, int, int]:  # type: ignore[override]
        if index in self._forgotten:
            raise IndexError(f"chunk {index} was added and let go")
        position, offset, length = self._places[index]
        data = os.pread(self._file.fileno(), length, offset)
        if len(data) != length:
            raise OSError(f"spill file ended after {len(data)} of {length} bytes")
        return position, data, 0, length

    def __iter__(self) -> Iterator[tuple[int, bytes, int, int]]:
        return (self[i] for i in range(len(self._places)))

    def forget(self, index: int) -> int:
        """Mark chunk ``index`` added; return its length, 0 if it already was."""
        if index in self._forgotten:
            return 0
        self._forgotten.add(index)
        return self._places[index][2]

    @property
    def file_bytes(self) -> int:
        return self._end

    def close(self) -> None:
        self._file.close()


@dataclass
class StagedUpload:
    """The validated chunks of one upload in flight."""

    codec: Codec
    chunk_bytes: int
    chunks: list[tuple[int, bytes, int, int]] | SpilledChunks = field(default_factory=list)
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
        self.chunks.append((position, raw, start, length))
        # Move the cursor only now: a refused chunk must not count as received.
        self.cursor.position = position + length
        self.carry = carry

    def spill(self, directory: str | None) -> None:
        """Keep this upload's chunk data in a temporary file under ``directory`` (None:
        the system's temp dir) instead of memory; call before its first chunk."""
        assert not self.chunks, "spill before the first chunk"
        self.chunks = SpilledChunks(directory)

    @property
    def spilled(self) -> bool:
        return isinstance(self.chunks, SpilledChunks)

    def discard(self) -> None:
        """Let the chunks go now (the spill file is deleted); the upload is done with.

        A spilled upload stays ``spilled`` (its file closed): counts of the uploads held
        in memory read that flag after the upload is let go.
        """
        if isinstance(self.chunks, SpilledChunks):
            self.chunks.close()
        else:
            self.chunks = []

    def consume(self, index: int) -> None:
        """Let chunk ``index`` go: the reducer has added it (and reads it no more)."""
        if self.on_consumed is None:
            return
        if isinstance(self.chunks, SpilledChunks):
            length = self.chunks.forget(index)
        else:
            chunk = self.chunks[index]
            if chunk is None:
                return
            self.chunks[index] = None  # type: ignore[call-overload]
            length = chunk[3]
        if length:
            self.on_consumed(length)

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
