"""The round engine's state and the read-only queries on it.

``fedgrad.server.engine.RoundEngine`` extends ``EngineState`` with the events that
change the state (joins, uploads, deadlines, closes); everything here only reads it,
apart from ``_joined`` noting when a node was last seen. Pure, like the engine: no
grpc, torch, asyncio, threads or clocks.
"""

from __future__ import annotations

from fedgrad.errors import FailedPrecondition, StaleRound, Unavailable
from fedgrad.server.policy import RoundPolicy, Selection, SyncPolicy, Tally
from fedgrad.server.rounds import EngineView, NodeRecord, NodeState, Phase, Rules

__all__ = ["EngineState"]


class EngineState:
    """The fields of the round engine and the queries every event shares."""

    def __init__(self, rules: Rules, policy: RoundPolicy | None = None) -> None:
        self.rules = rules
        self.policy: RoundPolicy = policy or SyncPolicy()
        self._phase = Phase.WAITING
        self._round = 0
        self._nodes: dict[str, NodeRecord] = {}
        self._reported: dict[str, str] = {}  # node id -> upload id counted in the open round
        self._pending = 0  # counted uploads whose add has not finished
        self._starting = False  # the start was decided; the shell is publishing round 0
        self._selection = Selection(None, 0)  # the open round's sample
        self._attempt = 0  # replacement draws in the open round
        self._closing = False  # the close was decided; the shell is stepping
        self.deadline_passed = False
        self.start_deadline_passed = False
        self._shutting_down = False
        self._last = rules.rounds  # rounds to train; end_early() lowers it

    # -- read-only state ---------------------------------------------------------------
    @property
    def round(self) -> int:
        return self._round

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def finished(self) -> bool:
        return self._phase is Phase.FINISHED

    @property
    def nodes(self) -> tuple[NodeRecord, ...]:
        return tuple(list(self._nodes.values()))

    @property
    def reported(self) -> dict[str, str]:
        """Node id -> upload id of the uploads counted in the open round (a copy)."""
        return dict(self._reported)

    @property
    def selected(self) -> frozenset[str] | None:
        """The nodes the open round takes uploads from (None: every active node)."""
        return self._selection.nodes

    def is_selected(self, node_id: str, round_: int) -> bool:
        """Return True if ``round_`` is open and takes an upload from ``node_id``."""
        if self._phase is not Phase.COLLECTING or round_ != self._round:
            return False
        nodes = self._selection.nodes
        return nodes is None or node_id in nodes

    @property
    def pending_adds(self) -> int:
        return self._pending

    @property
    def active_count(self) -> int:
        return sum(1 for r in self._nodes.values() if r.state is NodeState.ACTIVE)

    @property
    def below_quorum(self) -> bool:
        """True past a deadline with fewer than ``min_nodes`` uploads counted."""
        if self._phase is Phase.WAITING:
            return self.start_deadline_passed
        return (
            self._phase is Phase.COLLECTING
            and self.deadline_passed
            and len(self._reported) < self.rules.min_nodes
        )

    @property
    def opening_round(self) -> int:
        """The round the shell is about to publish: the next one while closing."""
        return self._round + 1 if self._closing else self._round

    def tally(self) -> Tally:
        """Return what the policy decides on, as of now."""
        return Tally(
            nodes=self.rules.nodes,
            min_nodes=self.rules.min_nodes,
            active=frozenset(n for n, r in self._nodes.items() if r.state is NodeState.ACTIVE),
            reported=frozenset(self._reported),
            deadline_passed=self.deadline_passed,
            start_deadline_passed=self.start_deadline_passed,
            selected=self._selection.nodes,
            target=self._selection.target,
        )

    def node(self, node_id: str) -> NodeRecord | None:
        """Return the record of ``node_id``, or None if it never joined."""
        return self._nodes.get(node_id)

    def view(self) -> EngineView:
        """Return a consistent snapshot for status, metrics and progress."""
        return EngineView(
            round=self._round,
            total_rounds=self._last,
            phase=self._phase,
            finished=self.finished,
            below_quorum=self.below_quorum,
            deadline_passed=self.deadline_passed,
            reported=frozenset(self._reported),
            pending_adds=self._pending,
            # list() first: metrics read this from the HTTP thread while the loop joins nodes,
            # and copying a dict's values is one C call (atomic under the GIL).
            nodes=tuple(NodeRecord(**vars(r)) for r in list(self._nodes.values())),
            selected=self._selection.nodes,
        )

    @property
    def stuck(self) -> bool:
        """True if the open sampled round has no upload and no selected node to wait for."""
        nodes = self._selection.nodes
        if nodes is None or self._phase is not Phase.COLLECTING or self._closing:
            return False
        return not self._reported and not any(self._state(n) is NodeState.ACTIVE for n in nodes)

    def staleness(self, round_: int) -> int:
        """Return how many rounds (versions) old an upload computed on ``round_`` is now."""
        return self._round - round_

    def counted(self) -> int:
        """Return how many uploads the open round counted."""
        return len(self._reported)

    @property
    def total_rounds(self) -> int:
        """Rounds training runs for: ``rules.rounds``, or fewer after ``end_early``."""
        return self._last

    # -- helpers -----------------------------------------------------------------------
    def _eligible(self) -> list[str]:
        """The sorted ids a round may select: active nodes (not late, not left)."""
        return sorted(n for n, r in self._nodes.items() if r.state is NodeState.ACTIVE)

    def _state(self, node_id: str) -> NodeState | None:
        record = self._nodes.get(node_id)
        return None if record is None else record.state

    def _check_round(self, round_: int) -> None:
        """Raise StaleRound if an upload computed on ``round_`` can no longer count."""
        oldest = self.policy.oldest_round(self._round)
        if self.finished or round_ >= oldest:
            if self.finished:
                raise StaleRound(f"round {round_} is closed: training finished", self._round)
            return
        if oldest == self._round:
            raise StaleRound(f"round {round_} is closed", self._round)
        raise StaleRound(
            f"version {round_} is {self._round - round_} versions old; uploads at most"
            f" {self._round - oldest} versions old count (--max-staleness)",
            self._round,
        )

    def _check_open(self) -> None:
        if self._shutting_down:
            raise Unavailable("the aggregator is shutting down; retry shortly")

    def _joined(self, node_id: str, now: float) -> NodeRecord:
        record = self._nodes.get(node_id)
        if record is None:
            raise FailedPrecondition(f"node {node_id!r} has not joined: call Join first")
        record.last_seen = now
        return record
