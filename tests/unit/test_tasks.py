"""Tests of the built-in tasks: options, shards, determinism, gradients, convergence."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

import fedgrad.tasks
from fedgrad.errors import ConfigError
from fedgrad.task import BUILTIN_TASKS, Task, Update, check_update, load_task
from fedgrad.tasks import DigitsTask, LinearTask, SyntheticTask


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The models are tiny: a second intra-op thread only adds synchronisation,
    # which measured 30x slower (7 ms -> 210 ms per digits update) on a busy 2-core box.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weighted_mean(updates: list[Update]) -> list[torch.Tensor]:
    total = sum(u.num_samples for u in updates)
    return [
        sum(u.gradients[j] * (u.num_samples / total) for u in updates)
        for j in range(len(updates[0].gradients))
    ]


def simulate(task: Task, nodes: int, rounds: int, seed: int = 0) -> list[dict[str, float]]:
    """Train like the aggregator, in-process: weighted mean of updates, then an optimizer step.

    Returns:
        ``task.evaluate`` after each round.
    """
    torch.manual_seed(seed)
    model, node_model = task.model(), task.model()
    assert task.optimizer == "sgd"
    opt = torch.optim.SGD(model.parameters(), lr=task.lr)
    shards = [task.shard(i, nodes) for i in range(nodes)]
    history = []
    for r in range(rounds):
        updates = []
        for i, shard in enumerate(shards):
            node_model.load_state_dict(model.state_dict())
            update = task.compute_update(node_model, shard, _generator(1000 * r + i))
            check_update(update, node_model.parameters())
            updates.append(update)
        for p, g in zip(model.parameters(), _weighted_mean(updates), strict=True):
            p.grad = g
        opt.step()
        metrics = task.evaluate(model)
        assert metrics is not None
        history.append(metrics)
    return history


# -- loading and options --------------------------------------------------------


def test_exported_members() -> None:
    assert fedgrad.tasks.__all__ == ["DigitsTask", "LinearTask", "SyntheticTask"]
    classes = {"digits": DigitsTask, "linear": LinearTask, "synthetic": SyntheticTask}
    for name, cls in classes.items():
        assert BUILTIN_TASKS[name] == f"fedgrad.tasks.{name}:{cls.__name__}"
        assert type(load_task(name)) is cls


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("digits", {"nope": "1"}),
        ("digits", {"split": "random"}),
        ("digits", {"hidden": "0"}),
        ("digits", {"hidden": "big"}),
        ("digits", {"local_steps": "-1"}),
        ("digits", {"local_lr": "0"}),
        ("digits", {"local_lr": "nan"}),
        ("digits", {"batch_size": "2.5"}),
        ("linear", {"samples": "0"}),
        ("linear", {"features": "x"}),
        ("linear", {"noise": "-0.1"}),
        ("linear", {"noise": "inf"}),
        ("linear", {"hidden": "3"}),
        ("synthetic", {"params": "0"}),
        ("synthetic", {"params": "-5"}),
        ("synthetic", {"params": "1.5"}),
        ("synthetic", {"params": "12Q"}),
        ("synthetic", {"params": "nan"}),
        ("synthetic", {"tensors": "0"}),
        ("synthetic", {"dtype": "int8"}),
        ("synthetic", {"split": "iid"}),
    ],
)
def test_bad_options_raise_config_error(name: str, args: dict[str, str]) -> None:
    key = next(iter(args))
    with pytest.raises(ConfigError, match=key):
        load_task(name, args)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("50000000", 50_000_000), ("50M", 50_000_000), ("1e6", 1_000_000), ("1.5k", 1500),
     ("2_000", 2000), (" 3G ", 3 * 10**9), ("7", 7)],
)  # fmt: skip
def test_synthetic_params_forms(text: str, expected: int) -> None:
    task = load_task("synthetic", {"params": text, "tensors": "3"})
    assert isinstance(task, SyntheticTask)
    assert task.params == expected
    assert sum(task.sizes) == expected


def test_options_override_defaults() -> None:
    task = load_task(
        "digits",
        {"hidden": "16", "local_steps": "3", "batch_size": "8", "local_lr": "0.05"},
    )
    assert (task.local_steps, task.batch_size, task.local_lr) == (3, 8, 0.05)
    assert DigitsTask.local_steps > 0
    assert next(task.model().parameters()).shape == (16, 64)


@pytest.mark.parametrize("name", ["digits", "linear", "synthetic"])
@pytest.mark.parametrize(("index", "count"), [(-1, 4), (4, 4), (0, 0)])
def test_bad_shard_index(name: str, index: int, count: int) -> None:
    with pytest.raises(ConfigError):
        load_task(name).shard(index, count)


# -- digits --------------------------------------------------------------------


def _rows(x: torch.Tensor, y: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(tuple(row) for row in torch.cat([x, y[:, None].float()], 1).tolist())


@pytest.mark.parametrize("split", ["iid", "non-iid"])
@pytest.mark.parametrize("count", [1, 3, 4, 7])
def test_digits_shards_partition_train_split(split: str, count: int) -> None:
    task = DigitsTask(seed=1, split=split)
    shards = [task.shard(i, count) for i in range(count)]
    sizes = [len(y) for _, y in shards]
    assert sum(sizes) == len(task.y_train) == 1347
    assert max(sizes) - min(sizes) <= 1
    x = torch.cat([s[0] for s in shards])
    y = torch.cat([s[1] for s in shards])
    assert _rows(x, y) == _rows(task.x_train, task.y_train)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_digits_split_and_classes_per_shard() -> None:
    iid, non_iid = DigitsTask(), DigitsTask(split="non-iid")
    assert len(iid.y_test) == 450
    assert torch.bincount(iid.y_test).tolist() == torch.bincount(non_iid.y_test).tolist()
    for i in range(4):
        assert len(iid.shard(i, 4)[1].unique()) == 10
        assert len(non_iid.shard(i, 4)[1].unique()) <= 4


def test_digits_deterministic() -> None:
    a, b, other = DigitsTask(seed=5), DigitsTask(seed=5), DigitsTask(seed=6)
    assert torch.equal(a.shard(2, 4)[0], b.shard(2, 4)[0])
    assert torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.shard(2, 4)[1], other.shard(2, 4)[1])
    torch.manual_seed(0)
    model = a.model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    updates = []
    for _ in range(2):
        model.load_state_dict(state)
        updates.append(a.compute_update(model, a.shard(0, 4), _generator(42)))
        check_update(updates[-1], model.parameters())
    for g1, g2 in zip(updates[0].gradients, updates[1].gradients, strict=True):
        assert torch.equal(g1, g2)
    assert updates[0].num_samples == len(a.shard(0, 4)[1])


def test_digits_iid_shards_are_the_historical_ones() -> None:
    # split=iid must not move: results recorded before fedgrad.partition stay comparable.
    task = DigitsTask(seed=3)
    order = torch.randperm(1347, generator=torch.Generator().manual_seed(3))
    for i, idx in enumerate(torch.tensor_split(order, 5)):
        x, y = task.shard(i, 5)
        assert torch.equal(x, task.x_train[idx]) and torch.equal(y, task.y_train[idx])


@pytest.mark.parametrize(
    "options",
    [{"classes_per_node": "2"}, {"classes_per_node": "3"}, {"dirichlet": "0.1"},
     {"dirichlet": "1000"}, {"split": "iid", "dirichlet": "0.5"}],
)  # fmt: skip
@pytest.mark.parametrize("count", [5, 8])
def test_digits_non_iid_options_partition_train_split(options: dict[str, str], count: int) -> None:
    task = load_task("digits", options, seed=2)
    shards = [task.shard(i, count) for i in range(count)]
    assert all(len(y) >= 1 for _, y in shards)
    x = torch.cat([s[0] for s in shards])
    y = torch.cat([s[1] for s in shards])
    assert _rows(x, y) == _rows(task.x_train, task.y_train)
    again = load_task("digits", options, seed=2).shard(1, count)
    assert torch.equal(again[1], shards[1][1])
    other_seed = load_task("digits", options, seed=3).shard(1, count)
    assert not torch.equal(other_seed[1], shards[1][1])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_digits_classes_per_node(k: int) -> None:
    task = DigitsTask(seed=0, classes_per_node=str(k))
    assert task.classes_per_node == k and task.dirichlet is None
    count = 10
    seen = [len(task.shard(i, count)[1].unique()) for i in range(count)]
    assert max(seen) <= k, seen
    if k == 1:
        assert seen == [1] * count


def test_digits_dirichlet_skew_follows_alpha() -> None:
    def largest_class_share(alpha: str) -> float:
        task = DigitsTask(seed=0, dirichlet=alpha)
        assert task.dirichlet == float(alpha) and task.classes_per_node is None
        shares = []
        for i in range(8):
            y = task.shard(i, 8)[1]
            shares.append(float(torch.bincount(y, minlength=10).max()) / len(y))
        return sum(shares) / len(shares)

    # Uniform mix: ~0.1 per class; alpha 0.1 makes one class dominate each node.
    assert largest_class_share("1000") < 0.15
    assert largest_class_share("0.1") > 0.4


@pytest.mark.parametrize(
    "options",
    [{"split": "non-iid", "classes_per_node": "2"}, {"split": "non-iid", "dirichlet": "0.5"},
     {"classes_per_node": "2", "dirichlet": "0.5"}],
)  # fmt: skip
def test_digits_split_options_are_mutually_exclusive(options: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="mutually exclusive") as info:
        load_task("digits", options)
    for key, value in options.items():
        assert f"{key}={value}" in str(info.value)


@pytest.mark.parametrize(
    ("options", "key"),
    [({"classes_per_node": "0"}, "classes_per_node"), ({"classes_per_node": "1.5"}, "classes_per_node"),
     ({"dirichlet": "0"}, "dirichlet"), ({"dirichlet": "-0.5"}, "dirichlet"),
     ({"dirichlet": "inf"}, "dirichlet"), ({"dirichlet": "x"}, "dirichlet")],
)  # fmt: skip
def test_digits_bad_split_values(options: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"bad value {key}="):
        load_task("digits", options)


def test_digits_classes_per_node_needs_enough_shards() -> None:
    task = DigitsTask(classes_per_node="2")
    task.shard(0, 5)  # 5 x 2 = 10 shards: one class each
    with pytest.raises(ConfigError, match=r"cannot cover 10 classes.*k >= 3"):
        task.shard(0, 4)


def test_digits_fedavg_converges_iid() -> None:
    history = simulate(DigitsTask(seed=0), nodes=4, rounds=15)
    accuracy = [m["accuracy"] for m in history]
    assert accuracy[-1] >= 0.95, accuracy
    assert history[-1]["loss"] < history[0]["loss"]


def test_digits_fedavg_learns_non_iid() -> None:
    history = simulate(DigitsTask(seed=0, split="non-iid"), nodes=4, rounds=20)
    # Measured ~0.90; each node sees only 2-3 classes, so FedAvg drifts.
    assert history[-1]["accuracy"] >= 0.85, [m["accuracy"] for m in history]


# -- linear --------------------------------------------------------------------


def _mse_gradient(model: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Return d/dtheta mean((x w^T + b - y)^2), computed in closed form."""
    residual = (x @ model.weight.detach().T + model.bias.detach() - y) * (2 / len(y))
    return [residual.T @ x, residual.sum(0)]


