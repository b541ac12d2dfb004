"""The parameter broadcast: one round's messages, read from the parameters as they are sent.

A ``Snapshot`` holds the serialized header and, per chunk, views of the parameter bytes
it carries; a chunk is encoded when the first stream sends it (one memcpy, ~11 GB/s
here) and shared with the streams reading it about then, so the aggregator keeps no
serialized copy of the model. The reader/writer rule: before the
optimizer writes the parameters the shell calls ``freeze``, which copies the chunks into
bytes only if a stream is still reading them (a straggler, an asynchronous round), and
stops handing this snapshot to new pulls.

With ``--broadcast-dtype``, or parameters that live on a device, the snapshot is
serialized once at publish time (the chunks of a cast or host copy): the optimizer's
master copy is never rounded and never read by a stream.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from fedgrad.codec import Layout, byte_view, dtype_to_proto, iter_chunk_pieces
from fedgrad.framing import chunk_message_size, encode_chunk
from fedgrad.proto import fedgrad_pb2 as pb

__all__ = ["Snapshot", "make_snapshot"]


class Snapshot:
    """The ``ParameterMessage``s of one published round: a header, then chunks."""

    def __init__(
        self,
        round_: int,
        finished: bool,
        header: bytes,
        pieces: list[tuple[int, int, list[np.ndarray]]],
        serialized: bool,
    ) -> None:
        self.round, self.finished = round_, finished
        self._header = header
        self._pieces: list[tuple[int, int, list[np.ndarray]]] | None = pieces
        self._frozen: tuple[bytes, ...] | None = None
        if serialized:
            self._frozen = tuple(encode_chunk(t, o, p) for t, o, p in pieces)
            self._pieces = None
        self.wire_bytes = len(header) + sum(
            chunk_message_size(t, o, sum(len(x) for x in p)) for t, o, p in pieces
        )
        #: Streams that were handed this snapshot and have not finished (loop only).
        self.readers = 0
        self._cache: dict[int, bytes] = {}  # chunk index -> its message, while being read
        self._positions: dict[int, int] = {}  # stream -> the next chunk it reads
        self._tokens = itertools.count()
        self._lock = threading.Lock()

    @classmethod
    def received(cls, round_: int, finished: bool, messages: Sequence[bytes]) -> Snapshot:
        """The messages of a broadcast received from elsewhere, sent on as they are (a relay)."""
        snapshot = cls(round_, finished, messages[0], [], serialized=True)
        snapshot._frozen = tuple(messages[1:])
        snapshot.wire_bytes = sum(len(m) for m in messages)
        return snapshot

    @property
    def serialized(self) -> bool:
        """True once the chunks are bytes of their own (``freeze`` or a cast/device copy)."""
        return self._frozen is not None

    def messages(self) -> Iterator[bytes]:
        """Yield the header, then each chunk (encoded from the parameters, or the frozen bytes).

        A chunk is encoded once for the streams reading it about together: it stays cached
        until every stream now reading is past it (so streams that keep pace share one
        copy, and the cache never exceeds the chunks between the slowest and the fastest).
        """
        yield self._header
        token = next(self._tokens)
        index = 0
        try:
            while True:
                frozen = self._frozen
                if frozen is not None:
                    yield from frozen[index:]
                    return
                pieces = self._pieces
                if pieces is None or index >= len(pieces):
                    return
                data = self._cache.get(index)
                if data is None:
                    tensor, offset, views = pieces[index]
                    data = self._cache[index] = encode_chunk(tensor, offset, views)
                index += 1
                self._positions[token] = index
                self._trim()
                yield data
        finally:
            self._positions.pop(token, None)
            self._trim()

    def _trim(self) -> None:
        """Drop the cached chunks every stream reading now has passed."""
        if not self._positions:
            self._cache.clear()
            return
        low = min(self._positions.values())
        for i in [i for i in self._cache if i < low]:
            del self._cache[i]

    def freeze(self) -> None:
        """Before the parameters change: copy the chunks if a stream is still reading them.

        Called in a worker thread while the loop keeps streaming (the parameters do not
        change until it returns); streams that start after it read the copy.
        """
        with self._lock:
            if self._frozen is None and self._pieces is not None and self.readers:
                self._frozen = tuple(encode_chunk(t, o, p) for t, o, p in self._pieces)
            self._pieces = None  # no new reads of the parameters through this snapshot


def make_snapshot(
    params: Sequence[torch.Tensor],
    layout: Layout,
    chunk_bytes: int,
    round_: int,
    finished: bool,
    session_id: str,
    broadcast_dtype: str | None = None,
    total_rounds: int = 0,
    config: Mapping[str, str] | None = None,
    buffers: bytes = b"",
) -> Snapshot:
    """Describe the broadcast of ``params`` (serialized now only if cast or on a device)."""
    dtype = getattr(torch, broadcast_dtype) if broadcast_dtype else None
    if dtype is not None:
        layout = Layout(layout.specs, dtype)
    header = pb.ParameterMessage(
        header=pb.ParameterHeader(
            round=round_,
            total_bytes=layout.total,
            finished=finished,
            session_id=session_id,
            dtype=dtype_to_proto(dtype) if dtype is not None else pb.DTYPE_UNSPECIFIED,  # type: ignore[arg-type]
            total_rounds=total_rounds,
            config=dict(config or {}),
            buffers=buffers,
        )
    ).SerializeToString()
    # A no-op for CPU parameters in their own dtype; a device's are copied to the host.
    cast = [p.detach().to(device="cpu", dtype=dtype or p.dtype) for p in params]
    copied = any(c.data_ptr() != p.data_ptr() for c, p in zip(cast, params, strict=True))
    views = [byte_view(p) for p in cast]
    pieces = list(iter_chunk_pieces(views, layout, chunk_bytes))
    return Snapshot(round_, finished, header, pieces, serialized=copied)
