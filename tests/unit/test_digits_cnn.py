"""Tests of the digits task's ``model=cnn``: options, BatchNorm buffers, FedAvg convergence."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from fedgrad.errors import ConfigError
from fedgrad.task import Task, Update, check_update, load_task, trainable_parameters
from fedgrad.tasks import DigitsTask

TARGET = 0.97


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # As in test_tasks.py: a tiny model runs slower with a second intra-op thread on a busy box.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _stats(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return ``bn``'s running mean, running variance and batch count."""
    assert bn.running_mean is not None and bn.running_var is not None
    assert bn.num_batches_tracked is not None
    return bn.running_mean, bn.running_var, int(bn.num_batches_tracked)


# -- options and the model -------------------------------------------------------


def test_default_model_is_the_mlp_bitwise() -> None:
    default, mlp = DigitsTask(seed=1), DigitsTask(seed=1, model="mlp")
    assert (default.local_steps, default.local_lr, default.batch_size) == (40, 0.5, 32)
    assert (mlp.local_steps, mlp.local_lr, mlp.batch_size) == (40, 0.5, 32)
    torch.manual_seed(3)
    reference = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    models = []
    for task in (default, mlp):
        torch.manual_seed(3)
        models.append(task.model())
    for model in models:
        assert str(model) == str(reference)
        assert list(model.buffers()) == []
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            assert torch.equal(p, q)
    shard = default.shard(0, 4)
    updates = [
        task.compute_update(model, shard, torch.Generator().manual_seed(5))
        for task, model in zip((default, mlp), models, strict=True)
    ]
    for g, h in zip(updates[0].gradients, updates[1].gradients, strict=True):
        assert torch.equal(g, h)


def test_cnn_builds_with_batch_norm_buffers() -> None:
    task = load_task("digits", {"model": "cnn"})
    model = task.model()
    norms = _batch_norms(model)
    assert [bn.num_features for bn in norms] == [16, 32]
    names = [n for n, _ in model.named_buffers()]
    assert sum(n.endswith("running_mean") for n in names) == 2
    assert sum(n.endswith("running_var") for n in names) == 2
    assert sum(n.endswith("num_batches_tracked") for n in names) == 2
    x, _ = task.shard(0, 4)
    assert x.shape[1:] == (64,)  # the shards are rows for both models
    assert model(x[:5]).shape == (5, 10)


def test_cnn_defaults_and_overrides() -> None:
    task = DigitsTask(model="cnn")
    defaults = DigitsTask.CNN_DEFAULTS
    assert (task.local_steps, task.local_lr, task.batch_size) == (
        defaults["local_steps"],
        defaults["local_lr"],
        defaults["batch_size"],
    )
    assert task.lr == 1.0 and task.optimizer == "sgd"  # FedAvg at the aggregator
    loaded = load_task(
        "digits", {"model": "cnn", "local_steps": "3", "local_lr": "0.05", "batch_size": "8"}
    )
    assert (loaded.local_steps, loaded.local_lr, loaded.batch_size) == (3, 0.05, 8)


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"model='resnet'.*\['mlp', 'cnn'\]"):
        load_task("digits", {"model": "resnet"})


def test_hidden_is_mlp_only() -> None:
    with pytest.raises(ConfigError, match="hidden applies only to model=mlp"):
        load_task("digits", {"model": "cnn", "hidden": "16"})


def test_evaluate_uses_running_statistics() -> None:
    task = DigitsTask(model="cnn")
    torch.manual_seed(0)
    model = task.model()
    task.compute_update(model, task.shard(0, 4), torch.Generator().manual_seed(0))
    before = copy.deepcopy(model.state_dict())
    model.train()
    first = task.evaluate(model)
    assert not model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # eval mode leaves the buffers alone
    assert task.evaluate(model) == first  # no batch statistics: the result is repeatable


@pytest.mark.parametrize(
    ("options", "count"),
    [
        ({}, 4),
        ({"split": "non-iid"}, 4),
        ({"classes_per_node": "2"}, 5),
        ({"dirichlet": "0.5"}, 4),
        ({"local_steps": "0"}, 4),
        ({"batch_size": "0", "local_steps": "2"}, 4),
    ],
)
def test_cnn_update_with_split_and_training_options(options: dict[str, str], count: int) -> None:
    task = load_task("digits", {"model": "cnn", **options}, seed=2)
    torch.manual_seed(0)
    model = task.model()
    shard = task.shard(count - 1, count)
    update = task.compute_update(model, shard, torch.Generator().manual_seed(1))
    check_update(update, model.parameters())
    assert update.num_samples == len(shard[1])
    assert all(torch.isfinite(g).all() for g in update.gradients)
    # One forward pass in train mode per local step (one for FedSGD's whole-shard gradient).
    steps = max(task.local_steps, 1)
    for bn in _batch_norms(model):
        mean, _, batches = _stats(bn)
        assert batches == steps
        assert mean.abs().sum() > 0


