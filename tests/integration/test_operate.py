"""Operate the real stack (issue 6, "Operate"): metrics, logs, configuration, status,
health, reflection, plot and the progress line.

Every aggregator is a real gRPC server on 127.0.0.1 (port 0 or a free port), either
in-process (``serve``) or as a ``fedgrad`` process (``spawn``, ``cli``); nodes are
``fedgrad node`` processes or hand-driven stubs (``hand_node``) that make real RPCs. A
hand node paces a federation: while it holds back its upload the round stays open, so
"during the run" is a state the test waits for, never a sleep it hopes is long enough.
Metrics are scraped over real HTTP and parsed with ``prometheus_client``'s parser. No
timing is asserted; every wait has a deadline and every process is killed at teardown.
"""

from __future__ import annotations

import json
import math
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from polling import wait_until
from prometheus_client.parser import text_string_to_metric_families

from fedgrad.config import AggregatorConfig, NodeConfig
from fedgrad.errors import ConfigError
from fedgrad.history import RoundRecord, read_history
from fedgrad.launch.cli import build_parser, main, subparser
from fedgrad.launch.commands import aggregator_config, node_config
from fedgrad.launch.options import resolve
from fedgrad.launch.progress import render_progress
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.server.aggregator import Aggregator
from fedgrad.task import load_task

#: Bound on any one process or wait (interpreter start-up, a few rounds); never asserted.
PROC_TIMEOUT = 120.0
WAIT = 60.0
LOCAL = "127.0.0.1"
#: A text log line: "HH:MM:SS LEVEL   logger: message [fields]".
TEXT_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) +fedgrad[\w.]*: \S")
#: Where a text log record starts (anywhere in a terminal's byte stream).
TEXT_RECORD = re.compile(r"\d\d:\d\d:\d\d (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) +fedgrad")
# The loss appears once a round has one (no "loss nan" before the first round closes).
PROGRESS = re.compile(r"round \d+/\d+ \[[#.]+\] \d+/\d+ uploads +\d+\.\d MB/s  (loss \S+  )?\w+")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- helpers --------------------------------------------------------------------------------------
class Scrape(dict):
    """One scrape of /metrics: ``scrape(name, **labels)`` is a sample's value (KeyError if absent)."""

    def __call__(self, name: str, **labels: str) -> float:
        return self[(name, frozenset(labels.items()))]

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self


