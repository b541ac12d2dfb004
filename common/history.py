"""Per-round training history: the record, its CSV file and its plot."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

__all__ = ["RoundRecord", "plot_history", "read_history", "write_history"]


@dataclass(frozen=True)
class RoundRecord:
    """One closed round, as the aggregator saw it.

    Attributes:
        round: rounds completed (1-based).
        train_loss: sample-weighted mean of the nodes' reported "loss" (NaN if none).
        test_loss, test_accuracy: the task's held-out evaluation after the step (NaN if none).
        seconds: wall time from publishing the round to publishing the next one.
        bytes: payload bytes received and sent during the round.
        nodes: uploads counted in the round.
    """

    round: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    seconds: float
    bytes: int
    nodes: int


_COLUMNS = [f.name for f in fields(RoundRecord)]


def write_history(path: str | Path, records: Sequence[RoundRecord]) -> None:
    """Write records as CSV with a header row (round, train_loss, test_accuracy, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_COLUMNS)
        writer.writeheader()
        for r in records:
            writer.writerow(asdict(r))


def read_history(path: str | Path) -> list[RoundRecord]:
    """Read a CSV written by ``write_history``."""
    with Path(path).open(newline="") as fh:
        return [
            RoundRecord(
                round=int(row["round"]),
                train_loss=float(row["train_loss"]),
                test_loss=float(row["test_loss"]),
                test_accuracy=float(row["test_accuracy"]),
                seconds=float(row["seconds"]),
                bytes=int(row["bytes"]),
                nodes=int(row["nodes"]),
            )
            for row in csv.DictReader(fh)
        ]


def plot_history(records: Sequence[RoundRecord], out: str | Path) -> None:
    """Draw train/test loss and test accuracy per round into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(rounds, [r.train_loss for r in records], marker="o", label="train loss")
    if any(not math.isnan(r.test_loss) for r in records):
        ax_loss.plot(rounds, [r.test_loss for r in records], marker="s", label="test loss")
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot(rounds, [r.test_accuracy for r in records], marker="o", color="tab:green")
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("held-out accuracy")
    ax_acc.set_ylim(0, 1)
    fig.suptitle("fedgrad training history")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