@pytest.mark.parametrize(("samples", "count"), [(1024, 4), (1003, 4), (10, 10), (7, 3)])
def test_linear_weighted_mean_is_full_gradient(samples: int, count: int) -> None:
    task = load_task("linear", {"samples": str(samples), "features": "5"}, seed=3)
    assert isinstance(task, LinearTask)
    torch.manual_seed(0)
    model = task.model()
    shards = [task.shard(i, count) for i in range(count)]
    assert [len(x) for x, _ in shards] == [
        len(t) for t in torch.arange(samples).tensor_split(count)
    ]
    x_all, y_all = task.full_data()
    assert torch.equal(torch.cat([x for x, _ in shards]), x_all)
    assert torch.equal(torch.cat([y for _, y in shards]), y_all)
    updates = [task.compute_update(model, s, _generator(i)) for i, s in enumerate(shards)]
    for update in updates:
        check_update(update, model.parameters())
        assert update.gradients[0].dtype == torch.float64
    expected = _mse_gradient(model, x_all, y_all)
    for got, want in zip(_weighted_mean(updates), expected, strict=True):
        # float64 summation-order differences only.
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_linear_fedsgd_matches_full_batch_gd() -> None:
    task = LinearTask(seed=0, samples="1001")
    history = simulate(task, nodes=4, rounds=60)
    torch.manual_seed(0)
    reference = task.model()
    x, y = task.full_data()
    for _ in range(60):
        with torch.no_grad():
            for p, g in zip(reference.parameters(), _mse_gradient(reference, x, y), strict=True):
                p -= task.lr * g
    assert history[-1]["loss"] == pytest.approx(task.evaluate(reference)["loss"], rel=1e-9)
    # Converged to the noise floor (noise std 0.1).
    assert history[-1]["loss"] < 0.02 < history[0]["loss"]