def scrape(port: int) -> Scrape:
    """GET http://127.0.0.1:PORT/metrics over real HTTP and parse the exposition text."""
    with urllib.request.urlopen(f"http://{LOCAL}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    out = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def zeros(node: Any) -> list[torch.Tensor]:
    """Gradients of the node's manifest, all zero (the step changes nothing, shapes match)."""
    return [torch.zeros(s.shape, dtype=s.dtype) for s in node.specs]


def bad_upload(node: Any, round_: int) -> grpc.RpcError:
    """Push an upload whose id is malformed; return the refusal (INVALID_ARGUMENT)."""
    with pytest.raises(grpc.RpcError) as info:
        node.push(round_, zeros(node), upload_id="not a valid id!")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    return info.value


def finish(proc: subprocess.Popen[str], timeout: float = PROC_TIMEOUT) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def node_states(stub: Any) -> tuple[int, dict[str, str]]:
    """The aggregator's open round and each node's state, through GetStatus."""
    reply = stub.GetStatus(pb.StatusRequest(), timeout=10)
    return reply.round, {n.node_id: n.state for n in reply.nodes}


def reported(stub: Any, round_: int, node_id: str) -> Callable[[], bool]:
    """A check: ``node_id`` has uploaded in the open round ``round_``."""

    def check() -> bool:
        open_round, states = node_states(stub)
        return open_round == round_ and states.get(node_id) == "reported"

    return check


def kill_group(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.communicate(timeout=10)
    except (subprocess.TimeoutExpired, ValueError):
        pass


def aggregator_argv(cli: Any, port_file: Path, *extra: str | Path) -> list[str | Path]:
    return [
        *cli.argv, "aggregator", "--listen", f"{LOCAL}:0", "--port-file", port_file,
        "--round-timeout", "600", "--finish-grace", "30", *extra,
    ]  # fmt: skip


def node_argv(cli: Any, port: int, node_id: str, *extra: str | Path) -> list[str | Path]:
    return [
        *cli.argv, "node", "--aggregator", f"{LOCAL}:{port}", "--node-id", node_id,
        "--give-up-after", "60", *extra,
    ]  # fmt: skip


def paced_rounds(
    hand: Any, stub: Any, rounds: int, cli_node: str, hold: Callable[[int], None]
) -> None:
    """Play ``rounds`` rounds with ``hand`` as the last uploader of each.

    In every round: wait until ``cli_node`` has uploaded, call ``hold(round)`` (the
    round is open, one upload in), then upload and pull the next round.
    """
    hand.pull(0)
    for r in range(rounds):
        wait_until(reported(stub, r, cli_node), f"{cli_node} uploading round {r}", WAIT)
        hold(r)
        hand.push(r, zeros(hand), metrics={"loss": 1.0})
        hand.pull(r + 1)


# == 1. metrics ===================================================================================
def test_metrics_move_during_a_run(serve, hand_node) -> None:
    """Scrape /metrics over HTTP before, inside and after rounds: every family moves as it should."""
    served = serve("linear", nodes=2, rounds=3, metrics_port=0, round_timeout=600.0)
    port = served.thread.server.metrics_port
    assert port > 0, "metrics_port=0 must bind an ephemeral port and report it"
    a = hand_node(served, "node-a", num_samples=1)
    b = hand_node(served, "node-b", num_samples=3)
    payload = served.core.layout.total  # bytes of one upload (float64 linear model)

    m0 = scrape(port)
    assert m0("fedgrad_rounds_completed_total") == 0
    assert m0("fedgrad_nodes", state="active") == 2
    assert m0("fedgrad_nodes", state="late") == 0
    assert m0("fedgrad_round_duration_seconds_count") == 0
    assert m0("fedgrad_uploads_accepted_total") == 0
    assert m0("fedgrad_bytes_received_total") == 0
    assert math.isnan(m0("fedgrad_last_loss")), "no round yet: the last loss is NaN"
    assert not any(k[0] == "fedgrad_rejections_total" for k in m0)

    # Round 0, half-way: one upload in, the round still open.
    a.pull(0)
    b.pull(0)
    wait_until(lambda: scrape(port)("fedgrad_bytes_sent_total") > 0, "bytes sent to grow", WAIT)
    a.push(0, zeros(a), metrics={"loss": 1.5})
    # The reply means "counted"; the add, and the release of the upload's staging slot,
    # follow a moment later. Scrape once they are done.
    served.call_settled(lambda: None)
    mid = scrape(port)
    assert mid("fedgrad_uploads_accepted_total") == 1
    assert mid("fedgrad_bytes_received_total") == payload
    assert mid("fedgrad_rounds_completed_total") == 0
    assert mid("fedgrad_staging_bytes") == 0, "nothing staged between uploads"
    assert mid("fedgrad_round") == 0

    # A malformed upload is refused and counted by reason.
    bad_upload(b, 0)
    assert scrape(port)("fedgrad_rejections_total", reason="INVALID_ARGUMENT") == 1

    b.push(0, zeros(b), metrics={"loss": 0.5})
    a.pull(1)  # returns once round 0 closed and round 1 is published
    m1 = scrape(port)
    assert m1("fedgrad_rounds_completed_total") == 1
    assert m1("fedgrad_round") == 1
    assert m1("fedgrad_uploads_accepted_total") == 2
    assert m1("fedgrad_bytes_received_total") == 2 * payload
    assert m1("fedgrad_round_duration_seconds_count") == 1
    assert m1("fedgrad_round_duration_seconds_bucket", le="+Inf") == 1
    assert m1("fedgrad_round_duration_seconds_sum") > 0
    for phase in ("collect", "reduce", "step", "broadcast"):
        assert m1.has("fedgrad_round_phase_seconds_total", phase=phase), phase
        assert m1("fedgrad_round_phase_seconds_total", phase=phase) >= 0
    assert m1("fedgrad_nodes", state="active") == 2
    # Sample-weighted train loss: (1.5 * 1 + 0.5 * 3) / 4.
    assert m1("fedgrad_last_loss") == 0.75
    assert m1("fedgrad_rejections_total", reason="INVALID_ARGUMENT") == 1

    # Round 1: the counters keep growing.
    b.pull(1)
    a.push(1, zeros(a), metrics={"loss": 3.0})
    b.push(1, zeros(b), metrics={"loss": 1.0})
    a.pull(2)
    m2 = wait_until(
        lambda: (
            (s := scrape(port))("fedgrad_bytes_sent_total") > m1("fedgrad_bytes_sent_total") and s
        ),
        "bytes sent to grow in round 1",
        WAIT,
    )
    assert m2("fedgrad_rounds_completed_total") == 2
    assert m2("fedgrad_uploads_accepted_total") == 4
    assert m2("fedgrad_bytes_received_total") == 4 * payload
    assert m2("fedgrad_round_duration_seconds_count") == 2
    for phase in ("collect", "reduce", "step", "broadcast"):
        assert m2("fedgrad_round_phase_seconds_total", phase=phase) >= m1(
            "fedgrad_round_phase_seconds_total", phase=phase
        ), f"counter {phase} went down"
    assert m2("fedgrad_last_loss") == 1.5  # (3.0 * 1 + 1.0 * 3) / 4
    assert math.isfinite(m2("fedgrad_last_loss"))

    # A node that leaves is counted as such.
    a.stub.Leave(pb.LeaveRequest(node_id="node-a"), timeout=10)
    m3 = scrape(port)
    assert m3("fedgrad_nodes", state="active") == 1
    assert m3("fedgrad_nodes", state="left") == 1


def test_metrics_scrape_does_not_fail_while_nodes_join(serve, connect) -> None:
    """A scrape reads the aggregator's state from the HTTP server's thread while the
    event loop changes it; every scrape must still answer 200.

    (A short GIL switch interval makes a thread switch inside the collector's loops
    likely; it changes how often the race is hit, not whether it exists.)
    """
    served = serve("linear", nodes=1_000_000, metrics_port=0)  # round 0 never opens
    port = served.thread.server.metrics_port
    stop = threading.Event()
    stubs = [connect(served) for _ in range(3)]

    def joiner(k: int) -> None:
        i = 0
        while not stop.is_set() and i < 5000:
            stubs[k].Join(pb.JoinRequest(node_id=f"n{k}-{i}", num_samples=1), timeout=10)
            i += 1

    threads = [threading.Thread(target=joiner, args=(k,), daemon=True) for k in range(3)]
    interval = sys.getswitchinterval()
    failures: list[str] = []
    sys.setswitchinterval(1e-5)
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline and any(t.is_alive() for t in threads):
            try:
                scrape(port)
            except urllib.error.HTTPError as exc:
                failures.append(f"HTTP {exc.code}: {exc.read()[:200]!r}")
                exc.close()
                break
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, (
        "a scrape failed while nodes joined (the collector iterates core.nodes from the HTTP"
        f" thread while the event loop inserts into it): {failures[0]}"
    )


# == 2, 4, 5, 7. a CLI federation: status, health, metrics flag, plot ============================
@pytest.mark.slow
def test_status_health_metrics_and_plot_of_a_cli_federation(
    spawn, cli, hand_node, connect, closed_port: int, tmp_path: Path
) -> None:
    """``fedgrad status``/``health`` against a running ``fedgrad aggregator`` process with a
    ``fedgrad node`` process and a paced hand node; its ``--metrics-port`` over HTTP; then
    the tools against a closed port, and ``fedgrad plot`` of the run's history."""
    params = 300_000  # float32: 1.2 MB per upload, so the MB figures are not 0.0
    payload = params * 4
    task = ("--task", "synthetic", "--task-arg", f"params={params}")
    port_file, history, mport = tmp_path / "port", tmp_path / "history.csv", cli.closed_port()
    aggregator = spawn(
        *aggregator_argv(cli, port_file, *task, "--nodes", "2", "--rounds", "2",
                         "--history", history, "--metrics-port", str(mport)),
        log=tmp_path / "aggregator.log",
    )  # fmt: skip
    # Meanwhile: the tools against a port nothing listens on.
    down = {
        "status": spawn(*cli.argv, "status", f"{LOCAL}:{closed_port}", "--timeout", "3"),
        "health": spawn(*cli.argv, "health", f"{LOCAL}:{closed_port}", "--timeout", "3"),
    }
    port = cli.wait_port(port_file, aggregator)
    address = f"{LOCAL}:{port}"
    node = spawn(*node_argv(cli, port, "node-0", *task), log=tmp_path / "node.log")
    hand = hand_node(address, "hand", num_samples=100)
    stub = connect(address)

    observed: dict[str, Any] = {}

    def observe(round_: int) -> None:
        if round_ != 1:
            return
        # Round 1 is open: node-0 has uploaded, the hand node has not. Four parameter
        # streams (two per round) of at least one payload each have been counted.
        wait_until(
            lambda: stub.GetStatus(pb.StatusRequest(), timeout=10).bytes_sent >= 4 * payload,
            "the four parameter streams to be counted",
            WAIT,
        )
        bad_upload(hand, 1)
        tools = {
            "status": spawn(*cli.argv, "status", address),
            "json": spawn(*cli.argv, "status", address, "--json"),
            "health": spawn(*cli.argv, "health", address),
        }
        observed["metrics"] = scrape(mport)
        observed.update({name: finish(proc) for name, proc in tools.items()})

    paced_rounds(hand, stub, 2, "node-0", observe)
    code, _, _ = finish(node)
    assert code == 0, (tmp_path / "node.log").read_text()
    code, _, _ = finish(aggregator)
    assert code == 0, (tmp_path / "aggregator.log").read_text()

    # -- status, text ---------------------------------------------------------------------------
    code, out, err = observed["status"]
    assert code == 0, err
    assert re.search(
        r"^round 1/2 +phase collecting +mode sync +selected 2 +uploads this round 1"
        r" +finished False$",
        out,
        re.M,
    ), out
    # 3 uploads counted (2 in round 0, node-0's in round 1) of 1.2 MB each.
    assert "bytes received 3.6 MB" in out, out
    assert re.search(r"^node-0 +reported +100 +1 +[\d.]+ +[\d.]+ ", out, re.M), "with a norm"
    assert re.search(r"^hand +active ", out, re.M), out
    assert re.search(r"^  train_loss +\d", out, re.M), "the last round's metrics are listed"

    # -- status --json ------------------------------------------------------------------------
    code, out, err = observed["json"]
    assert code == 0, err
    doc = json.loads(out)
    # proto3 JSON: 64-bit counters are strings ("1"), so read them with int().
    assert int(doc["round"]) == 1 and int(doc["total_rounds"]) == 2
    assert {n["node_id"]: n["state"] for n in doc["nodes"]} == {
        "hand": "active",
        "node-0": "reported",
    }
    assert int(doc["bytes_received"]) == 3 * payload
    assert int(doc["bytes_sent"]) >= 4 * payload
    assert "train_loss" in doc["last_metrics"]
    # The text form prints the same counters.
    text_out = observed["status"][1]
    assert f"sent {int(doc['bytes_sent']) / 1e6:.1f} MB" in text_out, text_out

    # -- health -------------------------------------------------------------------------------
    code, out, err = observed["health"]
    assert (code, out.strip()) == (0, "SERVING"), err

    # -- --metrics-port on the process, over HTTP --------------------------------------------
    m = observed["metrics"]
    assert m("fedgrad_rounds_completed_total") == 1
    assert m("fedgrad_uploads_accepted_total") == 3
    assert m("fedgrad_bytes_received_total") == 3 * payload
    assert m("fedgrad_bytes_sent_total") == int(doc["bytes_sent"])
    assert m("fedgrad_bytes_spilled_total") == 0  # unsharded: nothing is staged in files
    assert m("fedgrad_nodes", state="active") == 2
    assert m("fedgrad_rejections_total", reason="INVALID_ARGUMENT") == 1
    assert math.isfinite(m("fedgrad_last_loss"))

    # -- not reachable: exit 1 with a one-line reason, no traceback ---------------------------
    code, out, err = finish(down["status"])
    assert code == 1, (out, err)
    assert err.startswith("fedgrad status: UNAVAILABLE: ") and "Traceback" not in err, err
    code, out, err = finish(down["health"])
    assert code == 1, (out, err)
    assert err.startswith("unhealthy: UNAVAILABLE: ") and "Traceback" not in err, err

    # -- plot of the history this run wrote -------------------------------------------------------
    assert [r.round for r in read_history(history)] == [0, 1]
    png = tmp_path / "out" / "curves.png"
    code, out, err = finish(spawn(*cli.argv, "plot", history, "--out", png))
    assert code == 0, err
    assert out.strip() == f"wrote {png}"
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR" and len(data) > 10_000, "a real image, not an empty canvas"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1000, 400), "figsize 10x4 inches at 100 dpi"


def test_status_json_keeps_zero_and_false_fields(serve, hand_node, capsys) -> None:
    """``status --json`` is for machines: at round 0 "round" is 0 and "finished" false,
    not missing (proto3 JSON drops default values unless told not to)."""
    served = serve("linear", nodes=2)
    hand_node(served, "node-0")  # 1 of 2: waiting at round 0
    assert main(["status", served.address, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["nodes"][0]["node_id"] == "node-0"
    missing = [k for k in ("round", "finished", "reported", "bytes_received") if k not in doc]
    assert not missing, f"status --json omits zero/false fields {missing}: {doc}"
    assert int(doc["round"]) == 0 and doc["finished"] is False


# == 2. logs ======================================================================================
@pytest.mark.slow
def test_json_logs_of_aggregator_and_node(spawn, cli, hand_node, connect, tmp_path: Path) -> None:
    """``--log-format json``: every stderr line of both processes is one JSON object with
    time/level/message; round, node, event and reason fields sit on the relevant lines."""
    port_file = tmp_path / "port"
    aggregator = spawn(
        *aggregator_argv(cli, port_file, "--task", "linear", "--nodes", "2", "--rounds", "2",
                         "--log-format", "json"),
    )  # fmt: skip
    port = cli.wait_port(port_file, aggregator)
    node = spawn(*node_argv(cli, port, "node-0", "--task", "linear", "--log-format", "json"))
    hand = hand_node(f"{LOCAL}:{port}", "hand")
    stub = connect(port)
    paced_rounds(hand, stub, 2, "node-0", lambda r: bad_upload(hand, r) if r == 0 else None)
    node_code, node_out, node_err = finish(node)
    agg_code, agg_out, agg_err = finish(aggregator)
    assert node_code == 0, node_err
    assert agg_code == 0, agg_err

    def records(text: str, who: str) -> list[dict[str, Any]]:
        out = []
        for line in text.splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                raise AssertionError(f"{who}: not a JSON line: {line!r}") from None
            assert isinstance(doc, dict), line
            assert {"time", "level", "message"} <= doc.keys(), line
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"]), line
            assert doc["level"] in {"debug", "info", "warning", "error", "critical"}, line
            out.append(doc)
        assert out, f"{who} logged nothing"
        return out

    agg = records(agg_err, "aggregator")
    nodes = records(node_err, "node")
    assert agg_out == node_out == "", "logs go to stderr only"

    rounds = [d for d in agg if d.get("event") == "round"]
    assert [d["round"] for d in rounds] == [0, 1], rounds
    joins = {d["node"] for d in agg if d.get("event") == "join"}
    assert joins == {"node-0", "hand"}, agg
    (reject,) = [d for d in agg if d.get("event") == "reject"]
    assert reject["reason"] == "INVALID_ARGUMENT" and reject["node"] == "hand"
    assert reject["round"] == 0 and reject["level"] == "warning"
    assert "upload_id" in reject["message"]
    assert any(d.get("event") == "listen" for d in agg)
    uploads = [d for d in nodes if d.get("event") == "upload"]
    assert [(d["node"], d["round"]) for d in uploads] == [("node-0", 0), ("node-0", 1)], nodes
    assert all(d.get("node") == "node-0" for d in nodes if "event" in d), nodes


@pytest.mark.slow
def test_text_logs_and_no_progress_line_without_a_terminal(
    spawn, cli, hand_node, connect, tmp_path: Path
) -> None:
    """Default logs are readable text lines (no JSON); with stderr a pipe, no progress line
    is drawn even while a round stays open for several redraw periods."""
    port_file = tmp_path / "port"
    aggregator = spawn(
        *aggregator_argv(cli, port_file, "--task", "linear", "--nodes", "2", "--rounds", "2")
    )
    port = cli.wait_port(port_file, aggregator)
    node = spawn(*node_argv(cli, port, "node-0", "--task", "linear"))
    hand = hand_node(f"{LOCAL}:{port}", "hand")
    # Hold round 0 open for 3 redraw periods of the progress line (0.5 s): it would show.
    paced_rounds(hand, connect(port), 2, "node-0", lambda r: time.sleep(1.5) if r == 0 else None)
    node_code, _, node_err = finish(node)
    agg_code, agg_out, agg_err = finish(aggregator)
    assert node_code == 0, node_err
    assert agg_code == 0, agg_err

    for who, text in (("aggregator", agg_err), ("node", node_err)):
        assert "\r" not in text and "\x1b" not in text, f"{who}: terminal control codes: {text!r}"
        assert not PROGRESS.search(text), f"{who}: a progress line on a pipe: {text}"
        lines = text.splitlines()
        assert lines, f"{who} logged nothing"
        for line in lines:
            assert TEXT_LINE.match(line), f"{who}: not a readable log line: {line!r}"
            assert not line.lstrip().startswith("{"), line
    assert agg_out == ""
    round_lines = [ln for ln in agg_err.splitlines() if "[round=" in ln and "event=round" in ln]
    assert len(round_lines) == 2, agg_err
    assert re.search(
        r"fedgrad\.cli: round 0 closed \(1 of 2\): train loss \d+\.\d{4}, ", round_lines[0]
    )
    assert "node joined [node=hand round=0 event=join]" in agg_err, agg_err


# == 8. progress ==================================================================================
class Terminal:
    """A process whose stderr is a pseudo-terminal; the master side is read in a thread."""

    def __init__(self, argv: Sequence[str | Path], env: Mapping[str, str]) -> None:
        master, slave = pty.openpty()
        self.master = master
        self._chunks: list[bytes] = []
        try:
            self.proc = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=slave,
                env=dict(env),
                start_new_session=True,
            )
        finally:
            os.close(slave)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: the process and its children closed the terminal
                return
            if not data:
                return
            self._chunks.append(data)

    @property
    def text(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    def close(self) -> None:
        kill_group(self.proc)
        self._reader.join(10)
        os.close(self.master)


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    started: list[Terminal] = []

    def factory(argv: Sequence[str | Path], env: Mapping[str, str]) -> Terminal:
        term = Terminal(argv, env)
        started.append(term)
        return term

    yield factory
    for term in started:
        term.close()


@pytest.mark.slow
def test_progress_line_on_a_terminal(
    terminal, spawn, cli, hand_node, connect, tmp_path: Path
) -> None:
    """Attached to a terminal, the aggregator redraws ``round r/R [###...] k/n uploads ...
    MB/s`` in place (carriage return + erase line) while rounds run; log lines still show."""
    port_file = tmp_path / "port"
    term = terminal(
        aggregator_argv(cli, port_file, "--task", "linear", "--nodes", "2", "--rounds", "2"),
        cli.env(),
    )
    port = cli.wait_port(port_file, term.proc)
    node = spawn(*node_argv(cli, port, "node-0", "--task", "linear"))
    hand = hand_node(f"{LOCAL}:{port}", "hand")
    half = "[" + "#" * 12 + "." * 12 + "] 1/2 uploads"

    def hold(round_: int) -> None:
        # node-0 uploaded, the hand node holds: the bar of this round shows 1 of 2.
        wait_until(
            lambda: f"round {round_ + 1}/2 {half}" in term.text,
            f"progress of round {round_ + 1}",
            WAIT,
        )

    paced_rounds(hand, connect(port), 2, "node-0", hold)
    assert finish(node)[0] == 0
    assert term.proc.wait(PROC_TIMEOUT) == 0
    term._reader.join(10)
    text = term.text

    # Each draw: erase the line, then the progress text (cut where a log record follows it).
    draws = [TEXT_RECORD.split(d)[0] for d in re.findall(r"\r\x1b\[K(round [^\r\n\x1b]*)", text)]
    assert draws, f"no progress line drawn: {text!r}"
    for draw in draws:
        assert PROGRESS.fullmatch(draw), draw
    assert any(f"round 1/2 {half}" in d for d in draws)
    assert any(f"round 2/2 {half}" in d for d in draws)
    assert "fedgrad.cli: round 0 closed (1 of 2): train loss" in text, "log lines still appear"


@pytest.mark.slow
def test_log_lines_do_not_run_into_the_progress_line(
    terminal, cli, hand_node, tmp_path: Path
) -> None:
    """On a terminal, a log record must start on a line of its own, not be appended to
    the progress line that was drawn just before it (``...  waiting12:00:01 INFO ...``)."""
    port_file = tmp_path / "port"
    term = terminal(
        aggregator_argv(cli, port_file, "--task", "linear", "--nodes", "2", "--rounds", "1"),
        cli.env(),
    )
    port = cli.wait_port(port_file, term.proc)
    wait_until(lambda: "round 1/1 [" in term.text, "a progress line before the join", WAIT)
    hand_node(f"{LOCAL}:{port}", "late-joiner")  # logs "node joined" after the bar was drawn
    wait_until(lambda: "node joined" in term.text, "the join log line", WAIT)
    text = term.text
    glued = [
        text[max(0, m.start() - 60) : m.start() + 40]
        for m in TEXT_RECORD.finditer(text)
        if not (
            m.start() == 0 or text[m.start() - 1] == "\n" or text[: m.start()].endswith("\r\x1b[K")
        )
    ]
    assert not glued, f"log records written onto the progress line: {glued}"


def _core(rounds: int = 5) -> Aggregator:
    return Aggregator(load_task("linear", {}), AggregatorConfig(rounds=rounds, progress=False))


def _report(core: Aggregator, *nodes: str) -> None:
    """Count an upload of each node in the open round, through the engine's events."""
    engine = core.engine
    for node in nodes:
        engine.open_upload(node, engine.round, f"{node}.r{engine.round}", now=0.0)
        engine.accept(node, engine.round, f"{node}.r{engine.round}")
        engine.abandon(node)
        engine.added()


def _close(core: Aggregator) -> None:
    core.engine.begin_close()
    core.engine.opened()


def test_render_progress_on_a_core() -> None:
    core = _core()
    assert render_progress(core, 0.0) == (
        "round 1/5 [........................] 0/1 uploads      0.0 MB/s  waiting"
    )
    engine = core.engine
    for name in ("a", "b", "c", "d"):
        if engine.join(name, 1, now=0.0):
            engine.opened()
    _report(core, "a", "b", "c", "d")
    _close(core)
    _report(core, "a", "b", "c")
    engine.round_deadline(1)  # d misses it: no longer expected
    _close(core)
    _report(core, "a", "b")
    core.ledger.history = [RoundRecord(2, 0.123456, 0.2, 0.9, 1.0, 10, 3)]
    line = render_progress(core, 12_345_678.0)
    assert line == (
        "round 3/5 [################........] 2/3 uploads     12.3 MB/s  loss 0.1235  collecting"
    )
    assert render_progress(core, 0.0, width=6).startswith("round 3/5 [####..] 2/3 uploads")
    _report(core, "d")
    engine.leave("d", now=0.0)
    assert engine.leave("c", now=0.0) is True  # more reports than active nodes: the bar is full
    assert "[########################] 3/2 uploads" in render_progress(core, 0.0)
    _close(core)
    for _ in range(2):
        _report(core, "a", "b")
        _close(core)
    assert engine.finished  # never "round 6/5"
    assert render_progress(core, 0.0).startswith("round 5/5 [")
    assert render_progress(core, 0.0).endswith("finished")


# == 6. reflection ================================================================================
def test_reflection_lists_and_resolves_the_services(serve) -> None:
    """With reflection on, a client that knows nothing but the address (as grpcurl does)
    lists the services and resolves every Aggregator method with its message types."""
    served = serve("linear", reflection=True)
    with grpc.insecure_channel(served.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        assert "fedgrad.v1.Aggregator" in services, services
        assert "grpc.health.v1.Health" in services, services
        pool = DescriptorPool(db)  # a fresh pool: everything comes over the wire
        service = pool.FindServiceByName("fedgrad.v1.Aggregator")
        methods = {
            m.name: (
                m.input_type.full_name,
                m.output_type.full_name,
                m.client_streaming,
                m.server_streaming,
            )
            for m in service.methods
        }
        assert methods == {
            "Join": ("fedgrad.v1.JoinRequest", "fedgrad.v1.JoinReply", False, False),
            "PullParameters": (
                "fedgrad.v1.PullRequest",
                "fedgrad.v1.ParameterMessage",
                False,
                True,
            ),
            "PushGradients": ("fedgrad.v1.GradientMessage", "fedgrad.v1.PushReply", True, False),
            "Leave": ("fedgrad.v1.LeaveRequest", "fedgrad.v1.LeaveReply", False, False),
            "GetStatus": ("fedgrad.v1.StatusRequest", "fedgrad.v1.StatusReply", False, False),
        }
        status = pool.FindMessageTypeByName("fedgrad.v1.StatusReply")
        assert {"round", "nodes", "bytes_received"} <= set(status.fields_by_name)
        health = pool.FindServiceByName("grpc.health.v1.Health")
        assert "Check" in health.methods_by_name


def test_reflection_is_off_by_default(serve) -> None:
    served = serve("linear")
    with grpc.insecure_channel(served.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# == 3. configuration =============================================================================
def effective(
    section: str, argv: Sequence[str] = (), environ: Mapping[str, str] | None = None
) -> AggregatorConfig | NodeConfig:
    """The config ``fedgrad SECTION ARGV`` would run with, through the real parser."""
    parser = build_parser()
    given = parser.parse_args([section, *argv])
    values = resolve(subparser(parser, section), given, section, dict(environ or {}))
    return aggregator_config(values) if section == "aggregator" else node_config(values)


FLAT = "rounds = 3\nseed = 1\n"
TABLES = '[aggregator]\nrounds = 3\nseed = 1\n\n[node]\nnode-id = "n-7"\nseed = 4\n'


@pytest.mark.parametrize("layout", ["flat", "tables"])
@pytest.mark.parametrize(
    ("case", "argv", "environ", "rounds"),
    [
        ("file", [], {}, 3),
        ("env over file", [], {"FEDGRAD_ROUNDS": "2"}, 2),
        ("flag over env", ["--rounds", "1"], {"FEDGRAD_ROUNDS": "2"}, 1),
    ],
)
def test_precedence_flag_env_file(
    tmp_path: Path, layout: str, case: str, argv: list[str], environ: dict[str, str], rounds: int
) -> None:
    toml = tmp_path / "fedgrad.toml"
    toml.write_text(FLAT if layout == "flat" else TABLES)
    cfg = effective("aggregator", ["--config", str(toml), *argv], environ)
    assert cfg.rounds == rounds, case
    assert cfg.seed == 1, "keys the environment and flags do not set still come from the file"


def test_defaults_and_the_config_file_named_by_the_environment(tmp_path: Path) -> None:
    assert (effective("aggregator").rounds, effective("aggregator").seed) == (10, 0)
    good, bad = tmp_path / "good.toml", tmp_path / "missing.toml"
    good.write_text(TABLES)
    cfg = effective("aggregator", [], {"FEDGRAD_CONFIG": str(good)})
    assert (cfg.rounds, cfg.seed) == (3, 1)
    # --config wins over FEDGRAD_CONFIG (flags > environment).
    cfg = effective("aggregator", ["--config", str(good)], {"FEDGRAD_CONFIG": str(bad)})
    assert cfg.rounds == 3
    # Flags and environment beat the file for the seed too.
    env = {"FEDGRAD_CONFIG": str(good), "FEDGRAD_SEED": "5"}
    assert effective("aggregator", [], env).seed == 5
    assert effective("aggregator", ["--seed", "7"], env).seed == 7


def test_one_shared_file_with_aggregator_and_node_tables(tmp_path: Path) -> None:
    toml = tmp_path / "shared.toml"
    toml.write_text(
        "[aggregator]\n"
        'task = "linear"\nrounds = 3\nround-timeout = 7.5\nmin_nodes = 2\nnodes = 2\n'
        'reflection = true\nallow-nodes = "n-7,n-8"\ntask_args = ["samples=64"]\n'
        "\n[node]\n"
        'task = "linear"\nnode-id = "n-7"\nshard = "1/2"\ngive-up-after = 5\n'
        'compress = "float16"\nseed = 4\n'
    )
    agg = effective("aggregator", ["--config", str(toml)], {"FEDGRAD_NO_PROGRESS": "yes"})
    assert isinstance(agg, AggregatorConfig)
    assert (agg.task, agg.rounds, agg.round_timeout, agg.min_nodes) == ("linear", 3, 7.5, 2)
    assert agg.reflection is True and agg.progress is False
    assert agg.allow_nodes == ("n-7", "n-8")
    assert agg.task_args == (("samples", "64"),)
    assert agg.seed == 0, "the [node] table's seed is not the aggregator's"
    node = effective("node", ["--config", str(toml)])
    assert isinstance(node, NodeConfig)
    assert (node.task, node.node_id, node.shard, node.seed) == ("linear", "n-7", (1, 2), 4)
    assert (node.give_up_after, node.compress) == (5.0, "float16")
    node = effective("node", ["--config", str(toml)], {"FEDGRAD_NODE_ID": "env-9"})
    assert node.node_id == "env-9"


BAD_SOURCES = {
    # case: (command, file text or None, environment, texts the message must contain)
    "unknown key in the [aggregator] table": (
        "aggregator", '[aggregator]\nrounds = 2\ncolour = "blue"\n', {}, ["{file}", "'colour'"]),
    "unknown key in the [node] table": (
        "node", '[aggregator]\nrounds = 2\n[node]\nnode-id = "x"\nspeed = 3\n', {},
        ["{file}", "'speed'"]),
    "node key in the [aggregator] table": (
        "aggregator", '[aggregator]\nnode-id = "x"\n', {}, ["{file}", "'node-id'"]),
    "non-positive rounds in the file": (
        "aggregator", "[aggregator]\nrounds = 0\n", {}, ["{file}", "'rounds'"]),
    "text for a number in the file": (
        "aggregator", 'rounds = "three"\n', {}, ["{file}", "'rounds'", "three"]),
    "fraction for an integer in the file": (
        "aggregator", "rounds = 2.5\n", {}, ["{file}", "'rounds'"]),
    "bad choice in the file": (
        "aggregator", 'log-format = "xml"\n', {}, ["{file}", "'log-format'", "xml"]),
    "bad boolean in the file": (
        "aggregator", 'reflection = "maybe"\n', {}, ["{file}", "'reflection'", "maybe"]),
    "bad shard in the [node] table": (
        "node", '[node]\nshard = "1-2"\n', {}, ["{file}", "'shard'"]),
    "file is not TOML": ("aggregator", "rounds = = 3\n", {}, ["{file}", "not valid TOML"]),
    "file does not exist": ("aggregator", None, {}, ["{file}", "cannot read"]),
    "bad choice in the environment": (
        "aggregator", None, {"FEDGRAD_LOG_FORMAT": "xml"}, ["environment FEDGRAD_LOG_FORMAT"]),
    "bad boolean in the environment": (
        "aggregator", None, {"FEDGRAD_REFLECTION": "maybe"}, ["environment FEDGRAD_REFLECTION"]),
    "bad float in the environment": (
        "node", None, {"FEDGRAD_GIVE_UP_AFTER": "-1"}, ["environment FEDGRAD_GIVE_UP_AFTER"]),
    "bad shard in the environment": (
        "node", None, {"FEDGRAD_SHARD": "x/y"}, ["environment FEDGRAD_SHARD"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_file_and_environment_values_exit_2_naming_the_source(
    case: str,
    tmp_path: Path,
    closed_port: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Through ``fedgrad.launch.cli.main``: exit 2 before anything starts, the message
    names the file and key or the variable."""
    command, text, environ, needles = BAD_SOURCES[case]
    toml = tmp_path / "fedgrad.toml"
    if text is not None:
        toml.write_text(text)
    argv = [command, "--config", str(toml)] if text is not None or not environ else [command]
    for key in [k for k in os.environ if k.startswith("FEDGRAD_")]:
        monkeypatch.delenv(key)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    # Refused before anything starts (so main() below cannot start serving).
    with pytest.raises(ConfigError):
        effective(command, argv[1:], environ)
    if command == "node":  # if the config were accepted, fail fast instead of retrying
        argv += ["--aggregator", f"{LOCAL}:{closed_port}"]
        # A flag outranks the environment: set the fail-fast flag only where the bad
        # value is not that very setting.
        argv += [] if "FEDGRAD_GIVE_UP_AFTER" in environ else ["--give-up-after", "0.5"]
    else:
        argv += ["--listen", f"{LOCAL}:0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedgrad {command}: error: "), err
    for needle in needles:
        assert needle.replace("{file}", str(toml)) in err, err


SILENTLY_DROPPED: dict[str, tuple[str, Callable[[AggregatorConfig], bool]]] = {
    # case: (file text, "the setting was applied"); otherwise it must be refused.
    "top-level key next to the tables": (
        'seed = 7\n[aggregator]\nrounds = 3\n[node]\nnode-id = "n-7"\n',
        lambda cfg: cfg.seed == 7,
    ),
    # No table of that name exists: it can only be refused.
    "misspelled table name": ("[aggregater]\nrounds = 3\n", lambda cfg: False),
    "table nested in [aggregator]": (
        "[aggregator]\nrounds = 3\n[aggregator.extra]\nseed = 7\n",
        lambda cfg: False,
    ),
}


@pytest.mark.parametrize("case", list(SILENTLY_DROPPED))
def test_file_settings_are_applied_or_refused_never_ignored(case: str, tmp_path: Path) -> None:
    """Unknown keys are errors at start-up: a setting the file holds but the program
    would not use must not pass silently."""
    text, applied = SILENTLY_DROPPED[case]
    toml = tmp_path / "fedgrad.toml"
    toml.write_text(text)
    try:
        cfg = effective("aggregator", ["--config", str(toml)])
    except ConfigError as exc:
        assert str(toml) in str(exc), exc  # refused, naming the file: fine
        return
    assert applied(cfg), f"{case}: accepted but ignored: {text!r} gives {cfg}"


def test_config_keys_and_variables_named_after_the_flags(tmp_path: Path) -> None:
    """README: "same keys as the flags" and "FEDGRAD_<FLAG>": ``--task-arg`` is
    ``task-arg`` in the file and ``FEDGRAD_TASK_ARG`` in the environment."""
    toml = tmp_path / "fedgrad.toml"
    toml.write_text('[aggregator]\ntask = "linear"\ntask-arg = ["samples=64"]\n')
    problems = []
    try:
        cfg = effective("aggregator", ["--config", str(toml)])
        if cfg.task_args != (("samples", "64"),):
            problems.append(f"file key task-arg ignored: {cfg.task_args}")
    except ConfigError as exc:
        problems.append(f"file key task-arg refused: {exc}")
    cfg = effective("aggregator", ["--task", "linear"], {"FEDGRAD_TASK_ARG": "samples=64"})
    if cfg.task_args != (("samples", "64"),):
        problems.append(f"FEDGRAD_TASK_ARG=samples=64 ignored: task_args={cfg.task_args}")
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_config_file_environment_and_tables_drive_real_processes(
    spawn, cli, tmp_path: Path
) -> None:
    """One shared file for both processes: the aggregator reads ``[aggregator]`` (3 rounds,
    overridden to 2 by FEDGRAD_ROUNDS), the node finds the file through FEDGRAD_CONFIG and
    takes its id from ``[node]``. The history has 2 rows, and the node's id is the file's."""
    port_file, history = tmp_path / "port", tmp_path / "history.csv"
    toml = tmp_path / "fedgrad.toml"
    toml.write_text(
        "seed = 1\n"  # flat keys are shared: the node must run with the aggregator's seed
        "[aggregator]\n"
        f'task = "linear"\nrounds = 3\nnodes = 1\nlisten = "{LOCAL}:0"\n'
        f"port-file = {json.dumps(str(port_file))}\nhistory = {json.dumps(str(history))}\n"
        "finish-grace = 30\n"
        "\n[node]\n"
        'task = "linear"\nnode-id = "from-file"\ngive-up-after = 60\n'
    )
    aggregator = spawn(*cli.argv, "aggregator", "--config", toml, env=cli.env(FEDGRAD_ROUNDS="2"))
    port = cli.wait_port(port_file, aggregator)
    node = spawn(
        *cli.argv, "node", "--aggregator", f"{LOCAL}:{port}", env=cli.env(FEDGRAD_CONFIG=str(toml))
    )
    node_code, _, node_err = finish(node)
    agg_code, _, agg_err = finish(aggregator)
    assert node_code == 0, node_err
    assert agg_code == 0, agg_err
    assert [r.round for r in read_history(history)] == [0, 1], "FEDGRAD_ROUNDS=2 beats rounds = 3"
    assert "node joined [node=from-file round=0 event=join]" in agg_err, agg_err
    assert "round 1 closed (2 of 2):" in agg_err


# -- bad values of flags: clear errors at start-up ------------------------------------------------
BAD_FLAGS = {
    # case: (extra aggregator arguments, texts the message must contain)
    "metrics port above 65535": (["--metrics-port", "70000"], ["metrics"]),
    "negative max-inflight": (["--max-inflight", "-1"], ["inflight"]),
    "metrics port in use": (["--metrics-port", "{busy}"], ["{busy}"]),
}


@pytest.fixture(scope="module")
def bad_flag_runs(cli) -> Iterator[dict[str, tuple[int | None, str]]]:
    """Start every BAD_FLAGS aggregator at once; case -> (exit code, or None if it served)."""
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind((LOCAL, 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    procs = {}
    try:
        for case, (extra, _) in BAD_FLAGS.items():
            argv = [*cli.argv, "aggregator", "--task", "linear", "--listen", f"{LOCAL}:0"]
            argv += [a.replace("{busy}", port) for a in extra]
            procs[case] = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env=cli.env(), start_new_session=True,
            )  # fmt: skip
        results: dict[str, tuple[int | None, str]] = {}
        for case, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=20)
                results[case] = (proc.returncode, out + err)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                results[case] = (None, "still running after 20 s: the bad value was accepted")
        yield {c: (code, text.replace(port, "{busy}")) for c, (code, text) in results.items()}
    finally:
        for proc in procs.values():
            kill_group(proc)
        busy.close()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flag_values_are_clear_errors_at_start_up(bad_flag_runs, case: str) -> None:
    code, output = bad_flag_runs[case]
    assert "Traceback" not in output, f"a stack trace instead of a message:\n{output}"
    assert code in (1, 2), f"exit {code}:\n{output}"
    for needle in BAD_FLAGS[case][1]:
        assert needle in output, output
    if case != "metrics port in use":
        assert code == 2, f"a bad value is a usage error (exit 2), got {code}:\n{output}"
