"""Robust aggregation against simulated attackers (issue 17), on the digits task.

In-process ``LocalCluster``: 10 IID digits nodes, seed 0, every node every round;
node-0 and node-1 run ``--simulate-attack`` (``fedgrad.client.attacks``) with
``sign-flip:10``, ``scale:100``, ``samples:1000000000`` (at or above the Join's
limit of 2**29: refused at Join) or ``samples:500000000`` (below it: the weighted
mean follows those two nodes' honest updates), or nobody attacks. Each attack
meets each rule: the weighted mean, ``median``, ``trimmed-mean:0.2``, ``krum:2``,
``multi-krum:2,6``, ``geometric-median``, and the weighted mean with
``--clip-update-norm C`` alone. The figure is the held-out test accuracy after the
last round, or "refused at Join", or "diverged" when the loss overflowed and the
aggregator refused the upload that reported it (the run then stops). The runs are
seeded and their rules order-independent, so a rerun gives the same table.

* FedSGD: ``local_steps=0``, SGD at ``benchmarks.stragglers.FEDSGD_LR`` (0.5),
  100 rounds (honest: 0.95 first at round ~80, 0.953 at the end); C = 0.5.
* FedAvg: the task's 40 local steps, lr 1.0, 15 rounds (honest: 0.95 from round 4
  on, 0.973 at the end); C = 2.0.

C comes from the honest uploads' L2 norms (a plain simulation of the honest run):
FedAvg's are 5.5-5.9 in round 0, 2.9-3.8 in round 1, 1.8-2.1 in round 2 and
0.6-1.9 from round 5 on; FedSGD's 0.28-0.34 in round 0, 0.46-0.57 around round 20
and 0.19-0.32 by round 99. So C is about an honest node's norm early on: it
leaves nearly every honest upload alone after the first rounds and bounds an
attacker's pull to about one honest node's.

Run: ``python -m benchmarks.robustness [--algorithm fedsgd|fedavg ...] [--out FILE]``
prints the JSON, then the markdown tables (benchmarks/README.md, "Robustness").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.stragglers import FEDSGD_LR, TARGET

__all__ = ["ALGORITHMS", "ATTACKS", "RULES", "Algorithm", "markdown", "robustness", "run_cell"]

NODES = 10
ATTACKERS = ("node-0", "node-1")
#: What the attackers do; None: nobody attacks.
ATTACKS: tuple[str | None, ...] = (
    None,
    "sign-flip:10",
    "scale:100",
    "samples:1000000000",
    "samples:500000000",
)
#: The rules, by table row; ``clip`` is the weighted mean with the algorithm's C.
RULES = (
    "weighted-mean",
    "median",
    "trimmed-mean:0.2",
    "krum:2",
    "multi-krum:2,6",
    "geometric-median",
    "clip",
)


@dataclass(frozen=True)
class Algorithm:
    """How one algorithm trains digits here: task options, lr, rounds and the clip's C."""

    task_args: Mapping[str, str]
    lr: float
    rounds: int
    clip: float


ALGORITHMS = {
    "fedsgd": Algorithm({"local_steps": "0"}, FEDSGD_LR, 100, 0.5),
    "fedavg": Algorithm({}, 1.0, 15, 2.0),
}


def _options(rule: str, algorithm: Algorithm) -> dict[str, Any]:
    if rule == "clip":
        return {"clip_update_norm": algorithm.clip}
    return {"reduce": rule}


