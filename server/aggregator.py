"""The aggregator's state machine: nodes, rounds, uploads, the optimizer step.

No grpc here: ``fedgrad.server.service`` translates protobuf to these calls
and ``RpcError``s to status codes. Everything runs on one asyncio loop; the
heavy tensor work (commit, step, serialization) runs in a worker thread while
the loop keeps reading other streams.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedgrad.codec import Layout, specs_of
from fedgrad.config import AggregatorConfig
from fedgrad.errors import (
    AlreadyExists,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    StaleRound,
    Unavailable,
)
from fedgrad.history import RoundRecord
from fedgrad.server.accumulator import MAX_EXACT_WEIGHT, Accumulator, StagedUpload
from fedgrad.server.broadcast import Snapshot, make_snapshot
from fedgrad.server.checkpoint import load_checkpoint, save_checkpoint
from fedgrad.task import Task, trainable_parameters

__all__ = ["MAX_PULLS_PER_NODE", "Aggregator", "NodeRecord", "UploadTicket", "make_optimizer"]

#: Parameter streams one node may hold open at once (one, plus one reconnecting).
MAX_PULLS_PER_NODE = 2

#: Bytes of gradients materialized at once during the optimizer step.
STEP_BATCH_BYTES = 32 << 20

log = logging.getLogger("fedgrad.aggregator")
_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Build the aggregator's torch.optim optimizer ("sgd", "momentum" or "adam")."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r} (sgd, momentum, adam)")


def _batches(sizes: list[int], limit: int) -> list[list[int]]:
    """Split indices 0..len(sizes)-1 into consecutive runs of at most ``limit`` bytes each
    (a single larger entry gets a run of its own)."""
    batches: list[list[int]] = []
    used = limit
    for i, size in enumerate(sizes):
        if not batches or used + size > limit:
            batches.append([])
            used = 0
        batches[-1].append(i)
        used += size
    return batches


def check_id(kind: str, value: str) -> str:
    """Return ``value`` if it is 1-128 chars of [A-Za-z0-9._-], else raise InvalidArgument."""
    if not _ID.match(value):
        raise InvalidArgument(f"{kind} {value!r} must be 1-128 characters of [A-Za-z0-9._-]")
    return value


def _check_metrics(metrics: dict[str, float]) -> None:
    if len(metrics) > 64:
        raise InvalidArgument(f"{len(metrics)} metrics in the header; at most 64")
    for name, value in metrics.items():
        if len(name) > 128 or not math.isfinite(value):
            raise InvalidArgument(
                f"metric {name[:128]!r} = {value}: names up to 128 chars, finite values"
            )


@dataclass
class NodeRecord:
    """What the aggregator knows of one node."""

    node_id: str
    num_samples: int
    state: str = "active"  # active, dropped (missed a deadline), left
    last_round: int = -1
    last_seen: float = field(default_factory=time.monotonic)
    uploading: bool = False
    pulls: int = 0


@dataclass(eq=False)
class UploadTicket:
    """One upload in flight: its header and its staged chunks."""

    node_id: str
    round: int
    upload_id: str
    weight: int
    metrics: dict[str, float]
    staged: StagedUpload | None
    duplicate: bool = False
    accepted: bool = False  # counted in the round; the reduce may still be running


class Aggregator:
    """Owns the parameters, the optimizer and the rounds."""

    def __init__(self, task: Task, cfg: AggregatorConfig) -> None:
        self.task, self.cfg = task, cfg
        torch.manual_seed(cfg.seed)
        self.model = task.model()
        named = trainable_parameters(self.model)
        self.params = [p for _, p in named]
        self.layout = Layout(specs_of(named))
        lr = cfg.lr if cfg.lr is not None else task.lr
        self.optimizer = make_optimizer(cfg.optimizer or task.optimizer, self.params, lr)
        # Two reduce threads pay off once uploads are large; small models stay single-threaded.
        workers = min(2, os.cpu_count() or 1) if self.layout.total >= 16 << 20 else 1
        dtype = np.float32 if cfg.accumulate == "float32" else np.float64
        self.acc = Accumulator(self.layout, workers, dtype)
        self._step_batches = _batches(self.layout.nbytes, STEP_BATCH_BYTES)
        self.session_id = uuid.uuid4().hex
        self.round = 0
        self.started = self.finished = False
        self.phase = "waiting"
        self.nodes: dict[str, NodeRecord] = {}
        self.reported: dict[str, str] = {}
        self.round_loss = [0.0, 0.0]
        self.history: list[RoundRecord] = []
        self.snapshot: Snapshot | None = None
        self.final_pulled: set[str] = set()
        self.bytes_received = self.bytes_sent = 0
        self.round_started = time.monotonic()
        self.deadline_passed = False
        self._round_bytes = 0
        self.max_inflight = cfg.max_inflight or max(
            1, min(64, cfg.staging_mb * (1 << 20) // max(1, self.layout.total))
        )
        self.on_round: list[Callable[[RoundRecord], None]] = []
        self.uploads_accepted = 0
        self.inflight: set[UploadTicket] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._deadline_task: asyncio.Task[None] | None = None
        self.rejections: dict[str, int] = {}
        self.phase_seconds: dict[str, float] = {}
        self._reduce_seconds = 0.0
        self.closing = False
        self.closing_round = False  # the step of the open round has begun
        self.pending_reduces = 0  # accepted uploads not yet added to the accumulator
        self.resumed = bool(cfg.checkpoint_dir) and self._restore()

    async def start(self) -> None:
        """Create the loop-bound primitives; call once on the serving loop."""
        self._changed = asyncio.Condition()
        self._commit = asyncio.Lock()
        self._slots = asyncio.Semaphore(self.max_inflight)
        if self.resumed:
            async with self._changed:
                await self._publish(first=True)

    # -- checkpoints -------------------------------------------------------------
    def _meta(self) -> dict[str, object]:
        return {
            "session_id": self.session_id,
            "task": self.cfg.task,
            "reduce": self.cfg.reduce,
            "nodes": [
                {
                    "node_id": r.node_id,
                    "num_samples": r.num_samples,
                    "state": r.state,
                    "last_round": r.last_round,
                }
                for r in self.nodes.values()
            ],
        }

    def checkpoint(self) -> None:
        """Write the state of the current (published) round, if --checkpoint-dir is set."""
        if self.cfg.checkpoint_dir:
            names = [s.name for s in self.layout.specs]
            save_checkpoint(
                self.cfg.checkpoint_dir,
                self.round,
                dict(zip(names, self.params, strict=True)),
                self.optimizer,
                self._meta(),
                self.history,
            )

    def _restore(self) -> bool:
        assert self.cfg.checkpoint_dir
        loaded = load_checkpoint(self.cfg.checkpoint_dir)
        if loaded is None:
            return False
        doc, params, optim_state = loaded
        if doc.get("task") != self.cfg.task or doc.get("reduce") != self.cfg.reduce:
            raise ConfigError(
                f"checkpoint in {self.cfg.checkpoint_dir} is for task {doc.get('task')!r} with"
                f" reduce {doc.get('reduce')!r}; use a new --checkpoint-dir for another run"
            )
        with torch.no_grad():
            for spec, p in zip(self.layout.specs, self.params, strict=True):
                saved = params.get(spec.name)
                if saved is None or saved.shape != p.shape or saved.dtype != p.dtype:
                    raise ConfigError(
                        f"checkpoint tensor {spec.name!r} does not match the task's model"
                    )
                p.copy_(saved)
        self.optimizer.load_state_dict(optim_state)
        self.round, self.session_id = int(doc["round"]), str(doc["session_id"])
        self.history = [RoundRecord(**r) for r in doc["history"]]
        for n in doc["nodes"]:
            self.nodes[n["node_id"]] = NodeRecord(
                n["node_id"],
                int(n["num_samples"]),
                "active" if n["state"] != "left" else "left",
                int(n["last_round"]),
            )
        log.info(
            "resumed from checkpoint at round %d",
            self.round,
            extra={"round": self.round, "event": "resume"},
        )
        return True

    # -- membership ------------------------------------------------------------
    async def join(self, node_id: str, num_samples: int) -> NodeRecord:
        """Register or re-register a node; start round 0 once enough nodes joined."""
        check_id("node_id", node_id)
        self._check_open()
        if num_samples >= MAX_EXACT_WEIGHT:
            raise InvalidArgument(
                f"num_samples {num_samples} is absurd (limit {MAX_EXACT_WEIGHT - 1})"
            )
        async with self._changed:
            record = self.nodes.get(node_id)
            if record is None:
                record = self.nodes[node_id] = NodeRecord(node_id, num_samples)
                log.info(
                    "node joined", extra={"node": node_id, "round": self.round, "event": "join"}
                )
            record.num_samples, record.state, record.last_seen = (
                num_samples,
                "active",
                time.monotonic(),
            )
            if not self.started and self._active_count() >= self.cfg.nodes:
                await asyncio.to_thread(self.checkpoint)
                await self._publish(first=True)
            return record

    async def leave(self, node_id: str) -> None:
        """Stop waiting for a node; its upload of the open round, if counted, stays counted."""
        async with self._changed:
            record = self._joined(node_id)
            record.state = "left"
            log.info("node left", extra={"node": node_id, "round": self.round, "event": "leave"})
            self._changed.notify_all()
        await self._maybe_close()

    def _check_open(self) -> None:
        if self.closing:
            raise Unavailable("the aggregator is shutting down; retry shortly")

    def _joined(self, node_id: str) -> NodeRecord:
        record = self.nodes.get(node_id)
        if record is None:
            raise FailedPrecondition(f"node {node_id!r} has not joined: call Join first")
        record.last_seen = time.monotonic()
        return record

    def _active_count(self) -> int:
        return sum(1 for r in self.nodes.values() if r.state == "active")

    # -- parameters --------------------------------------------------------------
    async def wait_snapshot(self, node_id: str, min_round: int) -> Snapshot:
        """Wait until a round >= ``min_round`` (or the end) is published; return it.

        The caller must call ``pull_done`` when its stream ends.
        """
        self._check_open()
        record = self._joined(node_id)
        if record.pulls >= MAX_PULLS_PER_NODE:
            raise ResourceExhausted(
                f"node {node_id!r} already has {record.pulls} parameter streams open"
            )
        if record.state == "dropped":
            record.state = "active"
        record.pulls += 1
        try:
            return await self._wait_published(min_round)
        except BaseException:
            record.pulls -= 1
            raise

    def pull_done(self, node_id: str) -> None:
        """Release a parameter stream slot of ``node_id``."""
        record = self.nodes.get(node_id)
        if record is not None and record.pulls > 0:
            record.pulls -= 1

    async def _wait_published(self, min_round: int) -> Snapshot:
        async with self._changed:
            await self._changed.wait_for(
                lambda: (
                    self.snapshot is not None
                    and (self.snapshot.round >= min_round or self.snapshot.finished)
                )
            )
            assert self.snapshot is not None
            return self.snapshot

    def sent(self, node_id: str, snapshot: Snapshot) -> None:
        """Record a completed parameter stream."""
        self.bytes_sent += snapshot.wire_bytes
        self._round_bytes += snapshot.wire_bytes
        if snapshot.finished:
            self.final_pulled.add(node_id)

    # -- uploads -------------------------------------------------------------------
    async def open_upload(
        self,
        node_id: str,
        round_: int,
        upload_id: str,
        num_samples: int,
        metrics: dict[str, float],
        layout: Layout,
    ) -> UploadTicket:
        """Check an upload header and reserve a staging slot.

        Raises:
            FailedPrecondition, StaleRound, AlreadyExists, InvalidArgument, ResourceExhausted.
        """
        check_id("upload_id", upload_id)
        _check_metrics(metrics)
        self._check_open()
        record = self._joined(node_id)
        if record.state == "left":
            raise FailedPrecondition(f"node {node_id!r} has left: call Join again")
        if self.finished or round_ < self.round:
            raise StaleRound(f"round {round_} is closed", self.round)
        if not self.started or round_ > self.round:
            raise FailedPrecondition(f"round {round_} is not open (current round {self.round})")
        weight = self._weight(num_samples)
        previous = self.reported.get(node_id)
        if previous == upload_id:
            return UploadTicket(node_id, round_, upload_id, weight, metrics, None, duplicate=True)
        if previous is not None:
            raise AlreadyExists(
                f"node {node_id!r} already uploaded {previous!r} for round {round_}; "
                f"a different upload {upload_id!r} is refused"
            )
        if record.uploading:
            raise ResourceExhausted(f"node {node_id!r} already has an upload in flight")
        if record.state == "dropped":
            record.state = "active"
        record.uploading = True
        try:
            await asyncio.wait_for(self._slots.acquire(), self.cfg.slot_wait)
        except TimeoutError:
            record.uploading = False
            raise ResourceExhausted(
                f"{self.max_inflight} uploads in flight for {self.cfg.slot_wait:.0f} s; retry later"
            ) from None
        except BaseException:
            record.uploading = False  # cancelled while queued: the node must not stay locked out
            raise
        ticket = UploadTicket(
            node_id, round_, upload_id, weight, metrics, StagedUpload(layout, self.cfg.chunk_bytes)
        )
        self.inflight.add(ticket)
        return ticket

    def _weight(self, num_samples: int) -> int:
        if self.cfg.reduce != "weighted-mean":
            return 1
        if not 1 <= num_samples < MAX_EXACT_WEIGHT:
            raise InvalidArgument(
                f"num_samples must be in [1, {MAX_EXACT_WEIGHT - 1}] for the weighted mean,"
                f" got {num_samples}"
            )
        return num_samples

    @property
    def staging_bytes(self) -> int:
        """Bytes of uploads staged right now."""
        return sum(t.staged.nbytes for t in list(self.inflight) if t.staged is not None)

    def release(self, ticket: UploadTicket, reduced: bool = False) -> None:
        """Free the staging slot of a ticket (after its reduce, or failure); idempotent.

        An accepted ticket keeps its slot until its reduce is done (``reduced=True``).
        """
        if ticket.accepted and not reduced:
            return
        self.inflight.discard(ticket)
        if ticket.staged is not None:
            ticket.staged = None
            self._slots.release()
            record = self.nodes.get(ticket.node_id)
            if record is not None:
                record.uploading = False

    async def commit(self, ticket: UploadTicket) -> int:
        """Accept a complete upload exactly once; return the round it counts in.

        The reply does not wait for the reduce: once an upload is complete, valid and
        recorded as this node's upload of the open round, it counts. The reduce runs
        in the background (one at a time, in a worker thread) and the round closes
        only after every accepted upload is reduced. An aggregator crash loses the
        open round's accumulator either way, so acking before the add promises nothing
        more than acking after it, and the node's upload overlaps the reduce.
        """
        if ticket.duplicate:
            return ticket.round
        staged = ticket.staged
        assert staged is not None
        staged.complete()
        if self.round != ticket.round or self.finished or self.closing_round:
            current = self.round + 1 if self.closing_round else self.round
            raise StaleRound(f"round {ticket.round} closed during the upload", current)
        previous = self.reported.get(ticket.node_id)
        if previous is not None:
            if previous == ticket.upload_id:
                return ticket.round
            raise AlreadyExists(
                f"node {ticket.node_id!r} already uploaded for round {ticket.round}"
            )
        # From here on, no await until the reduce is scheduled: the acceptance is atomic.
        ticket.accepted = True
        self.reported[ticket.node_id] = ticket.upload_id
        self.pending_reduces += 1
        self.uploads_accepted += 1
        self.bytes_received += staged.nbytes
        self._round_bytes += staged.nbytes
        if "loss" in ticket.metrics:
            self.round_loss[0] += ticket.metrics["loss"] * ticket.weight
            self.round_loss[1] += ticket.weight
        self.nodes[ticket.node_id].last_round = ticket.round
        self._spawn(self._reduce(ticket, staged))
        log.debug(
            "upload accepted",
            extra={"node": ticket.node_id, "round": ticket.round, "event": "commit"},
        )
        return ticket.round

    async def _reduce(self, ticket: UploadTicket, staged: StagedUpload) -> None:
        try:
            async with self._commit:
                began = time.perf_counter()
                await asyncio.to_thread(self.acc.commit, staged, ticket.weight)
                self._reduce_seconds += time.perf_counter() - began
        except Exception:
            # Cannot happen for a validated upload (weights and length are checked before
            # acceptance); if it does, say so loudly rather than close a round without it.
            log.exception(
                "reduce failed; the round will not close",
                extra={"node": ticket.node_id, "round": ticket.round, "event": "reduce_failed"},
            )
            raise
        finally:
            self.release(ticket, reduced=True)
        self.pending_reduces -= 1
        await self._maybe_close()

    # -- rounds ------------------------------------------------------------------------
    def quorum(self) -> bool:
        """Return True if the open round may close now."""
        if not self.started or self.finished or not self.reported or self.pending_reduces:
            return False
        waiting = [
            r for r in self.nodes.values() if r.state == "active" and r.node_id not in self.reported
        ]
        if not waiting:
            return True
        return self.deadline_passed and len(self.reported) >= self.cfg.min_nodes

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _maybe_close(self) -> None:
        async with self._commit:
            if not self.quorum():
                return
            if self.deadline_passed:
                for r in self.nodes.values():
                    if r.state == "active" and r.node_id not in self.reported:
                        r.state = "dropped"
                        log.warning(
                            "node missed the round deadline",
                            extra={"node": r.node_id, "round": self.round, "event": "dropped"},
                        )
            await self._close_round()

    async def _close_round(self) -> None:
        self.phase = "stepping"
        self.closing_round = True
        collected = time.perf_counter()
        phases = {"collect": time.monotonic() - self.round_started, "reduce": self._reduce_seconds}
        divisor = self.acc.weight if self.cfg.reduce != "sum" else 1.0
        metrics = await asyncio.to_thread(self._step, divisor)
        phases["step"] = time.perf_counter() - collected
        record = RoundRecord(
            round=self.round + 1,
            train_loss=self.round_loss[0] / self.round_loss[1]
            if self.round_loss[1]
            else float("nan"),
            test_loss=metrics.get("loss", float("nan")),
            test_accuracy=metrics.get("accuracy", float("nan")),
            seconds=time.monotonic() - self.round_started,
            bytes=self._round_bytes,
            nodes=self.acc.count,
        )
        self.history.append(record)
        self.round += 1
        self.closing_round = False
        self.acc.reset()
        self.reported.clear()
        self.round_loss = [0.0, 0.0]
        began = time.perf_counter()
        await asyncio.to_thread(self.checkpoint)
        phases["checkpoint"] = time.perf_counter() - began
        began = time.perf_counter()
        async with self._changed:
            await self._publish(first=False)
        phases["broadcast"] = time.perf_counter() - began
        self.phase_seconds = phases
        for callback in self.on_round:
            callback(record)

    def _step(self, divisor: float) -> dict[str, float]:
        # Gradients exist a batch of tensors at a time, never a whole second model:
        # torch.optim skips parameters whose grad is None, and sgd, momentum and adam
        # update each parameter from its own gradient and state, so stepping batch by
        # batch gives the same parameters as one step over all of them.
        for batch in self._step_batches:
            grads = [torch.empty_like(self.params[i]) for i in batch]
            self.acc.result_into(grads, divisor, batch)
            for i, g in zip(batch, grads, strict=True):
                self.params[i].grad = g
            del grads
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.eval()
            return self.task.evaluate(self.model) or {}

    async def _publish(self, first: bool) -> None:
        """Serialize the parameters of the (new) round and wake waiting pulls. Holds _changed."""
        self.finished = self.round >= self.cfg.rounds
        self.snapshot = None  # let the old broadcast go before the new one is built
        self.snapshot = await asyncio.to_thread(
            make_snapshot,
            self.params,
            self.layout,
            self.cfg.chunk_bytes,
            self.round,
            self.finished,
            self.session_id,
        )
        self.started = True
        self.phase = "finished" if self.finished else "collecting"
        self.round_started = time.monotonic()
        self.deadline_passed = False
        self._round_bytes = 0
        self._reduce_seconds = 0.0
        self._changed.notify_all()
        if not self.finished:
            if self._deadline_task is not None:
                self._deadline_task.cancel()
            self._deadline_task = asyncio.get_running_loop().create_task(self._deadline(self.round))

    async def _deadline(self, round_: int) -> None:
        await asyncio.sleep(self.cfg.round_timeout)
        if self.round != round_ or self.finished:
            return
        self.deadline_passed = True
        await self._maybe_close()
        # Still open with the quorum reached: an upload is being added; it closes the round.
        if self.round == round_ and len(self.reported) < self.cfg.min_nodes:
            self.phase = "waiting"
            log.warning(
                "round deadline passed with %d of %d required uploads; waiting for nodes",
                len(self.reported),
                self.cfg.min_nodes,
                extra={"round": round_, "event": "below_quorum"},
            )

    async def wait_finished(self) -> None:
        """Return once training is over and every active node pulled the final parameters."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.finished)
        loop_deadline = time.monotonic() + self.cfg.finish_grace
        while time.monotonic() < loop_deadline:
            pending = [
                r
                for r in self.nodes.values()
                if r.state == "active" and r.node_id not in self.final_pulled
            ]
            if not pending:
                return
            await asyncio.sleep(0.05)
        log.warning(
            "finished; some nodes did not fetch the final parameters", extra={"event": "finish"}
        )

    async def final_checkpoint(self) -> None:
        """Checkpoint the last committed round, never in the middle of a step."""
        async with self._commit:
            await asyncio.to_thread(self.checkpoint)

    def close(self) -> None:
        """Cancel the round timer and background work (on shutdown)."""
        if self._deadline_task is not None:
            self._deadline_task.cancel()
        for task in list(self._background):
            task.cancel()
        self.acc.close()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return the model's full state dict (parameters and buffers), detached."""
        return {k: v.detach() for k, v in self.model.state_dict().items()}
