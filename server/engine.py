"""The round engine: membership, phases, acceptance of uploads, quorum and deadlines.

A sans-I/O state machine in the manner of python-hyper's h11: no grpc, torch,
asyncio, threads or clocks. The async shell (``fedgrad.server.aggregator``)
feeds it events (a join, an upload header, a counted upload, an add finished, a
deadline, the time as a number) and acts on what each call returns: start the
federation, close the round, warn that the round is below quorum. Every rule
about *when* the federation starts and a round may close lives in a
``RoundPolicy`` (``fedgrad.server.policy``); synchronous rounds with a quorum
are one policy, sampled and asynchronous rounds are others. Everything outside
reads the engine through its read-only properties and ``view()``; only the
engine's methods change its state. The state and the read-only queries live in
``EngineState`` (``fedgrad.server.engine_state``); this module holds the events.

Round numbers are 0-based: round r is open while the parameters of round r are
published; closing it applies the uploads counted in it and opens round r + 1.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedgrad.errors import (
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    StaleRound,
)
from fedgrad.server.engine_state import EngineState
from fedgrad.server.policy import Selection
from fedgrad.server.rounds import (
    MAX_PULLS_PER_NODE,
    UNSELECTED,
    Deadline,
    EngineView,
    NodeRecord,
    NodeState,
    Phase,
    Rules,
)

# The vocabulary lives in fedgrad.server.rounds; importing it from here keeps working.
__all__ = [
    "MAX_PULLS_PER_NODE",
    "UNSELECTED",
    "Deadline",
    "EngineView",
    "NodeRecord",
    "NodeState",
    "Phase",
    "RoundEngine",
    "Rules",
]


class RoundEngine(EngineState):
    """The federation's round state machine; see the module docstring."""

    # -- restore -----------------------------------------------------------------------
    def restore(self, round_: int, nodes: Iterable[NodeRecord]) -> None:
        """Take the round and the nodes of a checkpoint; the shell then publishes ``round_``."""
        self._round = round_
        for record in nodes:
            state = NodeState.LEFT if record.state is NodeState.LEFT else NodeState.ACTIVE
            self._nodes[record.node_id] = NodeRecord(
                record.node_id, record.num_samples, state, record.last_round, record.last_upload
            )
        self._starting = True

    def redo(self) -> None:
        """Forget the open round's counted uploads: a shard lost its part of them.

        The round stays the same; the shell republishes its parameters (``opened``) and
        every node uploads it again. Call with no add pending (``pending_adds`` 0).
        """
        if self._pending:
            raise RuntimeError("redo() while counted uploads are being added")
        self._reported.clear()
        self._closing = False
        self._starting = True
        self.deadline_passed = False
        for record in self._nodes.values():
            record.uploading = False

    # -- membership --------------------------------------------------------------------
    def join(self, node_id: str, num_samples: int, now: float) -> bool:
        """Register or re-register a node; return True if the federation starts now.

        Raises:
            Unavailable: the aggregator is shutting down.
        """
        self._check_open()
        record = self._nodes.get(node_id)
        if record is None:
            record = self._nodes[node_id] = NodeRecord(node_id, num_samples)
        record.num_samples, record.state, record.last_seen = num_samples, NodeState.ACTIVE, now
        return self._maybe_start()

    def start_deadline(self) -> bool:
        """The start deadline passed; return True if the federation starts now."""
        self.start_deadline_passed = True
        return self._maybe_start()

    def _maybe_start(self) -> bool:
        if self._phase is not Phase.WAITING or self._starting:
            return False
        if not self.policy.ready_to_start(self.tally()):
            return False
        self._starting = True
        return True

    def leave(self, node_id: str, now: float) -> bool:
        """Stop waiting for a node; return True if the round may close now.

        Its upload of the open round, if counted, stays counted.

        Raises:
            FailedPrecondition: the node never joined.
        """
        self._joined(node_id, now).state = NodeState.LEFT
        return self._may_close()

    def replace_missing(self, missed_deadline: bool = False) -> frozenset[str]:
        """Select replacements for selected nodes that left or are late; return them.

        A sampled round with fewer than ``min_nodes`` uploads at its deadline (or with
        no selected node left to wait for) would otherwise wait forever. With
        ``missed_deadline``, selected nodes that have not reported are marked late
        first (an upload of theirs still counts if it comes). The draw is seeded from
        (seed, round, attempt), like the round's own.
        """
        nodes = self._selection.nodes
        if nodes is None or self._phase is not Phase.COLLECTING or self._closing:
            return frozenset()
        if missed_deadline:
            for node_id in nodes - set(self._reported):
                record = self._nodes.get(node_id)
                if record is not None and record.state is NodeState.ACTIVE:
                    record.state = NodeState.LATE
        waiting = {n for n in nodes if self._state(n) is NodeState.ACTIVE} - set(self._reported)
        missing = self._selection.target - len(self._reported) - len(waiting)
        spare = [n for n in self._eligible() if n not in nodes]
        if missing <= 0 or not spare:
            return frozenset()
        self._attempt += 1
        drawn = self.policy.select(self._round, spare, self._attempt).nodes or frozenset()
        extra = frozenset(sorted(drawn)[:missing])
        self._selection = Selection(nodes | extra, self._selection.target)
        return extra

    def open_pull(self, node_id: str, now: float) -> None:
        """Take one of the node's parameter-stream slots (a late node counts as active again).

        Raises:
            Unavailable, FailedPrecondition, ResourceExhausted.
        """
        self._check_open()
        record = self._joined(node_id, now)
        if record.pulls >= MAX_PULLS_PER_NODE:
            raise ResourceExhausted(
                f"node {node_id!r} already has {record.pulls} parameter streams open"
            )
        if record.state is NodeState.LATE:
            record.state = NodeState.ACTIVE
        record.pulls += 1

    def close_pull(self, node_id: str) -> None:
        """Give back a parameter-stream slot of ``node_id``."""
        record = self._nodes.get(node_id)
        if record is not None and record.pulls > 0:
            record.pulls -= 1

    # -- uploads -----------------------------------------------------------------------
    def open_upload(self, node_id: str, round_: int, upload_id: str, now: float) -> bool:
        """Check an upload header; return True if it repeats the upload already counted.

        Otherwise the node is marked as uploading until ``accept`` or ``abandon``.
        Precedence: a closed round is ABORTED before any duplicate check.

        Raises:
            Unavailable, FailedPrecondition, StaleRound, AlreadyExists, ResourceExhausted.
        """
        self._check_open()
        record = self._joined(node_id, now)
        if record.state is NodeState.LEFT:
            raise FailedPrecondition(f"node {node_id!r} has left: call Join again")
        self._check_round(round_)
        if self._phase is Phase.WAITING or round_ > self._round:
            raise FailedPrecondition(f"round {round_} is not open (current round {self._round})")
        if not self.policy.may_upload(self.tally(), node_id):
            raise FailedPrecondition(
                f"node {node_id!r} is not selected for round {round_}: its pull waits for a"
                " round that selects it"
            )
        if round_ < self._round and round_ <= record.last_round:
            # Asynchronous rounds: an older version's upload of this node already counted.
            if round_ == record.last_round and upload_id == record.last_upload:
                return True
            raise AlreadyExists(
                f"node {node_id!r} already uploaded {record.last_upload!r} computed on"
                f" version {record.last_round}; upload {upload_id!r} is refused"
            )
        previous = self._reported.get(node_id)
        if previous == upload_id:
            return True
        if previous is not None:
            raise AlreadyExists(
                f"node {node_id!r} already uploaded {previous!r} for round {round_}; "
                f"a different upload {upload_id!r} is refused"
            )
        if record.uploading:
            raise ResourceExhausted(f"node {node_id!r} already has an upload in flight")
        if record.state is NodeState.LATE:
            record.state = NodeState.ACTIVE
        record.uploading = True
        return False

    def abandon(self, node_id: str) -> None:
        """End an upload that will not be (or was already) counted: the node may upload again."""
        record = self._nodes.get(node_id)
        if record is not None:
            record.uploading = False

    def accept(self, node_id: str, round_: int, upload_id: str) -> bool:
        """Count a complete, valid upload exactly once; return False if it already counted.

        After True the shell adds the upload and then calls ``added``.

        Raises:
            StaleRound: the round closed (or began closing) during the upload.
            AlreadyExists: another upload of this node counted in the meantime.
        """
        oldest = self.policy.oldest_round(self._round)
        if (
            not oldest <= round_ <= self._round
            or self._phase is not Phase.COLLECTING
            or self._closing
        ):
            current = self._round + 1 if self._closing else self._round
            raise StaleRound(f"round {round_} closed during the upload", current)
        previous = self._reported.get(node_id)
        if previous is not None:
            if previous == upload_id:
                return False
            raise AlreadyExists(f"node {node_id!r} already uploaded for round {round_}")
        target = self._selection.target
        if target and len(self._reported) >= target:
            # Over-commitment or a full async buffer: the round has its K uploads.
            raise StaleRound(
                f"round {self._round} already has its {target} uploads", self._round + 1
            )
        self._reported[node_id] = upload_id
        self._pending += 1
        record = self._nodes[node_id]
        record.last_round, record.last_upload = round_, upload_id
        return True

    def added(self) -> bool:
        """A counted upload's add finished; return True if the round may close now."""
        if self._pending <= 0:
            raise RuntimeError("added() without a counted upload")
        self._pending -= 1
        return self._may_close()

    # -- rounds ------------------------------------------------------------------------
    def round_deadline(self, round_: int) -> Deadline:
        """The deadline of ``round_`` passed; return what to do."""
        if round_ != self._round or self._phase is not Phase.COLLECTING or self._closing:
            return Deadline.IGNORED
        self.deadline_passed = True
        if self._may_close():
            return Deadline.CLOSE
        if len(self._reported) >= self.rules.min_nodes:
            return Deadline.PENDING
        return Deadline.BELOW_QUORUM

    def _may_close(self) -> bool:
        if self._phase is not Phase.COLLECTING or self._closing or self._pending:
            return False
        return self.policy.may_close(self.tally())

    def begin_close(self) -> tuple[str, ...]:
        """Start closing the open round; return the nodes marked late by its deadline.

        Call only after a True/CLOSE decision; uploads arriving now are ABORTED.
        """
        if not self._may_close():
            raise RuntimeError("begin_close() without a close decision")
        self._closing = True
        self._phase = Phase.STEPPING
        late: list[str] = []
        if self.deadline_passed:
            selected = self._selection.nodes
            for r in self._nodes.values():
                if selected is not None and r.node_id not in selected:
                    continue
                if r.state is NodeState.ACTIVE and r.node_id not in self._reported:
                    r.state = NodeState.LATE
                    late.append(r.node_id)
        return tuple(late)

    def opened(self) -> bool:
        """The shell published the parameters of the next round (or of round 0, or a resume).

        Return True if training is finished (no round opens).
        """
        if self._closing:
            self._round += 1
            self._closing = False
            self._reported.clear()
        elif not self._starting:
            raise RuntimeError("opened() without a start or a close")
        self._starting = False
        self.deadline_passed = False
        finished = self._round >= self._last
        self._phase = Phase.FINISHED if finished else Phase.COLLECTING
        self._attempt = 0
        if finished:
            self._selection = Selection(None, 0)
        else:
            self._selection = self.policy.select(self._round, self._eligible())
        return finished

    def end_early(self) -> None:
        """Make the round being closed the last one (e.g. the privacy budget is spent).

        Call between ``begin_close`` and ``opened``; ``opened`` then finishes training.
        """
        if not self._closing:
            raise RuntimeError("end_early() outside a close")
        self._last = self._round + 1

    def shut_down(self) -> None:
        """Refuse joins, pulls and uploads from now on (UNAVAILABLE): the aggregator stops."""
        self._shutting_down = True