def test_linear_deterministic() -> None:
    a, b = LinearTask(seed=9, noise="0.5"), LinearTask(seed=9, noise="0.5")
    assert torch.equal(a.full_data()[1], b.full_data()[1])
    assert not torch.equal(a.full_data()[1], LinearTask(seed=10).full_data()[1])


# -- synthetic -----------------------------------------------------------------


def test_synthetic_layout_and_names() -> None:
    task = SyntheticTask(params="1003", tensors="4")
    model = task.model()
    names = [f"w.{i}" for i in range(4)]
    assert list(model.state_dict()) == names
    assert [n for n, _ in model.named_parameters()] == names
    assert [p.numel() for p in model.parameters()] == [251, 251, 251, 250]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_synthetic_zero_size_tensors() -> None:
    task = SyntheticTask(params="3", tensors="5")
    model = task.model()
    assert [p.numel() for p in model.parameters()] == [1, 1, 1, 0, 0]
    update = task.compute_update(model, task.shard(0, 1), _generator(0))
    check_update(update, model.parameters())
    assert [g.numel() for g in update.gradients] == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_synthetic_update_shapes_dtypes_finite(dtype: str) -> None:
    task = load_task("synthetic", {"params": "10k", "tensors": "7", "dtype": dtype})
    model = task.model()
    assert all(p.dtype == getattr(torch, dtype) for p in model.parameters())
    update = task.compute_update(model, task.shard(2, 4), _generator(0))
    check_update(update, model.parameters())
    assert all(torch.isfinite(g).all() for g in update.gradients)
    assert update.num_samples == 102
    assert isinstance(update.metrics["loss"], float)
    assert task.evaluate(model) is None


