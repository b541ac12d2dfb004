"""A/B runs: each selected fedgrad suite also runs with a baseline build, right after itself.

The project's rule is that a redesign keeps behaviour: benchmark before and
after, side by side in one run. ``python -m benchmarks.run --baseline FEDGRAD``
(``FEDGRAD``: another build's ``fedgrad`` executable, the one
``benchmarks/baseline.sh REV`` prints) adds to each selected fedgrad suite a
twin ``base:<suite>``: the same measurement with the aggregator and the CLI
nodes started from ``FEDGRAD``. Protocol-level driver nodes stay this
checkout's ``benchmarks.fedgrad_driver``, which speaks the same wire contract.

Every repetition runs each twin right after its suite (A A' B B' ..), so a
drift of this shared machine hits both alike; each pair is compared by the
median over repetitions of its per-repetition ratio new / base.

Not run directly: ``make bench-ab BASE=REV`` or ``python -m benchmarks.run --baseline FEDGRAD``.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from benchmarks import report
from benchmarks.common import REPO_ROOT, BenchError, child_env, ratio, summarize

__all__ = ["baseline_info", "compare", "table", "twin_suites", "with_twins"]

#: Versions that must match for an A/B run to compare code rather than environments.
_PINNED = ("torch", "grpcio", "protobuf", "numpy")

# Run by both interpreters with the children's environment (common.child_env puts
# this repo on PYTHONPATH): where ``import fedgrad`` would load from, and versions.
_PROBE = f"""
import importlib.metadata as m, importlib.util as u, json
def version(dist):
    try:
        return m.version(dist)
    except m.PackageNotFoundError:
        return None
spec = u.find_spec("fedgrad")
print(json.dumps({{"fedgrad_file": spec and spec.origin,
                  "versions": {{d: version(d) for d in {_PINNED!r}}}}}))
