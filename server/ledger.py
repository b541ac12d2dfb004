"""What the rounds applied: the history, the journal, per-node statistics, the DP budget.

The shell (``fedgrad.server.aggregator``) tells the ledger of every upload it
adds (``applied``) and of every closed round (``close``); the ledger keeps:

* ``history``: one ``RoundRecord`` per closed round (``history.csv``);
* ``journal``: async and sampled rounds, the uploads each round applied in the
  order they were added, and whom a sampled round selected (``server/replay.py``
  replays it; it goes into every checkpoint);
* ``node_stats``: each node's last applied upload's L2 norm and the robust rule's
  statistics of it (status, metrics, the JSON log);
* the privacy budget: epsilon after each round, and whether the next one would
  pass ``--dp-target-epsilon``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fedgrad.config import AggregatorConfig
from fedgrad.history import RoundRecord
from fedgrad.server.counters import Counters
from fedgrad.server.privacy import PrivacyAccountant

__all__ = ["Ledger"]

log = logging.getLogger("fedgrad.aggregator")


class Ledger:
    """The record of applied rounds; see the module docstring."""

    def __init__(self, cfg: AggregatorConfig, accountant: PrivacyAccountant | None) -> None:
        self.cfg, self.accountant = cfg, accountant
        self.history: list[RoundRecord] = []
        self.journaled = cfg.mode == "async" or cfg.sampled
        self.journal: list[dict[str, Any]] = []
        self.node_stats: dict[str, dict[str, float]] = {}
        self._applied: list[dict[str, Any]] = []  # the open round's, in add order
        #: round -> every held-out metric the nodes reported (``--evaluate-every``).
        self.federated: dict[int, dict[str, float]] = {}

    def applied(
        self, node_id: str, computed_on: int, weight: int, staleness: int, norm: float
    ) -> None:
        """Record an upload the reducer just added (in add order)."""
        self._applied.append(
            {
                "node": node_id,
                "computed_on": computed_on,
                "weight": weight,
                "staleness": staleness,
                "norm": norm,
            }
        )

    def epsilon(self, rounds: int) -> float:
        """Return epsilon after ``rounds`` rounds (NaN without DP)."""
        return math.nan if self.accountant is None else self.accountant.epsilon(rounds)

    def close(
        self,
        round_: int,
        counters: Counters,
        metrics: dict[str, float],
        selected: frozenset[str] | None,
        taking_part: int,
        robust: dict[str, dict[str, float]],
    ) -> RoundRecord:
        """Record the closed round ``round_``; return its history row.

        Args:
            counters: the round's traffic, losses and clock.
            metrics: the task's evaluation after the step.
            selected: the round's sample (None: every node).
            taking_part: the ``selected`` column (sample size, active nodes, or 0).
            robust: the robust rule's per-node statistics of the round.
        """
        applied, self._applied = self._applied, []
        self._keep_stats(round_, applied, robust)
        if self.journaled:
            entry: dict[str, Any] = {"version": round_, "uploads": applied}
            if selected is not None:
                entry["selected"] = sorted(selected)
            self.journal.append(entry)
        stale = [a["staleness"] for a in applied] or [0]
        federated, held_out = counters.federated()
        self.federated[round_] = federated
        record = RoundRecord(
            round=round_,
            train_loss=counters.train_loss(),
            test_loss=metrics.get("loss", math.nan),
            test_accuracy=metrics.get("accuracy", math.nan),
            seconds=counters.elapsed(),
            bytes=counters.round_bytes,
            nodes=len(applied),
            selected=taking_part,
            staleness_mean=sum(stale) / len(stale),
            staleness_max=max(stale),
            epsilon=self.epsilon(len(self.history) + 1),
            federated_loss=federated.get("loss", math.nan),
            federated_accuracy=federated.get("accuracy", math.nan),
            federated_samples=held_out,
        )
        self.history.append(record)
        return record

    def budget_spent(self, record: RoundRecord) -> bool:
        """Return True if one more round would pass --dp-target-epsilon (and say so)."""
        target = self.cfg.dp_target_epsilon
        if target is None:
            return False
        after_next = self.epsilon(len(self.history) + 1)
        if after_next <= target:
            return False
        log.warning(
            "privacy budget spent: epsilon %.3f after round %d, one more round would"
            " reach %.3f > --dp-target-epsilon %g; training ends",
            record.epsilon,
            record.round,
            after_next,
            target,
            extra={"round": record.round, "event": "budget_spent"},
        )
        return True

    def _keep_stats(
        self, round_: int, applied: list[dict[str, Any]], robust: dict[str, dict[str, float]]
    ) -> None:
        """Keep each applied node's norm and robust statistics; log them (JSON: ``stats``)."""
        round_stats = {}
        for upload in applied:
            stats = {"norm": float(upload["norm"]), **robust.get(upload["node"], {})}
            self.node_stats[upload["node"]] = round_stats[upload["node"]] = stats
        left_out = sorted(n for n, s in round_stats.items() if s.get("selected") == 0.0)
        log.log(
            logging.INFO if robust or self.cfg.clip_update_norm else logging.DEBUG,
            "round %d applied %d uploads (largest norm %.4g%s)",
            round_,
            len(applied),
            max((s["norm"] for s in round_stats.values()), default=0.0),
            f"; {self.cfg.reduce} left out {', '.join(left_out)}" if left_out else "",
            extra={"round": round_, "event": "round_stats", "stats": round_stats},
        )
