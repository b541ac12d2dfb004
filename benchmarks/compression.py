"""Compressed updates (issue 14): bytes and round time per codec, and rounds to accuracy.

* ``compress_wire``: services, as ``fedgrad_round`` (``fedgrad aggregator`` + N ``fedgrad
  node`` processes, the ``synthetic`` task, no training compute), one run per codec: none,
  bfloat16, int8, topk:0.01, powersgd:4, and int8 with ``--broadcast-dtype bfloat16``. The
  model is ``shape=matrix`` (each tensor m x n), so PowerSGD has matrices to factor; the
  same model for every codec. Per codec, from the rounds after the first: the history's
  ``bytes`` (uploads + broadcasts) and ``seconds`` (medians); upload bytes from the
  aggregator's ``--metrics-port`` counters (``fedgrad_bytes_received`` /
  ``fedgrad_uploads_accepted``, payload bytes per upload, times the uploads a round); the
  aggregator's own round phases (its "round N closed" log line: collect, reduce, step,
  checkpoint, broadcast); and, in this process on the same tensors, one node's encode
  (``ErrorFeedback.encode``, what ``fedgrad node`` runs: the codec plus its error feedback)
  and one upload's decode and add into a float64 sum. Ratios divide by none's figures of
  the same repetition.
* ``compress_tta``: in-process ``LocalCluster("digits", nodes=4)``, IID shards, seed 0,
  FedSGD (``local_steps=0``, lr ``stragglers.FEDSGD_LR``) and FedAvg (the task's 40 local
  steps, lr 1): rounds and seconds to the target accuracy (0.95) per codec: none, int8,
  topk:0.01 with and without error feedback, powersgd:4; capped, "not reached" if not.

A codec this build does not know is reported as unavailable (its reason), not run.

Run: ``python -m benchmarks.compression --suite compress_wire|compress_tta [--quick]``
prints the suite's JSON and its table (``benchmarks.run``'s full or quick sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from benchmarks import fedgrad_bench
from benchmarks.common import (
    BenchError,
    Procs,
    RssSampler,
    free_port,
    prometheus_value,
    ratio,
    scrape_metrics,
)
from benchmarks.stragglers import FEDSGD_LR, TARGET, accuracy_summary

__all__ = [
    "METRICS",
    "THRESHOLDS",
    "TTA_CONFIGS",
    "WIRE_CONFIGS",
    "compress_tta",
    "compress_wire",
    "unavailable",
]


@dataclass(frozen=True)
class WireConfig:
    """One ``compress_wire`` run: a label, the nodes' ``--compress``, aggregator flags."""

    label: str
    key: str  # metric prefix
    codec: str
    aggregator_flags: tuple[str, ...] = ()


WIRE_CONFIGS = (
    WireConfig("none", "none", "none"),
    WireConfig("bfloat16", "bf16", "bfloat16"),
    WireConfig("int8", "int8", "int8"),
    WireConfig("topk:0.01", "topk", "topk:0.01"),
    WireConfig("powersgd:4", "powersgd", "powersgd:4"),
    WireConfig("int8 + broadcast bfloat16", "int8_bcast_bf16", "int8",
               ("--broadcast-dtype", "bfloat16")),
)  # fmt: skip


@dataclass(frozen=True)
class TtaConfig:
    """One ``compress_tta`` codec: a label, the nodes' codec and ``error_feedback``."""

    label: str
    key: str
    codec: str
    error_feedback: str = "auto"  # NodeConfig.error_feedback: auto, on, off


TTA_CONFIGS = (
    TtaConfig("none", "none", "none"),
    TtaConfig("int8", "int8", "int8"),
    TtaConfig("topk:0.01, error feedback", "topk_ef", "topk:0.01", "on"),
    TtaConfig("topk:0.01, no error feedback", "topk_noef", "topk:0.01", "off"),
    TtaConfig("powersgd:4", "powersgd", "powersgd:4", "on"),
)
#: algorithm -> (digits task options, aggregator lr), as in ``stragglers.sampling_noniid``.
ALGORITHMS = {"fedsgd": ({"local_steps": "0"}, FEDSGD_LR), "fedavg": ({}, 1.0)}

