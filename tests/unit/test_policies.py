"""Sampled, over-committed and asynchronous round policies, driven through the engine.

No server and no clock: the engine takes events and the tests check its decisions
(who is selected, which uploads count, when a round or a version closes).
"""

from __future__ import annotations

import math

import pytest

from fedgrad.config import AggregatorConfig
from fedgrad.errors import AlreadyExists, ConfigError, FailedPrecondition, StaleRound
from fedgrad.server.engine import UNSELECTED, Deadline, RoundEngine, Rules
from fedgrad.server.policy import (
    AsyncPolicy,
    SampledPolicy,
    make_policy,
    staleness_weight,
)


def _engine(nodes: int, policy: object, rounds: int = 5, min_nodes: int = 1) -> RoundEngine:
    engine = RoundEngine(Rules(nodes=nodes, rounds=rounds, min_nodes=min_nodes), policy)  # type: ignore[arg-type]
    started = [engine.join(f"n{i:02d}", 10, now=0.0) for i in range(nodes)]
    assert started[-1] is True
    assert engine.opened() is False
    return engine


def _sampled(nodes: int, k: int, seed: int = 0, overcommit: float = 1.0, **kw: int) -> RoundEngine:
    cfg = AggregatorConfig(nodes=nodes, sample=k, seed=seed, overcommit=overcommit)
    return _engine(nodes, make_policy(cfg), **kw)


def _count(engine: RoundEngine, node: str, round_: int | None = None, uid: str = "") -> bool:
    """Header, count and add one upload; return the close decision."""
    round_ = engine.round if round_ is None else round_
    uid = uid or f"{node}.r{round_}"
    assert engine.open_upload(node, round_, uid, now=1.0) is False
    assert engine.accept(node, round_, uid) is True
    engine.abandon(node)
    return engine.added()


def _close(engine: RoundEngine) -> None:
    engine.begin_close()
    engine.opened()


def test_a_sampled_round_selects_k_and_the_draw_depends_only_on_seed_and_round() -> None:
    a, b = _sampled(20, 5, seed=7), _sampled(20, 5, seed=7)
    other = _sampled(20, 5, seed=8)
    draws = []
    for _ in range(3):
        assert a.selected is not None and len(a.selected) == 5
        assert a.selected == b.selected, "same seed and round: same nodes"
        draws.append(a.selected)
        for engine in (a, b, other):
            for node in sorted(engine.selected or ()):
                _count(engine, node)
            _close(engine)
    assert len(set(draws)) == 3, "each round draws anew"
    assert _sampled(20, 5, seed=8).selected != _sampled(20, 5, seed=7).selected


def test_the_draw_does_not_depend_on_join_order() -> None:
    policy = SampledPolicy(3, lambda n: 4)
    ids = [f"node-{i}" for i in range(12)]
    assert policy.select(2, ids) == policy.select(2, list(reversed(ids)))


def test_an_unselected_node_may_not_upload_and_status_shows_it_unselected() -> None:
    engine = _sampled(6, 2)
    assert engine.selected is not None
    outsider = sorted({f"n{i:02d}" for i in range(6)} - engine.selected)[0]
    with pytest.raises(FailedPrecondition, match="not selected for round 0"):
        engine.open_upload(outsider, 0, "x", now=1.0)
    view = engine.view()
    shown = {r.node_id: view.shown_state(r) for r in view.nodes}
    assert shown[outsider] == UNSELECTED
    assert all(shown[n] == "active" for n in engine.selected)
    assert engine.is_selected(outsider, 0) is False
    assert all(engine.is_selected(n, 0) for n in engine.selected)


def test_a_sampled_round_closes_when_every_selected_node_reported() -> None:
    engine = _sampled(6, 3)
    first, *rest = sorted(engine.selected or ())
    assert _count(engine, first) is False
    assert _count(engine, rest[0]) is False
    assert _count(engine, rest[1]) is True


def test_overcommit_selects_ceil_k_f_and_closes_with_the_first_k() -> None:
    engine = _sampled(10, 3, overcommit=1.5)
    selected = sorted(engine.selected or ())
    assert len(selected) == math.ceil(3 * 1.5)
    assert _count(engine, selected[0]) is False
    assert _count(engine, selected[1]) is False
    assert _count(engine, selected[2]) is True, "the first K close the round"
    assert engine.open_upload(selected[3], 0, "late", now=1.0) is False
    engine.begin_close()
    with pytest.raises(StaleRound):
        engine.accept(selected[3], 0, "late")


def test_overcommit_refuses_an_upload_past_k_before_the_close() -> None:
    engine = _sampled(10, 2, overcommit=2.0)
    selected = sorted(engine.selected or ())
    for node in selected[:2]:
        assert engine.open_upload(node, 0, node, now=1.0) is False
        assert engine.accept(node, 0, node) is True  # adds still running
    assert engine.open_upload(selected[2], 0, "third", now=1.0) is False
    with pytest.raises(StaleRound, match="already has its 2 uploads") as caught:
        engine.accept(selected[2], 0, "third")
    assert caught.value.current_round == 1


def test_a_selected_node_that_leaves_is_not_waited_for() -> None:
    engine = _sampled(6, 2)
    stay, go = sorted(engine.selected or ())
    assert _count(engine, stay) is False
    assert engine.leave(go, now=2.0) is True, "the round closes without the node that left"


