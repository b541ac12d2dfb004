"""Faults on the network: slow and silent peers, blackholes, resets, slow links.

How these tests run (real gRPC, real signals, bounded waits): ``faults_support.py``.

Issue 3, "Faults" (the other bullets: ``faults_support.py``):

- slow peers: ``test_slow_loris_upload_is_cut_by_the_idle_deadline``,
  ``test_blackholed_upload_is_cut_by_the_idle_deadline``,
  ``test_stalled_broadcast_reader_blocks_only_its_own_stream``,
  ``test_reset_mid_upload_leaves_no_trace``, ``test_training_over_a_slow_link``
- network partitions: ``test_netns.py``
"""

from __future__ import annotations

import threading
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from faultproxy import FaultProxy
from faults_support import (
    CALL,
    PROC_TIMEOUT,
    SYNTHETIC_ARGS,
    after_reset,
    constant_grads,
    core_state,
    log_lines,
    slots_free,
)
from polling import wait_until

from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.task import load_task


# == slow peers ==========================================================================================
def test_slow_loris_upload_is_cut_by_the_idle_deadline(serve, hand_node, stalled, caplog) -> None:
    """Header and two chunks, then silence: INVALID_ARGUMENT after idle_timeout, slot freed."""
    served = serve("linear", nodes=2, chunk_bytes=16, idle_timeout=0.5, max_inflight=1)
    a = hand_node(served, "node-0", num_samples=2)
    hand_node(served, "node-1", num_samples=2)
    before = core_state(served)
    g = constant_grads(a.specs, 0.5)
    msgs = a.messages(0, g)
    slow = stalled(a.stub, msgs[:3], msgs[3:])
    with pytest.raises(grpc.RpcError) as info:
        slow.result()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "idle" in info.value.details()
    wait_until(lambda: slots_free(served), "the slot to be freed")
    assert core_state(served).same_accumulation(before)
    records = log_lines(caplog, "fedgrad.service", "idle")
    assert [(r.node, r.round) for r in records] == [("node-0", 0)]  # type: ignore[attr-defined]

    # A connection that never sends its header is cut the same way.
    silent = stalled(a.stub, [])
    assert silent.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert a.push(0, g).round == 0  # the node (and its upload id) is not poisoned


def test_blackholed_upload_is_cut_by_the_idle_deadline(serve, hand_node, stalled, caplog) -> None:
    """The link swallows everything mid-upload (fault proxy): the server frees the slot."""
    served = serve("linear", nodes=2, chunk_bytes=16, idle_timeout=0.5, max_inflight=1)
    with FaultProxy(served.port) as proxy:
        a = hand_node(proxy.address, "node-0", num_samples=2)
        hand_node(served, "node-1", num_samples=2)
        before = core_state(served)
        g = constant_grads(a.specs, 0.5)
        msgs = a.messages(0, g)
        upload = stalled(a.stub, msgs[:2], msgs[2:])
        wait_until(lambda: "node-0" in core_state(served).uploading, "the upload to open")
        proxy.blackhole()
        upload.release()  # the rest is sent into the void
        wait_until(lambda: log_lines(caplog, "fedgrad.service", "idle"), "the idle cut-off")
        wait_until(lambda: slots_free(served), "the slot to be freed")
        assert core_state(served).same_accumulation(before)
        proxy.reset()
        assert upload.code() == grpc.StatusCode.UNAVAILABLE
        proxy.pass_through()
        reply = after_reset(lambda: a.stub.PushGradients(iter(msgs), timeout=CALL))
        assert reply.round == 0 and not reply.duplicate