# -- FedAvg with averaged BatchNorm statistics -----------------------------------


def _mean_buffers(server: nn.Module, nodes: list[nn.Module], updates: list[Update]) -> None:
    """Set the server's buffers to the nodes' mean weighted by samples; counts take the max."""
    total = sum(u.num_samples for u in updates)
    per_node = [dict(m.named_buffers()) for m in nodes]
    with torch.no_grad():
        for name, buffer in server.named_buffers():
            values = [b[name] for b in per_node]
            if name.endswith("num_batches_tracked"):
                buffer.copy_(torch.stack(values).max())
            else:
                weighted = [
                    v * (u.num_samples / total) for v, u in zip(values, updates, strict=True)
                ]
                buffer.copy_(torch.stack(weighted).sum(dim=0))


def simulate_fedavg(
    task: Task, nodes: int, rounds: int, seed: int = 0
) -> tuple[nn.Module, list[float]]:
    """Run FedAvg in-process as the aggregator would, averaging parameters and buffers.

    Each round every node loads the server's parameters and buffers and runs
    ``compute_update``; the server steps SGD(``task.lr``) on the sample-weighted
    mean pseudo-gradient and takes the nodes' sample-weighted mean buffers.

    Returns:
        The server's model and its test accuracy after each round.
    """
    torch.manual_seed(seed)
    server = task.model()
    models = [task.model() for _ in range(nodes)]
    shards = [task.shard(i, nodes) for i in range(nodes)]
    assert task.optimizer == "sgd"
    opt = torch.optim.SGD(server.parameters(), lr=task.lr)
    accuracy = []
    for r in range(rounds):
        updates = []
        for i, (model, shard) in enumerate(zip(models, shards, strict=True)):
            model.load_state_dict(server.state_dict())
            updates.append(
                task.compute_update(model, shard, torch.Generator().manual_seed(1000 * r + i))
            )
        total = sum(u.num_samples for u in updates)
        for j, (_, p) in enumerate(trainable_parameters(server)):
            p.grad = torch.stack([u.gradients[j] * (u.num_samples / total) for u in updates]).sum(0)
        opt.step()
        _mean_buffers(server, models, updates)
        metrics = task.evaluate(server)
        assert metrics is not None
        accuracy.append(metrics["accuracy"])
    return server, accuracy


def _first_at(accuracy: list[float], target: float) -> int | None:
    return next((r + 1 for r, a in enumerate(accuracy) if a >= target), None)


def test_cnn_fedavg_reaches_target_with_averaged_buffers() -> None:
    # Measured on seed 0: 0.97 from round 2 and >= 0.98 from round 4; 10 rounds leave margin
    # under the 30-round budget the defaults are tuned for.
    task = DigitsTask(seed=0, model="cnn")
    server, accuracy = simulate_fedavg(task, nodes=4, rounds=10)
    first = _first_at(accuracy, TARGET)
    assert first is not None and accuracy[-1] >= TARGET, accuracy
    norms = _batch_norms(server)
    for bn in norms:
        mean, var, batches = _stats(bn)
        assert mean.abs().sum() > 0
        assert not torch.allclose(var, torch.ones_like(var))
        assert batches == 10 * task.local_steps
    # The statistics matter: the same weights with fresh (0, 1) statistics do far worse.
    fresh = copy.deepcopy(server)
    for bn in _batch_norms(fresh):
        bn.reset_running_stats()
    metrics = task.evaluate(fresh)
    assert metrics is not None and metrics["accuracy"] < 0.8, metrics


@pytest.mark.slow
@pytest.mark.parametrize(
    ("seed", "options"),
    [(1, {}), (2, {}), (3, {}), (0, {"dirichlet": "0.5"}), (0, {"split": "non-iid"})],
)
def test_cnn_fedavg_within_30_rounds(seed: int, options: dict[str, str]) -> None:
    task = load_task("digits", {"model": "cnn", **options}, seed=seed)
    _, accuracy = simulate_fedavg(task, nodes=4, rounds=30, seed=seed)
    assert _first_at(accuracy, TARGET) is not None, accuracy
    assert accuracy[-1] >= TARGET, accuracy
