"""Faults in a round's life: deadline and quorum, late and repeated uploads.

How these tests run (real gRPC, real signals, bounded waits): ``faults_support.py``.

Issue 3, "Faults" (the other bullets: ``faults_support.py``):

- round deadline + quorum: ``test_round_closes_at_the_deadline_with_quorum``,
  ``test_round_below_quorum_waits_and_says_so``
- the start is a quorum too (issue 11): ``test_start_deadline_starts_with_min_nodes``,
  ``test_start_below_min_nodes_keeps_waiting_and_says_so``
- late / repeated uploads: ``test_late_upload_is_aborted_with_the_current_round``,
  ``test_upload_in_flight_when_the_round_closes_is_aborted``,
  ``test_retry_after_a_lost_ack_is_counted_once``,
  ``test_second_different_upload_is_already_exists``
"""

from __future__ import annotations

import logging

import grpc
import pytest
from faultproxy import FaultProxy
from faults_support import (
    CALL,
    ROUND_FOREVER,
    after_reset,
    assert_params,
    constant_grads,
    core_state,
    log_lines,
    node_states,
    sgd_reference,
    slots_free,
    status,
)
from polling import wait_until


# == round deadline and quorum ====================================================================
def test_round_closes_at_the_deadline_with_quorum(serve, hand_node, caplog) -> None:
    """3 nodes, M=2: a silent node does not hang the round; it closes with 2 and the node is late.

    The late node then comes back, is counted again, and training finishes.
    """
    caplog.set_level(logging.INFO)
    served = serve("linear", nodes=3, min_nodes=2, round_timeout=1.0, rounds=2, start_timeout=60.0)
    a, b, c = (hand_node(served, f"node-{i}", num_samples=n) for i, n in enumerate((3, 5, 7)))
    theta0 = served.state_dict()
    ga, gb = constant_grads(a.specs, 0.25), constant_grads(b.specs, -0.5)
    a.push(0, ga)
    b.push(0, gb)
    wait_until(lambda: core_state(served).round == 1, "round 0 to close at its deadline")

    assert served.core.history[0].nodes == 2
    assert_params(served.state_dict(), sgd_reference(theta0, [(3, ga), (5, gb)], lr=0.1))
    assert node_states(status(a.stub))["node-2"] == "late"
    missed = log_lines(caplog, "fedgrad.aggregator", "missed the round deadline")
    assert [(r.node, r.round) for r in missed] == [("node-2", 0)]  # type: ignore[attr-defined]

    # The late node comes back: pulls the current round and is counted in it.
    header, _ = c.pull(min_round=1)
    assert header.round == 1
    assert c.push(1, constant_grads(c.specs, 1.0)).round == 1
    assert node_states(status(c.stub))["node-2"] == "reported"
    a.push(1, ga)
    b.push(1, gb)
    wait_until(lambda: core_state(served).finished, "the last round to close")
    assert served.core.history[1].nodes == 3


def test_round_below_quorum_waits_and_says_so(serve, hand_node, caplog) -> None:
    """Below M uploads at the deadline the round stays open, logs and reports it; M closes it."""
    caplog.set_level(logging.INFO)
    served = serve("linear", nodes=3, min_nodes=2, round_timeout=0.5, rounds=2, start_timeout=60.0)
    a, b, _c = (hand_node(served, f"node-{i}", num_samples=4) for i in range(3))
    theta0 = served.state_dict()
    ga, gb = constant_grads(a.specs, 1.0), constant_grads(b.specs, 3.0)
    a.push(0, ga)

    records = wait_until(
        lambda: log_lines(caplog, "fedgrad.aggregator", "waiting for nodes"),
        "the below-quorum log line",
    )
    assert "1 of 2 required uploads" in records[0].getMessage()
    assert records[0].round == 0  # type: ignore[attr-defined]
    state = core_state(served)
    assert (state.round, state.count, list(state.reported)) == (0, 1, ["node-0"])
    assert_params(served.state_dict(), theta0)  # no partial update was applied
    reply = status(a.stub)
    assert (reply.round, reply.reported) == (0, 1)
    missing = {n.node_id: n.state for n in reply.nodes if n.node_id != "node-0"}
    assert reply.phase != "collecting" or set(missing.values()) == {"late"}, (
        "past the deadline below --min-nodes, GetStatus must say the round waits for nodes "
        f"(phase {reply.phase!r}, missing nodes {missing}); it looks like a normal open round"
    )

    b.push(0, gb)  # the second upload reaches M: the round closes now
    wait_until(lambda: core_state(served).round == 1, "round 0 to close once M uploads arrived")
    assert served.core.history[0].nodes == 2
    assert_params(served.state_dict(), sgd_reference(theta0, [(4, ga), (4, gb)], lr=0.1))
    assert node_states(status(a.stub))["node-2"] == "late"


