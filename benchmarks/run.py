"""Run every suite side by side in one run, interleaved, and report medians and ratios.

Each repetition runs every suite once, in the same order (A B C .. A B C ..),
so slow drifts of this noisy 2-core machine hit all suites alike; only ratios
from one run are compared. Every suite starts fresh processes on 127.0.0.1.

Full mode (``make bench``): P = 50M fp32 in 20 tensors, N = 4, 3 repetitions,
plus the other targets of issue 5 (RSS at N = 16 vs N = 2, 2000 x 1K tensors
vs 20 large ones, 200 concurrent nodes) and the stragglers issue's digits suites
(``benchmarks/stragglers.py``: time to accuracy with stragglers, rounds to accuracy
with sampled non-IID nodes, 1,000 joined nodes) and the compressed-updates issue's
(``benchmarks/compression.py``: bytes and round time per codec, rounds to accuracy per
codec). Quick mode (``make bench-quick``):
the same suites on small sizes, 2 repetitions, about 6 minutes.

A/B mode (``make bench-ab BASE=REV``): ``--baseline FEDGRAD`` also runs each
selected fedgrad suite with another build's ``fedgrad`` executable, as
``base:<suite>`` right after it, and reports new / base (``benchmarks/ab.py``).

Run: ``python -m benchmarks.run [--quick] --out DIR [--reps 3] [--suites a,b]
[--baseline runs/baseline-REV/.venv/bin/fedgrad]``
Writes ``DIR/results.json``, ``DIR/chart.png`` and the children's logs under
``DIR/logs``; prints the table of medians (min-max), the ratios and any A/B table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks import (
    ab,
    compression,
    fedgrad_bench,
    flower_deploy,
    flower_grpc,
    gloo,
    privacy,
    raw_grpc,
    report,
    robustness,
    shaped,
    stragglers,
)
from benchmarks.common import BenchError, MiB, Procs

__all__ = ["FEDGRAD_SUITES", "FULL", "QUICK", "SUITES", "Plan", "execute", "run"]


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run (all suites read what they need from it)."""

    reps: int
    params: int  # fp32 values of the main model (fedgrad, Flower, gloo)
    tensors: int  # tensors of the main model
    nodes: int  # nodes / clients / ranks of the main comparison
    rounds: int  # fedgrad rounds per run (the first is not counted)
    flower_rounds: int  # Flower rounds per run (the first is not counted)
    raw_bytes: int  # bytes per raw grpcio transfer
    gloo_iters: int
    rss_nodes: tuple[int, int]  # N for "peak RSS flat in N" (small, large)
    many_tensors: tuple[int, int]  # (count, params each) vs the same bytes in 20 tensors
    scale_nodes: int
    scale_params: int
    scale_rounds: int
    scale_procs: int  # driver processes sharing the scale nodes
    straggle_rounds: int  # sync rounds of stragglers_tta (the others: as many uploads)
    noniid_nodes: int  # sampling_noniid: nodes, C = 0.1 of them a round
    noniid_caps: tuple[int, int]  # rounds run by FedSGD, FedAvg (to 0.95 or the cap)
    noniid_splits: tuple[str, ...]  # digits non-IID splits (task options)
    fleet_nodes: int  # scale_1000: joined nodes (node processes with --count)
    fleet_sample: int  # ... sampled a round; also the size of the federation compared
    fleet_rounds: int
    fleet_procs: int  # node processes sharing fleet_nodes
    target_accuracy: float  # of the time- and rounds-to-accuracy suites
    robust_algorithms: tuple[str, ...]  # robustness: fedsgd and/or fedavg
    robust_rounds: int | None  # None: each algorithm's own (benchmarks/robustness.py)
    privacy_rounds: int
    privacy_configs: tuple[tuple[float, float], ...]  # (noise multiplier, clip)
    mem_params: int  # issue 15's memory targets: the 95 MiB model (25M float32) ...
    mem_nodes: tuple[int, int]  # ... with this few and this many CLI nodes


