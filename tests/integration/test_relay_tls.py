"""Relays over TLS: mutual TLS towards the upstream and towards the relay's own nodes.

The layout a site would use: the central CA issues the aggregator's certificate and the
relay's client certificate (its name is the relay's node id); the site's own CA issues
the relay's server certificate and its nodes' certificates. Real processes over real
TLS: the federation trains to the parameters of the same nodes connected directly, and
the relay checks its nodes' identity as the aggregator does.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load_file

from fedgrad import LocalCluster
from fedgrad.certs import init_federation
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.proto import fedgrad_pb2_grpc as pb_grpc
from tests.conftest import free_port

WAIT = 120.0
LOCAL = "127.0.0.1"


def _fedgrad() -> list[str]:
    return [sys.executable, "-m", "fedgrad.launch.cli"]


def _credentials(certs: Path, node: str | None) -> grpc.ChannelCredentials:
    pair = {}
    if node is not None:
        pair = {
            "private_key": (certs / "nodes" / f"{node}.key").read_bytes(),
            "certificate_chain": (certs / "nodes" / f"{node}.pem").read_bytes(),
        }
    return grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes(), **pair)


def _wait_ready(address: str, credentials: grpc.ChannelCredentials) -> None:
    with grpc.secure_channel(address, credentials) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)


def _join_code(address: str, credentials: grpc.ChannelCredentials, node_id: str) -> Any:
    with grpc.secure_channel(address, credentials) as channel:
        try:
            pb_grpc.AggregatorStub(channel).Join(pb.JoinRequest(node_id=node_id), timeout=10)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.slow
def test_a_relay_over_mutual_tls_both_ways_trains_and_checks_its_nodes(
    spawn: Any, tmp_path: Path
) -> None:
    rounds = 3
    with LocalCluster("linear", nodes=2) as cluster:
        want = cluster.run(rounds).params
    central, site = tmp_path / "central", tmp_path / "site"
    init_federation(central, ["relay-0"], [LOCAL])
    init_federation(site, ["n0", "n1"], [LOCAL])
    upstream, relay = f"{LOCAL}:{free_port()}", f"{LOCAL}:{free_port()}"
    aggregator = spawn(
        *_fedgrad(), "aggregator", "--task", "linear", "--nodes", "1", "--rounds", str(rounds),
        "--listen", upstream, "--save", str(tmp_path / "final.safetensors"), "--no-progress",
        "--tls-cert", central / "server.pem", "--tls-key", central / "server.key",
        "--tls-client-ca", central / "ca.pem", log=tmp_path / "aggregator.log",
    )  # fmt: skip
    relay_proc = spawn(
        *_fedgrad(), "relay", "--task", "linear", "--upstream", upstream, "--listen", relay,
        "--nodes", "2", "--node-id", "relay-0",
        "--tls-cert", site / "server.pem", "--tls-key", site / "server.key",
        "--tls-client-ca", site / "ca.pem", "--upstream-ca", central / "ca.pem",
        "--upstream-cert", central / "nodes" / "relay-0.pem",
        "--upstream-key", central / "nodes" / "relay-0.key", log=tmp_path / "relay.log",
    )  # fmt: skip

    def logs() -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text()[-2500:]}" for p in sorted(tmp_path.glob("*.log"))
        )

    _wait_ready(relay, _credentials(site, "n0"))
    # The relay's Join needs the upstream: wait until it answers a node at all.
    deadline = time.monotonic() + WAIT
    while _join_code(relay, _credentials(site, "n0"), "n0")[0] == grpc.StatusCode.UNAVAILABLE:
        assert time.monotonic() < deadline, logs()
        time.sleep(0.1)
    # n0's certificate may not act as n1; a certificate from another CA gets no connection.
    code, details = _join_code(relay, _credentials(site, "n0"), "n1")
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert "'n0'" in details and "'n1'" in details
    code, _ = _join_code(relay, _credentials(central, "relay-0"), "relay-0")
    assert code == grpc.StatusCode.UNAVAILABLE, "a certificate the site's CA did not sign"
    nodes = [
        spawn(
            *_fedgrad(),
            "node",
            "--task",
            "linear",
            "--aggregator",
            relay,
            "--node-id",
            f"n{i}",
            "--shard",
            f"{i}/2",
            "--tls-ca",
            site / "ca.pem",
            "--tls-cert",
            site / "nodes" / f"n{i}.pem",
            "--tls-key",
            site / "nodes" / f"n{i}.key",
            log=tmp_path / f"node{i}.log",
        )  # fmt: skip
        for i in range(2)
    ]
    for proc in [*nodes, aggregator, relay_proc]:
        assert proc.wait(timeout=WAIT) == 0, logs()
    final = load_file(str(tmp_path / "final.safetensors"))
    for name, value in want.items():
        assert torch.equal(final[name], value), (name, logs())


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--listen", "0.0.0.0:0"], "refusing to serve plaintext"),
        (["--tls-key", "relay.key"], "--tls-key needs --tls-cert"),
        (["--upstream-cert", "r.pem", "--upstream-key", "r.key"], "needs --upstream-ca"),
        (["--tls-cert", "missing.pem", "--tls-key", "missing.key"], "missing.pem"),
        (["--upstream-ca", "missing-ca.pem"], "missing-ca.pem"),
    ],
)
def test_relay_tls_mistakes_exit_2_with_one_line(
    spawn: Any, tmp_path: Path, flags: list[str], words: str
) -> None:
    proc = spawn(
        *_fedgrad(), "relay", "--task", "linear", "--upstream", f"{LOCAL}:1", *flags,
        cwd=tmp_path,
    )  # fmt: skip
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], err
