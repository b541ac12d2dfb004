"""Relays (issue 15): a relay is an aggregator to its nodes and one node to its upstream.

2 relays of 3 nodes give bitwise the parameters of 6 nodes connected directly; a relay
killed with SIGKILL mid-training and restarted loses nothing and applies nothing twice;
an aggregator that cannot add a presummed upload exactly refuses it.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load_file

from fedgrad import LocalCluster
from fedgrad.codec import manifest_from_proto
from fedgrad.errors import ConfigError
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.proto import fedgrad_pb2_grpc as pb_grpc
from tests.conftest import free_port

WAIT = 120.0


def test_two_relays_of_three_nodes_equal_six_nodes_connected_directly() -> None:
    with LocalCluster("digits", nodes=6) as cluster:
        direct = cluster.run(3)
    with LocalCluster("digits", nodes=6, relays=2) as cluster:
        relayed = cluster.run(3)
    for name, value in direct.params.items():
        assert torch.equal(relayed.params[name], value), name
    assert [r.nodes for r in relayed.history] == [2, 2, 2]  # the aggregator saw 2 uploads
    for one, two in zip(direct.history, relayed.history, strict=True):
        assert two.train_loss == pytest.approx(one.train_loss, rel=1e-12)
        assert (two.test_loss, two.test_accuracy) == (one.test_loss, one.test_accuracy)
        assert two.bytes < one.bytes  # 2 broadcasts and 2 uploads instead of 6 and 6


@pytest.mark.parametrize("forward", ["float64", "float32"])
def test_relays_in_front_of_a_sharded_aggregator_equal_nodes_connected_directly(
    forward: str,
) -> None:
    # Each relay pulls both shards' pieces into one model for its nodes and pushes each
    # shard its pieces of the sum; shard 0 counts it on both shards or neither.
    with LocalCluster("digits", nodes=4) as cluster:
        direct = cluster.run(3)
    with LocalCluster(
        "digits", nodes=4, shards=2, relays=2, relay_options={"forward_dtype": forward}
    ) as cluster:
        relayed = cluster.run(3)
    for name, value in direct.params.items():
        if forward == "float64":
            assert torch.equal(relayed.params[name], value), name
        else:  # the sums rounded to float32 on the way: close, not bitwise
            torch.testing.assert_close(relayed.params[name], value, rtol=1e-5, atol=1e-6)
    assert [r.nodes for r in relayed.history] == [2, 2, 2]
    for one, two in zip(direct.history, relayed.history, strict=True):
        assert two.train_loss == pytest.approx(one.train_loss, rel=1e-6)


def test_a_forwarded_float64_sum_larger_than_the_staging_budget_is_staged_whole() -> None:
    # A relay's float64 sum of a float32 model is twice the model's payload; with one
    # upload of staging (max_inflight=1) it must still be received, not wait for bytes
    # only its own completion would free (slot_wait shortened so a wait would fail).
    with LocalCluster("digits", nodes=2) as cluster:
        direct = cluster.run(2)
    with LocalCluster(
        "digits", nodes=2, relays=1, max_inflight=1, slot_wait=5.0, chunk_bytes=4096
    ) as cluster:
        relayed = cluster.run(2)
    for name, value in direct.params.items():
        assert torch.equal(relayed.params[name], value), name


def test_relays_must_divide_the_nodes() -> None:
    with pytest.raises(ConfigError, match="relays"):
        LocalCluster("digits", nodes=5, relays=2)


def test_a_presummed_upload_is_refused_where_it_cannot_be_added_exactly(serve, wire) -> None:
    served = serve("linear", nodes=1, reduce="median")
    stub = pb_grpc.AggregatorStub(grpc.insecure_channel(served.address))
    reply = stub.Join(pb.JoinRequest(node_id="relay-0", num_samples=1), timeout=30)
    specs = manifest_from_proto(reply.manifest)
    header = wire.header(0, "relay-0", num_samples=4)
    header.presummed = True
    chunks = wire.chunks(specs, [torch.zeros(s.shape, dtype=s.dtype) for s in specs], 1 << 20)
    with pytest.raises(grpc.RpcError) as err:
        stub.PushGradients(iter(wire.upload(header, chunks)), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "streaming reduction" in err.value.details()


def _fedgrad() -> list[str]:
    return [sys.executable, "-m", "fedgrad.launch.cli"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shards", "victim"), [(1, "relay"), (2, "relay"), (2, "shard 1")], ids=str
)
def test_a_killed_relay_restarted_loses_nothing_and_applies_nothing_twice(
    spawn: Any, tmp_path: Path, shards: int, victim: str
) -> None:
    # victim "shard 1": the relays stay up; shard 1's restart makes shard 0 restart the
    # open round, and each relay collects it again from its nodes (Relay._redo).
    rounds = 6
    with LocalCluster("digits", nodes=4) as cluster:
        want = cluster.run(rounds).params
    peers = [f"127.0.0.1:{free_port()}" for _ in range(shards)]
    upstream = peers[0]
    relays = [f"127.0.0.1:{free_port()}" for _ in range(2)]

    def server(i: int) -> Any:
        return spawn(
            *_fedgrad(), "aggregator", "--task", "digits", "--nodes", "2", "--rounds",
            str(rounds), "--listen", peers[i], "--no-progress", "--round-timeout", "120",
            *(["--save", str(tmp_path / "final.safetensors")] if i == 0 else []),
            *(["--shard", f"{i}/{shards}", "--peers", ",".join(peers),
               "--checkpoint-dir", str(tmp_path / f"ckpt{i}")] if shards > 1 else []),
            log=tmp_path / f"aggregator{i}-{time.time()}.log",
        )  # fmt: skip

    servers = [server(i) for i in reversed(range(shards))]

    def relay(r: int) -> Any:
        return spawn(
            *_fedgrad(), "relay", "--task", "digits", "--upstream", upstream,
            "--listen", relays[r], "--nodes", "2", "--node-id", f"relay-{r}",
            log=tmp_path / f"relay{r}-{time.time()}.log",
        )  # fmt: skip

    running = [relay(0), relay(1)]
    nodes = [
        spawn(
            *_fedgrad(),
            "node",
            "--task",
            "digits",
            "--aggregator",
            relays[i // 2],
            "--node-id",
            f"node-{i}",
            "--shard",
            f"{i}/4",
            "--simulate-delay",
            "0.4",
            "--give-up-after",
            "120",
            log=tmp_path / f"node{i}.log",
        )  # fmt: skip
        for i in range(4)
    ]

    def logs() -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text()[-2500:]}" for p in sorted(tmp_path.glob("*.log"))
        )

    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        with grpc.insecure_channel(upstream) as channel:
            try:
                status = pb_grpc.AggregatorStub(channel).GetStatus(pb.StatusRequest(), timeout=2)
                if status.round >= 2:
                    break
            except grpc.RpcError:
                pass
        time.sleep(0.05)
    else:
        raise AssertionError(logs())
    if victim == "relay":
        running[1].send_signal(signal.SIGKILL)
        running[1].wait(timeout=30)
        time.sleep(0.5)
        running[1] = relay(1)
    else:  # servers are in reversed shard order: shard 1 is servers[0]
        servers[0].send_signal(signal.SIGKILL)
        servers[0].wait(timeout=30)
        time.sleep(0.5)
        servers[0] = server(1)
    for proc in [*nodes, *servers, *running]:
        assert proc.wait(timeout=WAIT) == 0, logs()
    final = load_file(str(tmp_path / "final.safetensors"))
    for name, value in want.items():
        assert torch.equal(final[name], value), (name, logs())


def test_a_float32_forwarded_sum_halves_the_relays_bytes_and_stays_close() -> None:
    with LocalCluster("digits", nodes=4) as cluster:
        direct = cluster.run(3)
    runs = {}
    for dtype in ("float64", "float32"):
        with LocalCluster(
            "digits", nodes=4, relays=2, relay_options={"forward_dtype": dtype}
        ) as cluster:
            runs[dtype] = cluster.run(3)
    for name, value in direct.params.items():
        assert torch.allclose(runs["float32"].params[name], value, rtol=1e-5, atol=1e-6), name
    # Each round's bytes: 2 broadcasts (the same) and 2 uploads, float32 instead of float64.
    wide, narrow = (sum(r.bytes for r in runs[d].history) for d in ("float64", "float32"))
    direct_bytes = sum(r.bytes for r in direct.history)
    assert narrow < wide < direct_bytes
    assert narrow == pytest.approx(direct_bytes / 2, rel=0.01)
