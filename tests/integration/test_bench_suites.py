"""Every ``make bench`` suite runs end to end at a tiny size (``tests/unit/test_bench_harness.py``'s
``TINY`` plan), and the report has each suite's metrics and every target ratio.

Here, not with the harness's unit tests: it takes minutes, and pytest-xdist schedules
files in collection order, so it starts early instead of last.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import report, run, shaped
from tests.unit.test_bench_harness import FLOWER_MISSING, TINY

#: Suites that call the same function as another with other arguments only (more
#: shards, a dtype, 127.0.0.1, more nodes): the tiny run takes one of each kind.
SIBLINGS = {
    "shaped_k1": "shaped_k2",
    "shaped_k4": "shaped_k2",
    "shaped_relay2_f32": "shaped_relay2",
    "unshaped_k2": "unshaped_k1",
    "fedgrad_mem95_large_n": "fedgrad_mem95_small_n",
    "fedgrad_mem95_lean_small_n": "fedgrad_mem95_small_n",
    "fedgrad_mem95_lean_large_n": "fedgrad_mem95_small_n",
}


@pytest.mark.slow
@pytest.mark.timeout(1200)  # every suite, each starting its processes: minutes, not seconds
def test_every_suite_runs_on_a_tiny_size(tmp_path: Path) -> None:
    names = [n for n in run.SUITES if not (FLOWER_MISSING and n.startswith("flower"))]
    assert set(SIBLINGS) <= set(run.SUITES) and set(SIBLINGS.values()) <= set(run.SUITES)
    names = [n for n in names if n not in SIBLINGS]
    if shaped.netns_unavailable():  # not root, or no ip/tc: the shaped suites cannot run
        names = [n for n in names if not n.startswith("shaped")]
    results = run.execute(TINY, tmp_path, names, mode="tiny", command="pytest")

    assert (tmp_path / "chart.png").stat().st_size > 0
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["plan"]["params"] == TINY.params
    for name in names:
        (result,) = results["runs"][name]
        assert "error" not in result, f"{name}: {result.get('error')}"
        for metric, _unit, _get in report.METRICS[name]:
            assert results["summary"][name][metric]["n"] == 1, (name, metric)
    assert {r["name"] for r in results["ratios"]} >= {name for name, *_ in report.RATIOS}
    assert "ratio" in report.table(results)