"""


def with_twins(names: Sequence[str], twinned: Sequence[str]) -> list[str]:
    """Return ``names`` with ``base:<name>`` right after each name in ``twinned``."""
    out = []
    for name in names:
        out.append(name)
        if name in twinned:
            out.append(report.TWIN_PREFIX + name)
    return out


def twin_suites(
    suites: Mapping[str, Callable[..., dict]], names: Sequence[str], cli: Sequence[str]
) -> dict[str, Callable[..., dict]]:
    """Return ``base:<name>`` -> the suite ``name`` run with the ``cli`` argv prefix."""
    return {report.TWIN_PREFIX + n: functools.partial(suites[n], cli=list(cli)) for n in names}


def _probe(python: Path | str) -> dict:
    """Run the probe with ``python`` and the children's environment; return its JSON."""
    done = subprocess.run(
        [str(python), "-c", _PROBE], env=child_env(), cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise BenchError(f"{python} failed to probe its venv:\n{done.stderr.strip()[-2000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if not found["fedgrad_file"]:
        raise BenchError(f"{python} cannot import fedgrad")
    return {**found, **_git_rev(Path(found["fedgrad_file"]).parent)}


def _git_rev(where: Path) -> dict:
    """Return the commit checked out around ``where`` and whether tracked files differ."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                              timeout=60, check=False)  # fmt: skip
        return done.stdout.strip() if done.returncode == 0 else ""

    rev = git("rev-parse", "HEAD")
    return {"rev": rev or None, "dirty": bool(rev and git("status", "--porcelain", "-uno"))}


def baseline_info(cli: Path) -> dict:
    """Describe the baseline build and this one: revisions, fedgrad sources, versions.

    Args:
        cli: the baseline's ``fedgrad`` console script; its venv's ``python`` sits beside it.

    Returns:
        ``{"cli": ..., "base": {...}, "new": {...}}``, each side with ``rev``, ``dirty``,
        ``fedgrad_file`` and the ``versions`` of torch, grpcio, protobuf and numpy.

    Raises:
        BenchError: the baseline's python is missing, or it would import this
            checkout's fedgrad instead of its own (then base and new are the same code).
    """
    python = cli.parent / "python"
    if not python.exists():
        raise BenchError(f"no python next to {cli}: pass the fedgrad script of a venv")
    base, new = _probe(python), _probe(sys.executable)
    if Path(base["fedgrad_file"]).resolve() == Path(new["fedgrad_file"]).resolve():
        raise BenchError(f"{python} imports this checkout's fedgrad ({new['fedgrad_file']}), "
                         "not the baseline's: rebuild it with benchmarks/baseline.sh")  # fmt: skip
    return {"cli": str(cli), "base": base, "new": new}


# Compared for every pair that measures them: what a redesign must keep.
_AB_METRICS = ("round_s", "push_gbps", "pull_gbps", "peak_rss_mb")


def _values(suite: str, result: dict) -> dict[str, float]:
    """Return the A/B metrics of one repetition, round seconds first (empty if it failed)."""
    got = {k: v for k, v in report.metric_values(suite, result).items() if k in _AB_METRICS}
    if "error" not in result and result.get("median") is not None:
        # Every fedgrad scenario's "median" is its steady-state seconds per round.
        got = {"round_s": float(result["median"])} | got
    return got


def compare(runs: Mapping[str, list[dict]]) -> list[dict]:
    """Pair every ``base:<suite>`` with ``<suite>``; return one entry per shared metric.

    Returns:
        ``[{"suite", "metric", "unit", "new", "base", "ratio"}]``: ``new`` and ``base``
        are medians over repetitions, ``ratio`` is ``summarize`` of the per-repetition
        ratios new / base (repetitions where either side failed are left out).
    """
    out = []
    for name, base_reps in runs.items():
        if not name.startswith(report.TWIN_PREFIX):
            continue
        suite = name.removeprefix(report.TWIN_PREFIX)
        # A suite given up after a permanent error stops early: zip keeps repetitions aligned.
        pairs = [
            (_values(suite, n), _values(suite, b))
            for n, b in zip(runs[suite], base_reps, strict=False)
        ]
        units = {k: u for k, u, _ in report.METRICS.get(suite, [])} | {"round_s": "s/round"}
        # A pair that failed on both sides still gets its row (n/a), so it is not missed.
        keys = dict.fromkeys(k for pair in pairs for side in pair for k in side) or ["round_s"]
        for metric in keys:
            both = [(new[metric], base[metric]) for new, base in pairs
                    if metric in new and metric in base]  # fmt: skip
            out.append({
                "suite": suite, "metric": metric, "unit": units.get(metric, ""),
                "new": summarize(n for n, _ in both)["median"],
                "base": summarize(b for _, b in both)["median"],
                "ratio": summarize(r for n, b in both if (r := ratio(n, b)) is not None),
            })  # fmt: skip
    return out


def _side(info: dict) -> str:
    rev = (info.get("rev") or "?")[:9]
    return rev + (" + uncommitted changes" if info.get("dirty") else "")


def table(results: dict) -> str:
    """Return the A/B table: medians of each side and new / base with min-max."""
    info = results.get("baseline", {})
    lines = [
        f"A/B  new = this checkout ({_side(info.get('new', {}))}), "
        f"base = {_side(info.get('base', {}))} ({info.get('cli', '?')})",
        "new/base < 1: new takes less time or memory; for GB/s, > 1: new moves data faster",
        "",
        f"{'suite':<22} {'metric':<12} {'new':>9} {'base':>9}  {'new/base [min-max] (n)':<28} unit",
        "-" * 92,
    ]  # fmt: skip
    for row in results.get("ab", []):
        r, new, base = row["ratio"], row["new"], row["base"]
        shown = "n/a" if r["median"] is None else (
            f"{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}] (n={r['n']})")  # fmt: skip
        cells = ["n/a" if v is None else f"{v:.4g}" for v in (new, base)]
        lines.append(f"{row['suite']:<22} {row['metric']:<12} {cells[0]:>9} {cells[1]:>9}  "
                     f"{shown:<28} {row['unit']}")  # fmt: skip
    versions = {side: info.get(side, {}).get("versions", {}) for side in ("new", "base")}
    if differ := [d for d in _PINNED if versions["new"].get(d) != versions["base"].get(d)]:
        lines.append("\nWARNING: the venvs differ in " + ", ".join(
            f"{d} {versions['new'].get(d)} (new) vs {versions['base'].get(d)} (base)"
            for d in differ))  # fmt: skip
    return "\n".join(lines)
