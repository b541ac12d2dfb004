"""A network partition between hosts: ``ip netns`` + veth, one node's link cut mid-round.

Issue 3, "Network partitions between hosts". Topology (all addresses created here,
in 10.213.0.0/16, and removed in the fixture's teardown whatever happens)::

    root namespace                                   namespace fgB-<pid>
      aggregator (in-process) on 10.213.X.1 --veth-- 10.213.X.2  node-1 (fedgrad node)
      hand node-0 (paces the rounds)
                                                     namespace fgC-<pid>
                  10.213.Y.1 --veth (cut here)------ 10.213.Y.2  node-2 (fedgrad node)

node-2 reaches the aggregator's address through its own veth (default route via
10.213.Y.1; the root namespace delivers to any of its local addresses). The link
is cut with ``ip link set <root end> down`` after node-2 reported the open round:
that round still closes with everyone, the next one closes at its deadline with
the quorum (``min_nodes`` 2 of 3) and node-2 is late; then the link comes back,
node-2's TCP connection resumes, it catches up (ABORTED -> pull the current round)
and is counted again, and training finishes. Skipped, with the reason, when not
root or when ``ip netns`` / veth are unavailable.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import torch

from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.seeding import round_generator
from fedgrad.task import load_task

pytestmark = [pytest.mark.slow, pytest.mark.netns]

WAIT = 60.0
ROUNDS = 8
CUT_AFTER = 2  # node-2's link goes down once it reported this round


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _skip_reason() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root for ip netns and veth"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"fgprobe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    try:
        veth = _ip("link", "add", f"fgp{os.getpid() % 100000}", "type", "veth", "peer", "name",
                   "eth0", "netns", probe, check=False)  # fmt: skip
        if veth.returncode != 0:
            return f"veth pairs are unavailable: {veth.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    """A namespace joined to the root namespace by a veth pair."""

    netns: str
    root_if: str
    root_ip: str
    ip: str


@dataclass
class Lab:
    """The namespaces, links and processes of the test; ``close()`` removes them all."""

    tag: str
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def add_host(self, name: str, subnet: int) -> Host:
        host = Host(
            f"fg{name}-{self.tag}",
            f"fgv{self.tag}{name}",
            f"10.213.{subnet}.1",
            f"10.213.{subnet}.2",
        )
        self.hosts[name] = host
        _ip("netns", "add", host.netns)
        _ip(
            "link", "add", host.root_if, "type", "veth", "peer", "name", "eth0", "netns", host.netns
        )
        _ip("addr", "add", f"{host.root_ip}/24", "dev", host.root_if)
        _ip("link", "set", host.root_if, "up")
        for args in (
            ("addr", "add", f"{host.ip}/24", "dev", "eth0"),
            ("link", "set", "eth0", "up"),
            ("link", "set", "lo", "up"),
            ("route", "add", "default", "via", host.root_ip),
        ):
            _ip("-n", host.netns, *args)
        return host

    def run(self, host: Host, *argv: str) -> subprocess.Popen[str]:
        """Start ``argv`` inside ``host``'s namespace (killed at close)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGRAD_")}
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def cut(self, host: Host) -> None:
        _ip("link", "set", host.root_if, "down")

    def restore(self, host: Host) -> None:
        _ip("link", "set", host.root_if, "up")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.communicate(timeout=10)
            except (subprocess.TimeoutExpired, ValueError):
                pass
        for host in self.hosts.values():
            _ip("link", "del", host.root_if, check=False)
            _ip("netns", "del", host.netns, check=False)


def _free_subnets() -> tuple[int, int]:
    used = _ip("-o", "addr", "show", "to", "10.213.0.0/16").stdout
    base = 100 + (os.getpid() % 70) * 2
    for offset in range(0, 140, 2):
        x = 100 + (base - 100 + offset) % 140
        if f"10.213.{x}." not in used and f"10.213.{x + 1}." not in used:
            return x, x + 1
    pytest.skip("no free 10.213.x.0/24 pair for the test network")


@pytest.fixture
def lab() -> Iterator[Lab]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    lab = Lab(f"{os.getpid() % 100000}")
    try:
        yield lab
    finally:
        lab.close()