def test_a_round_whose_selected_nodes_all_left_draws_replacements() -> None:
    engine = _sampled(8, 2)
    gone = sorted(engine.selected or ())
    for node in gone:
        assert engine.leave(node, now=1.0) is False
    assert engine.stuck
    replaced = engine.replace_missing()
    assert len(replaced) == 2 and not replaced & set(gone)
    again = _sampled(8, 2)
    for node in gone:
        again.leave(node, now=1.0)
    assert again.replace_missing() == replaced, "replacements are seeded too"
    a, b = sorted(replaced)
    assert _count(engine, a) is False
    assert _count(engine, b) is True


def test_a_selected_node_missing_the_deadline_is_replaced_next_round() -> None:
    engine = _sampled(6, 2, min_nodes=1)
    on_time, missing = sorted(engine.selected or ())
    assert _count(engine, on_time) is False
    assert engine.round_deadline(0) is Deadline.CLOSE
    assert engine.begin_close() == (missing,), "only the selected node is late"
    engine.opened()
    assert missing not in (engine.selected or ()), "a late node is not drawn until it returns"


def test_below_quorum_at_the_deadline_replaces_the_silent_selected_nodes() -> None:
    engine = _sampled(6, 2, min_nodes=2)
    first, silent = sorted(engine.selected or ())
    assert _count(engine, first) is False
    assert engine.round_deadline(0) is Deadline.BELOW_QUORUM
    assert engine.replace_missing() == frozenset(), "a node still active is waited for"
    extra = engine.replace_missing(missed_deadline=True)
    assert len(extra) == 1 and silent not in extra
    view = engine.view()
    assert {r.node_id: view.shown_state(r) for r in view.nodes}[silent] == "late"
    assert _count(engine, next(iter(extra))) is True


def test_sampled_start_waits_for_min_available() -> None:
    cfg = AggregatorConfig(nodes=1, sample=2, min_available=4)
    engine = RoundEngine(Rules(nodes=1, rounds=2), make_policy(cfg))
    assert [engine.join(f"n{i}", 1, now=0.0) for i in range(4)] == [False, False, False, True]


def test_sample_fraction_takes_ceil_c_n() -> None:
    cfg = AggregatorConfig(nodes=50, sample_fraction=0.1)
    engine = _engine(50, make_policy(cfg))
    assert engine.selected is not None and len(engine.selected) == 5


# -- asynchronous (FedBuff) ------------------------------------------------------------
def _async(nodes: int, buffer: int, max_staleness: int = 2) -> RoundEngine:
    return _engine(nodes, AsyncPolicy(buffer, max_staleness, lambda tau: 1.0), rounds=20)


def test_async_closes_a_version_every_buffer_uploads() -> None:
    engine = _async(4, 2)
    assert engine.selected is None
    assert _count(engine, "n00") is False
    assert _count(engine, "n01") is True
    _close(engine)
    assert engine.round == 1


def test_async_takes_stale_uploads_up_to_the_bound_and_aborts_older() -> None:
    engine = _async(6, 2, max_staleness=2)
    for v in range(3):  # n00/n01 push versions forward; n05 stays on version 0
        _count(engine, "n00", uid=f"a{v}")
        _count(engine, "n01", uid=f"b{v}")
        _close(engine)
    assert engine.round == 3
    with pytest.raises(StaleRound, match="3 versions old") as caught:
        engine.open_upload("n05", 0, "old", now=1.0)
    assert caught.value.current_round == 3
    assert engine.open_upload("n04", 1, "ok", now=1.0) is False, "staleness 2 is allowed"
    assert engine.accept("n04", 1, "ok") is True
    assert engine.staleness(1) == 2


def test_async_repeat_of_a_flushed_upload_is_a_duplicate_not_a_second_count() -> None:
    engine = _async(4, 2)
    _count(engine, "n00", uid="same")
    _count(engine, "n01", uid="other")
    _close(engine)
    # n00's reply was lost; it retries the upload computed on version 0.
    assert engine.open_upload("n00", 0, "same", now=1.0) is True
    with pytest.raises(AlreadyExists, match="computed on version 0"):
        engine.open_upload("n00", 0, "different", now=1.0)


def test_async_closes_when_every_active_node_is_in_the_buffer() -> None:
    engine = _async(2, 5)
    assert _count(engine, "n00") is False
    assert _count(engine, "n01") is True, "no one else could fill the buffer"


def test_staleness_forms() -> None:
    constant = staleness_weight("constant", ())
    poly = staleness_weight("polynomial", (0.5,))
    hinge = staleness_weight("hinge", (10.0, 4.0))
    assert constant(7) == 1.0
    assert poly(0) == 1.0 and poly(3) == pytest.approx(0.5)
    assert hinge(4) == 1.0 and hinge(5) == pytest.approx(1 / 11)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sample": 2, "sample_fraction": 0.5}, "not both"),
        ({"overcommit": 1.5}, "overcommit needs sample"),
        ({"mode": "async", "sample": 2}, "drop sample"),
        ({"buffer": 2}, "mode async"),
        ({"min_available": 3}, "min_available needs sample"),
        ({"sample": 4, "min_available": 2}, "min_available must be >= sample"),
        ({"staleness": "poly"}, "constant, polynomial:A or hinge:A,B"),
        ({"staleness": "hinge:1"}, "constant, polynomial:A or hinge:A,B"),
        ({"sample_fraction": 0.0}, r"fraction in \(0, 1\]"),
        ({"overcommit": 0.5}, ">= 1"),
        ({"mode": "fast"}, "sync, async"),
    ],
)
def test_bad_round_settings_say_what_to_fix(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AggregatorConfig(**options)  # type: ignore[arg-type]
