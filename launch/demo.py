"""``fedgrad demo``: an aggregator and N nodes as separate processes on loopback.

Run: ``fedgrad demo --nodes 4 --rounds 20 --out runs/demo`` (what ``make run`` does).
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import grpc

from fedgrad.config import AggregatorConfig
from fedgrad.history import RoundRecord, plot_history, read_history
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.proto import fedgrad_pb2_grpc as pb_grpc
from fedgrad.wire import open_channel

__all__ = ["NODES", "OUT", "ROUNDS", "run_demo", "status_line", "summary"]

#: Defaults of ``fedgrad demo``: a few nodes, enough rounds to see the curves flatten.
NODES, ROUNDS, OUT = 4, 20, "runs/demo"

_CLI = [sys.executable, "-m", "fedgrad.launch.cli"]


def _task_flags(task: str, task_args: dict[str, str]) -> list[str]:
    flags = ["--task", task]
    for key, value in task_args.items():
        flags += ["--task-arg", f"{key}={value}"]
    return flags


def _spawn(
    command: str, flags: list[str], options: dict[str, object], log: Path
) -> subprocess.Popen[bytes]:
    """Start ``fedgrad COMMAND FLAGS --KEY VALUE...`` (True: a bare flag), output to ``log``."""
    argv = [*_CLI, command, *flags]
    for key, value in options.items():
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    with log.open("wb") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)


def _wait_port(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(
                f"the aggregator exited with {proc.returncode} before serving; see its log"
            )
        time.sleep(0.05)
    raise TimeoutError("the aggregator did not start serving in time")


def status_line(status: pb.StatusReply, elapsed: float) -> str:
    """Return the demo's progress line, with only the metrics the aggregator has.

    Round 0 has none yet; a task without an accuracy (a regression) shows its test loss
    as the held-out number instead.

    Args:
        status: the aggregator's ``GetStatus`` reply (it omits metrics it does not have).
        elapsed: seconds since the demo started.

    Returns:
        One line, e.g. ``round   3/20  train loss  0.4127  test accuracy 0.9133  ...``.
    """
    metrics = {k: v for k, v in status.last_metrics.items() if not math.isnan(v)}
    parts = [f"round {status.round:>3}/{status.total_rounds}"]
    if "train_loss" in metrics:
        parts.append(f"train loss {metrics['train_loss']:7.4f}")
    if "test_accuracy" in metrics:
        parts.append(f"test accuracy {metrics['test_accuracy']:6.4f}")
    elif "test_loss" in metrics:
        parts.append(f"test loss {metrics['test_loss']:7.4f}")
    moved = (status.bytes_received + status.bytes_sent) / 1e6
    parts += [f"moved {moved:8.2f} MB", f"{elapsed:5.1f} s"]
    return "  ".join(parts)


def _progress(stub: pb_grpc.AggregatorStub, started: float, last: list[int], tty: bool) -> None:
    try:
        s = stub.GetStatus(pb.StatusRequest(), timeout=2.0)
    except grpc.RpcError:
        return
    line = status_line(s, time.monotonic() - started)
    if tty:
        print("\r" + line, end="", flush=True)
    elif s.round != last[0]:
        print(line, flush=True)
    last[0] = s.round


def run_demo(nodes: int, rounds: int, task: str, task_args: dict[str, str], out: Path) -> int:
    """Train ``task`` with ``nodes`` node processes; write history.csv and curves.png to ``out``.

    Raises:
        ConfigError: ``nodes`` or ``rounds`` is one the aggregator would refuse.
    """
    # Refuse what the aggregator would, with its message, before any process starts.
    AggregatorConfig(task=task, nodes=nodes, rounds=rounds)
    out.mkdir(parents=True, exist_ok=True)
    port_file = out / "port"
    port_file.unlink(missing_ok=True)
    flags = _task_flags(task, task_args)
    started = time.monotonic()
    print(
        f"fedgrad demo: 1 aggregator + {nodes} nodes, task {task}, {rounds} rounds; logs in {out}/"
    )
    agg = _spawn(
        "aggregator",
        flags,
        {
            "listen": "127.0.0.1:0",
            "port-file": port_file,
            "nodes": nodes,
            "rounds": rounds,
            "history": out / "history.csv",
            "save": out / "model.safetensors",
            "no-progress": True,
            "finish-grace": 10,
        },
        out / "aggregator.log",
    )
    procs = [agg]
    try:
        port = _wait_port(port_file, agg, 120)
        for i in range(nodes):
            options: dict[str, object] = {
                "aggregator": f"127.0.0.1:{port}",
                "node-id": f"node-{i}",
                "shard": f"{i}/{nodes}",
                "give-up-after": 30,
                "threads": 1,  # N nodes share this machine's cores: one torch thread each
            }
            procs.append(_spawn("node", flags, options, out / f"node-{i}.log"))
        _watch(procs, port, started)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return _report(procs, out, started)


def _watch(procs: list[subprocess.Popen[bytes]], port: int, started: float) -> None:
    tty = sys.stdout.isatty()
    last = [-1]
    with open_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AggregatorStub(channel)
        deadline = time.monotonic() + 900
        while procs[0].poll() is None and time.monotonic() < deadline:
            _progress(stub, started, last, tty)
            if any(p.poll() not in (None, 0) for p in procs[1:]):
                break
            time.sleep(0.25)
    if tty:
        print()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def summary(history: list[RoundRecord]) -> str:
    """Return the demo's last words: rounds, the final metrics the task has, bytes moved."""
    last = history[-1]
    parts = [f"{len(history)} rounds"]
    if not math.isnan(last.train_loss):
        parts.append(f"final train loss {last.train_loss:.4f}")
    if not math.isnan(last.test_accuracy):
        parts.append(f"held-out test accuracy {last.test_accuracy:.4f}")
    elif not math.isnan(last.test_loss):
        parts.append(f"held-out test loss {last.test_loss:.4f}")
    parts.append(f"{sum(r.bytes for r in history) / 1e6:.1f} MB moved")
    return ", ".join(parts)


def _report(procs: list[subprocess.Popen[bytes]], out: Path, started: float) -> int:
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        names = ["aggregator" if i == 0 else f"node-{i - 1}" for i in failed]
        print(
            f"demo failed: {', '.join(names)} exited non-zero; see the logs in {out}/",
            file=sys.stderr,
        )
        return 1
    history = read_history(out / "history.csv")
    plot_history(history, out / "curves.png")
    print(f"done in {time.monotonic() - started:.1f} s: {summary(history)}")
    print(f"wrote {out / 'history.csv'}, {out / 'curves.png'}, {out / 'model.safetensors'}")
    return 0