def _current_round(exc: grpc.RpcError) -> int:
    for key, value in exc.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "fedgrad-current-round":
            return int(value)
    raise AssertionError(f"ABORTED without fedgrad-current-round: {exc.details()}")


def test_partitioned_node_misses_a_round_then_rejoins(serve, hand_node, lab, caplog) -> None:
    caplog.set_level(logging.INFO)
    x, y = _free_subnets()
    b_host, c_host = lab.add_host("B", x), lab.add_host("C", y)
    # Plaintext on a test network only this test can reach (the aggregator refuses it
    # on a non-loopback address unless told).
    served = serve("linear", listen=f"{b_host.root_ip}:0", insecure=True, nodes=3,
                   min_nodes=2, round_timeout=3.0, rounds=ROUNDS, finish_grace=30.0,
                   start_timeout=120.0)  # fmt: skip
    address = f"{b_host.root_ip}:{served.port}"

    task = load_task("linear")
    data = task.shard(0, 3)
    model = task.model()
    a = hand_node(address, "node-0", num_samples=len(data[0]))

    def node_proc(host: Host, index: int) -> subprocess.Popen[str]:
        return lab.run(host, sys.executable, "-m", "fedgrad.launch.cli", "node", "--task",
                       "linear", "--aggregator", address, "--node-id", f"node-{index}",
                       "--shard", f"{index}/3", "--give-up-after", "120")  # fmt: skip

    procs = {"node-1": node_proc(b_host, 1), "node-2": node_proc(c_host, 2)}

    def core(fn: Any) -> Any:
        return served.call(lambda: fn(served.core))

    def wait(predicate: Any, what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not predicate():
            for name, proc in procs.items():
                assert proc.poll() is None, f"{name} exited: {proc.communicate()}"
            assert time.monotonic() < deadline, f"gave up after {WAIT:.0f} s waiting for {what}"
            time.sleep(0.02)

    def upload(round_: int) -> int:
        """node-0 pulls ``round_`` (or later), computes and uploads; return the next round."""
        header, params = a.pull(round_)
        if header.finished:
            return -1
        with torch.no_grad():
            for p, value in zip(model.parameters(), params, strict=True):
                p.copy_(value)
        update = task.compute_update(model, data, round_generator(0, "node-0", header.round))
        try:
            a.push(header.round, update.gradients)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED:
                raise
            return _current_round(exc)  # the round closed without us: continue there
        return header.round + 1

    next_round = 0
    while next_round < CUT_AFTER:
        next_round = upload(next_round)
        wait(lambda r=next_round: core(lambda c: c.round) >= r, f"round {next_round - 1} to close")

    # node-2 reports round CUT_AFTER; then its link goes down in the middle of that round.
    wait(lambda: "node-2" in core(lambda c: c.reported), "node-2 to report before the cut")
    lab.cut(c_host)
    try:
        next_round = upload(next_round)  # round CUT_AFTER closes with all three
        wait(lambda: core(lambda c: c.round) > CUT_AFTER, "the round of the cut to close")
        partitioned = CUT_AFTER + 1
        next_round = upload(next_round)  # node-0 and node-1 report; node-2 cannot
        wait(lambda: core(lambda c: c.round) > partitioned, "the deadline to close at quorum")
    finally:
        lab.restore(c_host)

    history = core(lambda c: list(c.history))
    assert [r.nodes for r in history[: partitioned + 1]] == [3] * (partitioned) + [2]
    missed = [r for r in caplog.records if "missed the round deadline" in r.getMessage()]
    assert [(r.node, r.round) for r in missed] == [("node-2", partitioned)]  # type: ignore[attr-defined]
    reply = a.stub.GetStatus(pb.StatusRequest(), timeout=20)
    assert {n.node_id: n.state for n in reply.nodes}["node-2"] == "late"

    # The link is back: node-2's connection resumes, it catches up and is counted again.
    wait(lambda: core(lambda c: c.nodes["node-2"].state) == "active", "node-2 to come back")
    while next_round >= 0:
        next_round = upload(next_round)
    wait(lambda: core(lambda c: c.finished), "training to finish")
    assert core(lambda c: c.nodes["node-2"].last_round) > partitioned, "node-2 never counted again"
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{err}"
    final = core(lambda c: c.history)
    assert len(final) == ROUNDS and final[-1].test_loss < final[0].test_loss
