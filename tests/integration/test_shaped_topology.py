"""benchmarks.shaped: hosts in namespaces on a shaped bridge, and one tiny shaped run.

Checks the harness, not fedgrad's speed: two hosts shaped to 80 Mbit/s reach each
other over TCP, a few MB between them pass at most 1.5x the shaped rate (unshaped
veths pass several Gbit/s here), and the teardown removes every namespace and link
it made. Then ``shaped_rounds`` at a tiny size returns round times and bytes. Skipped,
with the reason, when not root or when ``ip`` / ``tc`` are missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import shaped
from benchmarks.common import BenchError, Procs

pytestmark = [pytest.mark.slow, pytest.mark.netns]

RATE_MBIT = 80
PAYLOAD = 4 * 1024 * 1024

# The receiver times from its first byte to EOF, so connection set-up is not counted.
SINK = """import socket, sys, time
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
srv.settimeout(60)
print("LISTENING", flush=True)
conn, _ = srv.accept()
conn.settimeout(60)
got, first = 0, None
while data := conn.recv(1 << 20):
    first = first or time.monotonic()
    got += len(data)
print("RESULT", got, time.monotonic() - first, flush=True)
"""
SOURCE = """import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as conn:
    conn.sendall(b"x" * int(sys.argv[3]))
"""


# A stand-in ``fedgrad`` with the planned shard and relay flags: servers listen on
# --listen for a moment, shard 0 writes a two-round history; every call logs its argv.
FAKE_CLI = """import json, os, socket, sys, time
if "--help" in sys.argv:
    print("--shard I/K --peers ADDR,... --insecure")
    sys.exit(0)
with open(os.environ["FAKE_FEDGRAD_LOG"], "a") as log:
    print(json.dumps(sys.argv[1:]), file=log)
args = sys.argv[2:]
if sys.argv[1] in ("aggregator", "relay"):
    host, port = args[args.index("--listen") + 1].rsplit(":", 1)
    with socket.create_server((host, int(port))):
        time.sleep(3)
    if "--history" in args:
        with open(args[args.index("--history") + 1], "w") as fh:
            fh.write("round,seconds,bytes\\n0,0.5,100\\n1,0.25,80\\n")
"""


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    reason = shaped.netns_unavailable()
    if reason:
        pytest.skip(reason)
    with Procs(tmp_path / "logs") as started:
        yield started


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=True).stdout  # fmt: skip


def _assert_removed(names: dict[str, list[str]]) -> None:
    namespaces = {line.split()[0] for line in _ip("netns", "list").splitlines()}
    assert not namespaces & set(names["netns"]), f"left behind: {namespaces}"
    links = _ip("-o", "link")
    assert not [link for link in names["links"] if f" {link}:" in links or f" {link}@" in links]


def test_two_shaped_hosts_talk_below_the_rate_and_leave_nothing(procs: Procs) -> None:
    with shaped.Topology(["a", "b"], rate_mbit=RATE_MBIT) as topo:
        names = topo.names()
        assert set(names["netns"]) <= set(_ip("netns", "list").split())
        qdisc = _ip("-n", topo.namespace("a"), "-o", "link", "show", "eth0")
        assert "tbf" in qdisc, qdisc
        sink = topo.spawn(procs, "sink", "b", [sys.executable, "-c", SINK, topo.address("b"),
                                               topo.port("b")], pipe_stdout=True)  # fmt: skip
        procs.read_line(sink, "LISTENING", timeout=30)
        topo.run("a", [sys.executable, "-c", SOURCE, topo.address("b"), topo.port("b"),
                       PAYLOAD], timeout=60)  # fmt: skip
        got, seconds = procs.read_line(sink, "RESULT", timeout=60).split()
        assert int(got) == PAYLOAD
        mbit_s = PAYLOAD * 8 / float(seconds) / 1e6
        assert mbit_s < 1.5 * RATE_MBIT, f"{mbit_s:.0f} Mbit/s through an {RATE_MBIT} Mbit/s link"
    _assert_removed(names)


def test_teardown_runs_when_the_body_raises(procs: Procs) -> None:
    with pytest.raises(KeyboardInterrupt), shaped.Topology(["x", "y", "z"], None) as topo:
        names = topo.names()
        topo.spawn(procs, "sleeper", "x", [sys.executable, "-c", "import time; time.sleep(60)"])
        raise KeyboardInterrupt
    _assert_removed(names)


@pytest.mark.parametrize("shards", [1, 2])
def test_shaped_rounds_at_a_tiny_size(procs: Procs, shards: int) -> None:
    if reason := shaped.unavailable(shards):
        pytest.skip(reason)
    # A short finish grace: shards after the first wait it out before they exit.
    result = shaped.shaped_rounds(20_000, 4, nodes=2, rounds=2, procs=procs, shards=shards,
                                  rate_mbit=100, extra=("--finish-grace", "2"),
                                  timeout=240)  # fmt: skip
    assert len(result["all_rounds"]) == 2 and result["median"] > 0
    assert result["bytes_per_round"] > 0
    assert all(result["rss_bytes"][f"agg{i}"] > 0 for i in range(shards))
    left = [ns for ns in _ip("netns", "list").split() if ns.startswith(f"fgsh-{os.getpid()}-")]
    assert not left


def test_a_missing_shard_or_relay_command_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shaped, "_help_text", lambda cli, command: None)
    for shards, relays in ((2, 0), (1, 2)):
        with pytest.raises(BenchError, match=shaped.NOT_AVAILABLE):
            shaped.shaped_rounds(20_000, 4, nodes=2, rounds=2, shards=shards, relays=relays)


def test_shards_and_relays_get_the_planned_flags(
    procs: Procs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fedgrad.py").write_text(FAKE_CLI)
    monkeypatch.setenv("FAKE_FEDGRAD_LOG", str(tmp_path / "calls.jsonl"))
    cli = [sys.executable, str(tmp_path / "fedgrad.py")]
    result = shaped.shaped_rounds(1000, 2, nodes=4, rounds=2, procs=procs, shards=2, relays=2,
                                  rate_mbit=None, cli=cli, timeout=60)  # fmt: skip
    assert (result["median"], result["bytes_per_round"]) == (0.25, 80)
    assert set(result["rss_bytes"]) == {"agg0", "agg1", "relay0", "relay1"}

    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]

    def value(call: list[str], flag: str) -> str:
        return call[call.index(flag) + 1]

    aggs = sorted((c for c in calls if c[0] == "aggregator"), key=lambda c: value(c, "--shard"))
    peers = [value(c, "--listen") for c in aggs]
    for i, call in enumerate(aggs):
        assert value(call, "--shard") == f"{i}/2"
        assert value(call, "--peers") == ",".join(peers)
        assert value(call, "--nodes") == "2"  # the relays are shard 0's nodes
        assert ("--history" in call) == (i == 0)
    relays = [c for c in calls if c[0] == "relay"]
    assert [value(c, "--upstream") for c in relays] == [peers[0]] * 2
    assert [value(c, "--nodes") for c in relays] == ["2", "2"]
    relay_at = [value(c, "--listen") for c in relays]
    nodes = sorted((c for c in calls if c[0] == "node"), key=lambda c: value(c, "--shard"))
    upstreams = [value(c, "--aggregator") for c in nodes]
    # Nodes 0-1 on one relay, 2-3 on the other (the relays log their calls in any order).
    assert upstreams[0] == upstreams[1] != upstreams[2] == upstreams[3]
    assert set(upstreams) == set(relay_at)
