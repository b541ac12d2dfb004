"""fedgrad scenarios: each a function of its parameters, each a fresh aggregator process.

* ``round_time``: the aggregator and N ``fedgrad node`` processes (CLI, synthetic
  task, no training compute); seconds per round from the aggregator's history
  CSV (median of the rounds after the first, which also waits for joins) and
  the aggregator's peak RSS (psutil, every 20 ms).
* ``driver_rounds``: the aggregator with protocol-level driver nodes
  (``benchmarks.fedgrad_driver``, threads in a few processes) instead of CLI
  nodes: for many nodes (RSS flat in N, 200-node scale) and for timing one
  node's pull (broadcast) and push against raw grpcio.

The aggregator listens on 127.0.0.1 port 0 and writes the bound port to
``--port-file`` (race-free, unlike picking a free port and passing it).

Every scenario takes ``cli``, the ``fedgrad`` command to run (default: this
checkout's), so an A/B run measures another build the same way
(``benchmarks/ab.py``).

Run: ``python -m benchmarks.fedgrad_bench [--params 1000000] [--nodes 4] [--rounds 4]
[--driver] [--cli runs/baseline-REV/.venv/bin/fedgrad]``
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import (
    GB,
    BenchError,
    Procs,
    RssSampler,
    module_cmd,
    percentile,
    summarize,
)

__all__ = ["driver_rounds", "fedgrad_cli", "push_broadcast", "round_time"]

NOT_AVAILABLE = "fedgrad CLI not available yet"


def fedgrad_cli() -> list[str]:
    """Return the argv prefix of the ``fedgrad`` command.

    Raises:
        BenchError: neither the console script nor ``fedgrad.launch.cli`` exists.
    """
    script = Path(sys.executable).parent / "fedgrad"
    if script.exists():
        return [str(script)]
    try:
        found = importlib.util.find_spec("fedgrad.launch.cli") is not None
    except ModuleNotFoundError:
        found = False
    if found:
        return module_cmd("fedgrad.launch.cli")
    raise BenchError(NOT_AVAILABLE)


def _task(params: int, tensors: int) -> list[str]:
    return ["--task", "synthetic", "--task-arg", f"params={params}",
            "--task-arg", f"tensors={tensors}"]  # fmt: skip


def _start_aggregator(
    procs: Procs, work: Path, params: int, tensors: int, nodes: int, rounds: int,
    extra: Sequence[str] = (), cli: Sequence[str] | None = None,
) -> tuple:  # fmt: skip
    """Start ``fedgrad aggregator``; return (process, port, history path, log name)."""
    name = f"fedgrad-aggregator-{work.name}"
    port_file, history = work / "port", work / "history.csv"
    cmd = [
        *(cli or fedgrad_cli()), "aggregator", *_task(params, tensors),
        "--listen", "127.0.0.1:0", "--port-file", str(port_file),
        "--nodes", str(nodes), "--rounds", str(rounds), "--lr", "0.1", "--insecure",
        "--history", str(history), "--finish-grace", "10", "--no-progress", *extra,
    ]  # fmt: skip
    proc = procs.spawn(name, cmd)
    deadline = time.monotonic() + 120
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"aggregator did not start:\n{procs.log_tail(name)}")
        time.sleep(0.05)
    return proc, int(port_file.read_text()), history, name


def _finish_aggregator(procs: Procs, proc, name: str, history: Path, timeout: float) -> list:
    """Wait for the aggregator to exit 0; return its history rows."""
    try:
        code = procs.wait(proc, timeout)
    except BenchError as err:
        raise BenchError(f"{err}\n{procs.log_tail(name)}") from err
    if code != 0 or not history.exists():
        raise BenchError(f"aggregator exited with {code}:\n{procs.log_tail(name)}")
    with history.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _round_stats(rows: list[dict], params: int, peak_rss: int) -> dict:
    """Summarize history rows: steady-state seconds (rounds after the first), p50/p99."""
    seconds = [float(r["seconds"]) for r in rows]
    steady = seconds[1:] or seconds
    return {
        "params": params,
        "model_bytes": params * 4,  # fp32
        "peak_rss_bytes": peak_rss,
        "all_rounds": seconds,
        "round_bytes": [int(r["bytes"]) for r in rows],
        "p50": percentile(steady, 50),
        "p99": percentile(steady, 99),
        **summarize(steady),
    }


def round_time(
    params: int, tensors: int = 20, nodes: int = 4, rounds: int = 4,
    procs: Procs | None = None, timeout: float = 900, extra: Sequence[str] = (),
    cli: Sequence[str] | None = None,
) -> dict:  # fmt: skip
    """Run the aggregator and ``nodes`` CLI node processes; time the rounds.

    Args:
        params: fp32 parameters of the synthetic model.
        tensors: how many tensors hold them.
        nodes: ``fedgrad node`` processes (shard I/N each).
        rounds: rounds to train; the first is excluded from the median.
        procs: where to start the children (a fresh ``Procs`` if None).
        timeout: seconds allowed for the whole run.
        extra: more ``fedgrad aggregator`` flags (e.g. ``--max-inflight 2``).
        cli: argv prefix of the ``fedgrad`` command that runs the aggregator and
            the nodes (another build's, for A/B runs); None: ``fedgrad_cli()``.

    Returns:
        ``summarize`` of steady-state seconds per round, ``p50``/``p99``,
        ``all_rounds``, ``peak_rss_bytes`` of the aggregator and ``model_bytes``.

    Raises:
        BenchError: the CLI is missing, a process failed, or the deadline passed.
    """
    own = procs is None
    procs = procs or Procs()
    cli = list(cli or fedgrad_cli())
    try:
        work = Path(tempfile.mkdtemp(prefix="round-", dir=procs.log_dir))
        agg, port, history, name = _start_aggregator(
            procs, work, params, tensors, nodes, rounds, extra, cli
        )
        with RssSampler(agg.pid) as rss:
            for i in range(nodes):
                procs.spawn(
                    f"fedgrad-node{i}-{work.name}",
                    [*cli, "node", *_task(params, tensors), "--aggregator",
                     f"127.0.0.1:{port}", "--node-id", f"n{i}", "--shard", f"{i}/{nodes}"],
                )  # fmt: skip
            rows = _finish_aggregator(procs, agg, name, history, timeout)
    finally:
        if own:
            procs.close()
    return {"nodes": nodes, "tensors": tensors, **_round_stats(rows, params, rss.peak_bytes)}


def driver_rounds(
    params: int, tensors: int = 20, nodes: int = 2, rounds: int = 3, driver_procs: int = 1,
    procs: Procs | None = None, timeout: float = 900, extra: Sequence[str] = (),
    cli: Sequence[str] | None = None,
) -> dict:  # fmt: skip
    """Run the aggregator with ``nodes`` driver nodes spread over ``driver_procs`` processes.

    The drivers are always this checkout's ``benchmarks.fedgrad_driver``; ``cli``
    (as in ``round_time``) chooses only the aggregator's build.

    Returns:
        What ``round_time`` returns, plus ``pull_gbps`` and ``push_gbps``
        (``summarize`` over every node and round after the first) and the
        drivers' ``errors``.

    Raises:
        BenchError: the CLI is missing, a process failed, or the deadline passed.
    """
    own = procs is None
    procs = procs or Procs()
    try:
        work = Path(tempfile.mkdtemp(prefix="driver-", dir=procs.log_dir))
        agg, port, history, name = _start_aggregator(
            procs, work, params, tensors, nodes, rounds, extra, cli
        )
        with RssSampler(agg.pid) as rss:
            drivers = _start_drivers(procs, work, port, nodes, driver_procs, timeout)
            stats = [s for d in drivers for s in json.loads(procs.read_line(d, "RESULT", timeout))]
            rows = _finish_aggregator(procs, agg, name, history, timeout=60)
    finally:
        if own:
            procs.close()
    result = {"nodes": nodes, "tensors": tensors, **_round_stats(rows, params, rss.peak_bytes)}
    return {**result, **_transfer_rates(stats)}


def _start_drivers(procs: Procs, work: Path, port: int, nodes: int, count: int,
                   timeout: float) -> list:  # fmt: skip
    """Start ``count`` driver processes sharing ``nodes`` node ids."""
    per = -(-nodes // count)  # ceil
    drivers = []
    for k, first in enumerate(range(0, nodes, per)):
        n = min(per, nodes - first)
        drivers.append(procs.spawn(
            f"fedgrad-driver{k}-{work.name}",
            module_cmd("benchmarks.fedgrad_driver", "--target", f"127.0.0.1:{port}",
                       "--nodes", n, "--first", first, "--timeout", timeout),
            pipe_stdout=True,
        ))  # fmt: skip
    return drivers


def _transfer_rates(stats: list[dict]) -> dict:
    """Per-node pull/push GB/s of every round after the first, and any driver errors."""
    pulls, pushes = [], []
    for s in stats:
        size = s["stream_bytes"]
        for rnd, pull_s, push_s in zip(s["rounds"], s["pull_seconds"], s["push_seconds"],
                                       strict=True):  # fmt: skip
            if rnd > 0 and size:  # round 0 also pays connection and first-touch costs
                pulls.append(size / pull_s / GB)
                pushes.append(size / push_s / GB)
    return {
        "pull_gbps": summarize(pulls),
        "push_gbps": summarize(pushes),
        "errors": [f"{s['node_id']}: {s['error']}" for s in stats if s["error"]],
    }


def push_broadcast(params: int, tensors: int = 20, rounds: int = 4, procs: Procs | None = None,
                   cli: Sequence[str] | None = None) -> dict:  # fmt: skip
    """Time one node's push and pull of P fp32 (GB/s); compare with raw grpcio."""
    return driver_rounds(params, tensors, nodes=1, rounds=rounds, procs=procs, cli=cli)


def main(argv: list[str] | None = None) -> None:
    """Run one round-time measurement with CLI nodes and print it as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--tensors", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--driver", action="store_true", help="driver nodes instead of CLI nodes")
    parser.add_argument("--cli", help="a fedgrad executable to run (default: this venv's)")
    args = parser.parse_args(argv)
    cli = [args.cli] if args.cli else None
    try:
        if args.driver:
            result = driver_rounds(args.params, args.tensors, args.nodes, args.rounds, cli=cli)
        else:
            result = round_time(args.params, args.tensors, args.nodes, args.rounds, cli=cli)
    except BenchError as err:
        raise SystemExit(f"fedgrad benchmark failed: {err}") from err
    print(json.dumps({k: v for k, v in result.items() if k != "values"}, default=str))


if __name__ == "__main__":
    main()