def run_cell(algorithm: Algorithm, rule: str, attack: str | None, seed: int = 0) -> dict:
    """Train once; return the final accuracy, or why the run ended early.

    Returns:
        ``outcome``: ``trained``, ``refused at Join`` (a claim of 2**29 samples or
        more) or ``diverged`` (a node's loss became infinite or NaN, an upload the
        aggregator refuses); ``final_accuracy`` (None unless trained), ``error`` (the
        run's error, or None) and ``seconds``.

    Raises:
        RuntimeError: the run failed in any other way (the benchmark is broken).
    """
    from fedgrad.launch.local import LocalCluster

    attackers = {node: attack for node in ATTACKERS} if attack else None
    started = time.monotonic()
    with LocalCluster(
        "digits", nodes=NODES, task_args=algorithm.task_args, seed=seed, lr=algorithm.lr,
        attackers=attackers, **_options(rule, algorithm),
    ) as cluster:  # fmt: skip
        try:
            history = cluster.run(rounds=algorithm.rounds).history
        except RuntimeError as exc:
            outcome = _ended_by(str(exc))
            if outcome is None:
                raise
            return {"outcome": outcome, "final_accuracy": None, "error": str(exc),
                    "seconds": time.monotonic() - started}  # fmt: skip
    return {
        "outcome": "trained",
        "final_accuracy": history[-1].test_accuracy,
        "error": None,
        "seconds": time.monotonic() - started,
    }


def _ended_by(error: str) -> str | None:
    """Return which expected end ``LocalCluster.run``'s ``error`` is, or None."""
    if "RefusedError" not in error:
        return None
    if "num_samples" in error and "is absurd" in error:
        return "refused at Join"
    if "metric 'loss' = " in error:
        return "diverged"
    return None


def robustness(
    algorithms: Sequence[str] = tuple(ALGORITHMS), seed: int = 0, rounds: int | None = None
) -> dict:
    """Run every rule against every attack for ``algorithms``; return the results.

    Returns:
        ``rounds`` overrides each algorithm's rounds (a smaller run).
        The setting (nodes, attackers, target, each algorithm's lr, rounds and C) and,
        per ``ALGORITHM``, per rule, per attack (``none`` for no attacker): ``run_cell``.
    """
    result: dict[str, Any] = {
        "nodes": NODES, "attackers": list(ATTACKERS), "seed": seed, "target": TARGET,
        "algorithms": {a: {"task_args": dict(ALGORITHMS[a].task_args), "lr": ALGORITHMS[a].lr,
                           "rounds": ALGORITHMS[a].rounds, "clip_update_norm": ALGORITHMS[a].clip}
                       for a in algorithms},
    }  # fmt: skip
    for name in algorithms:
        table: dict[str, dict[str, dict]] = {}
        algorithm = ALGORITHMS[name]
        if rounds is not None:  # a smaller run (the harness test)
            algorithm = replace(algorithm, rounds=rounds)
        for rule in RULES:
            table[rule] = {
                attack or "none": run_cell(algorithm, rule, attack, seed) for attack in ATTACKS
            }
            print(f"{name} {rule}: done", file=sys.stderr, flush=True)
        result[name] = table
    return result


def _cell(outcome: Mapping[str, Any]) -> str:
    if outcome["outcome"] != "trained":
        return str(outcome["outcome"])
    return f"{outcome['final_accuracy']:.3f}"


def markdown(result: Mapping[str, Any]) -> str:
    """Return one markdown table per algorithm: rules by row, attacks by column."""
    lines = []
    for name, setting in result["algorithms"].items():
        rule_of = {"clip": f"clip C = {setting['clip_update_norm']:g} (weighted mean)"}
        lines += [
            f"{name} ({setting['rounds']} rounds, lr {setting['lr']:g}): final test accuracy,"
            f" 2 of {result['nodes']} nodes attacking",
            "",
            "| rule | no attacker | " + " | ".join(str(a) for a in ATTACKS[1:]) + " |",
            "|---" * len(ATTACKS) + "|---|",
        ]
        for rule, row in result[name].items():
            cells = " | ".join(_cell(row[a or "none"]) for a in ATTACKS)
            lines.append(f"| {rule_of.get(rule, rule)} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print its JSON, then its markdown tables."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.robustness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--algorithm", action="append", choices=list(ALGORITHMS),
                        help="fedsgd and/or fedavg (default: both)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # the attack warnings and refusals, once per cell
    started = time.monotonic()
    result = robustness(args.algorithm or tuple(ALGORITHMS), args.seed)
    result["seconds"] = time.monotonic() - started
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    print()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
