"""The compute node: join, pull parameters, compute, push gradients, repeat.

The loop here knows rounds, tensors and the task; every gRPC call, retry and
status-code rule is in ``fedgrad.client.transport``, which hands back replies or
domain errors (``Failure`` with an ``Action``, ``Stopped``, ``RefusedError``). Pull and
push, the tensors' way between the model and the wire, are ``fedgrad.client.exchange``'s.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from fedgrad.buffers import buffer_specs, model_buffers
from fedgrad.client.attacks import attack_generator, attacked, claimed_samples, warn_attack
from fedgrad.client.exchange import TensorExchange, pinned
from fedgrad.client.feedback import ErrorFeedback
from fedgrad.client.sharded import ShardLinks
from fedgrad.client.transport import Action, Backoff, Failure, Stopped, Transport
from fedgrad.codec import (
    Layout,
    TensorSpec,
    byte_view,
    manifest_from_proto,
    manifest_to_proto,
    specs_of,
)
from fedgrad.codecs import codec_for
from fedgrad.config import NodeConfig
from fedgrad.errors import RefusedError, TaskError
from fedgrad.logs import once_per_process
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.seeding import round_generator
from fedgrad.task import (
    EVAL_PREFIX,
    EVAL_SAMPLES,
    EVALUATE_KEY,
    RoundContext,
    Task,
    check_update,
    resolve_device,
    to_device,
    trainable_parameters,
)
from fedgrad.wire import task_identity

__all__ = ["Node", "NodeResult", "join_request", "simulated_delay"]

log = logging.getLogger("fedgrad.node")
#: The codecs whose loss error feedback makes up for by default (``--error-feedback auto``).
_FEEDBACK_BY_DEFAULT = ("topk", "powersgd")


def join_request(
    cfg: NodeConfig, layout: Layout, num_samples: int, buffers: list[TensorSpec] | None = None
) -> pb.JoinRequest:
    """Return the Join a node sends: its id and samples, and its model, seed and task.

    The aggregator refuses a node whose model, seed or task differs from its own
    (INVALID_ARGUMENT, naming what differs) before the node takes part in any round.

    Args:
        cfg: the node's config (id, seed, task spec and options).
        layout: the node's trainable tensors, in order.
        num_samples: the node's sample count.
        buffers: the model's buffer manifest (none: the node takes no part in their mean).

    Returns:
        The request (the config keeps the seed a uint64, as the field needs).
    """
    return pb.JoinRequest(
        node_id=cfg.node_id,
        num_samples=num_samples,
        manifest=manifest_to_proto(layout.specs),
        seed=cfg.seed,
        task=task_identity(cfg.task, cfg.task_args),
        buffers=manifest_to_proto(buffers) if buffers else None,
    )


def simulated_delay(cfg: NodeConfig, round_: int) -> float:
    """Return the seconds ``--simulate-delay`` adds to this round: uniform in [MIN, MAX].

    The draw has its own generator, seeded from (seed, node id, round) with a salt, and
    never touches the task's ``round_generator``: training results are bitwise the same
    with and without delays, and a restarted node waits as long as before.

    Args:
        cfg: the node's config (seed, node id, ``simulate_delay``).
        round_: the round computed.
    """
    low, high = cfg.simulate_delay
    if high <= 0:
        return 0.0
    # A str seed is hashed with SHA-512 (random.seed, version 2): the same in every process.
    rng = random.Random(f"simulate-delay\x00{cfg.seed}\x00{cfg.node_id}\x00{round_}")
    return rng.uniform(low, high)


@once_per_process
def _warn_simulated(delay: tuple[float, float]) -> None:
    """Say once per process (and range) that rounds are slowed on purpose."""
    log.warning(
        "simulating stragglers: each round waits %g-%g s after computing (--simulate-delay)",
        *delay,
        extra={"event": "simulate_delay"},
    )


@dataclass(frozen=True)
class NodeResult:
    """What a node did: rounds it uploaded and the final round it saw."""

    node_id: str
    uploads: int
    final_round: int


class Node(TensorExchange):
    """One compute node. ``run()`` returns when training is over, or after ``stop()``.

    Args:
        task: the task (this node's own object).
        cfg: the node's config.
        compute: entered around each round's ``compute_update``; ``fedgrad node --count``
            passes a semaphore shared by its nodes to bound the concurrent compute.
    """

    def __init__(
        self, task: Task, cfg: NodeConfig, compute: AbstractContextManager[Any] | None = None
    ) -> None:
        self.task, self.cfg = task, cfg
        self.compute = compute if compute is not None else nullcontext()
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        #: Where the model and its computation live (``--device``).
        self.device = resolve_device(cfg.device)
        self.model = task.model().to(self.device)
        # The first torch.optim optimizer of a process imports torch._dynamo (~1 s here):
        # pay it at start-up, not inside the first round a task builds one in.
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        self.params = [p for _, p in trainable_parameters(self.model)]
        self.layout = Layout(specs_of(trainable_parameters(self.model)))
        # On a GPU the wire reads and writes pinned host copies, moved in one batch of
        # asynchronous copies per round; on the CPU it reads the parameters themselves.
        on_cpu = self.device.type == "cpu"
        self.host = self.params if on_cpu else [pinned(p) for p in self.params]
        self.grad_host = None if on_cpu else [pinned(p) for p in self.params]
        self.views = [byte_view(t.data) for t in self.host]
        self.data = to_device(task.shard(*cfg.shard), self.model)
        self.held_out = to_device(task.holdout(*cfg.shard), self.model)
        self.num_samples = claimed_samples(cfg.simulate_attack, task.num_samples(self.data))
        self.buffers = [b for _, b in model_buffers(self.model)]
        self.buffer_specs = buffer_specs(self.model)
        self.share_buffers = False  # the aggregator says, at Join
        self.join_request = join_request(cfg, self.layout, self.num_samples, self.buffer_specs)
        self.codec = codec_for(
            cfg.compress, self.layout.specs, stochastic=cfg.rounding == "stochastic"
        )
        feedback = cfg.error_feedback == "on" or (
            cfg.error_feedback == "auto" and cfg.compress.startswith(_FEEDBACK_BY_DEFAULT)
        )
        self.feedback = ErrorFeedback(self.codec, feedback, cfg.state_dir, cfg.node_id)
        self.transport = Transport(cfg)
        self.session_id = ""
        self.chunk_bytes = 0
        self.upload_ready = False
        self.uploads = 0
        self._staging: tuple[torch.dtype, Layout, list[torch.Tensor]] | None = None
        #: A sharded aggregator's other shards (set at Join), None for one aggregator.
        self.links: ShardLinks | None = None
        self._takes_context = "context" in inspect.signature(task.compute_update).parameters

    @property
    def stop_event(self) -> threading.Event:
        """Set once ``stop()`` was called."""
        return self.transport.stopped

    @property
    def backoff(self) -> Backoff:
        """The retry budget shared by every call (``attempt``: failures since the last success)."""
        return self.transport.backoff

    def close(self) -> None:
        """Close the channel (the channels, to a sharded aggregator)."""
        if self.links is not None:
            self.links.close()
        self.transport.close()

    def stop(self, reason: str = "stop requested") -> None:
        """Make ``run()`` leave the federation and return, whatever the node is doing now.

        Cancels the call in flight and ends a backoff wait; ``run()`` then calls Leave
        and returns its ``NodeResult``. Idempotent, and safe from any thread at any
        moment, before, during or after ``run()``, also from a signal handler that
        interrupts another ``stop()``. From a signal handler, keep ``run()`` off the main
        thread (as ``fedgrad node`` does): the handler interrupts the main thread between
        any two bytecodes, possibly inside a lock that ``run()`` holds (a backoff wait's).

        Args:
            reason: logged as "REASON: leaving the federation"; the first one wins.
        """
        self.transport.stop(reason)
        if self.links is not None:
            self.links.stop(reason)

    # -- calls -------------------------------------------------------------------
    def join(self, after: Failure | None = None) -> pb.JoinReply:
        """Join (idempotent) and check that the aggregator's model is this task's model.

        Args:
            after: the failure that sent the node back to Join (backed off if transient).

        Raises:
            TaskError: the aggregator's model is not this task's model.
        """
        reply = self.transport.join(self.join_request, after)
        theirs = manifest_from_proto(reply.manifest)
        if theirs != self.layout.specs:
            raise TaskError(
                "the aggregator's model differs from this node's task model "
                f"({len(theirs)} vs {len(self.layout.specs)} tensors): run both with the same --task"
            )
        self.chunk_bytes = reply.chunk_bytes
        self.upload_ready = reply.upload_ready
        self.share_buffers = bool(self.buffers) and not reply.buffers_local
        if (
            self.share_buffers
            and manifest_from_proto(reply.buffers, integers=True) != self.buffer_specs
        ):
            raise TaskError(
                "the aggregator's model buffers differ from this node's: run both with the same"
                " --task"
            )
        unit = max(self.codec.layout.itemsizes, default=1)
        if unit > self.chunk_bytes:
            raise TaskError(
                f"codec {self.codec.name} sends records of {unit} bytes, more than the"
                f" aggregator's --chunk-bytes {self.chunk_bytes}: use a smaller int8 block"
            )
        self.session_id = reply.session_id
        if len(reply.shard_map.shards) > 1 and (
            self.links is None or self.links.map_id != reply.shard_map.map_id
        ):
            if self.links is not None:
                self.links.close()
            self.links = ShardLinks(self.cfg, reply.shard_map, self.layout.specs, self.transport)
        log.info(
            "joined at round %d of %d",
            reply.round,
            reply.total_rounds,
            extra={"node": self.cfg.node_id, "round": reply.round, "event": "join"},
        )
        return reply

    def leave(self) -> None:
        """Tell the aggregator to stop waiting for this node (best effort)."""
        self.transport.leave()

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> NodeResult:
        """Train until the aggregator finishes or ``stop()``; reconnect across aggregator restarts.

        Returns:
            What the node did, also after ``stop()`` (then the node has called Leave).

        Raises:
            GaveUpError: the aggregator was unreachable for ``give_up_after`` seconds.
            RefusedError: the aggregator refused this node (credentials, bad input).
            TaskError: the task or the aggregator's model does not fit.
        """
        try:
            return self._loop()
        except Failure as failure:  # a failure of a Join outside the loop's recovery
            raise RefusedError(
                f"the aggregator refused node {self.cfg.node_id!r}: {failure}"
            ) from None

    def _loop(self) -> NodeResult:
        next_round = 0
        if self.cfg.simulate_delay[1] > 0:
            _warn_simulated(tuple(self.cfg.simulate_delay))  # a list (LocalCluster) is no key
        if self.cfg.simulate_attack is not None:
            warn_attack(self.cfg.simulate_attack)
        try:
            self.join()
            while not self.stop_event.is_set():
                try:
                    header = self.pull(next_round)
                    if header.session_id != self.session_id:
                        next_round = self.join().round
                        continue
                    if header.finished:
                        return NodeResult(self.cfg.node_id, self.uploads, header.round)
                    context = RoundContext(header.round, header.total_rounds, dict(header.config))
                    next_round = self.train_round(header.round, context)
                except Failure as failure:
                    next_round = self._recover(failure, next_round)
        except Stopped:
            pass
        except (TaskError, RefusedError):
            # The task crashed or the aggregator refused us: say we are gone (best
            # effort), so the aggregator stops waiting for this node until a deadline.
            self.leave()
            raise
        log.info(
            "%s: leaving the federation",
            self.transport.stop_reason,
            extra={"node": self.cfg.node_id, "event": "leave"},
        )
        self.leave()
        return NodeResult(self.cfg.node_id, self.uploads, next_round)

    def train_round(self, round_: int, context: RoundContext | None = None) -> int:
        """Compute and push this round's update; return the next round to pull.

        ``context`` (the broadcast's round, total rounds and config) is the task's
        ``context`` during ``compute_update``, and its ``context=`` argument if it takes one.
        """
        generator = round_generator(self.cfg.seed, self.cfg.node_id, round_)
        evaluation = self._evaluate(context)  # the pulled parameters, before any local step
        self.task.context = context
        extra = {"context": context} if self._takes_context else {}
        with self.compute:
            update = self.task.compute_update(self.model, self.data, generator, **extra)
        check_update(update, self.params)
        if self.cfg.simulate_attack is not None:
            update = attacked(update, self.cfg.simulate_attack, attack_generator(self.cfg, round_))
        # After the compute and outside ``compute``: a waiting straggler holds no worker.
        if self.stop_event.wait(simulated_delay(self.cfg, round_)):
            raise Stopped
        reply = self.push(
            round_, update.gradients, update.num_samples, {**update.metrics, **evaluation}
        )
        self.uploads += 0 if reply.duplicate else 1
        log.info(
            "round %d uploaded (loss %.4f)",
            round_,
            update.metrics.get("loss", float("nan")),
            extra={"node": self.cfg.node_id, "round": round_, "event": "upload"},
        )
        return round_ + 1

    def _evaluate(self, context: RoundContext | None) -> dict[str, float]:
        """Evaluate the round's parameters on the held-out data if the aggregator asks."""
        if self.held_out is None or context is None or context.config.get(EVALUATE_KEY) != "1":
            return {}
        with self.compute:
            metrics = self.task.evaluate_holdout(self.model, self.held_out)
        out = {EVAL_PREFIX + k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        out[EVAL_SAMPLES] = float(self.task.num_samples(self.held_out))
        return out

    def _recover(self, failure: Failure, next_round: int) -> int:
        """Return the round to pull after ``failure`` of a pull, a push or a Join."""
        if failure.action is Action.CONTINUE_AT:
            current = failure.current_round
            log.info(
                "round closed before our upload counted; continuing at round %s",
                current,
                extra={"node": self.cfg.node_id, "round": next_round, "event": "stale"},
            )
            return current if current is not None else next_round
        if failure.action is Action.NEXT_ROUND:
            return next_round + 1
        if failure.action is Action.ASK_AGAIN:
            return next_round
        # REJOIN or BACK_OFF: after a reconnect, redo the aggregator's open round: if it
        # restarted from a checkpoint our counted upload may be gone; if not, the same
        # upload id is a no-op.
        return self.join(after=failure).round
