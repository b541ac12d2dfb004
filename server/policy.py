"""Round policies: when the federation starts and when a round may close.

The seam for how rounds are run (``docs/architecture.md``). The round engine
asks its policy three questions and hands it a ``Tally``, a frozen picture of
what counts; a policy never changes the engine. Synchronous rounds with a
quorum are ``SyncPolicy``; per-round sampling and buffered asynchronous rounds
are further policies answering the same questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["RoundPolicy", "SyncPolicy", "Tally"]


@dataclass(frozen=True)
class Tally:
    """What a policy decides on: who is expected, who reported, which deadlines passed."""

    nodes: int  # --nodes: joined nodes to wait for before the first round
    min_nodes: int  # --min-nodes: the quorum once a deadline passed
    active: frozenset[str]  # nodes waited for (joined, not late, not left)
    reported: frozenset[str]  # nodes whose upload counted in the open round
    deadline_passed: bool  # the open round's deadline
    start_deadline_passed: bool


class RoundPolicy(Protocol):
    """When the federation starts, who may upload, and when a round may close."""

    def ready_to_start(self, tally: Tally) -> bool:
        """Return True if the first round may open now."""
        ...

    def may_close(self, tally: Tally) -> bool:
        """Return True if the open round may close now (every counted add is done)."""
        ...

    def may_upload(self, tally: Tally, node_id: str) -> bool:
        """Return True if ``node_id`` is expected to upload in the open round."""
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

    def may_close(self, tally: Tally) -> bool:
        if not tally.reported:
            return False
        if tally.active <= tally.reported:
            return True
        return tally.deadline_passed and len(tally.reported) >= tally.min_nodes

    def may_upload(self, tally: Tally, node_id: str) -> bool:
        return True
