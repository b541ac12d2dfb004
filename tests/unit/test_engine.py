"""The round engine driven directly: events in, decisions out, no server, no clock.

A hypothesis state machine drives random interleavings of joins, leaves,
headers, counted uploads, finished adds, deadlines and closes, and checks the
invariants after every step: an upload counts at most once, a round closes
exactly once, never below the quorum, and a late upload never changes a
closed round.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fedgrad.errors import (
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    RpcError,
    StaleRound,
    Unavailable,
)
from fedgrad.server.engine import Deadline, NodeState, Phase, RoundEngine, Rules


def _started(nodes: int = 2, rounds: int = 3, min_nodes: int = 1) -> RoundEngine:
    engine = RoundEngine(Rules(nodes=nodes, rounds=rounds, min_nodes=min_nodes))
    decisions = [engine.join(f"n{i}", 10, now=0.0) for i in range(nodes)]
    assert decisions == [False] * (nodes - 1) + [True], "the last join starts the federation"
    assert engine.opened() is False
    return engine


def _upload(engine: RoundEngine, node: str, upload_id: str = "u") -> bool:
    """Header, count and add one upload; return the close decision of the add."""
    assert engine.open_upload(node, engine.round, upload_id, now=1.0) is False
    assert engine.accept(node, engine.round, upload_id) is True
    engine.abandon(node)
    return engine.added()


def test_the_federation_starts_once_enough_nodes_joined() -> None:
    engine = RoundEngine(Rules(nodes=2, rounds=1))
    assert engine.join("a", 5, now=0.0) is False
    assert engine.phase is Phase.WAITING
    with pytest.raises(FailedPrecondition, match="not open"):
        engine.open_upload("a", 0, "u", now=0.0)
    assert engine.join("b", 5, now=0.0) is True
    assert engine.join("a", 5, now=0.0) is False, "a start is decided once"
    assert engine.opened() is False and engine.phase is Phase.COLLECTING


def test_the_start_deadline_starts_with_min_nodes_and_waits_below() -> None:
    # Issue: --nodes 4 --min-nodes 3 where one node never joins must not wait forever.
    engine = RoundEngine(Rules(nodes=4, rounds=2, min_nodes=3))
    for node in ("a", "b"):
        assert engine.join(node, 1, now=0.0) is False
    assert engine.start_deadline() is False, "two of three: keep waiting"
    assert engine.below_quorum and engine.view().shown_phase == "waiting"
    assert engine.join("c", 1, now=1.0) is True, "the third join starts it past the deadline"
    engine.opened()
    assert engine.phase is Phase.COLLECTING and not engine.below_quorum


def test_a_round_closes_when_every_active_node_reported() -> None:
    engine = _started(nodes=2)
    assert _upload(engine, "n0") is False
    assert engine.view().shown_state(engine.node("n0")) == "reported"  # type: ignore[arg-type]
    assert _upload(engine, "n1") is True
    assert engine.begin_close() == ()
    with pytest.raises(StaleRound) as stale:
        engine.accept("n0", 0, "other")
    assert stale.value.current_round == 1, "an upload finishing during the step is told r+1"
    assert engine.opened() is False and engine.round == 1 and not engine.reported


def test_a_deadline_closes_with_the_quorum_and_marks_the_rest_late() -> None:
    engine = _started(nodes=3, min_nodes=2)
    _upload(engine, "n0")
    assert engine.round_deadline(0) is Deadline.BELOW_QUORUM
    assert engine.below_quorum and engine.view().shown_phase == "waiting"
    assert _upload(engine, "n1") is True, "past the deadline the quorum closes the round"
    assert engine.begin_close() == ("n2",)
    assert engine.node("n2").state is NodeState.LATE  # type: ignore[union-attr]
    engine.opened()
    assert engine.round_deadline(0) is Deadline.IGNORED, "an old round's timer does nothing"
    engine.open_pull("n2", now=5.0)
    assert engine.node("n2").state is NodeState.ACTIVE, "a late node that pulls is back"  # type: ignore[union-attr]


def test_a_deadline_with_an_add_running_leaves_the_close_to_the_add() -> None:
    engine = _started(nodes=2, min_nodes=1)
    engine.open_upload("n0", 0, "u", now=0.0)
    assert engine.accept("n0", 0, "u") is True
    assert engine.round_deadline(0) is Deadline.PENDING
    assert engine.added() is True


def test_retries_count_once_and_other_uploads_are_refused() -> None:
    engine = _started(nodes=2)
    _upload(engine, "n0", "first")
    assert engine.open_upload("n0", 0, "first", now=1.0) is True, "a retry is a duplicate"
    with pytest.raises(AlreadyExists):
        engine.open_upload("n0", 0, "second", now=1.0)
    assert engine.counted() == 1


def test_one_upload_in_flight_per_node() -> None:
    engine = _started(nodes=2)
    engine.open_upload("n0", 0, "u", now=0.0)
    with pytest.raises(ResourceExhausted, match="in flight"):
        engine.open_upload("n0", 0, "u2", now=0.0)
    engine.abandon("n0")
    assert engine.open_upload("n0", 0, "u2", now=0.0) is False


def test_leave_and_shutdown() -> None:
    engine = _started(nodes=2)
    _upload(engine, "n0")
    assert engine.leave("n1", now=2.0) is True, "no one left to wait for"
    with pytest.raises(FailedPrecondition, match="has left"):
        engine.open_upload("n1", 0, "u", now=2.0)
    with pytest.raises(FailedPrecondition, match="has not joined"):
        engine.leave("stranger", now=2.0)
    engine.shut_down()
    for call in (lambda: engine.join("n2", 1, 0.0), lambda: engine.open_pull("n0", 0.0)):
        with pytest.raises(Unavailable):
            call()


def test_the_last_round_finishes() -> None:
    engine = _started(nodes=1, rounds=1)
    assert _upload(engine, "n0") is True
    engine.begin_close()
    assert engine.opened() is True and engine.finished
    with pytest.raises(StaleRound):
        engine.open_upload("n0", 1, "u", now=3.0)


NODES = ("a", "b", "c", "d")


class Federation(RuleBasedStateMachine):
    """Random event orders against the engine, with a model of what must hold."""

    def __init__(self) -> None:
        super().__init__()
        self.engine = RoundEngine(Rules(nodes=2, rounds=4, min_nodes=2))
        self.counted: set[tuple[str, int]] = set()  # (node, round) counted, ever
        self.closed: dict[int, frozenset[str]] = {}  # round -> who it applied
        self.adding = 0
        self.started = False

    @rule(node=st.sampled_from(NODES))
    def join(self, node: str) -> None:
        if self.engine.join(node, 3, now=0.0):
            assert not self.started, "the federation starts once"
            self.started = True
            self.engine.opened()

    @rule()
    def start_deadline(self) -> None:
        if self.engine.start_deadline():
            assert not self.started
            self.started = True
            self.engine.opened()

    @rule(node=st.sampled_from(NODES))
    def leave(self, node: str) -> None:
        try:
            close = self.engine.leave(node, now=0.0)
        except FailedPrecondition:
            return
        if close:
            self._close()

    @rule(node=st.sampled_from(NODES), back=st.integers(0, 1), upload=st.sampled_from("xy"))
    def upload(self, node: str, back: int, upload: str) -> None:
        engine = self.engine
        round_ = max(0, engine.round - back)
        before = engine.reported
        try:
            duplicate = engine.open_upload(node, round_, upload, now=0.0)
        except RpcError:
            assert engine.reported == before
            return
        if duplicate:
            assert (node, round_) in self.counted
            return
        try:
            counted = engine.accept(node, round_, upload)
        except (StaleRound, AlreadyExists):
            counted = False
        engine.abandon(node)
        if counted:
            assert (node, round_) not in self.counted, "an upload counts at most once"
            assert round_ not in self.closed, "a late upload never changes a closed round"
            self.counted.add((node, round_))
            self.adding += 1

    @precondition(lambda self: self.adding > 0)
    @rule()
    def add_finished(self) -> None:
        self.adding -= 1
        if self.engine.added():
            self._close()

    @rule()
    def deadline(self) -> None:
        if self.engine.round_deadline(self.engine.round) is Deadline.CLOSE:
            self._close()

    def _close(self) -> None:
        engine = self.engine
        round_, reported = engine.round, frozenset(engine.reported)
        active = {r.node_id for r in engine.nodes if r.state is NodeState.ACTIVE}
        assert reported, "a round never closes empty"
        assert reported >= active or len(reported) >= engine.rules.min_nodes, "never below quorum"
        engine.begin_close()
        assert round_ not in self.closed, "a round closes exactly once"
        self.closed[round_] = reported
        engine.opened()
        assert engine.round == round_ + 1

    @invariant()
    def applied_is_what_was_counted(self) -> None:
        for round_, reported in self.closed.items():
            assert reported == {n for n, r in self.counted if r == round_}
        assert self.engine.pending_adds == self.adding


Federation.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_federation = Federation.TestCase