def test_reset_mid_upload_leaves_no_trace(serve, hand_node, stalled) -> None:
    """The connection is reset mid-upload (fault proxy): cancelled upload, slot freed, no trace."""
    served = serve("linear", nodes=2, chunk_bytes=16, max_inflight=1)
    with FaultProxy(served.port) as proxy:
        a = hand_node(proxy.address, "node-0", num_samples=2)
        hand_node(served, "node-1", num_samples=2)
        before = core_state(served)
        msgs = a.messages(0, constant_grads(a.specs, 7.0))
        upload = stalled(a.stub, msgs[:3], msgs[3:])
        wait_until(lambda: "node-0" in core_state(served).uploading, "the upload to open")
        assert proxy.reset() >= 1
        assert upload.code() == grpc.StatusCode.UNAVAILABLE
        wait_until(lambda: slots_free(served), "the reset upload's slot to be freed")
        assert core_state(served).same_accumulation(before)
        reply = after_reset(lambda: a.stub.PushGradients(iter(msgs), timeout=CALL))
        assert reply.round == 0


def test_training_over_a_slow_link(serve) -> None:
    """A node behind a delaying proxy trains like one on a direct link (same parameters)."""
    from fedgrad.client.node import Node
    from fedgrad.config import NodeConfig

    def run(via_proxy: bool) -> dict[str, torch.Tensor]:
        served = serve("linear", nodes=2, rounds=3, finish_grace=10.0)
        with FaultProxy(served.port) as proxy:
            proxy.delay(0.01)
            results: list[Any] = []
            threads = []
            for i in range(2):
                address = proxy.address if via_proxy and i == 1 else served.address
                cfg = NodeConfig(task="linear", aggregator=address, node_id=f"node-{i}",
                                 shard=(i, 2), give_up_after=30.0)  # fmt: skip
                node = Node(load_task("linear"), cfg)
                thread = threading.Thread(target=lambda n=node: results.append(n.run()))
                threads.append((thread, node))
                thread.start()
            for thread, node in threads:
                thread.join(PROC_TIMEOUT)
                node.close()
                assert not thread.is_alive()
            assert len(results) == 2 and {r.final_round for r in results} == {3}
        wait_until(lambda: core_state(served).finished, "training to finish")
        params = served.state_dict()
        served.stop()
        return params

    slow, fast = run(True), run(False)
    for name in fast:
        assert torch.equal(slow[name], fast[name]), name


def test_stalled_broadcast_reader_blocks_only_its_own_stream(serve, hand_node) -> None:
    """A joined node opens PullParameters on a 16 MB model and never reads it.

    HTTP/2 flow control stalls its stream only: the other nodes pull, upload and
    finish two rounds (closing at the deadline with M=2 without the stalled node),
    and the stalled stream still delivers round 0's parameters intact afterwards.
    """
    served = serve("synthetic", task_args=SYNTHETIC_ARGS, nodes=3, min_nodes=2,
                   round_timeout=1.0, rounds=2, start_timeout=60.0)  # fmt: skip
    a, b, s = (hand_node(served, f"node-{i}") for i in range(3))
    stream = s.stub.PullParameters(pb.PullRequest(node_id="node-2", min_round=0), timeout=120)
    first = next(stream)  # the header; the 16 MB behind it are never read (yet)
    assert first.header.round == 0 and first.header.total_bytes == 16_000_000
    theta0 = served.state_dict()
    for r in range(2):
        for node in (a, b):
            header, params = node.pull(r)
            assert header.round == r
            node.push(r, constant_grads(node.specs, 1e-3 * (r + 1)))
        wait_until(lambda r=r: core_state(served).round == r + 1, f"round {r} to close")
    assert core_state(served).finished
    # node-0 and node-1 pulled two rounds each: four streams of ~16 MB were sent. (Whether
    # the stalled stream also counts depends on how much the HTTP/2 windows buffered, so it
    # is not asserted: what matters is that the others finished while it stalled.)
    total = first.header.total_bytes
    wait_until(
        lambda: served.call(lambda: served.core.counters.bytes_sent) >= 4 * total,
        "the four completed streams to be accounted",
    )

    # Drain the stalled stream now: the round-0 snapshot, complete and unchanged.
    rest = [m for m in stream]
    data = b"".join(m.chunk.data for m in rest)
    assert len(data) == first.header.total_bytes
    values = np.frombuffer(data, dtype=np.float32)
    flat0 = torch.cat([theta0[k].reshape(-1) for k in theta0]).numpy()
    assert np.array_equal(values, flat0)
