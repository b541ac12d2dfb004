"""Shard I > 0 of a sharded aggregator: its pieces, their uploads, and shard 0's orders.

A follower keeps no round engine. Nodes push it their part of each upload (the pieces
only) and pull its pieces; a complete part is *held*, not added, until shard 0 has
counted the upload on every shard (``Commit``), so a node that dies after uploading to
some shards and not others contributes to none. ``Close`` steps exactly the uploads
shard 0 names and publishes the next round.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from fedgrad.codecs import Codec, codec_for
from fedgrad.config import AggregatorConfig
from fedgrad.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    OutOfRange,
    ResourceExhausted,
    StaleRound,
)
from fedgrad.server.broadcast import Snapshot, make_snapshot
from fedgrad.server.counters import Counters
from fedgrad.server.model import ServerModel
from fedgrad.server.reducers import accumulate_for, make_reducer
from fedgrad.server.resume import read_checkpoint, write_checkpoint
from fedgrad.server.sharding import PEER_CALL, ShardSetup, shard_settings
from fedgrad.server.staging import StagedUpload
from fedgrad.shards import settings_differ
from fedgrad.task import Task
from fedgrad.wire import check_id

__all__ = ["ShardFollower"]

log = logging.getLogger("fedgrad.shards")


@dataclass(eq=False)
class _Part:
    node_id: str
    round: int
    upload_id: str
    staged: StagedUpload
    complete: bool = False
    failed: str = ""
    released: bool = False  # its staging slot was given back
    presummed: bool = False  # a relay's sum (its header said so): added as it is


class ShardFollower:
    """The state of shard I > 0: pieces, optimizer, reducer, held parts, the broadcast."""

    def __init__(self, task: Task, cfg: AggregatorConfig, setup: ShardSetup) -> None:
        self.cfg, self.setup = cfg, setup
        self.model = ServerModel(setup.task, cfg)
        self.layout = self.model.layout
        self.accumulate = accumulate_for(cfg.accumulate, self.layout)
        self.reducer = make_reducer(cfg.reduce, self.layout, self.accumulate, 1)
        self.codecs: dict[str, Codec] = {}
        self.counters = Counters()
        self.incarnation = uuid.uuid4().hex
        self.session_id = ""
        self.round = 0
        self.total_rounds = cfg.rounds
        self.finished = False
        self.snapshot: Snapshot | None = None
        self.parts: dict[str, _Part] = {}  # node id -> its part of the open round
        self.added: dict[str, str] = {}  # node id -> upload id added this round
        self.final_pulled: set[str] = set()
        self.final_readers: set[str] = set()
        self.max_inflight = cfg.staging_slots(self.layout.total)
        #: Parts held in memory at once; the others go to files (``StagedUpload.spill``).
        self.memory_parts = cfg.shard_memory_parts(setup.whole_bytes)
        self.parts_in_memory = 0
        self.synced = False
        #: Why this shard stops (its settings are not shard 0's), "" while it can go on.
        self.failed = ""
        self._adds: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._changed = asyncio.Condition()
        self._slots = asyncio.Semaphore(self.max_inflight)
        self._adding = asyncio.Lock()
        saved = self._saved_rounds()
        if saved:
            self._load(saved[-1])
            log.info("resumed from checkpoint at round %d", self.round, extra={"event": "resume"})
        await self._publish(self.round, False)

    # -- checkpoints: one folder per round, the last two kept (shard 0 may roll back one) --
    def _folder(self, round_: int) -> Path:
        assert self.cfg.checkpoint_dir
        return Path(self.cfg.checkpoint_dir) / f"round-{round_}"

    def _saved_rounds(self) -> list[int]:
        if not self.cfg.checkpoint_dir or not Path(self.cfg.checkpoint_dir).is_dir():
            return []
        rounds = []
        for path in Path(self.cfg.checkpoint_dir).glob("round-*"):
            suffix = path.name.removeprefix("round-")
            if suffix.isdigit() and (path / "checkpoint.json").exists():
                rounds.append(int(suffix))
        return sorted(rounds)

    def _load(self, round_: int) -> None:
        cfg = replace(self.cfg, checkpoint_dir=str(self._folder(round_)))
        resumed = read_checkpoint(cfg, self.model)
        assert resumed is not None
        self.round, self.session_id = resumed.round, resumed.session_id

    def _checkpoint(self) -> None:
        """Write this round's pieces and optimizer state; keep the round before it."""
        if not self.cfg.checkpoint_dir:
            return
        cfg = replace(self.cfg, checkpoint_dir=str(self._folder(self.round)))
        write_checkpoint(cfg, self.round, self.model, (), self.session_id, ())
        for old in self._saved_rounds():
            if old < self.round - 1:
                shutil.rmtree(self._folder(old), ignore_errors=True)

    # -- shard 0's calls ---------------------------------------------------------------
    async def sync(
        self, shard: int, shards: int, settings: dict[str, str], round_: int, session: str
    ) -> int:
        """Check shard 0's settings; drop the open round's parts; take shard 0's round.

        A shard one round ahead (it closed a round shard 0 then lost) goes back to its
        checkpoint of shard 0's round. Returns the round now published here.
        """
        index, count = self.setup.index, self.setup.count
        if shard != index or shards != count:
            raise FailedPrecondition(
                f"shard 0 thinks this is shard {shard}/{shards}; it was started as {index}/{count}:"
                " give every shard the same --peers, in the same order"
            )
        differ = settings_differ(shard_settings(self.cfg), settings)
        if differ:
            message = "the shards' settings differ: " + "; ".join(differ)
            log.error(message, extra={"event": "shards"})
            self.failed = f"shard 0 refused: {message}"
            async with self._changed:
                self._changed.notify_all()
            raise FailedPrecondition(message)
        if self.session_id and self.session_id != session:
            raise FailedPrecondition(
                f"shard {index} resumed another federation (round {self.round}) than shard 0's"
                f" (round {round_}): start every shard from its own checkpoints of one run, or"
                " all from empty --checkpoint-dirs"
            )
        if self.round != round_ and not (
            self.round == round_ + 1 and round_ in self._saved_rounds()
        ):
            raise FailedPrecondition(
                f"shard {index} is at round {self.round}, shard 0 at round {round_}: give every"
                " shard its own --checkpoint-dir of the same run"
            )
        await self._discard_open_round()
        if self.round != round_:
            snapshot, self.snapshot = self.snapshot, None
            if snapshot is not None:
                await asyncio.to_thread(snapshot.freeze)
            await asyncio.to_thread(self._load, round_)
            log.warning(
                "back to round %d: shard 0 did not close round %d", round_, round_,
                extra={"event": "rollback"},
            )  # fmt: skip
        first = not self.session_id
        self.session_id, self.synced = session, True
        if first:
            await asyncio.to_thread(self._checkpoint)
        await self._publish(self.round, False)
        return self.round

    async def _discard_open_round(self) -> None:
        """Forget every part and add of the open round (shard 0 redoes it)."""
        while self._adds:
            await asyncio.gather(*list(self._adds), return_exceptions=True)
        for part in list(self.parts.values()):
            self._release(part)
        self.parts.clear()
        self.added.clear()
        self.reducer.reset()

    def _release(self, part: _Part) -> None:
        if not part.released:
            part.released = True
            if not part.staged.spilled:
                self.parts_in_memory -= 1
            part.staged.discard()
            self._slots.release()

    async def hold(
        self, node_id: str, round_: int, upload_id: str, wait: float, presummed: bool = False
    ) -> tuple[bool, str]:
        """Wait up to ``wait`` seconds until this upload's part is complete here."""

        def state() -> str | None:
            part = self.parts.get(node_id)
            if part is None or part.upload_id != upload_id or part.round != round_:
                return None
            if part.failed:
                return part.failed
            if part.presummed != presummed:
                return (
                    f"its part here says presummed={part.presummed}, the header on shard 0"
                    f" presummed={presummed}"
                )
            return "" if part.complete else None

        try:
            async with self._changed:
                async with asyncio.timeout(wait):
                    await self._changed.wait_for(lambda: state() is not None)
        except TimeoutError:
            return False, f"no complete part of upload {upload_id!r} within {wait:.0f} s"
        why = state()
        return (why == ""), why or ""

    async def commit(
        self, node_id: str, round_: int, upload_id: str, weight: int, presummed: bool = False
    ) -> None:
        part = self.parts.get(node_id)
        if (
            part is None
            or part.upload_id != upload_id
            or not part.complete
            or round_ != self.round
            or part.presummed != presummed
        ):
            raise FailedPrecondition(
                f"shard {self.setup.index} holds no complete part of {upload_id!r} (round {round_})"
                + (" with that presummed flag" if part is not None and part.complete else "")
            )
        del self.parts[node_id]
        async with self._changed:
            self.added[node_id] = upload_id
            self._changed.notify_all()
        task = asyncio.get_running_loop().create_task(self._add(part, weight))
        self._adds.add(task)
        task.add_done_callback(self._adds.discard)

    async def _add(self, part: _Part, weight: int) -> None:
        try:
            async with self._adding:
                add = functools.partial(self.reducer.add, presummed=part.presummed)  # type: ignore[call-arg]
                await asyncio.to_thread(add, part.staged, weight, 1.0, part.node_id)
            self.counters.uploads_accepted += 1
        finally:
            self._release(part)

    async def close(
        self, round_: int, uploads: dict[str, str], finished: bool, gather: bool = False
    ) -> int:
        """Step exactly ``uploads`` (node id -> upload id) of ``round_``; publish the next."""
        if round_ != self.round:
            if round_ + 1 == self.round:
                return self.round  # a repeated Close (its reply was lost): already done
            raise FailedPrecondition(
                f"shard {self.setup.index} is at round {self.round}, not {round_}"
            )
        try:  # a Commit may still be on its way (shard 0 closes once its own adds are done)
            async with self._changed, asyncio.timeout(PEER_CALL):
                await self._changed.wait_for(lambda: set(uploads) <= set(self.added))
        except TimeoutError:
            pass
        if dict(self.added) != dict(uploads):
            missing = sorted(set(uploads) - set(self.added))
            extra = sorted(set(self.added) - set(uploads))
            raise FailedPrecondition(
                f"shard {self.setup.index} added other uploads than shard 0 counted"
                f" (missing {missing}, extra {extra})"
            )
        while self._adds:
            await asyncio.gather(*list(self._adds))
        for part in list(self.parts.values()):  # parts shard 0 never counted: no trace
            self._release(part)
        self.parts.clear()
        snapshot, self.snapshot = self.snapshot, None
        if snapshot is not None:
            await asyncio.to_thread(snapshot.freeze)
        if uploads:
            await asyncio.to_thread(self.model.step, self.reducer)
        self.reducer.reset()
        # Who pulls the final pieces before this shard exits: the last round's nodes,
        # and shard 0 if it saves the model.
        self.final_readers = set(uploads) | ({"shard-0"} if gather else set())
        self.added.clear()
        self.round = round_ + 1
        await asyncio.to_thread(self._checkpoint)
        await self._publish(round_ + 1, finished)
        return self.round

    async def _publish(self, round_: int, finished: bool) -> None:
        snapshot = await asyncio.to_thread(
            make_snapshot,
            self.model.params,
            self.layout,
            self.cfg.chunk_bytes,
            round_,
            finished,
            self.session_id,
            None,
            self.total_rounds,
            self.model.round_config(round_, self.total_rounds) if not finished else {},
        )
        async with self._changed:
            self.round, self.finished, self.snapshot = round_, finished, snapshot
            self._changed.notify_all()

    # -- nodes' calls ------------------------------------------------------------------
    async def open_upload(
        self, node_id: str, round_: int, upload_id: str, shard: int, map_id: str, codec: str,
        payload_bytes: int, presummed: bool = False,
    ) -> _Part:  # fmt: skip
        """Check a part's header and take a staging slot."""
        check_id("node_id", node_id)
        check_id("upload_id", upload_id)
        if map_id != self.setup.plan.map_id:
            raise FailedPrecondition(
                f"upload for shard map {map_id!r}; this federation's is"
                f" {self.setup.plan.map_id!r}: Join shard 0 again"
            )
        if shard != self.setup.index:
            raise InvalidArgument(
                f"this is shard {self.setup.index}; the upload is for shard {shard}'s pieces"
            )
        if not self.synced or self.finished:
            raise FailedPrecondition(
                "training is over" if self.finished else "shard 0 has not opened a round yet"
            )
        if round_ != self.round:
            if round_ < self.round:
                raise StaleRound(
                    f"round {round_} is closed; round {self.round} is open", self.round
                )
            raise FailedPrecondition(f"round {round_} is not open: round {self.round} is")
        decoder = self.codecs.get(codec)
        if decoder is None:
            decoder = self.codecs[codec] = codec_for(codec, self.layout.specs)
        if payload_bytes and payload_bytes != decoder.layout.total:
            raise InvalidArgument(
                f"payload_bytes {payload_bytes} does not match codec {decoder.name!r}:"
                f" shard {self.setup.index}'s part is {decoder.layout.total} bytes"
            )
        if self.added.get(node_id) == upload_id:
            raise FailedPrecondition("already counted")  # the service answers duplicate
        try:
            await asyncio.wait_for(self._slots.acquire(), self.cfg.slot_wait)
        except TimeoutError:
            raise ResourceExhausted(
                f"{self.max_inflight} uploads in flight for {self.cfg.slot_wait:.0f} s; retry later"
            ) from None
        old = self.parts.pop(node_id, None)
        if old is not None:
            self._release(old)  # a retry replaces what the node sent before
        staged = StagedUpload(decoder, self.cfg.chunk_bytes)
        if self.parts_in_memory < self.memory_parts:
            self.parts_in_memory += 1
        else:
            try:
                staged.spill(self.cfg.spill_dir)
            except ResourceExhausted:
                self._slots.release()
                raise
        part = _Part(node_id, round_, upload_id, staged, presummed=presummed)
        self.parts[node_id] = part
        return part

    async def part_done(self, part: _Part, error: str) -> None:
        """The part's stream ended: complete (``error`` "") or failed."""
        async with self._changed:
            if self.parts.get(part.node_id) is part:
                if error:
                    part.failed = error
                    del self.parts[part.node_id]
                    self._release(part)
                else:
                    part.complete = True
                    self.counters.bytes_received += part.staged.nbytes
                    if part.staged.spilled:
                        self.counters.bytes_spilled += part.staged.nbytes
            elif error:
                self._release(part)  # dropped (a redo) while it streamed
            self._changed.notify_all()

    async def wait_snapshot(self, min_round: int) -> Snapshot:
        if min_round > self.total_rounds:
            raise OutOfRange(f"round {min_round} is past the last round ({self.total_rounds})")

        def ready() -> bool:
            s = self.snapshot
            return s is not None and self.synced and (s.finished or s.round >= min_round)

        async with self._changed:
            await self._changed.wait_for(ready)
            assert self.snapshot is not None
            self.snapshot.readers += 1
            return self.snapshot

    def sent(self, node_id: str, snapshot: Snapshot) -> None:
        self.counters.bytes_sent += snapshot.wire_bytes
        if snapshot.finished:
            self.final_pulled.add(node_id)

    async def wait_finished(self) -> None:
        """Return once training is over and the final pieces were pulled (or the grace).

        Raises:
            ConfigError: this shard's settings are not shard 0's.
        """
        async with self._changed:
            await self._changed.wait_for(lambda: self.finished or bool(self.failed))
        if self.failed:
            raise ConfigError(self.failed)
        deadline = time.monotonic() + self.cfg.finish_grace
        while time.monotonic() < deadline and not self.final_readers <= self.final_pulled:
            await asyncio.sleep(0.05)