FULL = Plan(
    reps=3, params=50_000_000, tensors=20, nodes=4, rounds=4, flower_rounds=3,
    raw_bytes=256 * MiB, gloo_iters=5, rss_nodes=(2, 16), many_tensors=(2000, 1000),
    scale_nodes=200, scale_params=100_000, scale_rounds=10, scale_procs=4,
    straggle_rounds=24, noniid_nodes=50, noniid_caps=(300, 100),
    noniid_splits=("classes_per_node=2", "dirichlet=0.5"), fleet_nodes=1000, fleet_sample=20,
    fleet_rounds=20, fleet_procs=4, target_accuracy=stragglers.TARGET,
    robust_algorithms=("fedsgd", "fedavg"), robust_rounds=None, privacy_rounds=100,
    privacy_configs=privacy.CONFIGS, mem_params=25_000_000, mem_nodes=(2, 8),
)  # fmt: skip
QUICK = Plan(
    reps=2, params=2_000_000, tensors=20, nodes=2, rounds=3, flower_rounds=2,
    raw_bytes=32 * MiB, gloo_iters=3, rss_nodes=(2, 8), many_tensors=(2000, 1000),
    scale_nodes=50, scale_params=10_000, scale_rounds=4, scale_procs=2,
    straggle_rounds=12, noniid_nodes=50, noniid_caps=(150, 80),
    noniid_splits=("classes_per_node=2",), fleet_nodes=100, fleet_sample=20, fleet_rounds=10,
    fleet_procs=2, target_accuracy=stragglers.TARGET,
    robust_algorithms=("fedavg",), robust_rounds=None, privacy_rounds=40, privacy_configs=((0.0, 0.3), (1.3, 0.3)),
    mem_params=25_000_000, mem_nodes=(2, 8),
)  # fmt: skip

#: Called as ``suite(plan, procs)``; the fedgrad suites also take ``cli=`` (the
#: ``fedgrad`` argv prefix, None for this checkout's), which an A/B run sets.
Suite = Callable[..., dict]
Cli = Sequence[str] | None


def _once(suite: Suite) -> Suite:
    """Run a deterministic (seeded, timing-free) suite in the first repetition only.

    Its result is the same in every repetition (two runs gave identical tables), so the
    later repetitions report the first one's instead of spending minutes to repeat it.
    """
    cache: dict[tuple[int, ...], dict] = {}

    def suite_once(plan: Plan, procs: Procs) -> dict:
        key = (id(plan),)
        if key not in cache:
            cache[key] = suite(plan, procs)
        return cache[key]

    return suite_once


def _many(plan: Plan, procs: Procs, cli: Cli = None) -> dict:
    count, each = plan.many_tensors
    return fedgrad_bench.round_time(count * each, count, plan.nodes, plan.rounds, procs, cli=cli)


def _few(plan: Plan, procs: Procs, cli: Cli = None) -> dict:
    count, each = plan.many_tensors
    return fedgrad_bench.round_time(count * each, 20, plan.nodes, plan.rounds, procs, cli=cli)


def _rss(index: int) -> Suite:
    def suite(plan: Plan, procs: Procs, cli: Cli = None) -> dict:
        n = plan.rss_nodes[index]
        return fedgrad_bench.driver_rounds(plan.params, plan.tensors, n, 3, procs=procs, cli=cli)

    return suite


def _mem(index: int, *extra: str) -> Suite:
    def suite(plan: Plan, procs: Procs, cli: Cli = None) -> dict:
        n = plan.mem_nodes[index]
        return fedgrad_bench.round_time(plan.mem_params, 20, n, 4, procs, extra=extra, cli=cli)

    return suite


