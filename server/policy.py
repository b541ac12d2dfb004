"""Round policies: when the federation starts, who takes part, and when a round may close.

The seam for how rounds are run (``docs/architecture.md``). The round engine
asks its policy a few questions and hands it a ``Tally``, a frozen picture of
what counts; a policy never changes the engine. Three policies answer them:

* ``SyncPolicy``: every active node in every round; close when all reported,
  or with ``min_nodes`` once the deadline passed.
* ``SampledPolicy``: each round selects K of the active nodes, seeded from
  (seed, round) (McMahan et al. 2017's fraction C of clients), optionally
  over-committed (FedScale): select ceil(K x F), close with the first K uploads.
* ``AsyncPolicy``: buffered asynchronous rounds (FedBuff, Nguyen et al. 2022):
  a round is a *version*; any node may upload an update computed on one of the
  last ``max_staleness`` versions, weighted by ``s(staleness)``, and every
  ``buffer`` uploads the optimizer steps and the next version is published.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fedgrad.config import AggregatorConfig

__all__ = [
    "AsyncPolicy",
    "RoundPolicy",
    "SampledPolicy",
    "Selection",
    "SyncPolicy",
    "Tally",
    "make_policy",
    "staleness_weight",
]


@dataclass(frozen=True)
class Tally:
    """What a policy decides on: who is expected, who reported, which deadlines passed."""

    nodes: int  # --nodes: joined nodes to wait for before the first round
    min_nodes: int  # --min-nodes: the quorum once a deadline passed
    active: frozenset[str]  # nodes waited for (joined, not late, not left)
    reported: frozenset[str]  # nodes whose upload counted in the open round
    deadline_passed: bool  # the open round's deadline
    start_deadline_passed: bool
    selected: frozenset[str] | None = None  # the open round's sample; None: every node
    target: int = 0  # uploads that fill the round (sampled: K; async: the buffer)


@dataclass(frozen=True)
class Selection:
    """Who a round takes uploads from, and how many uploads fill it."""

    nodes: frozenset[str] | None  # None: every active node
    target: int  # 0: no fixed number (wait for every active node)


class RoundPolicy(Protocol):
    """When the federation starts, who may upload, and when a round may close."""

    def ready_to_start(self, tally: Tally) -> bool:
        """Return True if the first round may open now."""
        ...

    def select(self, round_: int, eligible: Sequence[str], attempt: int = 0) -> Selection:
        """Return the selection of ``round_`` from ``eligible`` (sorted active node ids).

        ``attempt`` > 0 draws replacements for selected nodes that failed or left.
        """
        ...

    def may_close(self, tally: Tally) -> bool:
        """Return True if the open round may close now (every counted add is done)."""
        ...

    def may_upload(self, tally: Tally, node_id: str) -> bool:
        """Return True if ``node_id`` is expected to upload in the open round."""
        ...

    def oldest_round(self, current: int) -> int:
        """Return the oldest round an upload may have been computed on."""
        ...

    def scale(self, staleness: int) -> float:
        """Return the factor s(staleness) of an upload computed ``staleness`` rounds ago."""
        ...


class SyncPolicy:
    """Synchronous rounds: wait for every active node, or ``min_nodes`` past the deadline.

    The start is a quorum too: ``nodes`` joined, or ``min_nodes`` once the start
    deadline has passed.
    """

    def ready_to_start(self, tally: Tally) -> bool:
        if len(tally.active) >= tally.nodes:
            return True
        return tally.start_deadline_passed and len(tally.active) >= tally.min_nodes

    def select(self, round_: int, eligible: Sequence[str], attempt: int = 0) -> Selection:
        return Selection(None, 0)

    def may_close(self, tally: Tally) -> bool:
        if not tally.reported:
            return False
        if tally.active <= tally.reported:
            return True
        return tally.deadline_passed and len(tally.reported) >= tally.min_nodes

    def may_upload(self, tally: Tally, node_id: str) -> bool:
        return True

    def oldest_round(self, current: int) -> int:
        return current

    def scale(self, staleness: int) -> float:
        return 1.0


class SampledPolicy(SyncPolicy):
    """Each round selects K of the active nodes, seeded from (seed, round).

    The draw is ``random.Random`` seeded with a string of (seed, round, attempt)
    over the sorted node ids, so a run and a run resumed from its checkpoint select
    the same nodes. With ``overcommit`` F > 1 it selects ceil(K x F) and the round
    closes with the first K uploads: which K arrive first is timing, so that mode is
    not bitwise reproducible.
    """

    def __init__(
        self,
        seed: int,
        sample_size: Callable[[int], int],
        overcommit: float = 1.0,
        min_available: int = 0,
    ) -> None:
        self.seed, self.sample_size = seed, sample_size
        self.overcommit, self.min_available = overcommit, min_available

    def ready_to_start(self, tally: Tally) -> bool:
        needed = max(tally.nodes, self.min_available)
        if len(tally.active) >= needed:
            return True
        return tally.start_deadline_passed and len(tally.active) >= tally.min_nodes

    def select(self, round_: int, eligible: Sequence[str], attempt: int = 0) -> Selection:
        k = self.sample_size(len(eligible)) if eligible else 0
        count = min(len(eligible), math.ceil(k * self.overcommit - 1e-9))
        draw = random.Random(f"fedgrad-sample:{self.seed}:{round_}:{attempt}")
        return Selection(frozenset(draw.sample(sorted(eligible), count)), k)

    def may_close(self, tally: Tally) -> bool:
        if not tally.reported:
            return False
        if len(tally.reported) >= tally.target:
            return True  # the first K (over-commitment) or every selected node
        waiting = (tally.selected or frozenset()) & tally.active
        if waiting <= tally.reported:
            return True  # a round never waits for a node that left or is late
        quorum = min(tally.min_nodes, tally.target)
        return tally.deadline_passed and len(tally.reported) >= quorum

    def may_upload(self, tally: Tally, node_id: str) -> bool:
        return tally.selected is None or node_id in tally.selected


def staleness_weight(form: str, params: Sequence[float]) -> Callable[[int], float]:
    """Return s(tau): ``constant`` 1; ``polynomial`` (1 + tau)^-A; ``hinge`` 1 up to B,
    then 1 / (1 + A (tau - B)) (FedAsync's forms, Xie et al. 2019; FedBuff uses them).
    """
    if form == "polynomial":
        (a,) = params
        return lambda tau: float((1.0 + tau) ** -a)
    if form == "hinge":
        a, b = params
        return lambda tau: 1.0 if tau <= b else float(1.0 / (1.0 + a * (tau - b)))
    return lambda tau: 1.0


class AsyncPolicy(SyncPolicy):
    """Buffered asynchronous rounds (FedBuff): a version every ``buffer`` uploads.

    Every active node may upload, computed on any of the last ``max_staleness``
    versions. A version closes with ``buffer`` uploads, or when every active node's
    upload is in (no one else could add), or with ``min_nodes`` past the deadline.
    """

    def __init__(self, buffer: int, max_staleness: int, weight: Callable[[int], float]) -> None:
        self.buffer, self.max_staleness, self.weight = buffer, max_staleness, weight

    def select(self, round_: int, eligible: Sequence[str], attempt: int = 0) -> Selection:
        return Selection(None, self.buffer)

    def may_close(self, tally: Tally) -> bool:
        if len(tally.reported) >= tally.target > 0:
            return True
        return super().may_close(tally)

    def oldest_round(self, current: int) -> int:
        return max(0, current - self.max_staleness)

    def scale(self, staleness: int) -> float:
        return self.weight(staleness)


def make_policy(cfg: AggregatorConfig) -> RoundPolicy:
    """Return the policy ``cfg`` asks for (--mode, --sample, --overcommit, ...)."""
    from fedgrad.config import parse_staleness

    if cfg.mode == "async":
        weight = staleness_weight(*parse_staleness(cfg.staleness))
        return AsyncPolicy(cfg.buffer_size, cfg.max_staleness, weight)
    if cfg.sampled:
        available = cfg.min_available or cfg.sample  # 0 with a fraction: --nodes decides
        return SampledPolicy(cfg.seed, cfg.sample_size, cfg.overcommit, available)
    return SyncPolicy()
