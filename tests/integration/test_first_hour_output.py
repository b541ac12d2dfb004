"""What a newcomer reads: progress lines show only metrics that exist; plots show the curve.

The demo runs as real processes (an aggregator and a node on 127.0.0.1); the lines
and figures are also checked from their builders (``status_line``, ``summary``,
``history_figure``) on hand-made inputs, where each case is exact.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from fedgrad.history import (
    RoundRecord,
    accuracy_limits,
    history_figure,
    write_history,
)
from fedgrad.launch.demo import status_line, summary
from fedgrad.proto import fedgrad_pb2 as pb

NAN = math.nan
RUN_TIMEOUT = 240.0


def _record(round_: int, train: float, test_loss: float, accuracy: float) -> RoundRecord:
    return RoundRecord(round_, train, test_loss, accuracy, 0.5, 1000, 2)


# -- the demo's progress line ------------------------------------------------------------------
def test_round_0_line_has_no_metrics_and_no_nan():
    line = status_line(pb.StatusReply(round=0, total_rounds=20, bytes_sent=2_000_000), 1.25)
    assert line == "round   0/20  moved     2.00 MB    1.2 s"


def test_classification_line_shows_train_loss_and_accuracy():
    metrics = {"train_loss": 0.41274, "test_loss": 0.3, "test_accuracy": 0.91333}
    line = status_line(pb.StatusReply(round=3, total_rounds=20, last_metrics=metrics), 9.0)
    assert line.startswith("round   3/20  train loss  0.4127  test accuracy 0.9133  moved")


def test_regression_line_shows_its_test_loss_instead_of_an_accuracy():
    metrics = {"train_loss": 0.5, "test_loss": 0.25}
    line = status_line(pb.StatusReply(round=2, total_rounds=5, last_metrics=metrics), 3.0)
    assert "test loss  0.2500" in line and "accuracy" not in line and "nan" not in line


def test_summary_names_only_what_the_task_has():
    regression = [_record(0, 0.9, 0.8, NAN), _record(1, 0.5, 0.4, NAN)]
    assert summary(regression) == (
        "2 rounds, final train loss 0.5000, held-out test loss 0.4000, 0.0 MB moved"
    )
    digits = [_record(0, 0.9, 0.8, 0.9), _record(1, 0.5, 0.4, 0.95)]
    assert "held-out test accuracy 0.9500" in summary(digits)


@pytest.mark.slow
def test_demo_of_a_regression_task_prints_no_nan(cli, tmp_path):
    argv = [*cli.argv, "demo", "--task", "linear", "--nodes", "1", "--rounds", "2"]
    done = subprocess.run(
        [*argv, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=cli.env(),
        timeout=RUN_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nan" not in done.stdout.lower(), done.stdout
    rounds = [line for line in done.stdout.splitlines() if line.startswith("round")]
    assert rounds, done.stdout
    assert "held-out test loss" in done.stdout.splitlines()[-2], done.stdout
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


# -- fedgrad plot ---------------------------------------------------------------------------
def _visible_ticks(ax) -> list[float]:
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticks() if low <= t <= high]


def test_rounds_have_integer_ticks_and_accuracy_fits_the_curve():
    history = [_record(0, 0.9, 0.8, 0.95), _record(1, 0.5, 0.4, 0.97), _record(2, 0.3, 0.3, 0.98)]
    fig = history_figure(history)
    try:
        loss_ax, acc_ax = fig.axes
        for ax in (loss_ax, acc_ax):
            ticks = _visible_ticks(ax)
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
        low, high = acc_ax.get_ylim()
        # The data span 0.95..0.98: the smallest margin (0.01) around it, not 0..1.
        assert (low, high) == pytest.approx((0.94, 0.99))
    finally:
        plt.close(fig)


def test_a_task_without_accuracy_gets_no_empty_accuracy_axes():
    fig = history_figure([_record(0, 0.9, 0.8, NAN), _record(1, 0.5, 0.4, NAN)])
    try:
        assert len(fig.axes) == 1 and fig.axes[0].get_ylabel() == "loss"
    finally:
        plt.close(fig)


def test_accuracy_limits_of_a_flat_curve_and_of_a_perfect_one():
    assert accuracy_limits([0.5, 0.5]) == pytest.approx((0.49, 0.51))
    assert accuracy_limits([0.2, 0.8]) == pytest.approx((0.14, 0.86))  # 10% of the range
    low, high = accuracy_limits([0.9, NAN, 1.0])
    assert (low, high) == pytest.approx((0.89, 1.01))  # the markers at 1.0 stay whole
    with pytest.raises(ValueError):
        accuracy_limits([NAN])


@pytest.mark.slow
def test_fedgrad_plot_writes_the_png(cli, tmp_path):
    history = tmp_path / "history.csv"
    write_history(history, [_record(0, 0.9, 0.8, 0.95), _record(1, 0.5, 0.4, 0.97)])
    out = tmp_path / "curves.png"
    done = subprocess.run(
        [*cli.argv, "plot", str(history), "--out", str(out)],
        capture_output=True,
        text=True,
        env=cli.env(),
        timeout=RUN_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert Path(out).read_bytes().startswith(b"\x89PNG")