# == the start is a quorum too ===================================================================
def test_start_deadline_starts_with_min_nodes(serve, hand_node) -> None:
    """--nodes 4 --min-nodes 3, one node never joins: training starts at the start deadline."""
    served = serve("linear", nodes=4, min_nodes=3, start_timeout=1.0, round_timeout=60.0, rounds=1)
    nodes = [hand_node(served, f"node-{i}", num_samples=2) for i in range(3)]
    assert status(nodes[0].stub).phase == "waiting"
    header, _ = nodes[0].pull(min_round=0)  # waits in the pull until round 0 opens
    assert (header.round, status(nodes[0].stub).phase) == (0, "collecting")
    for node in nodes:
        node.push(0, constant_grads(node.specs, 1.0))
    wait_until(lambda: core_state(served).finished, "the only round to close with three")
    assert served.core.history[0].nodes == 3


def test_start_below_min_nodes_keeps_waiting_and_says_so(serve, hand_node, caplog) -> None:
    """Past the start deadline with fewer than --min-nodes: keep waiting, log it; then start."""
    caplog.set_level(logging.INFO)
    served = serve("linear", nodes=4, min_nodes=3, start_timeout=0.5, round_timeout=60.0, rounds=1)
    a, b = (hand_node(served, f"node-{i}") for i in range(2))
    records = wait_until(
        lambda: log_lines(caplog, "fedgrad.aggregator", "start deadline passed"),
        "the below-quorum start log line",
    )
    assert "2 of 4 nodes" in records[0].getMessage()
    assert status(a.stub).phase == "waiting" and core_state(served).round == 0
    with pytest.raises(grpc.RpcError) as info:
        a.push(0, constant_grads(a.specs, 1.0))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    hand_node(served, "node-2")  # the third join reaches --min-nodes: round 0 opens
    header, _ = a.pull(min_round=0)
    assert header.round == 0 and status(a.stub).phase == "collecting"


# == late and repeated uploads =========================================================================
def test_late_upload_is_aborted_with_the_current_round(serve, hand_node, caplog) -> None:
    caplog.set_level(logging.INFO)  # a stale upload is logged at info: the normal flow
    served = serve("linear", nodes=1, rounds=3)
    a = hand_node(served, "node-0", num_samples=4)
    g = constant_grads(a.specs, 0.5)
    assert a.push(0, g).round == 0  # the only node: round 0 closes
    wait_until(lambda: core_state(served).round == 1, "round 0 to close")
    before, params = core_state(served), served.state_dict()

    with pytest.raises(grpc.RpcError) as info:
        a.push(0, g, upload_id="node-0.r0.again")
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert "current_round=1" in info.value.details()
    assert ("fedgrad-current-round", "1") in tuple(info.value.trailing_metadata())
    assert core_state(served).same_accumulation(before)
    assert_params(served.state_dict(), params)
    assert log_lines(caplog, "fedgrad.service", "round 0 is closed")
    assert a.push(1, g).round == 1  # the node pulls and continues


