"""The upload intake: headers checked, staging slots reserved and given back.

Every upload passes here between its header and its end. The intake owns the
staging slots (at most ``max_inflight`` uploads received or waiting for their add
at once), the staging budget (``max_inflight`` uploads' bytes: a chunk waits while
the staged chunks fill it), the codec each header declares, and the one place a
slot and bytes are given back. Memory is bounded whatever the number of nodes.

An upload gives its slot back when its add begins, and the add lets each chunk go
once it is added, so with one slot the next upload arrives while the last one is
being added, within one upload's bytes. No two uploads can block each other: at
most ``max_inflight`` incomplete uploads hold bytes, each less than a whole upload,
so one of them always has room for its next chunk.

The uploads queued for a slot are told to send their chunks (``UPLOAD_READY``, the
call's initial metadata) only when next in line: the next one's first chunks wait in
its stream window when a slot frees, and the ones behind it hold only their header in
gRPC's buffers, so the bytes they hold do not grow with the number of nodes.

Counting an upload is the round engine's decision; the shell asks for it once the
upload is complete.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable

from fedgrad.buffers import unpack
from fedgrad.codec import Layout
from fedgrad.codecs import Codec, codec_for
from fedgrad.config import AggregatorConfig
from fedgrad.errors import InvalidArgument, ResourceExhausted
from fedgrad.server.engine import RoundEngine
from fedgrad.server.model import ServerModel
from fedgrad.server.reducers import MAX_EXACT_WEIGHT, Reducer
from fedgrad.server.staging import StagedUpload, UploadTicket, check_metrics
from fedgrad.wire import check_id

__all__ = ["Intake"]


class Intake:
    """Staging slots and codecs of the uploads in flight."""

    def __init__(
        self,
        cfg: AggregatorConfig,
        layout: Layout,
        engine: RoundEngine,
        reducer: Reducer,
        model: ServerModel,
    ) -> None:
        self.cfg, self.layout, self.engine, self.reducer = cfg, layout, engine, reducer
        self.model = model
        self.max_inflight = cfg.staging_slots(layout.total)
        #: A shard's parts held in memory at once, the others in files under
        #: ``--spill-dir`` (the aggregator sets it); None: every upload in memory.
        self.memory_slots: int | None = None
        self.inflight: set[UploadTicket] = set()
        self._codecs: dict[str, Codec] = {}

        #: Payload bytes the staged chunks hold now (``budget_bytes`` at most).
        self.held_bytes = 0

    def start(self) -> None:
        """Create the loop-bound semaphore; call once on the serving loop."""
        self._slots = asyncio.Semaphore(self.max_inflight)
        #: The uploads told to stream (``ready``): the slots' and the next one's, so that
        #: the next upload's first chunks are here when a slot frees, and the ones after it
        #: hold nothing but their header.
        self._told = asyncio.Semaphore(self.max_inflight + 1)
        self._freed = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    @property
    def budget_bytes(self) -> int:
        """``max_inflight`` uploads' payload bytes, of the largest upload in flight.

        An upload may be larger than the model's own payload (a relay's float64 sum of a
        float32 model): each upload in flight then still fits, so none waits for bytes
        that only its own completion would free.
        """
        largest = max(
            (t.staged.codec.layout.total for t in self.inflight if t.staged is not None),
            default=0,
        )
        return self.max_inflight * max(self.layout.total, largest)

    async def take(self, staged: StagedUpload, nbytes: int) -> None:
        """Wait until the staging budget has room for a chunk of ``nbytes``, then hold it.

        Raises:
            ResourceExhausted: no room within ``--slot-wait``.
        """
        deadline = time.monotonic() + self.cfg.slot_wait
        while self.held_bytes and self.held_bytes + nbytes > self.budget_bytes:
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), deadline - time.monotonic())
            except TimeoutError:
                raise ResourceExhausted(
                    f"the staging budget ({self.budget_bytes} bytes) stayed full for"
                    f" {self.cfg.slot_wait:.0f} s; retry later"
                ) from None
        self.held_bytes += nbytes
        staged.held += nbytes
        if staged.on_consumed is None:
            staged.on_consumed = functools.partial(self._consumed_soon, staged)

    def _consumed_soon(self, staged: StagedUpload, nbytes: int) -> None:
        self._loop.call_soon_threadsafe(self._consumed, staged, nbytes)

    def _consumed(self, staged: StagedUpload, nbytes: int) -> None:
        if staged.held >= nbytes:  # else dropped meanwhile: ``release`` gave it all back
            staged.held -= nbytes
            self._give(nbytes)

    def _give(self, nbytes: int) -> None:
        self.held_bytes -= nbytes
        self._freed.set()

    def free_slot(self, ticket: UploadTicket) -> None:
        """Give the ticket's slot to the next upload (its add begins; its bytes stay held)."""
        if ticket.slot:
            ticket.slot = False
            self._slots.release()
            self._told.release()

    @property
    def staging_bytes(self) -> int:
        """Bytes of uploads staged right now."""
        return sum(t.staged.nbytes for t in list(self.inflight) if t.staged is not None)

    async def open(
        self,
        node_id: str,
        round_: int,
        upload_id: str,
        num_samples: int,
        metrics: dict[str, float],
        codec: str = "",
        payload_bytes: int = 0,
        buffers: bytes = b"",
        presummed: bool = False,
        ready: Callable[[], Awaitable[None]] | None = None,
    ) -> UploadTicket:
        """Check an upload header and reserve a staging slot.

        ``ready()`` tells the node to send its chunks (``UPLOAD_READY``): it is awaited once
        the upload is next in line for a slot, or has one.

        Raises:
            InvalidArgument, Unavailable, FailedPrecondition, StaleRound, AlreadyExists,
            ResourceExhausted.
        """
        check_id("upload_id", upload_id)
        check_metrics(metrics)
        values = None
        if buffers and self.model.share_buffers:  # local mode: nodes keep theirs, ignored
            values = unpack(self.model.buffer_specs, buffers, "the upload")
        decoder = self._codec(codec)
        if payload_bytes and payload_bytes != decoder.layout.total:
            raise InvalidArgument(
                f"payload_bytes {payload_bytes} does not match codec {decoder.name!r}:"
                f" this model's payload is {decoder.layout.total} bytes"
            )
        if self.engine.open_upload(node_id, round_, upload_id, time.monotonic()):
            return UploadTicket(node_id, round_, upload_id, 0, metrics, None)
        try:
            weight = (
                self._presummed_weight(num_samples)
                if presummed
                else self.reducer.weight(num_samples)
            )
            async with asyncio.timeout(self.cfg.slot_wait):
                await self._told.acquire()
                try:
                    if ready is not None:
                        await ready()
                    await self._slots.acquire()
                except BaseException:
                    self._told.release()
                    raise
        except TimeoutError:
            self.engine.abandon(node_id)
            raise ResourceExhausted(
                f"{self.max_inflight} uploads in flight for {self.cfg.slot_wait:.0f} s; retry later"
            ) from None
        except BaseException:
            self.engine.abandon(node_id)  # refused or cancelled: the node must not stay locked out
            raise
        staged = StagedUpload(decoder, self.cfg.chunk_bytes)
        if self.memory_slots is not None and self.memory_slots <= sum(
            1 for t in self.inflight if t.staged is not None and not t.staged.spilled
        ):
            try:
                staged.spill(self.cfg.spill_dir)
            except ResourceExhausted:
                self._slots.release()
                self._told.release()
                self.engine.abandon(node_id)
                raise
        ticket = UploadTicket(
            node_id,
            round_,
            upload_id,
            weight,
            metrics,
            staged,
            buffers=values,
            presummed=presummed,
            slot=True,
        )
        self.inflight.add(ticket)
        return ticket

    def _presummed_weight(self, num_samples: int) -> int:
        """A relay's upload weighs the sum of its uploads' weights (InvalidArgument if it cannot)."""
        if (
            not getattr(self.reducer, "streaming", False)
            or type(self.reducer).__name__ != "StreamingReducer"
        ):
            raise InvalidArgument(
                f"a relay's presummed upload needs a streaming reduction (weighted-mean, mean,"
                f" sum), not {self.cfg.reduce!r} or differential privacy"
            )
        if self.cfg.mode != "sync" or self.cfg.clip_update_norm is not None:
            raise InvalidArgument(
                "a relay's presummed upload needs sync rounds without --clip-update-norm"
            )
        if not 1 <= num_samples < MAX_EXACT_WEIGHT:
            raise InvalidArgument(
                f"num_samples of a presummed upload (the sum of its weights) must be in"
                f" [1, {MAX_EXACT_WEIGHT - 1}], got {num_samples}"
            )
        return num_samples

    def _codec(self, declared: str) -> Codec:
        decoder = self._codecs.get(declared)
        if decoder is None:
            decoder = self._codecs[declared] = codec_for(declared, self.layout.specs)
        return decoder

    def release(self, ticket: UploadTicket, added: bool = False) -> None:
        """Free the staging slot of a ticket (after its add, or its failure); idempotent.

        A counted ticket keeps its slot until its add is done (``added=True``).
        """
        if ticket.counted and not added:
            return
        self.inflight.discard(ticket)
        if ticket.staged is not None:
            staged, ticket.staged = ticket.staged, None
            held, staged.held = staged.held, 0
            self._give(held)
            staged.discard()
            self.free_slot(ticket)
            self.engine.abandon(ticket.node_id)
