"""The round engine's vocabulary: phases, node states, deadlines, rules, records, the view.

Plain values, no behaviour beyond formatting: ``fedgrad.server.engine`` changes them,
everything else (status, metrics, checkpoints, the shell) reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum

__all__ = [
    "MAX_PULLS_PER_NODE",
    "UNSELECTED",
    "Deadline",
    "EngineView",
    "NodeRecord",
    "NodeState",
    "Phase",
    "Rules",
]

#: Parameter streams one node may hold open at once (one, plus one reconnecting).
MAX_PULLS_PER_NODE = 2


class Phase(StrEnum):
    """Where the federation is. ``value`` is what status and metrics show."""

    WAITING = "waiting"  # for enough nodes before the first round
    COLLECTING = "collecting"  # a round is open for uploads
    STEPPING = "stepping"  # the round is closing: optimizer step, checkpoint, publish
    FINISHED = "finished"


class NodeState(StrEnum):
    """What the engine knows of a node's participation."""

    ACTIVE = "active"  # waited for in every round (it is selected in)
    LATE = "late"  # missed a round deadline; not waited for until it pulls or uploads
    LEFT = "left"  # called Leave; must Join again


#: What status shows for an active node a sampled round did not select.
UNSELECTED = "unselected"


class Deadline(Enum):
    """What a round deadline decided."""

    IGNORED = "ignored"  # the round it was set for is no longer open
    CLOSE = "close"  # the quorum is there: close the round now
    PENDING = "pending"  # the quorum is there but an add is running: it closes the round
    BELOW_QUORUM = "below_quorum"  # fewer than min_nodes counted: keep waiting, say so


@dataclass(frozen=True)
class Rules:
    """The numbers the engine enforces (from ``AggregatorConfig``)."""

    nodes: int = 1  # nodes to wait for before the first round
    rounds: int = 10  # rounds to train
    min_nodes: int = 1  # quorum once a deadline has passed


@dataclass
class NodeRecord:
    """What the engine knows of one node. Read it; only the engine writes it."""

    node_id: str
    num_samples: int
    state: NodeState = NodeState.ACTIVE
    last_round: int = -1  # last round an upload of this node was counted in (computed on)
    last_upload: str = ""  # the upload id counted in last_round
    last_seen: float = 0.0  # the shell's monotonic clock at its last call
    uploading: bool = False
    pulls: int = 0


@dataclass(frozen=True)
class EngineView:
    """A consistent read-only picture of the engine, for status, metrics and progress."""

    round: int
    total_rounds: int
    phase: Phase
    finished: bool
    below_quorum: bool
    deadline_passed: bool
    reported: frozenset[str]
    pending_adds: int
    nodes: tuple[NodeRecord, ...] = field(default=())
    selected: frozenset[str] | None = None  # the open round's sample (None: every node)

    @property
    def shown_phase(self) -> str:
        """The phase as status shows it: "waiting" also below the quorum past a deadline."""
        return Phase.WAITING.value if self.below_quorum else self.phase.value

    def shown_state(self, node: NodeRecord) -> str:
        """Return a node's state as status shows it: active, reported, unselected, late or left."""
        if node.node_id in self.reported:
            return "reported"
        if (
            node.state is NodeState.ACTIVE
            and self.selected is not None
            and node.node_id not in self.selected
        ):
            return UNSELECTED
        if node.state is NodeState.LATE or (
            node.state is NodeState.ACTIVE and self.deadline_passed
        ):
            return "late"
        return node.state.value