def test_upload_in_flight_when_the_round_closes_is_aborted(serve, hand_node, stalled) -> None:
    """An upload still streaming when the deadline closes its round is refused at commit."""
    served = serve("linear", nodes=2, min_nodes=1, round_timeout=0.5, rounds=2, start_timeout=60.0)
    a = hand_node(served, "node-0", num_samples=2)
    b = hand_node(served, "node-1", num_samples=6)
    theta0 = served.state_dict()
    ga, gb = constant_grads(a.specs, 100.0), constant_grads(b.specs, -1.0)
    msgs = a.messages(0, ga)
    slow = stalled(a.stub, msgs[:1], msgs[1:])
    assert slow.sent.wait(CALL)
    b.push(0, gb)
    wait_until(lambda: core_state(served).round == 1, "the deadline to close round 0 with node-1")
    slow.release()
    with pytest.raises(grpc.RpcError) as info:
        slow.result()
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert ("fedgrad-current-round", "1") in tuple(info.value.trailing_metadata())
    wait_until(lambda: slots_free(served), "the aborted upload's slot to be freed")
    assert core_state(served).count == 0
    assert_params(served.state_dict(), sgd_reference(theta0, [(6, gb)], lr=0.1))


def test_retry_after_a_lost_ack_is_counted_once(serve, hand_node, connect) -> None:
    """The reply is lost on the wire (fault proxy), the node retries the same upload id."""
    served = serve("linear", nodes=2, rounds=1, round_timeout=ROUND_FOREVER)
    with FaultProxy(served.port) as proxy:
        a = hand_node(proxy.address, "node-0", num_samples=3)
        b = hand_node(served, "node-1", num_samples=5)
        theta0 = served.state_dict()
        ga, gb = constant_grads(a.specs, 0.75), constant_grads(b.specs, -2.0)
        messages = a.messages(0, ga, upload_id="node-0.r0.once")

        proxy.drop_responses()
        call = a.stub.PushGradients.future(iter(messages), timeout=CALL)
        wait_until(lambda: "node-0" in core_state(served).reported, "the upload to be counted")
        assert proxy.reset() >= 1
        with pytest.raises(grpc.RpcError) as info:
            call.result(timeout=CALL)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the ack never arrived
        proxy.pass_through()
        reply = after_reset(lambda: a.stub.PushGradients(iter(messages), timeout=CALL))
        assert (reply.duplicate, reply.round) == (True, 0)
        state = core_state(served)
        assert (state.count, state.weight) == (1, 3.0)
        b.push(0, gb)
    wait_until(lambda: core_state(served).finished, "the round to close")
    assert_params(served.state_dict(), sgd_reference(theta0, [(3, ga), (5, gb)], lr=0.1))


def test_second_different_upload_is_already_exists(serve, hand_node, caplog) -> None:
    served = serve("linear", nodes=2, rounds=1, round_timeout=ROUND_FOREVER)
    a = hand_node(served, "node-0", num_samples=3)
    b = hand_node(served, "node-1", num_samples=5)
    theta0 = served.state_dict()
    ga, gb = constant_grads(a.specs, 0.5), constant_grads(b.specs, 1.5)
    assert a.push(0, ga, upload_id="first").duplicate is False
    before = core_state(served)
    with pytest.raises(grpc.RpcError) as info:
        a.push(0, constant_grads(a.specs, 9.0), upload_id="second")
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "'first'" in info.value.details() and "'second'" in info.value.details()
    assert core_state(served).same_accumulation(before)
    assert a.push(0, ga, upload_id="first").duplicate is True  # the same one again: once
    assert core_state(served).same_accumulation(before)
    assert log_lines(caplog, "fedgrad.service", "a different upload")
    b.push(0, gb)
    wait_until(lambda: core_state(served).finished, "the round to close")
    assert_params(served.state_dict(), sgd_reference(theta0, [(3, ga), (5, gb)], lr=0.1))
