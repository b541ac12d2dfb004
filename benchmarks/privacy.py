"""Accuracy against epsilon for central DP (DP-FedAvg) on digits, 50 nodes, 10 a round.

Each configuration trains ``digits`` (FedAvg, the task's 40 local steps) in one
process (``LocalCluster``, real gRPC on 127.0.0.1) with ``--reduce mean
--sample 10 --dp-clip C --dp-noise-multiplier Z`` and reports the held-out
accuracy and the epsilon (delta 1e-5) the accountant gives after R rounds, plus
the same run without noise. The noise is seeded (``dp_test_seed``) so the table
reproduces; a production run draws it from the OS's CSPRNG instead.

Run: ``python -m benchmarks.privacy [--rounds 100] [--out runs/privacy.json]``
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

NODES, SAMPLE, DELTA = 50, 10, 1e-5
#: (noise multiplier, clip): no noise first, then noise at a few multipliers.
CONFIGS = ((0.0, 0.3), (0.5, 0.3), (0.8, 0.3), (1.0, 0.3), (1.3, 0.3), (1.6, 0.3), (1.0, 1.0))


def run(z: float, clip: float, rounds: int, seed: int = 0) -> dict[str, Any]:
    """Train one configuration; return its accuracy, epsilon and wall time."""
    from fedgrad.launch.local import LocalCluster

    options: dict[str, Any] = {"reduce": "mean", "sample": SAMPLE, "dp_delta": DELTA}
    if z > 0:
        options |= {"dp_noise_multiplier": z, "dp_clip": clip, "dp_test_seed": 1}
    else:
        options |= {"clip_update_norm": clip}
    began = time.perf_counter()
    with LocalCluster("digits", nodes=NODES, seed=seed, timeout=1800.0, **options) as cluster:
        result = cluster.run(rounds=rounds)
    history = result.history
    first = next((r for r in history if r.test_accuracy >= 0.90), None)
    return {
        "noise_multiplier": z,
        "clip": clip,
        "rounds": rounds,
        "final_accuracy": history[-1].test_accuracy,
        "best_accuracy": max(r.test_accuracy for r in history),
        "rounds_to_0.90": None if first is None else first.round + 1,
        # Stopping there (--dp-target-epsilon) spends only this much.
        "epsilon_at_0.90": None if first is None or math.isnan(first.epsilon) else first.epsilon,
        "epsilon": None if math.isnan(history[-1].epsilon) else history[-1].epsilon,
        "seconds": time.perf_counter() - began,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Return the results as a markdown table."""
    lines = [
        "| noise multiplier z | clip C | epsilon after all rounds (delta 1e-5) | final accuracy"
        " | best | rounds to 0.90 | epsilon at that round |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "no DP (clip only)" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        lines.append(
            f"| {r['noise_multiplier']:g} | {r['clip']:g} | {eps} | {r['final_accuracy']:.3f}"
            f" | {r['best_accuracy']:.3f} | {r['rounds_to_0.90'] or 'not reached'}"
            f" | {'-' if r['epsilon_at_0.90'] is None else format(r['epsilon_at_0.90'], '.2f')} |"
        )
    return "\n".join(lines)


def measure(rounds: int, configs: tuple[tuple[float, float], ...] = CONFIGS) -> dict[str, Any]:
    """Run ``configs`` for ``rounds`` rounds (a ``make bench`` suite); return the rows.

    Also the best accuracy reached at epsilon <= 8 (the issue's target is 0.90).
    """
    rows = [run(z, clip, rounds) for z, clip in configs]
    within = [r["final_accuracy"] for r in rows if r["epsilon"] is not None and r["epsilon"] <= 8]
    at_090 = [r["epsilon_at_0.90"] for r in rows if r["epsilon_at_0.90"] is not None]
    return {
        "rows": rows,
        "best_final_accuracy_eps_le_8": max(within, default=None),
        "least_epsilon_at_0.90": min(at_090, default=None),
        "table": table(rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("runs/privacy.json"))
    args = parser.parse_args(argv)
    rows = [run(z, clip, args.rounds) for z, clip in CONFIGS]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
