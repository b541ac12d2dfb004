"""The aggregator's async shell around the round engine.

The rules (membership, phases, acceptance, quorum, deadlines) are the pure
``RoundEngine``'s; this shell does the I/O they decide on: it owns the locks,
the staging slots, the worker threads that add uploads and step the
optimizer, the published snapshot, the timers and the checkpoints. It never
imports grpc: ``fedgrad.server.service`` translates protobuf to these calls
and ``RpcError``s to status codes. Everything runs on one asyncio loop; heavy
tensor work runs in worker threads while the loop keeps reading streams.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch

from fedgrad.config import AggregatorConfig
from fedgrad.errors import ConfigError, InvalidArgument, OutOfRange, StaleRound
from fedgrad.history import RoundRecord
from fedgrad.server.broadcast import Snapshot
from fedgrad.server.counters import Counters
from fedgrad.server.engine import NodeRecord, NodeState, RoundEngine, Rules
from fedgrad.server.ledger import Ledger
from fedgrad.server.model import Peer, ServerModel
from fedgrad.server.policy import make_policy
from fedgrad.server.privacy import privacy_accountant, private_reducer
from fedgrad.server.reducers import MAX_EXACT_WEIGHT, accumulate_for, make_reducer
from fedgrad.server.resume import read_checkpoint, write_checkpoint
from fedgrad.server.robust import check_fits
from fedgrad.server.sharding import PeerClients, ShardSetup
from fedgrad.server.staging import UploadTicket
from fedgrad.server.uploads import Intake
from fedgrad.task import EVAL_PREFIX, EVAL_SAMPLES, Task
from fedgrad.wire import check_id

from . import coordination

__all__ = ["Aggregator"]

log = logging.getLogger("fedgrad.aggregator")


class Aggregator:
    """Owns the model, the reducer and the published parameters; the engine owns the rules."""

    def __init__(self, task: Task, cfg: AggregatorConfig) -> None:
        self.cfg = cfg
        #: Shard 0 of a sharded aggregator: the shard plan and the calls to the others.
        self.shards: ShardSetup | None = None
        self.peers: PeerClients | None = None
        if cfg.shard_index[1] > 1:
            self.shards = ShardSetup(task, cfg)
            self.peers = PeerClients(self.shards, cfg)
            task = self.shards.task
        self.model = ServerModel(task, cfg)
        self.layout = self.model.layout
        #: The whole model's manifest (nodes join with it; a shard holds only its pieces).
        self.full_specs = self.shards.full_specs if self.shards else self.layout.specs
        #: Why the federation cannot go on (a shard unreachable or refusing), "" if it can.
        self.failed = ""
        #: Counts the open round's restarts on every shard (a shard lost its part of it).
        self.redo_epoch = 0
        self._eval_module: torch.nn.Module | None = None  # shard 0's copy for evaluation
        self.gathered_round = -1  # the round that copy holds
        self.policy = make_policy(cfg)
        self.engine = RoundEngine(Rules(cfg.nodes, cfg.rounds, cfg.min_nodes), self.policy)
        # Two add threads pay off once uploads are large; small models stay single-threaded.
        workers = min(2, os.cpu_count() or 1) if self.layout.total >= 16 << 20 else 1
        self.accumulate = accumulate_for(cfg.accumulate, self.layout)
        check_fits(cfg, self.layout)
        self.ledger = Ledger(cfg, privacy_accountant(cfg))
        self.reducer = private_reducer(cfg, self.layout, self.accumulate, workers) or make_reducer(
            cfg.reduce,
            self.layout,
            self.accumulate,
            workers,
            clip=cfg.clip_update_norm,
            max_samples=cfg.max_samples_per_node,
            budget_bytes=cfg.staging_mb << 20,
            spill_dir=cfg.spill_dir,
        )
        self.counters = Counters()
        self.session_id = uuid.uuid4().hex
        self.snapshot: Snapshot | None = None
        self.final_pulled: set[str] = set()
        self.on_round: list[Callable[[RoundRecord], None]] = []
        self.intake = Intake(cfg, self.layout, self.engine, self.reducer, self.model)
        if self.shards is not None:  # parts past the unsharded staging's share: to files
            self.intake.memory_slots = cfg.shard_memory_parts(self.shards.whole_bytes)
        self._background: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.Task[None] | None = None
        self.resumed = bool(cfg.checkpoint_dir) and self._restore()

    async def start(self) -> None:
        """Create the loop-bound primitives and timers; call once on the serving loop."""
        self._changed = asyncio.Condition()
        self._adding = asyncio.Lock()  # one add at a time
        self._closing = asyncio.Lock()  # held from a close decision to the next publish
        self._recovering = False
        self.intake.start()
        self._peers_ready = asyncio.Event()
        if self.peers is None:
            self._peers_ready.set()
            await coordination.open_first(self)
        else:  # serve at once; the first round opens once every shard agrees
            self._spawn(coordination.sync_then_open(self))

    def gathered_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model's final state_dict if the evaluation copy holds it, else None."""
        if self._eval_module is None or self.gathered_round != self.engine.total_rounds:
            return None
        return {k: v.detach() for k, v in self._eval_module.state_dict().items()}

    @property
    def blocked(self) -> str:
        """Why rounds cannot go on now (a shard unreachable), "" if nothing blocks them."""
        return self.failed or (self.peers.blocked if self.peers is not None else "")

    # -- read-only state ----------------------------------------------------------------
    @property
    def round(self) -> int:
        return self.engine.round

    @property
    def finished(self) -> bool:
        return self.engine.finished

    @property
    def phase(self) -> str:
        """The phase as status shows it (``EngineView.shown_phase``)."""
        return self.engine.view().shown_phase

    @property
    def nodes(self) -> dict[str, NodeRecord]:
        """A copy of the node records by id."""
        return {r.node_id: r for r in self.engine.view().nodes}

    @property
    def history(self) -> list[RoundRecord]:
        """One record per closed round (the ledger's)."""
        return self.ledger.history

    @property
    def journal(self) -> list[dict[str, Any]]:
        """Async and sampled rounds: the uploads each round applied, in order (the ledger's)."""
        return self.ledger.journal

    @property
    def node_stats(self) -> dict[str, dict[str, float]]:
        """Per node: its last applied upload's norm and the robust rule's statistics."""
        return self.ledger.node_stats

    @property
    def reported(self) -> dict[str, str]:
        """Node id -> upload id of the uploads counted in the open round (a copy)."""
        return self.engine.reported

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint(self, round_: int | None = None) -> None:
        """Write the state of ``round_`` (default: the open round), if --checkpoint-dir is set."""
        if self.cfg.checkpoint_dir:
            round_ = self.engine.round if round_ is None else round_
            nodes = self.engine.nodes
            write_checkpoint(
                self.cfg,
                round_,
                self.model,
                nodes,
                self.session_id,
                self.history,
                self.journal,
            )

    def _restore(self) -> bool:
        resumed = read_checkpoint(self.cfg, self.model)
        if resumed is None:
            return False
        self.session_id = resumed.session_id
        self.ledger.history, self.ledger.journal = resumed.history, resumed.journal
        self.engine.restore(resumed.round, resumed.nodes)
        log.info("resumed from checkpoint at round %d", self.round, extra={"event": "resume"})
        return True

    # -- membership ------------------------------------------------------------------------
    async def join(self, node_id: str, num_samples: int, node: Peer | None = None) -> NodeRecord:
        """Register or re-register a node; start round 0 once the start quorum is there.

        Raises:
            InvalidArgument: a bad id or sample count, or ``node``'s model, seed or task
                is not this federation's (the node is then not registered).
            Unavailable: shutting down.
        """
        check_id("node_id", node_id)
        if num_samples >= MAX_EXACT_WEIGHT:
            raise InvalidArgument(
                f"num_samples {num_samples} is absurd (limit {MAX_EXACT_WEIGHT - 1})"
            )
        if node is not None:
            node.check(self.full_specs, self.cfg, self.model.buffer_specs)
        known = self.engine.node(node_id) is not None
        if self.engine.join(node_id, num_samples, time.monotonic()):
            await coordination.begin(self)
        if not known:
            log.info("node joined", extra={"node": node_id, "round": self.round, "event": "join"})
        record = self.engine.node(node_id)
        assert record is not None
        return record

    async def leave(self, node_id: str) -> None:
        """Stop waiting for a node; its upload of the open round, if counted, stays counted."""
        close = self.engine.leave(node_id, time.monotonic())
        log.info("node left", extra={"node": node_id, "round": self.round, "event": "leave"})
        if not close and self.engine.stuck:
            self._replace_missing()
        async with self._changed:
            self._changed.notify_all()
        if close:
            await coordination.close_round(self)

    # -- parameters ------------------------------------------------------------------------
    async def wait_snapshot(self, node_id: str, min_round: int) -> Snapshot:
        """Wait until a round >= ``min_round`` (or the end) is published; return it.

        The caller must call ``pull_done`` when its stream ends.

        Raises:
            OutOfRange: ``min_round`` is past the last round.
            Unavailable, FailedPrecondition, ResourceExhausted: see ``RoundEngine.open_pull``.
        """
        last = self.engine.total_rounds
        if min_round > last:
            raise OutOfRange(
                f"round {min_round} is past the last round ({last} rounds, 0-based:"
                f" the final parameters are round {last})"
            )
        self.engine.open_pull(node_id, time.monotonic())
        epoch = self.redo_epoch

        def redone() -> bool:  # the round this node uploaded to restarted: it must redo it
            return self.redo_epoch != epoch and min_round > self.round and not self.finished

        def ready() -> bool:
            if redone():
                return True
            # A sampled round hands its parameters only to the nodes it selected: the
            # others wait here, without polling, until a round selects them or the end.
            s = self.snapshot
            if s is None or not (s.finished or s.round >= min_round):
                return False
            return (
                s.finished
                or self.engine.selected is None
                or self.engine.is_selected(node_id, s.round)
            )

        try:
            async with self._changed:
                await self._changed.wait_for(ready)
                if redone():
                    raise StaleRound(
                        f"round {self.round} restarted on every shard: pull it and upload again",
                        self.round,
                    )
                assert self.snapshot is not None
                # Registered on the loop with the check: ``freeze`` sees every reader.
                self.snapshot.readers += 1
                return self.snapshot
        except BaseException:
            self.engine.close_pull(node_id)
            raise

    def pull_done(self, node_id: str, snapshot: Snapshot | None = None) -> None:
        """Release a parameter stream slot of ``node_id`` (and its read of ``snapshot``)."""
        if snapshot is not None:
            snapshot.readers -= 1
        self.engine.close_pull(node_id)

    def sent(self, node_id: str, snapshot: Snapshot) -> None:
        """Record a completed parameter stream."""
        self.counters.bytes_sent += snapshot.wire_bytes
        self.counters.round_bytes += snapshot.wire_bytes
        if snapshot.finished:
            self.final_pulled.add(node_id)

    # -- uploads ---------------------------------------------------------------------------
    def count(self, ticket: UploadTicket) -> int:
        """Count a complete upload exactly once; return the round it counts in.

        The reply does not wait for the add: once an upload is complete, valid and
        recorded as this node's upload of the open round, it counts. The add runs in
        the background (one at a time, in a worker thread) and the round closes only
        after every counted upload is added. An aggregator crash loses the open round's
        sum either way, so replying before the add promises nothing more than after it.
        """
        staged = ticket.staged
        if staged is None:
            return ticket.round
        staged.complete()
        # No await from here until the add is scheduled: counting is atomic on the loop.
        if not self.engine.accept(ticket.node_id, ticket.round, ticket.upload_id):
            return ticket.round
        ticket.counted = True
        staleness = self.engine.staleness(ticket.round)
        self.counters.uploads_accepted += 1
        self.counters.received(staged.nbytes, staged.spilled)
        if "loss" in ticket.metrics:
            self.counters.round_losses[ticket.node_id] = (ticket.metrics["loss"], ticket.weight)
        if ticket.metrics.get(EVAL_SAMPLES, 0) >= 1:
            held_out = {
                k.removeprefix(EVAL_PREFIX): v
                for k, v in ticket.metrics.items()
                if k.startswith(EVAL_PREFIX) and k != EVAL_SAMPLES
            }
            self.counters.round_evals[ticket.node_id] = (
                held_out,
                int(ticket.metrics[EVAL_SAMPLES]),
            )
        self._spawn(coordination.add_upload(self, ticket, staged, staleness))
        log.debug("upload counted", extra={"node": ticket.node_id, "round": ticket.round})
        return ticket.round

    async def count_everywhere(self, ticket: UploadTicket) -> int:
        """``count``, on every shard: only once every shard holds its complete part.

        Unsharded, this is ``count``. Sharded, shard 0 first asks the others whether they
        hold the upload's part (waiting up to ``--idle-timeout``); if one does not, nothing
        counts anywhere (Unavailable: send every part again). Otherwise shard 0 counts it
        and tells the others to add their parts.
        """
        return await coordination.count_everywhere(self, ticket)

    # -- rounds ----------------------------------------------------------------------------
    @property
    def selected_count(self) -> int:
        """Nodes the open round takes uploads from (0 in async mode: anyone)."""
        return self._selected_count(self.engine.selected)

    def _selected_count(self, selected: frozenset[str] | None) -> int:
        if selected is not None:
            return len(selected)
        return 0 if self.cfg.mode == "async" else self.engine.active_count

    def _replace_missing(self, missed_deadline: bool = False) -> None:
        replaced = self.engine.replace_missing(missed_deadline)
        if replaced:
            log.warning(
                "selected nodes failed or left; selected %s in their place",
                ", ".join(sorted(replaced)),
                extra={"round": self.round, "event": "reselect"},
            )

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- the end ---------------------------------------------------------------------------
    async def wait_finished(self) -> None:
        """Return once training is over and every active node pulled the final parameters."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.finished or bool(self.failed))
        if self.failed:
            raise ConfigError(self.failed)
        deadline = time.monotonic() + self.cfg.finish_grace
        while time.monotonic() < deadline:
            active = {r.node_id for r in self.engine.nodes if r.state is NodeState.ACTIVE}
            if active <= self.final_pulled:
                return
            await asyncio.sleep(0.05)
        log.warning(
            "finished; some nodes did not fetch the final parameters", extra={"event": "finish"}
        )

    def shut_down(self) -> None:
        """Refuse new work with UNAVAILABLE (on SIGTERM/SIGINT)."""
        self.engine.shut_down()

    async def final_checkpoint(self) -> None:
        """Checkpoint the last published round, never in the middle of a step."""
        async with self._closing:
            await asyncio.to_thread(self.checkpoint)

    def close(self) -> None:
        """Cancel the timers and background work (on shutdown)."""
        for task in list(self._background):
            task.cancel()
        self.reducer.close()

    def state_dict(self) -> dict[str, Any]:
        """Return the model's full state dict (parameters and buffers), detached."""
        return self.model.state_dict()
