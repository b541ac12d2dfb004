"""Stragglers, sampled non-IID rounds and 1,000 joined nodes, on the digits task.

* ``stragglers_tta``: services (``fedgrad aggregator`` + two ``fedgrad node --count``
  processes on 127.0.0.1), 8 nodes, 2 of them slowed by ``--simulate-delay D``. A
  calibration run without delay measures a normal round (median of the rounds after
  the first: one node's compute plus its round trip, as the federation sees it), and
  D is ``factor`` (5) times that. Then, at the same number of applied uploads
  (``rounds`` x 8): sync with every node, over-commitment (``--sample 6 --overcommit
  1.3333``: select all 8, close with the first 6, the fast ones) and FedBuff
  (``--mode async --buffer 4``). Seconds to 0.95 test accuracy are the history's
  ``seconds`` summed from round 0's start through the first round at or above it.
* ``sampling_noniid``: in-process ``LocalCluster``, 50 nodes, C = 0.1 of them a
  round (``sample_fraction``), McMahan et al.'s ``classes_per_node=2`` and
  ``dirichlet=0.5`` splits, FedSGD (``local_steps=0``) and FedAvg (the task's 40
  local steps): rounds to 0.95, capped; "not reached" is reported as such.
* ``scale_1000``: services, a 20-node federation (every node, every round) and then
  1,000 nodes in a few ``fedgrad node --count`` processes with ``--sample 20``: the
  join storm (first node process started to 1,000 active, from the aggregator's
  ``--metrics-port`` gauge ``fedgrad_nodes{state="active"}``), the aggregator's
  peak RSS (``VmHWM``) of both runs and p50 / p99 seconds per round.

Run: ``python -m benchmarks.stragglers --suite stragglers_tta|sampling_noniid|scale_1000
[--quick]`` prints the suite's JSON (``benchmarks.run``'s full or quick sizes).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import (
    BenchError,
    Procs,
    RssSampler,
    free_port,
    percentile,
    prometheus_value,
    ratio,
    scrape_metrics,
    vm_hwm_bytes,
)
from benchmarks.fedgrad_bench import fedgrad_cli

__all__ = [
    "TARGET",
    "accuracy_summary",
    "sampling_noniid",
    "scale_1000",
    "seconds_to_accuracy",
    "stragglers_tta",
]

#: The test accuracy every time- and rounds-to-accuracy figure here is measured to.
TARGET = 0.95
#: FedSGD's aggregator learning rate on digits: of 0.2, 0.3, 0.5, 0.7, 1 (the task's), 2
#: and 5 at C = 0.1 of 50 classes_per_node=2 nodes (seed 0), 0.5 and 0.7 reach 0.95 first
#: (in 105 and 104 rounds), 1 needs 279, 2 and 5 diverge.
FEDSGD_LR = 0.5


def seconds_to_accuracy(rows: Sequence[Mapping[str, Any]], target: float) -> dict:
    """Return when a history first reaches ``target`` test accuracy.

    Args:
        rows: history rows in round order with ``test_accuracy`` and ``seconds``
            (history.csv strings or numbers).
        target: the accuracy to reach.

    Returns:
        ``round`` (0-based) and ``seconds`` (summed from round 0's start through
        that round) of the first row at or above ``target``, ``rounds`` (how many
        rounds that took), ``steady_seconds`` (the same without round 0, which also
        pays the nodes' first computation); all None if no row reaches it.
    """
    elapsed = 0.0
    for index, row in enumerate(rows):
        elapsed += float(row["seconds"])
        if float(row["test_accuracy"]) >= target:
            first = float(rows[0]["seconds"])
            return {"round": index, "rounds": index + 1, "seconds": elapsed,
                    "steady_seconds": elapsed - first}  # fmt: skip
    return {"round": None, "rounds": None, "seconds": None, "steady_seconds": None}


def accuracy_summary(rows: Sequence[Mapping[str, Any]], target: float) -> dict:
    """Return ``seconds_to_accuracy`` plus the final and best accuracy and applied uploads."""
    accuracy = [float(r["test_accuracy"]) for r in rows]
    return {
        **seconds_to_accuracy(rows, target),
        "target": target,
        "rounds_run": len(rows),
        "final_accuracy": accuracy[-1] if accuracy else None,
        "best_accuracy": max(accuracy, default=None),
        "uploads": sum(int(r["nodes"]) for r in rows),
        "staleness_max": max((int(r.get("staleness_max") or 0) for r in rows), default=0),
        "round_seconds": [float(r["seconds"]) for r in rows],
    }


def _cpu_seconds(pid: int, last: float) -> float:
    """Return the user + system CPU seconds of ``pid`` so far, ``last`` once it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return last
    return float(times.user + times.system)


class _Service:
    """One ``fedgrad aggregator`` on 127.0.0.1 port 0 (digits), its history and its peak RSS."""

    def __init__(self, procs: Procs, name: str, flags: Sequence[object], seed: int = 0,
                 metrics: bool = False) -> None:  # fmt: skip
        self.procs, self.name, self.cli = procs, name, fedgrad_cli()
        self.work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=procs.log_dir))
        self.history, port_file = self.work / "history.csv", self.work / "port"
        self.metrics_port = free_port() if metrics else None
        self.seed = seed
        cmd = [
            *self.cli, "aggregator", "--task", "digits", "--seed", seed,
            "--listen", "127.0.0.1:0", "--port-file", port_file, "--history", self.history,
            "--finish-grace", "5", "--no-progress", *flags,
        ]  # fmt: skip
        if self.metrics_port is not None:
            cmd += ["--metrics-port", self.metrics_port]
        self.proc = procs.spawn(name, [str(c) for c in cmd])
        self.node_procs: dict[str, subprocess.Popen[bytes]] = {}
        self.hwm = 0
        self.cpu: dict[str, float] = {}  # CPU seconds (user + system) last seen per process
        deadline = time.monotonic() + 120
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{name} did not start:\n{procs.log_tail(name)}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())

    def nodes(self, tag: str, count: int, first: int, shards: int, *flags: object) -> None:
        """Start ``count`` nodes n-FIRST.. in one ``fedgrad node --count`` process."""
        name = f"{self.name}-{tag}"
        self.node_procs[name] = self.procs.spawn(name, [str(c) for c in [
            *self.cli, "node", "--task", "digits", "--seed", self.seed,
            "--aggregator", f"127.0.0.1:{self.port}", "--node-id", "n", "--count", count,
            "--first", first, "--shard", f"ordinal/{shards}", *flags,
        ]])  # fmt: skip

    def poll(self) -> None:
        """Note the aggregator's peak RSS so far (``VmHWM`` is gone once it exits).

        Raises:
            BenchError: a node process failed (its log's tail says why).
        """
        self.hwm = max(self.hwm, vm_hwm_bytes(self.proc.pid) or 0)
        self.cpu["aggregator"] = _cpu_seconds(self.proc.pid, self.cpu.get("aggregator", 0.0))
        for name, proc in self.node_procs.items():
            self.cpu[name] = _cpu_seconds(proc.pid, self.cpu.get(name, 0.0))
            if proc.poll() and self.proc.poll() is None:
                raise BenchError(f"{name} exited with {proc.returncode}:\n"
                                 f"{self.procs.log_tail(name)}")  # fmt: skip

    def finish(self, timeout: float) -> list[dict]:
        """Wait for the aggregator to exit 0; return its history rows."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} still running after {timeout:.0f}s:\n"
                                 f"{self.procs.log_tail(self.name)}")  # fmt: skip
            self.poll()
            time.sleep(0.1)
        if self.proc.returncode != 0 or not self.history.exists():
            raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n"
                             f"{self.procs.log_tail(self.name)}")  # fmt: skip
        with self.history.open(newline="") as fh:
            return list(csv.DictReader(fh))


def _straggler_run(procs: Procs, name: str, nodes: int, slow: int, delay: float,
                   flags: Sequence[object], timeout: float) -> list[dict]:  # fmt: skip
    """Run ``nodes`` digits nodes, the last ``slow`` delayed by ``delay`` s; return the history."""
    service = _Service(procs, name, ["--nodes", nodes, *flags])
    service.nodes("fast", nodes - slow, 0, nodes)
    delayed = ("--simulate-delay", f"{delay:g}") if delay > 0 else ()
    service.nodes("slow", slow, nodes - slow, nodes, *delayed)
    return service.finish(timeout)


def stragglers_tta(
    rounds: int = 24, nodes: int = 8, slow: int = 2, factor: float = 5.0, buffer: int = 4,
    calibrate_rounds: int = 6, procs: Procs | None = None, target: float = TARGET,
    timeout: float = 300,
) -> dict:  # fmt: skip
    """Time to ``target`` accuracy of sync, over-committed and async rounds with stragglers.

    Args:
        rounds: sync rounds; the other configurations get the same applied uploads
            (``rounds * nodes``): ceil(that / fast nodes) over-committed rounds,
            ceil(that / ``buffer``) async versions.
        nodes: nodes in all; ``slow`` of them wait ``factor`` x a normal round.
        buffer: async uploads per version (FedBuff's K).
        calibrate_rounds: rounds of the calibration run without delay.

    Returns:
        ``delay_s``, ``normal_round_s``, per configuration (``sync``, ``overcommit``,
        ``async``) ``accuracy_summary`` and its flags, and the ratios of the
        seconds to ``target``.
    """
    own = procs is None
    procs = procs or Procs()
    fast = nodes - slow
    uploads = rounds * nodes
    # Floor to 4 decimals so ceil(fast x F) is exactly ``nodes``: every node is selected.
    overcommit = math.floor(nodes / fast * 1e4) / 1e4
    configs: dict[str, list[object]] = {
        "sync": ["--rounds", rounds],
        "overcommit": ["--rounds", -(-uploads // fast), "--sample", fast,
                       "--overcommit", overcommit],
        "async": ["--rounds", -(-uploads // buffer), "--mode", "async", "--buffer", buffer],
    }  # fmt: skip
    try:
        calib = _straggler_run(procs, "calibrate", nodes, slow, 0.0,
                               ["--rounds", calibrate_rounds], timeout)  # fmt: skip
        normal = statistics.median(float(r["seconds"]) for r in calib[1:] or calib)
        delay = round(factor * normal, 3)
        result: dict[str, Any] = {
            "nodes": nodes, "slow": slow, "factor": factor, "normal_round_s": normal,
            "delay_s": delay, "uploads": uploads, "target": target,
            "calibration": accuracy_summary(calib, target),
        }  # fmt: skip
        for config, flags in configs.items():
            rows = _straggler_run(procs, config, nodes, slow, delay, flags, timeout)
            result[config] = {"flags": [str(f) for f in flags], **accuracy_summary(rows, target)}
    finally:
        if own:
            procs.close()
    tta = {c: result[c]["seconds"] for c in configs}
    final = {c: result[c]["final_accuracy"] for c in configs}
    return {
        **result,
        "sync_over_async": ratio(tta["sync"], tta["async"]),
        "sync_over_overcommit": ratio(tta["sync"], tta["overcommit"]),
        "steady_sync_over_async": ratio(
            result["sync"]["steady_seconds"], result["async"]["steady_seconds"]
        ),
        "async_minus_sync_accuracy": final["async"] - final["sync"],
    }


def _cluster_history(nodes: int, fraction: float, rounds: int, lr: float, seed: int,
                     task_args: dict[str, str]) -> list[dict]:  # fmt: skip
    from fedgrad.launch.local import LocalCluster

    with LocalCluster("digits", nodes=nodes, task_args=task_args, seed=seed,
                      timeout=600, sample_fraction=fraction, lr=lr) as cluster:  # fmt: skip
        return [asdict(r) for r in cluster.run(rounds).history]


def sampling_noniid(
    nodes: int = 50, fraction: float = 0.1, caps: Mapping[str, int] | None = None,
    splits: Sequence[str] = ("classes_per_node=2", "dirichlet=0.5"), seed: int = 0,
    target: float = TARGET,
) -> dict:  # fmt: skip
    """Rounds to ``target`` of FedSGD and FedAvg at C = ``fraction`` of ``nodes`` non-IID nodes.

    Args:
        caps: rounds run per algorithm (``fedsgd``, ``fedavg``); not reaching
            ``target`` within them is reported as ``reached: false``.
        splits: digits task options, one non-IID split each (``KEY=VALUE``).

    Returns:
        Per ``<algorithm>/<split>``: ``accuracy_summary`` (``rounds`` to target or
        None), ``lr``, ``reached`` and a ``note``; ``sampled`` nodes per round.
    """
    caps = {"fedsgd": 300, "fedavg": 100, **(caps or {})}
    algorithms = {"fedsgd": ({"local_steps": "0"}, FEDSGD_LR), "fedavg": ({}, 1.0)}
    result: dict[str, Any] = {"nodes": nodes, "fraction": fraction, "seed": seed,
                              "sampled": math.ceil(fraction * nodes - 1e-9)}  # fmt: skip
    for split in splits:
        key, _, value = split.partition("=")
        for algorithm, (extra, lr) in algorithms.items():
            started = time.monotonic()
            rows = _cluster_history(nodes, fraction, caps[algorithm], lr, seed,
                                    {key: value, **extra})  # fmt: skip
            summary = accuracy_summary(rows, target)
            reached = summary["rounds"] is not None
            note = (f"{summary['rounds']} rounds" if reached
                    else f"not reached in {caps[algorithm]} rounds")  # fmt: skip
            del summary["round_seconds"], summary["seconds"], summary["steady_seconds"]
            result[f"{algorithm}/{split}"] = {
                **summary,
                "lr": lr,
                "reached": reached,
                "note": note,
                "wall_s": time.monotonic() - started,
            }
    return result


def _round_stats(rows: list[dict], peak: int) -> dict:
    """p50 / p99 seconds of the rounds after the first (which waits for the first pulls)."""
    seconds = [float(r["seconds"]) for r in rows]
    steady = seconds[1:] or seconds
    return {"rounds_done": len(rows), "p50_s": percentile(steady, 50),
            "p99_s": percentile(steady, 99), "peak_rss_bytes": peak,
            "selected": [int(r["selected"]) for r in rows], "round_seconds": seconds}  # fmt: skip


def _federation(procs: Procs, name: str, nodes: int, shards: int, node_procs: int, rounds: int,
                flags: Sequence[object], timeout: float) -> dict:  # fmt: skip
    """Run nodes n-0.. with shards i/``shards`` in ``node_procs`` processes; time joins, rounds."""
    service = _Service(procs, name, ["--nodes", nodes, "--rounds", rounds, *flags], metrics=True)
    assert service.metrics_port is not None
    with RssSampler(service.proc.pid) as rss:
        started = time.monotonic()
        per = -(-nodes // node_procs)
        for k, first in enumerate(range(0, nodes, per)):
            service.nodes(f"nodes{k}", min(per, nodes - first), first, shards, "--threads", "1")
        first_join, joined, active = None, None, 0.0
        deadline = started + timeout
        while joined is None and service.proc.poll() is None and time.monotonic() < deadline:
            text = scrape_metrics(service.metrics_port)
            active = (prometheus_value(text, "fedgrad_nodes", state="active") or 0) if text else 0
            if active and first_join is None:
                first_join = time.monotonic() - started
            if active >= nodes:
                joined = time.monotonic() - started
            service.poll()
            time.sleep(0.1)
        at_join = dict(service.cpu)
        if joined is None:
            raise BenchError(f"{name}: {active:.0f} of {nodes} nodes joined, then stopped or "
                             f"timed out:\n{procs.log_tail(name)}")  # fmt: skip
        rows = service.finish(max(1.0, deadline - time.monotonic()))
    return {
        "nodes": nodes,
        "join_s": joined,
        "first_join_s": first_join,
        "sampler_peak_rss_bytes": rss.peak_bytes,
        # CPU seconds (last seen, every 0.1 s) from all joined to the end: the rounds.
        "aggregator_cpu_s": service.cpu["aggregator"] - at_join["aggregator"],
        "nodes_cpu_s": sum(v - at_join.get(k, 0.0) for k, v in service.cpu.items())
        - (service.cpu["aggregator"] - at_join["aggregator"]),
        **_round_stats(rows, service.hwm),
    }


def scale_1000(
    nodes: int = 1000, sample: int = 20, rounds: int = 20, node_procs: int = 4,
    procs: Procs | None = None, timeout: float = 300,
) -> dict:  # fmt: skip
    """Compare ``nodes`` joined nodes sampling ``sample`` a round with a ``sample``-node federation.

    Both runs give node n-i shard i/``nodes`` (1-2 digits images each at 1,000) and
    spread the nodes over ``node_procs`` processes, so a selected node computes the
    same in both; the small federation waits for all its nodes every round (no
    ``--sample``).

    Returns:
        ``few`` (``sample`` nodes, no sampling) and ``many`` (``nodes`` nodes,
        ``--sample``): join seconds (first node process started to all active),
        aggregator peak RSS (``VmHWM``), p50 / p99 seconds per round; and
        ``rss_delta_mb`` (many - few) and ``p99_ratio`` (many / few).
    """
    own = procs is None
    procs = procs or Procs()
    try:
        # The same shards (i/nodes) and node processes in both runs: a round computes the
        # same, so the difference is what the other joined nodes cost.
        few = _federation(procs, "few", sample, nodes, node_procs, rounds, [], timeout)
        many = _federation(procs, "many", nodes, nodes, node_procs, rounds, ["--sample", sample],
                           timeout)  # fmt: skip
    finally:
        if own:
            procs.close()
    return {
        "sample": sample,
        "rounds": rounds,
        "node_procs": node_procs,
        "few": few,
        "many": many,
        "rss_delta_mb": (many["peak_rss_bytes"] - few["peak_rss_bytes"]) / 1e6,
        "p99_ratio": ratio(many["p99_s"], few["p99_s"]),
    }


def main(argv: list[str] | None = None) -> None:
    """Run one suite at benchmarks.run's full (or --quick) sizes and print its JSON."""
    from benchmarks.run import FULL, QUICK, SUITES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", required=True,
                        choices=["stragglers_tta", "sampling_noniid", "scale_1000"])  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="benchmarks.run's quick sizes")
    args = parser.parse_args(argv)
    with Procs() as procs:
        try:
            result = SUITES[args.suite](QUICK if args.quick else FULL, procs)
        except BenchError as err:
            raise SystemExit(f"{args.suite} failed: {err}") from err
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