#: (label, what the ratio divides, the ratio's key, op, target) of issue 14's wire targets.
WIRE_TARGETS = (
    ("int8", "upload bytes / none's", "upload_x", "<=", 0.3),
    ("int8 + broadcast bfloat16", "total bytes / none's", "total_x", "<=", 0.4),
    ("int8 + broadcast bfloat16", "round time / none's", "time_x", "<=", 0.6),
    ("topk:0.01", "upload bytes / none's", "upload_x", "<=", 0.03),
)
#: (config key, target) of issue 14's rounds-to-accuracy targets: rounds / none's rounds.
TTA_TARGETS = {"int8": 1.2, "topk_ef": 2.0, "topk_noef": None, "powersgd": 2.0}


def _node_codec(codec: str) -> str:
    """The ``NodeConfig.compress`` value of a ``--compress`` word (none is identity)."""
    return "identity" if codec == "none" else codec


def unavailable(codec: str, aggregator_flags: Sequence[str] = ()) -> str | None:
    """Why this build cannot run ``codec`` (and the aggregator flags), or None if it can.

    Asks the configs, which check a codec the same way as the CLI does.
    """
    from fedgrad.config import AggregatorConfig, NodeConfig
    from fedgrad.errors import ConfigError

    if "compress" not in {f.name for f in fields(NodeConfig)}:
        return "this build has no NodeConfig.compress (fedgrad node --compress CODEC)"
    try:
        NodeConfig(task="synthetic", compress=_node_codec(codec))
    except ConfigError as err:
        return f"codec {codec!r} unavailable: {err}"
    if "--broadcast-dtype" in aggregator_flags:
        if "broadcast_dtype" not in {f.name for f in fields(AggregatorConfig)}:
            return "this build has no --broadcast-dtype (AggregatorConfig.broadcast_dtype)"
    return None


# -- compress_wire ---------------------------------------------------------------------------
_ROUND_LINE = re.compile(r"round (\d+) closed \(.*, [\d.]+ s, [\d.]+ MB \(([^)]*)\)")
_PHASE = re.compile(r"([a-z_]+) ([\d.]+)s")


def _phases(log: Path) -> dict[int, dict[str, float]]:
    """Round -> the aggregator's phase seconds, from its "round N closed" log lines."""
    out: dict[int, dict[str, float]] = {}
    if not log.exists():
        return out
    for line in log.read_text(errors="replace").splitlines():
        if match := _ROUND_LINE.search(line):
            out[int(match.group(1))] = {k: float(v) for k, v in _PHASE.findall(match.group(2))}
    return out


def _shape_matrix() -> bool:
    """Whether this build's synthetic task takes ``shape=matrix``."""
    from fedgrad.errors import ConfigError
    from fedgrad.tasks.synthetic import SyntheticTask

    try:
        SyntheticTask(params="4", tensors="1", shape="matrix")
    except ConfigError:
        return False
    return True


def _task_flags(params: int, tensors: int, matrix: bool) -> list[str]:
    return [*fedgrad_bench._task(params, tensors), *(["--task-arg", "shape=matrix"] * matrix)]


def _spawn_nodes(
    procs: Procs, cli: Sequence[str], tag: str, codec: str, params: int, tensors: int,
    nodes: int, port: int, matrix: bool,
) -> dict[str, subprocess.Popen[bytes]]:  # fmt: skip
    """Start nodes n0.. (shard i/``nodes``) with ``--compress codec``; return them by log name."""
    started = {}
    for i in range(nodes):
        name = f"compress-node{i}-{tag}"
        started[name] = procs.spawn(name, [
            *cli, "node", *_task_flags(params, tensors, matrix), "--aggregator",
            f"127.0.0.1:{port}", "--node-id", f"n{i}", "--shard", f"{i}/{nodes}",
            "--compress", codec,
        ])  # fmt: skip
    return started