def test_synthetic_gradients_deterministic_and_varied() -> None:
    def grads(task: SyntheticTask, shard: int, seed: int) -> torch.Tensor:
        update = task.compute_update(task.model(), task.shard(shard, 4), _generator(seed))
        return torch.cat(update.gradients)

    task = SyntheticTask(seed=1, params="1000", tensors="3")
    model = task.model()
    update = task.compute_update(model, task.shard(0, 4), _generator(7))
    first = torch.cat(update.gradients)
    for g in update.gradients:
        g.add_(1.0)  # the caller owns the result; the cached base must not change
    assert torch.equal(grads(task, 0, seed=7), first)
    # A fresh task, even after other calls, gives the same gradients.
    fresh = SyntheticTask(seed=1, params="1000", tensors="3")
    grads(fresh, 0, seed=3)
    assert torch.equal(grads(fresh, 0, seed=7), first)
    assert not torch.equal(grads(task, 0, seed=8), grads(task, 0, seed=7))
    assert not torch.allclose(
        grads(task, 1, 7) / grads(task, 1, 7).norm(), grads(task, 0, 7) / grads(task, 0, 7).norm()
    )
    other_seed = SyntheticTask(seed=2, params="1000", tensors="3")
    assert not torch.equal(grads(other_seed, 0, 7), grads(task, 0, 7))


def test_synthetic_is_cheap(monkeypatch: pytest.MonkeyPatch) -> None:
    task = load_task("synthetic", {"params": "50M"})
    rng = torch.get_rng_state()
    start = time.perf_counter()
    model = task.model()
    # Generous: a fill takes ~0.05 s; the bound only catches per-element Python work.
    assert time.perf_counter() - start < 2.0
    assert torch.equal(torch.get_rng_state(), rng), "model() must not draw random numbers"
    assert sum(p.numel() for p in model.parameters()) == 50_000_000
    del model

    small = SyntheticTask(params="1000", tensors="4")
    calls = []
    real_randn = torch.randn

    def counting_randn(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(args)
        return real_randn(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(torch, "randn", counting_randn)
    model = small.model()
    for r in range(3):
        small.compute_update(model, small.shard(0, 2), _generator(r))
    assert len(calls) == 4, "the base is drawn once per shard, not per round"


def test_digits_unbalanced_split_covers_the_training_set_in_unequal_parts() -> None:
    from fedgrad.errors import ConfigError as _ConfigError
    from fedgrad.task import load_task as _load

    task = _load("digits", {"unbalanced": "1.0"}, seed=3)
    sizes = [len(task.shard(i, 4)[1]) for i in range(4)]
    assert sum(sizes) == len(task.y_train) and len(set(sizes)) > 1
    assert sizes == [
        len(_load("digits", {"unbalanced": "1.0"}, seed=3).shard(i, 4)[1]) for i in range(4)
    ]
    with pytest.raises(_ConfigError, match="mutually exclusive"):
        _load("digits", {"unbalanced": "1.0", "dirichlet": "0.5"})