#: name -> suite, in the order each repetition runs them (fedgrad next to its peer).
SUITES: dict[str, Suite] = {
    "fedgrad_round": lambda p, pr, cli=None: fedgrad_bench.round_time(
        p.params, p.tensors, p.nodes, p.rounds, pr, cli=cli),
    # The memory mode: float32 accumulator (README, "Memory").
    "fedgrad_round_lean": lambda p, pr, cli=None: fedgrad_bench.round_time(
        p.params, p.tensors, p.nodes, p.rounds, pr, extra=("--accumulate", "float32"), cli=cli),
    # The guaranteed order-independent sum, an option for float32 models (docs/architecture.md).
    "fedgrad_round_reproducible": lambda p, pr, cli=None: fedgrad_bench.round_time(
        p.params, p.tensors, p.nodes, p.rounds, pr, extra=("--accumulate", "reproducible"),
        cli=cli),
    "flower_grpc": lambda p, pr: flower_grpc.measure_flower_grpc(
        p.params, p.tensors, p.nodes, p.flower_rounds, pr),
    "gloo": lambda p, pr: gloo.measure_allreduce(p.params, p.nodes, p.gloo_iters, procs=pr),
    "fedgrad_push_pull": lambda p, pr, cli=None: fedgrad_bench.push_broadcast(
        p.params, p.tensors, 4, pr, cli=cli),
    "raw_upload": lambda p, pr: raw_grpc.measure_upload(p.raw_bytes, 3, pr),
    "raw_download": lambda p, pr: raw_grpc.measure_download(p.raw_bytes, 3, pr),
    "raw_fanin": lambda p, pr: raw_grpc.measure_fanin(p.raw_bytes, p.nodes, 3, pr),
    "flower_deploy": lambda p, pr: flower_deploy.measure_flower_deploy(
        p.params, p.tensors, p.nodes, p.flower_rounds, pr),
    "fedgrad_rss_small_n": _rss(0),
    "fedgrad_rss_large_n": _rss(1),
    # Issue 15's memory targets: CLI nodes, the default and --accumulate float32.
    "fedgrad_mem95_small_n": _mem(0),
    "fedgrad_mem95_large_n": _mem(1),
    "fedgrad_mem95_lean_small_n": _mem(0, "--accumulate", "float32"),
    "fedgrad_mem95_lean_large_n": _mem(1, "--accumulate", "float32"),
    "fedgrad_many_tensors": _many,
    "fedgrad_few_tensors": _few,
    "fedgrad_scale": lambda p, pr, cli=None: fedgrad_bench.driver_rounds(
        p.scale_params, 4, p.scale_nodes, p.scale_rounds, p.scale_procs, pr, cli=cli),
    # The stragglers issue: digits, real training (benchmarks/stragglers.py).
    "stragglers_tta": lambda p, pr: stragglers.stragglers_tta(
        p.straggle_rounds, procs=pr, target=p.target_accuracy),
    "sampling_noniid": lambda p, pr: stragglers.sampling_noniid(
        p.noniid_nodes, 0.1, dict(zip(("fedsgd", "fedavg"), p.noniid_caps, strict=True)),
        p.noniid_splits, target=p.target_accuracy),
    "scale_1000": lambda p, pr: stragglers.scale_1000(
        p.fleet_nodes, p.fleet_sample, p.fleet_rounds, p.fleet_procs, pr),
    # The trust issue: accuracy tables, seeded, so computed once (benchmarks/robustness.py,
    # benchmarks/privacy.py).
    "robustness": _once(lambda p, pr: robustness.robustness(
        p.robust_algorithms, rounds=p.robust_rounds)),
    "privacy": _once(lambda p, pr: privacy.measure(p.privacy_rounds, p.privacy_configs)),
    # Compressed updates, issue 14 (benchmarks/compression.py): the main model with each
    # codec, two more rounds than fedgrad_round (5 after the first); then digits rounds to
    # target per codec (seeded: computed once) at the non-IID suite's FedSGD cap and at most
    # 30 FedAvg rounds (float32 FedAvg needs 3 on these 4 IID nodes).
    "compress_wire": lambda p, pr: compression.compress_wire(
        p.params, p.tensors, p.nodes, p.rounds + 2, pr),
    "compress_tta": _once(lambda p, pr: compression.compress_tta(
        {"fedsgd": p.noniid_caps[0], "fedavg": min(p.noniid_caps[1], 30)},
        target=p.target_accuracy)),
    # Past one aggregator process, issue 15 (benchmarks/shaped.py): every process in its
    # own network namespace, 1 Gbit/s links (tbf on both ends of each veth), K shards; then
    # the same on 127.0.0.1; and 2 relays (float64 sums, exact; float32, half the bytes).
    "shaped_k1": lambda p, pr: shaped.shaped_rounds(
        p.params, p.tensors, p.nodes, p.rounds, pr, shards=1),
    "shaped_k2": lambda p, pr: shaped.shaped_rounds(
        p.params, p.tensors, p.nodes, p.rounds, pr, shards=2),
    "shaped_k4": lambda p, pr: shaped.shaped_rounds(
        p.params, p.tensors, p.nodes, p.rounds, pr, shards=4),
    "shaped_relay2": lambda p, pr: shaped.shaped_rounds(
        p.params, p.tensors, p.nodes, p.rounds, pr, relays=2),
    "shaped_relay2_f32": lambda p, pr: shaped.shaped_rounds(
        p.params, p.tensors, p.nodes, p.rounds, pr, relays=2,
        relay_extra=("--forward-dtype", "float32")),
    "unshaped_k1": lambda p, pr: shaped.shaped_rounds(
        p.params, p.tensors, p.nodes, p.rounds, pr, shards=1, rate_mbit=None, loopback=True),
    "unshaped_k2": lambda p, pr: shaped.shaped_rounds(
        p.params, p.tensors, p.nodes, p.rounds, pr, shards=2, rate_mbit=None, loopback=True),
}  # fmt: skip
# The compression suites' table rows and targets live beside them (benchmarks/compression.py).
report.METRICS.update(compression.METRICS)
report.METRICS.update({name: shaped.METRICS[name] for name in SUITES if name in shaped.METRICS})
report.THRESHOLDS.extend(compression.THRESHOLDS)
#: The suites that run the fedgrad CLI (they take ``cli=``); ``--baseline`` twins them.
# Suites a baseline build can run too (one before the reproducible sum has no such kernel).
FEDGRAD_SUITES = tuple(
    name for name in SUITES if name.startswith("fedgrad_") and name != "fedgrad_round_reproducible"
)

