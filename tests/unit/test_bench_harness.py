"""The benchmark harness runs end to end on a tiny size (no timing assertions).

Benchmarks are not tests: these check only that every suite starts its
processes, produces well-formed results, and that run/report write
results.json and chart.png. Flower suites are skipped only if flwr is not
installed (it comes with the ``bench`` extra).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from benchmarks import ab, fedgrad_bench, report, run, stragglers
from benchmarks.common import BenchError, percentile, prometheus_value, ratio, summarize
from benchmarks.flower_grpc import flower_available

FLOWER_MISSING = flower_available()

TINY = replace(
    run.QUICK,
    reps=1,
    params=20_000,
    nodes=2,
    rounds=3,
    flower_rounds=2,
    raw_bytes=2 * 1024 * 1024,
    gloo_iters=1,
    rss_nodes=(2, 3),
    mem_params=20_000,
    mem_nodes=(2, 3),
    many_tensors=(50, 100),
    scale_nodes=6,
    scale_params=1_000,
    scale_rounds=3,
    scale_procs=2,
    straggle_rounds=2,
    noniid_nodes=20,
    noniid_caps=(30, 3),
    noniid_splits=("classes_per_node=2", "dirichlet=0.5"),
    fleet_nodes=8,
    fleet_sample=2,
    fleet_rounds=3,
    fleet_procs=2,
    # Reached within TINY's few rounds, so every time- and rounds-to-accuracy metric exists.
    target_accuracy=0.3,
    robust_algorithms=("fedavg",),
    robust_rounds=1,
    privacy_rounds=2,
    privacy_configs=((1.0, 0.3),),
)


def test_statistics_helpers() -> None:
    assert summarize([3.0, 1.0, 2.0]) == {
        "n": 3, "median": 2.0, "min": 1.0, "max": 3.0, "values": [3.0, 1.0, 2.0],
    }  # fmt: skip
    assert summarize([])["median"] is None
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert percentile([], 50) is None
    assert ratio(1.0, 0.0) is None
    assert ratio(None, 2.0) is None
    assert ratio(3.0, 2.0) == 1.5


@pytest.mark.skipif(FLOWER_MISSING is not None, reason=f"Flower suites need flwr: {FLOWER_MISSING}")
def test_flower_suites_are_selected_when_flwr_is_installed() -> None:
    assert {"flower_grpc", "flower_deploy"} <= set(run.SUITES)


def test_missing_fedgrad_cli_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing() -> list[str]:
        raise BenchError(fedgrad_bench.NOT_AVAILABLE)

    monkeypatch.setattr(fedgrad_bench, "fedgrad_cli", missing)
    plan = replace(TINY, reps=2)
    runs = run.run(plan, tmp_path, ["fedgrad_round", "fedgrad_scale"], log=lambda _line: None)

    # Reported once per suite, then not retried: the CLI will not appear mid-run.
    assert runs["fedgrad_round"] == [
        {
            "error": fedgrad_bench.NOT_AVAILABLE,
            "wall_seconds": runs["fedgrad_round"][0]["wall_seconds"],
        }
    ]
    assert len(runs["fedgrad_scale"]) == 1
    results = report.build(runs, asdict(plan), "tiny", "pytest", 0.0)
    assert results["summary"]["fedgrad_round"]["errors"] == [fedgrad_bench.NOT_AVAILABLE]
    assert "n/a" in report.table(results)


def _rep(median: float, push: float) -> dict:
    return {"median": median, "push_gbps": {"median": push}, "pull_gbps": {"median": 2 * push}}


def test_ab_twins_run_right_after_their_suite_and_compare_per_repetition() -> None:
    names = ab.with_twins(["fedgrad_round", "gloo", "fedgrad_push_pull"], run.FEDGRAD_SUITES)
    assert names == ["fedgrad_round", "base:fedgrad_round", "gloo",
                     "fedgrad_push_pull", "base:fedgrad_push_pull"]  # fmt: skip
    twins = ab.twin_suites(run.SUITES, ["fedgrad_round"], ["/base/fedgrad"])
    assert twins["base:fedgrad_round"].keywords == {"cli": ["/base/fedgrad"]}

    runs = {
        "fedgrad_push_pull": [_rep(1.0, 2.0), _rep(1.2, 3.0), {"error": "boom"}],
        "base:fedgrad_push_pull": [_rep(2.0, 1.0), _rep(1.0, 1.0), _rep(9.0, 9.0)],
    }
    rows = {row["metric"]: row for row in ab.compare(runs)}

    assert list(rows) == ["round_s", "push_gbps", "pull_gbps"]
    # Ratios of the paired repetitions (the failed one left out), then their median.
    assert rows["round_s"]["ratio"]["values"] == [0.5, 1.2]
    assert rows["push_gbps"]["ratio"]["median"] == pytest.approx(2.5)
    assert rows["pull_gbps"]["unit"] == "GB/s"
    assert (rows["round_s"]["new"], rows["round_s"]["base"]) == (1.1, 1.5)

    results = report.build(runs, asdict(TINY), "tiny", "pytest", 0.0)
    assert "base:fedgrad_push_pull" in report.table(results)
    results.update(ab=ab.compare(runs), baseline={"cli": "/base/fedgrad"})
    assert "0.850 [0.500-1.200] (n=2)" in ab.table(results)


def test_ab_pair_that_failed_on_both_sides_still_shows() -> None:
    runs = {"fedgrad_round": [{"error": "x"}], "base:fedgrad_round": [{"error": "y"}]}
    (row,) = ab.compare(runs)
    assert (row["metric"], row["ratio"]["n"], row["new"]) == ("round_s", 0, None)


def test_ab_refuses_a_baseline_that_imports_this_checkout() -> None:
    with pytest.raises(BenchError, match="imports this checkout's fedgrad"):
        ab.baseline_info(Path(sys.executable).parent / "fedgrad")


@pytest.mark.slow
def test_ab_twin_runs_the_given_cli(tmp_path: Path) -> None:
    names = ab.with_twins(["fedgrad_round", "fedgrad_push_pull"], run.FEDGRAD_SUITES)
    suites = {**run.SUITES, **ab.twin_suites(run.SUITES, names[::2], fedgrad_bench.fedgrad_cli())}
    runs = run.run(TINY, tmp_path, names, lambda _line: None, suites)

    for name in names:
        assert "error" not in runs[name][0], f"{name}: {runs[name][0].get('error')}"
    rows = ab.compare(runs)
    assert {(r["suite"], r["metric"]) for r in rows} >= {
        ("fedgrad_round", "round_s"), ("fedgrad_push_pull", "push_gbps"),
    }  # fmt: skip
    assert all(r["ratio"]["n"] == 1 for r in rows)


def test_seconds_to_accuracy_sums_from_round_zero_through_the_first_hit() -> None:
    rows = [
        {"test_accuracy": "0.5", "seconds": "2.0", "nodes": "8"},
        {"test_accuracy": "0.96", "seconds": "0.5", "nodes": "8"},
        {"test_accuracy": "0.94", "seconds": "0.25", "nodes": "6"},
        {"test_accuracy": "0.97", "seconds": "0.25", "nodes": "8"},
    ]
    hit = stragglers.seconds_to_accuracy(rows, 0.95)
    assert hit == {"round": 1, "rounds": 2, "seconds": 2.5, "steady_seconds": 0.5}
    assert stragglers.seconds_to_accuracy(rows, 0.5)["seconds"] == 2.0  # round 0 itself
    assert stragglers.seconds_to_accuracy(rows, 0.99)["rounds"] is None

    summary = stragglers.accuracy_summary(rows, 0.95)
    assert (summary["final_accuracy"], summary["best_accuracy"]) == (0.97, 0.97)
    assert (summary["uploads"], summary["rounds_run"], summary["staleness_max"]) == (30, 4, 0)


def test_prometheus_value_matches_the_exact_label_set() -> None:
    text = (
        "# HELP fedgrad_nodes Nodes known, by state.\n"
        'fedgrad_nodes{state="active"} 1000.0\n'
        'fedgrad_nodes{state="late"} 2.0\n'
        "fedgrad_round 7.0\n"
    )
    assert prometheus_value(text, "fedgrad_nodes", state="active") == 1000.0
    assert prometheus_value(text, "fedgrad_round") == 7.0
    assert prometheus_value(text, "fedgrad_nodes", state="left") is None
    assert prometheus_value(text, "fedgrad_nodes") is None


def test_thresholds_and_untargeted_ratios_are_judged_and_shown() -> None:
    runs = {
        "stragglers_tta": [{"sync": {"seconds": 6.0, "final_accuracy": 0.96},
                            "async": {"seconds": 2.0, "final_accuracy": 0.955},
                            "overcommit": {"seconds": 3.0, "final_accuracy": 0.96},
                            "async_minus_sync_accuracy": -0.005}],
        "scale_1000": [{"error": "3 of 8 nodes joined"}],
    }  # fmt: skip
    results = report.build(runs, asdict(TINY), "tiny", "pytest", 0.0)
    verdicts = {r["name"]: r for r in results["ratios"]}

    assert verdicts["stragglers_sync_over_async"]["value"] == 3.0
    assert verdicts["stragglers_sync_over_async"]["met"] is True
    assert verdicts["stragglers_sync_over_overcommit"]["met"] is None  # no target
    assert verdicts["stragglers_async_accuracy"]["met"] is True  # |-0.005| <= 0.01
    assert verdicts["fleet_rss_delta_mb"]["met"] is None  # the suite failed
    assert verdicts["fleet_rounds_complete"]["met"] is False
    assert "abs<= 0.01" in report.table(results)


def test_compression_suites_report_their_ratios_and_targets(tmp_path: Path) -> None:
    from benchmarks import compression

    log = tmp_path / "aggregator.log"
    log.write_text(
        "12:00:00 INFO    fedgrad.cli: round 1 closed (2 of 5): train loss 0.9273, 2 uploads,"
        " 0.11 s, 16.3 MB (collect 0.101s reduce 0.005s step 0.011s checkpoint 0.000s"
        " broadcast 0.002s) [round=1 event=round]\n"
    )
    assert compression._phases(log) == {
        1: {"collect": 0.101, "reduce": 0.005, "step": 0.011, "checkpoint": 0.0, "broadcast": 0.002}
    }
    none = {"round_s": 2.0, "upload_bytes": 8e8, "total_bytes": 1.6e9}
    configs = {c.label: {"upload_x": 0.25, "total_x": 0.5, "time_x": 0.7}
               for c in compression.WIRE_CONFIGS}  # fmt: skip
    configs["none"] = {**none, "upload_x": 1.0, "total_x": 1.0, "time_x": 1.0}
    configs["topk:0.01"]["upload_x"] = 0.02
    configs["int8 + broadcast bfloat16"].update(total_x=0.38, time_x=0.65)
    worst = {"none": 1.0, "int8": 1.0, "topk_ef": 3.0, "topk_noef": None, "powersgd": 1.5}
    runs = {"compress_wire": [{"configs": configs}], "compress_tta": [{"worst": worst}]}
    results = report.build(runs, asdict(TINY), "tiny", "pytest", 0.0)
    verdicts = {r["name"]: r["met"] for r in results["ratios"]}

    assert {"compress_wire", "compress_tta"} <= set(run.SUITES)
    assert results["summary"]["compress_wire"]["int8_upload_x"]["median"] == 0.25
    assert verdicts["compress_int8_upload_x"] is True
    assert verdicts["compress_int8_bcast_bf16_total_x"] is True
    assert verdicts["compress_int8_bcast_bf16_time_x"] is False  # 0.65 > 0.6
    assert verdicts["compress_topk_upload_x"] is True
    assert verdicts["compress_tta_topk_ef"] is False  # 3x the rounds > 2x
    assert verdicts["compress_tta_powersgd"] is True
    assert "topk_noef_rounds_x" not in results["summary"]["compress_tta"]  # not reached: no value
