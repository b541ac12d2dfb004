"""What the aggregator's shell counts: traffic, uploads, refusals and time per phase."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

__all__ = ["Counters"]


@dataclass
class Counters:
    """Traffic and work counted by the shell; status, metrics and progress read them."""

    bytes_received: int = 0
    bytes_sent: int = 0
    uploads_accepted: int = 0
    rejections: dict[str, int] = field(default_factory=dict)  # gRPC status code name -> count
    phase_seconds: dict[str, float] = field(default_factory=dict)  # of the last closed round
    round_bytes: int = 0
    #: Payload bytes of counted uploads that were staged in files, not memory.
    bytes_spilled: int = 0
    round_losses: dict[str, tuple[float, int]] = field(default_factory=dict)  # node: loss, w
    #: node -> (its held-out metrics, its held-out samples), ``--evaluate-every`` rounds.
    round_evals: dict[str, tuple[dict[str, float], int]] = field(default_factory=dict)
    add_seconds: float = 0.0
    round_started: float = field(default_factory=time.monotonic)

    def new_round(self) -> None:
        """Start counting a newly opened round."""
        self.round_bytes, self.round_losses, self.add_seconds = 0, {}, 0.0
        self.round_evals = {}
        self.round_started = time.monotonic()

    def elapsed(self) -> float:
        """Return the seconds since the open round was published."""
        return time.monotonic() - self.round_started

    def train_loss(self) -> float:
        """Return the round's sample-weighted mean training loss (NaN if none was reported).

        ``math.fsum`` rounds the exact sum once, so the arrival order does not matter: two
        runs with the same seeds record bitwise the same history however uploads raced.
        """
        losses = list(self.round_losses.values())
        weight = sum(w for _, w in losses)
        return math.fsum(loss * w for loss, w in losses) / weight if weight else math.nan

    def federated(self) -> tuple[dict[str, float], int]:
        """Return the nodes' held-out metrics weighted by their samples, and the samples.

        Like the train loss, an exact sum rounded once (``math.fsum``): arrival order
        does not matter.
        """
        evals = list(self.round_evals.values())
        samples = sum(n for _, n in evals)
        if not samples:
            return {}, 0
        names = sorted({name for metrics, _ in evals for name in metrics})
        means = {}
        for name in names:
            having = [(m[name], n) for m, n in evals if name in m]
            weight = sum(n for _, n in having)
            means[name] = math.fsum(v * n for v, n in having) / weight
        return means, samples

    def received(self, nbytes: int, spilled: bool) -> None:
        """Count a counted upload's payload bytes (``spilled``: staged in a file)."""
        self.bytes_received += nbytes
        self.round_bytes += nbytes
        if spilled:
            self.bytes_spilled += nbytes

    def refused(self, code: str) -> None:
        """Count a call refused with gRPC status ``code``."""
        self.rejections[code] = self.rejections.get(code, 0) + 1
