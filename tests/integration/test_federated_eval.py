"""``--evaluate-every``: nodes evaluate the round's parameters on their own held-out data;
the aggregator's sample-weighted mean goes into history and status."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from fedgrad import LocalCluster, Task, Update
from fedgrad.task import load_task

SEED = 8


def test_digits_federated_accuracy_is_the_central_one_of_the_same_parameters() -> None:
    """The nodes' held-out parts cover the test set once, so their weighted accuracy of
    round r's starting parameters is the central accuracy after round r - 1's step."""
    with LocalCluster("digits", nodes=4, seed=SEED, evaluate_every=2) as cluster:
        history = cluster.run(rounds=5).history
    task = load_task("digits", {}, seed=SEED)
    test_size = len(task.y_test)
    torch.manual_seed(SEED)
    initial = task.evaluate(task.model())
    for r in history:
        if r.round % 2:
            assert r.federated_samples == 0 and math.isnan(r.federated_accuracy), r
            continue
        assert r.federated_samples == test_size
        before = initial if r.round == 0 else {"accuracy": history[r.round - 1].test_accuracy}
        assert r.federated_accuracy == pytest.approx(before["accuracy"], abs=1e-6), r.round
        assert math.isfinite(r.federated_loss)


class Constant(Task):
    """Node i's held-out 'accuracy' is i / 10 on 10 (i + 1) samples; its updates are zero."""

    lr = 0.1

    def model(self) -> nn.Module:
        return nn.Linear(1, 1)

    def shard(self, index: int, count: int) -> int:
        return index

    def num_samples(self, data: Any) -> int:
        return 5 if isinstance(data, int) else len(data)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def compute_update(self, model: nn.Module, data: Any, generator: torch.Generator) -> Update:
        return Update([torch.zeros_like(p) for p in model.parameters()], 5)

    def holdout(self, index: int, count: int) -> list[int]:
        return [index] * (10 * (index + 1))

    def evaluate_holdout(self, model: nn.Module, data: Any) -> dict[str, float]:
        return {"accuracy": data[0] / 10, "calibration": 1.0}


def test_held_out_metrics_are_weighted_by_held_out_samples() -> None:
    with LocalCluster(Constant(), nodes=3, seed=SEED, evaluate_every=1) as cluster:
        history = cluster.run(rounds=2).history
    weights = [10, 20, 30]
    want = sum(i / 10 * w for i, w in enumerate(weights)) / sum(weights)
    for r in history:
        assert r.federated_samples == 60
        assert r.federated_accuracy == pytest.approx(want, rel=1e-15)
        assert math.isnan(r.federated_loss), "no node reported a held-out loss"


def test_without_evaluate_every_nodes_do_not_evaluate() -> None:
    with LocalCluster(Constant(), nodes=2, seed=SEED) as cluster:
        history = cluster.run(rounds=2).history
    assert all(r.federated_samples == 0 for r in history)
