"""Per-round training history: the record, its CSV file and its plot."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "RoundRecord",
    "accuracy_limits",
    "history_figure",
    "plot_history",
    "read_history",
    "write_history",
]


@dataclass(frozen=True)
class RoundRecord:
    """One closed round, as the aggregator saw it.

    Attributes:
        round: the round that closed (0-based, as on the wire).
        train_loss: sample-weighted mean of the nodes' reported "loss" (NaN if none).
        test_loss, test_accuracy: the task's held-out evaluation after the step (NaN if none).
        seconds: wall time from publishing the round to publishing the next one.
        bytes: payload bytes received and sent during the round.
        nodes: uploads applied in the round (counted and added).
        selected: nodes the round took uploads from (sampled rounds; otherwise the
            active nodes when it closed, or 0 in async mode, where anyone may upload).
        staleness_mean, staleness_max: async mode, versions between the one an applied
            upload was computed on and the one it was applied to (0 in sync mode).
        epsilon: differential privacy, the (epsilon, --dp-delta) spent after this round
            (NaN without DP).
        federated_loss, federated_accuracy: ``--evaluate-every``, the nodes' evaluation of
            the parameters this round *started from* on their own held-out data, weighted
            by their held-out sample counts (NaN in other rounds or without such data).
        federated_samples: the held-out samples behind them (0 if none).
    """

    round: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    seconds: float
    bytes: int
    nodes: int
    selected: int = 0
    staleness_mean: float = 0.0
    staleness_max: int = 0
    epsilon: float = math.nan
    federated_loss: float = math.nan
    federated_accuracy: float = math.nan
    federated_samples: int = 0


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
                selected=int(row.get("selected") or 0),
                staleness_mean=float(row.get("staleness_mean") or 0.0),
                staleness_max=int(row.get("staleness_max") or 0),
                epsilon=float(row.get("epsilon") or math.nan),
                federated_loss=float(row.get("federated_loss") or math.nan),
                federated_accuracy=float(row.get("federated_accuracy") or math.nan),
                federated_samples=int(row.get("federated_samples") or 0),
            )
            for row in csv.DictReader(fh)
        ]


def history_figure(records: Sequence[RoundRecord]) -> Figure:
    """Draw train/test loss and, if the task has one, test accuracy per round.

    Rounds are integers, so the round axis has integer ticks only. The accuracy axis
    fits the curve with a small margin: late rounds of a good run differ in the second
    decimal, which a fixed 0..1 axis flattens into a line.

    Args:
        records: the history, one record per closed round.

    Returns:
        The matplotlib figure (Agg backend): the loss axes, then the accuracy axes if
        any round has an accuracy. Close it with ``matplotlib.pyplot.close``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r.round for r in records]
    accuracy = [r.test_accuracy for r in records]
    has_accuracy = any(not math.isnan(a) for a in accuracy)
    fig, grid = plt.subplots(1, 2 if has_accuracy else 1, figsize=(10, 4), squeeze=False)
    ax_loss = grid[0][0]
    ax_loss.plot(rounds, [r.train_loss for r in records], marker="o", label="train loss")
    if any(not math.isnan(r.test_loss) for r in records):
        ax_loss.plot(rounds, [r.test_loss for r in records], marker="s", label="test loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    for ax in fig.axes:
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if has_accuracy:
        ax_acc = grid[0][1]
        ax_acc.plot(rounds, accuracy, marker="o", color="tab:green")
        ax_acc.set_ylabel("held-out accuracy")
        ax_acc.set_ylim(*accuracy_limits(accuracy))
    fig.suptitle("fedgrad training history")
    fig.tight_layout()
    return fig


def accuracy_limits(values: Sequence[float], margin: float = 0.1) -> tuple[float, float]:
    """Return y limits that show ``values`` (NaN ignored), ``margin`` of their range around.

    The margin is at least 0.01, so a flat curve is not drawn on the axis' edge; the limits are
    not cut at 0 or 1, which would cut the markers of a curve that reaches them in half.

    Raises:
        ValueError: every value is NaN.
    """
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        raise ValueError("no accuracy to show")
    low, high = min(finite), max(finite)
    pad = max((high - low) * margin, 0.01)
    return low - pad, high + pad


def plot_history(records: Sequence[RoundRecord], out: str | Path) -> None:
    """Draw the history (``history_figure``) into a PNG at ``out``."""
    fig = history_figure(records)
    import matplotlib.pyplot as plt  # after history_figure chose the Agg backend

    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