# Errors that will not go away on the next repetition: stop retrying the suite.
_PERMANENT = (fedgrad_bench.NOT_AVAILABLE, "flwr not importable", shaped.NOT_AVAILABLE,
              shaped.NO_NETNS)  # fmt: skip


def run(
    plan: Plan, out: Path, names: list[str], log: Callable[[str], None] = print,
    suites: Mapping[str, Suite] = SUITES,
) -> dict:  # fmt: skip
    """Run ``names`` (in the order given) ``plan.reps`` times, interleaved; return the results."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    given_up: set[str] = set()
    for rep in range(plan.reps):
        for name in names:
            if name in given_up:
                continue
            started = time.monotonic()
            with Procs(out / "logs" / f"rep{rep}-{name}") as procs:
                try:
                    result = suites[name](plan, procs)
                except BenchError as err:
                    result = {"error": str(err)}
                    if any(p in str(err) for p in _PERMANENT):
                        given_up.add(name)
                except Exception as err:  # a broken suite must not cost the others' results
                    result = {"error": f"{type(err).__name__}: {err}"}
            result["wall_seconds"] = time.monotonic() - started
            runs[name].append(result)
            log(f"[rep {rep + 1}/{plan.reps}] {name}: {report.one_line(name, result)}")
    return runs


def execute(
    plan: Plan, out: Path, names: list[str], mode: str, command: str,
    baseline: Path | None = None, log: Callable[[str], None] = print,
) -> dict:  # fmt: skip
    """Run, then write ``out/results.json`` and ``out/chart.png``; return the results.

    Args:
        baseline: another build's ``fedgrad`` executable: each fedgrad suite in
            ``names`` also runs with it, as ``base:<suite>`` right after its own
            run; the results then hold ``baseline`` (both builds) and ``ab``.

    Raises:
        BenchError: ``baseline`` would not run its own fedgrad (``ab.baseline_info``).
    """
    suites: Mapping[str, Suite] = SUITES
    if baseline is not None:
        info = ab.baseline_info(baseline)
        twinned = [n for n in names if n in FEDGRAD_SUITES]
        suites = {**SUITES, **ab.twin_suites(SUITES, twinned, [str(baseline)])}
        names = ab.with_twins(names, twinned)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    runs = run(plan, out, names, log, suites)
    results = report.build(runs, asdict(plan), mode, command, time.time() - started)
    if baseline is not None:
        results.update(baseline=info, ab=ab.compare(runs))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    report.chart(results, out / "chart.png")
    return results


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run, print the table and ratios, write results.json and chart.png."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--quick", action="store_true", help="small sizes, ~6 minutes")
    parser.add_argument("--reps", type=int, help="repetitions (default 3, quick 2)")
    parser.add_argument("--params", type=int, help="override P (fp32 values of the main model)")
    parser.add_argument("--suites", help=f"comma-separated subset of: {', '.join(SUITES)}")
    parser.add_argument(
        "--baseline", type=Path, metavar="FEDGRAD",
        help="another build's fedgrad executable (benchmarks/baseline.sh REV prints it): "
        "each selected fedgrad suite also runs with it, as base:<suite>, and new / base is reported",
    )  # fmt: skip
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    plan = replace(plan, reps=args.reps or plan.reps, params=args.params or plan.params)
    names = list(SUITES) if not args.suites else args.suites.split(",")
    if unknown := [n for n in names if n not in SUITES]:
        parser.error(f"unknown suite(s) {unknown}; known: {', '.join(SUITES)}")
    names = [n for n in SUITES if n in names]  # always in the interleaving order
    baseline = args.baseline.absolute() if args.baseline else None  # children run in the repo root
    if baseline and not (baseline.is_file() and os.access(baseline, os.X_OK)):
        parser.error(f"--baseline {args.baseline}: not an executable (benchmarks/baseline.sh REV)")
    if baseline and not set(names) & set(FEDGRAD_SUITES):
        parser.error(f"--baseline needs a fedgrad suite: {', '.join(FEDGRAD_SUITES)}")
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    command = f"python -m benchmarks.run {argv_text}".strip()
    mode = "quick" if args.quick else "full"
    try:
        results = execute(plan, args.out, names, mode, command, baseline)
    except BenchError as err:
        raise SystemExit(f"benchmarks.run: {err}") from err
    print(report.table(results))
    if "ab" in results:
        print("\n" + ab.table(results))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'chart.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