def _watch(
    procs: Procs, agg: subprocess.Popen[bytes], name: str,
    node_procs: Mapping[str, subprocess.Popen[bytes]], metrics_port: int, deadline: float,
) -> dict[str, float]:  # fmt: skip
    """Wait for the aggregator to exit, scraping its counters; return the last scrape's.

    Raises:
        BenchError: a node process failed, or the deadline passed.
    """
    counters: dict[str, float] = {}
    while agg.poll() is None:
        text = scrape_metrics(metrics_port, timeout=1.0)
        if text:
            seen = {key: prometheus_value(text, f"fedgrad_{key}_total")
                    for key in ("bytes_received", "uploads_accepted", "bytes_sent")}  # fmt: skip
            if seen["uploads_accepted"]:
                counters = {k: v for k, v in seen.items() if v is not None}
        for node_name, proc in node_procs.items():
            if proc.poll() and agg.poll() is None:
                raise BenchError(f"{node_name} exited with {proc.returncode}:\n"
                                 f"{procs.log_tail(node_name)}")  # fmt: skip
        if time.monotonic() > deadline:
            raise BenchError(f"{name} still running after the deadline:\n{procs.log_tail(name)}")
        time.sleep(0.25)
    return counters


def _end(children: Sequence[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """Let one run's processes exit (nodes leave after the last broadcast), then end the rest.

    Each child has its own session (``Procs.spawn``), so its process group is its pid.
    """
    deadline = time.monotonic() + grace
    for proc in children:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _wire_run(
    procs: Procs, config: WireConfig, params: int, tensors: int, nodes: int, rounds: int,
    matrix: bool, timeout: float,
) -> dict:  # fmt: skip
    """Run the aggregator and ``nodes`` node processes with ``config``; measure the rounds."""
    began = time.monotonic()
    cli = fedgrad_bench.fedgrad_cli()
    work = Path(tempfile.mkdtemp(prefix=f"compress-{config.key}-", dir=procs.log_dir))
    metrics_port = free_port()
    shape = ["--task-arg", "shape=matrix"] if matrix else []
    agg, port, history, name = fedgrad_bench._start_aggregator(
        procs, work, params, tensors, nodes, rounds,
        [*shape, "--metrics-port", str(metrics_port), *config.aggregator_flags], cli,
    )  # fmt: skip
    counters: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    node_procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        with RssSampler(agg.pid) as rss:
            node_procs.update(_spawn_nodes(procs, cli, work.name, config.codec, params, tensors,
                                           nodes, port, matrix))  # fmt: skip
            counters = _watch(procs, agg, name, node_procs, metrics_port, deadline)
            rows = fedgrad_bench._finish_aggregator(procs, agg, name, history, timeout=10)
    finally:
        _end([agg, *node_procs.values()])
    steady = rows[1:] or rows
    seconds = [float(r["seconds"]) for r in rows]
    totals = [int(r["bytes"]) for r in rows]
    per_upload = ratio(counters.get("bytes_received"), counters.get("uploads_accepted"))
    source = "metrics"
    if per_upload is None:
        # No scrape caught an upload (a tiny model's run can end within one 0.25 s poll):
        # the codec's payload size, which the header declares and the aggregator counts.
        per_upload, source = _payload_bytes(config.codec, params, tensors, matrix), "codec"
    uploads = statistics.median(int(r["nodes"]) for r in steady)
    total = statistics.median(int(r["bytes"]) for r in steady)
    upload = per_upload * uploads if per_upload is not None else None
    phases = _phases(procs.log_dir / f"{name}.log")
    steady_phases = [phases[int(r["round"])] for r in steady if int(r["round"]) in phases]
    names = sorted({k for p in steady_phases for k in p})
    return {
        "codec": config.codec,
        "aggregator_flags": list(config.aggregator_flags),
        "round_s": statistics.median(float(r["seconds"]) for r in steady),
        "all_rounds": seconds,
        "round_bytes": totals,
        "total_bytes": total,
        "upload_bytes": upload,
        "upload_bytes_per_node": per_upload,
        "upload_bytes_from": source,  # metrics: the aggregator's counters; codec: layout.total
        "sent_bytes": total - upload if upload is not None else None,
        "uploads_per_round": uploads,
        # The aggregator's phases (median of the rounds after the first): collect (open to
        # close: the nodes' compute, encode and upload), reduce (decode + add of every
        # upload, summed over the reduce threads), step, checkpoint, broadcast (serializing
        # the next round's parameters, in --broadcast-dtype).
        "phases": {k: statistics.median(p.get(k, 0.0) for p in steady_phases) for k in names},
        "peak_rss_bytes": rss.peak_bytes,
        "wall_s": time.monotonic() - began,
    }


def _specs(params: int, tensors: int, matrix: bool) -> list:
    """The synthetic model's manifest (``TensorSpec`` per tensor)."""
    from fedgrad.codec import specs_of
    from fedgrad.task import trainable_parameters
    from fedgrad.tasks.synthetic import SyntheticTask

    options = {"params": str(params), "tensors": str(tensors)}
    if matrix:
        options["shape"] = "matrix"
    return specs_of(trainable_parameters(SyntheticTask(0, **options).model()))


def _payload_bytes(codec: str, params: int, tensors: int, matrix: bool) -> int:
    """Bytes of one upload's payload with ``codec`` (its layout; the header's payload_bytes)."""
    from fedgrad.codecs import codec_for

    return int(codec_for(_node_codec(codec), _specs(params, tensors, matrix)).layout.total)


def _codec_probe(codec: str, params: int, tensors: int, matrix: bool, rounds: int = 3) -> dict:
    """Time one node's encode and one upload's decode and add of ``codec``, in this process.

    Encode: the node's path, ``ErrorFeedback.encode`` (the codec plus error feedback, on
    for topk and powersgd as ``--error-feedback auto``) of synthetic shard 0's update,
    ``rounds`` rounds (the first has no residual yet; the figure is the median of the
    others). Decode: ``codec.decode`` of the last payload in 1 MiB chunks and the add of
    its values into a float64 sum (pre-touched): the reducer's work for one upload, on one
    thread (the aggregator splits a splittable codec's chunks over two).
    """
    import numpy as np
    import torch

    from fedgrad.client.feedback import ErrorFeedback
    from fedgrad.codec import DEFAULT_CHUNK_BYTES, iter_chunk_pieces
    from fedgrad.codecs import codec_for
    from fedgrad.tasks.synthetic import SyntheticTask

    options = {"params": str(params), "tensors": str(tensors)}
    if matrix:
        options["shape"] = "matrix"
    task = SyntheticTask(0, **options)
    model = task.model()
    coder = codec_for(_node_codec(codec), _specs(params, tensors, matrix))
    feedback = ErrorFeedback(coder, enabled=codec.startswith(("topk", "powersgd")))
    shard = task.shard(0, 1)
    encode_s, views = [], []
    for round_ in range(rounds):
        update = task.compute_update(model, shard, torch.Generator().manual_seed(round_))
        began = time.perf_counter()
        views = feedback.encode(round_, update.gradients, torch.Generator().manual_seed(round_))
        encode_s.append(time.perf_counter() - began)
    # The upload's chunks as the node cuts them (--chunk-bytes' default) and the aggregator
    # stages them: (payload position, message bytes, data start, data length).
    layout = coder.layout
    chunks = [
        (layout.starts[t] + offset, b"".join(p.data for p in pieces), 0, sum(p.nbytes for p in pieces))
        for t, offset, pieces in iter_chunk_pieces(views, layout, DEFAULT_CHUNK_BYTES)
    ]  # fmt: skip
    total = np.ones(layout.numel, np.float64)  # touched: no page faults in the timing
    began = time.perf_counter()
    for where, values in coder.decode(chunks):
        if coder.sparse:
            total[where] += values
        else:
            total[where : where + values.size] += values
    decode_s = time.perf_counter() - began
    return {
        "encode_s": statistics.median(encode_s[1:] or encode_s),
        "encode_round0_s": encode_s[0],
        "decode_s": decode_s,
        "payload_bytes": sum(c[3] for c in chunks),
    }


def compress_wire(
    params: int, tensors: int = 20, nodes: int = 4, rounds: int = 6,
    procs: Procs | None = None, configs: Sequence[WireConfig] = WIRE_CONFIGS,
    probe: bool = True, timeout: float = 600,
) -> dict:  # fmt: skip
    """Bytes and round time of each codec in ``configs``, against none's.

    Args:
        params, tensors: the synthetic model (float32, ``shape=matrix`` if the build has it).
        nodes: ``fedgrad node`` processes (shard I/N each).
        rounds: rounds per run; the first is not counted.
        probe: also time one node's encode and one decode in this process.

    Returns:
        Per config label: ``_wire_run``'s figures (or ``error`` / ``unavailable``), the
        probe's ``encode_s`` / ``decode_s``, and ``upload_x``, ``total_x``, ``time_x``
        (ratios to none's); ``targets`` (issue 14's, judged) and ``table`` (markdown).
    """
    own = procs is None
    procs = procs or Procs()
    matrix = _shape_matrix()
    result: dict[str, Any] = {"params": params, "tensors": tensors, "nodes": nodes,
                              "rounds": rounds, "matrix": matrix, "configs": {}}  # fmt: skip
    probes: dict[str, dict] = {}
    try:
        for config in configs:
            why = unavailable(config.codec, config.aggregator_flags)
            if why is not None:
                result["configs"][config.label] = {"codec": config.codec, "unavailable": why}
                continue
            try:
                run = _wire_run(procs, config, params, tensors, nodes, rounds, matrix, timeout)
            except BenchError as err:
                run = {"codec": config.codec, "error": str(err)}
            if probe and "error" not in run:
                if config.codec not in probes:
                    began = time.monotonic()
                    try:
                        probes[config.codec] = _codec_probe(config.codec, params, tensors, matrix)
                    except Exception as err:  # a probe must not cost the run its figures
                        probes[config.codec] = {"probe_error": f"{type(err).__name__}: {err}"}
                    probes[config.codec]["probe_wall_s"] = time.monotonic() - began
                run.update(probes[config.codec])
            result["configs"][config.label] = run
    finally:
        if own:
            procs.close()
    base = result["configs"].get("none", {})
    for config in configs:
        run = result["configs"][config.label]
        run["key"] = config.key
        run["upload_x"] = ratio(run.get("upload_bytes"), base.get("upload_bytes"))
        run["total_x"] = ratio(run.get("total_bytes"), base.get("total_bytes"))
        run["time_x"] = ratio(run.get("round_s"), base.get("round_s"))
    result["targets"] = [
        _verdict(f"{label}: {what}", result["configs"].get(label, {}).get(key), op, target)
        for label, what, key, op, target in WIRE_TARGETS
    ]
    result["table"] = wire_table(result)
    return result


def _verdict(what: str, value: float | None, op: str, target: float) -> dict:
    met = None if value is None else (value <= target if op == "<=" else value >= target)
    return {"what": what, "value": value, "op": op, "target": target, "met": met}


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}"


def _x(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def wire_table(result: dict) -> str:
    """Return ``compress_wire``'s markdown table: bytes, time, phases, ratios."""
    lines = [
        "| codec | upload MB/round | total MB/round | upload / none | total / none | s/round"
        " | time / none | node encode s | decode s | aggregator collect / reduce / step /"
        " broadcast s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in result["configs"].items():
        if "unavailable" in r or "error" in r:
            why = r.get("unavailable") or r["error"].splitlines()[0]
            lines.append(f"| {label} | {why} |" + " |" * 9)
            continue
        p = r.get("phases", {})
        phases = " / ".join(_s(p.get(k)) for k in ("collect", "reduce", "step", "broadcast"))
        lines.append(
            f"| {label} | {_mb(r['upload_bytes'])} | {_mb(r['total_bytes'])}"
            f" | {_x(r['upload_x'])} | {_x(r['total_x'])} | {_s(r['round_s'])}"
            f" | {_x(r['time_x'])} | {_s(r.get('encode_s'))} | {_s(r.get('decode_s'))}"
            f" | {phases} | {r['peak_rss_bytes'] / 1e6:.0f} |"
        )
    lines += ["", "| target | measured | target | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['what']} | {_x(t['value'])} | {t['op']} {t['target']:g} | {met} |")
    return "\n".join(lines)


# -- compress_tta ----------------------------------------------------------------------------
def _cluster_run(config: TtaConfig, algorithm: str, nodes: int, rounds: int, seed: int,
                 target: float) -> dict:  # fmt: skip
    from fedgrad.launch.local import LocalCluster

    task_args, lr = ALGORITHMS[algorithm]
    node_options = {"compress": _node_codec(config.codec), "error_feedback": config.error_feedback}
    began = time.monotonic()
    with LocalCluster("digits", nodes=nodes, task_args=task_args, seed=seed, timeout=600,
                      node_options=node_options, lr=lr) as cluster:  # fmt: skip
        rows = [asdict(r) for r in cluster.run(rounds).history]
    summary = accuracy_summary(rows, target)
    steady = rows[1:] or rows
    summary["bytes_per_round"] = statistics.median(int(r["bytes"]) for r in steady)
    summary["reached"] = summary["rounds"] is not None
    summary["note"] = (f"{summary['rounds']} rounds" if summary["reached"]
                       else f"not reached in {rounds} rounds")  # fmt: skip
    summary["wall_s"] = time.monotonic() - began
    del summary["round_seconds"]
    return summary


def compress_tta(
    caps: Mapping[str, int] | None = None, algorithms: Sequence[str] = ("fedsgd", "fedavg"),
    nodes: int = 4, configs: Sequence[TtaConfig] = TTA_CONFIGS, seed: int = 0,
    target: float = TARGET,
) -> dict:  # fmt: skip
    """Rounds and seconds to ``target`` accuracy on digits per codec and algorithm.

    Args:
        caps: rounds run per algorithm (``fedsgd``, ``fedavg``); LocalCluster runs them all,
            and not reaching ``target`` within them is reported as ``reached: false``.
        algorithms: which of FedSGD (``local_steps=0``) and FedAvg to run.

    Returns:
        Per ``<algorithm>/<config label>``: ``accuracy_summary`` (``rounds``, ``seconds``
        from round 0's start, ``steady_seconds``), ``bytes_per_round``, ``rounds_x`` (rounds
        / none's, None if either did not reach it), or ``unavailable``; ``worst`` (per
        config key, the largest ``rounds_x`` over the algorithms), ``targets``, ``table``.
    """
    caps = {"fedsgd": 300, "fedavg": 30, **(caps or {})}
    result: dict[str, Any] = {"nodes": nodes, "seed": seed, "target": target,
                              "algorithms": list(algorithms), "caps": dict(caps), "runs": {}}  # fmt: skip
    for algorithm in algorithms:
        for config in configs:
            why = unavailable(config.codec)
            key = f"{algorithm}/{config.label}"
            if why is not None:
                result["runs"][key] = {"codec": config.codec, "unavailable": why}
                continue
            try:
                run = _cluster_run(config, algorithm, nodes, caps[algorithm], seed, target)
            except (RuntimeError, TimeoutError) as err:
                run = {"error": f"{type(err).__name__}: {err}"}
            result["runs"][key] = {"codec": config.codec, "key": config.key,
                                   "error_feedback": config.error_feedback, **run}  # fmt: skip
        base = result["runs"].get(f"{algorithm}/none", {})
        base_bytes = base.get("bytes_per_round")
        for config in configs:
            run = result["runs"][f"{algorithm}/{config.label}"]
            run["rounds_x"] = ratio(run.get("rounds"), base.get("rounds"))
            run["seconds_x"] = ratio(run.get("seconds"), base.get("seconds"))
            run["bytes_x"] = ratio(run.get("bytes_per_round"), base_bytes)
    result["worst"] = {}
    result["targets"] = []
    for config in configs:
        runs = [result["runs"][f"{a}/{config.label}"] for a in algorithms]
        values = [r.get("rounds_x") for r in runs]
        result["worst"][config.key] = None if None in values else max(values, default=None)
        goal = TTA_TARGETS.get(config.key)
        for algorithm, run in zip(algorithms, runs, strict=True):
            if goal is None:
                continue
            verdict = _verdict(f"{algorithm}: {config.label} rounds / none's", run.get("rounds_x"),
                               "<=", goal)  # fmt: skip
            if run.get("reached") is False:
                verdict["met"] = False  # not reached within the cap: a miss, not "n/a"
            result["targets"].append(verdict)
    result["table"] = tta_table(result)
    return result


def tta_table(result: dict) -> str:
    """Return ``compress_tta``'s markdown table: rounds and seconds to target per codec."""
    lines = [
        f"| algorithm | codec | rounds to {result['target']:g} | rounds / none | s to"
        f" {result['target']:g} | s / none | final accuracy | bytes/round | bytes / none |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in result["runs"].items():
        algorithm, _, label = key.partition("/")
        if "unavailable" in r or "error" in r:
            why = r.get("unavailable") or r["error"].splitlines()[0]
            lines.append(f"| {algorithm} | {label} | {why} |" + " |" * 6)
            continue
        rounds = r["rounds"] if r["reached"] else r["note"]
        lines.append(
            f"| {algorithm} | {label} | {rounds} | {_x(r['rounds_x'])}"
            f" | {_x(r['seconds'])} | {_x(r['seconds_x'])} | {r['final_accuracy']:.3f}"
            f" | {r['bytes_per_round']:,.0f} | {_x(r['bytes_x'])} |"
        )
    lines += ["", "| target | measured | target | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        value = "not reached" if t["value"] is None and t["met"] is False else _x(t["value"])
        lines.append(f"| {t['what']} | {value} | {t['op']} {t['target']:g} | {met} |")
    return "\n".join(lines)


# -- benchmarks.run's table: metrics and targets (registered in benchmarks/run.py) -----------
Getter = Callable[[dict], float | None]


def _wire(label: str, key: str) -> Getter:
    return lambda r: r["configs"][label][key]


def _worst(key: str) -> Getter:
    return lambda r: r["worst"][key]


def _wire_metrics() -> list[tuple[str, str, Getter]]:
    out: list[tuple[str, str, Getter]] = [
        ("none_round_s", "s/round", _wire("none", "round_s")),
        ("none_upload_mb", "MB/round", lambda r: r["configs"]["none"]["upload_bytes"] / 1e6),
        ("none_total_mb", "MB/round", lambda r: r["configs"]["none"]["total_bytes"] / 1e6),
    ]
    for c in WIRE_CONFIGS[1:]:
        out += [
            (f"{c.key}_upload_x", "x none's upload bytes", _wire(c.label, "upload_x")),
            (f"{c.key}_total_x", "x none's total bytes", _wire(c.label, "total_x")),
            (f"{c.key}_time_x", "x none's round time", _wire(c.label, "time_x")),
        ]
    return out


#: suite -> [(metric, unit, getter)], as ``report.METRICS``.
METRICS: dict[str, list[tuple[str, str, Getter]]] = {
    "compress_wire": _wire_metrics(),
    "compress_tta": [
        (f"{c.key}_rounds_x", "x none's rounds to target (worst algorithm)", _worst(c.key))
        for c in TTA_CONFIGS[1:]
    ],
}
_KEYS = {c.label: c.key for c in WIRE_CONFIGS}
#: (name, what, (suite, metric), op, target), as ``report.THRESHOLDS``.
THRESHOLDS = [
    *(
        (f"compress_{_KEYS[label]}_{key}", f"{label}: {what}", ("compress_wire",
         f"{_KEYS[label]}_{key}"), op, target)
        for label, what, key, op, target in WIRE_TARGETS
    ),
    *(
        (f"compress_tta_{key}", f"rounds to target: {key} / none (worst of the algorithms run)",
         ("compress_tta", f"{key}_rounds_x"), "<=", goal)
        for key, goal in TTA_TARGETS.items()
        if goal is not None
    ),
]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Run one suite at benchmarks.run's full (or --quick) sizes; print its JSON and table."""
    from benchmarks.run import FULL, QUICK, SUITES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", required=True, choices=["compress_wire", "compress_tta"])
    parser.add_argument("--quick", action="store_true", help="benchmarks.run's quick sizes")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    with Procs() as procs:
        try:
            result = SUITES[args.suite](QUICK if args.quick else FULL, procs)
        except BenchError as err:
            raise SystemExit(f"{args.suite} failed: {err}") from err
    text = json.dumps(result, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    print("\n" + result["table"])


if __name__ == "__main__":
    main()
