"""Training over real gRPC on 127.0.0.1: exactness, reductions, optimizers, determinism, history.

Every numeric check compares with a reference computed here in plain torch from
the same seeds; each test states its tolerance. Servers are real aggregators on
port 0 (``LocalCluster`` or the ``serve`` fixture with nodes driven by hand).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from fedgrad import LocalCluster
from fedgrad.codec import TensorSpec
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.server import model as server_model
from fedgrad.task import load_task
from fedgrad.tasks.linear import LinearTask

SEED = 3
ROUNDS = 4
#: 1001 is odd and not divisible by 4: the shards of 2 and 4 nodes are uneven.
LINEAR_ARGS = {"samples": "1001", "features": "6"}
#: float64 model, one full-shard gradient per node: the weighted mean equals the
#: full-batch gradient up to float64 rounding of the sums (~1e-16 relative per
#: round), so after a few rounds parameters agree to far better than this.
EXACT_RTOL, EXACT_ATOL = 1e-10, 1e-12


def _full_batch_descent(task: LinearTask, seed: int, lr: float, rounds: int):
    """Plain full-batch gradient descent, initialised like the aggregator."""
    torch.manual_seed(seed)
    model = task.model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(rounds):
        opt.zero_grad()
        loss = task.loss(model, task.full_data())
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {k: v.detach() for k, v in model.state_dict().items()}, losses


# -- (1) exactness --------------------------------------------------------------------------------
@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_weighted_mean_equals_full_batch_gradient_descent(nodes: int) -> None:
    with LocalCluster(
        "linear", nodes=nodes, task_args=LINEAR_ARGS, seed=SEED, reduce="weighted-mean"
    ) as cluster:
        result = cluster.run(rounds=ROUNDS)
    task = LinearTask(seed=SEED, **LINEAR_ARGS)
    want, losses = _full_batch_descent(task, SEED, task.lr, ROUNDS)
    assert set(result.params) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(result.params[name], value, rtol=EXACT_RTOL, atol=EXACT_ATOL)
    # The history's train loss is the sample-weighted mean of the shard losses: the
    # full-batch loss before each step.
    got = [r.train_loss for r in result.history]
    assert got == pytest.approx(losses, rel=EXACT_RTOL)
    # (5) one record per round
    assert [r.round for r in result.history] == list(range(ROUNDS))
    assert all(r.nodes == nodes and r.bytes > 0 for r in result.history)
    assert all(math.isfinite(r.test_loss) for r in result.history)
    assert len(result.nodes) == nodes and all(n.uploads == ROUNDS for n in result.nodes)


# -- (2) reductions, (3) optimizers: nodes driven by hand -----------------------------------------
def _seeded_gradients(specs: Sequence[TensorSpec], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype) for s in specs]


def _reduce(grads, samples: Sequence[int], reduce: str) -> list[torch.Tensor]:
    """The reference reduction, in float64."""
    weights = list(samples) if reduce == "weighted-mean" else [1] * len(samples)
    divisor = {"sum": 1.0, "mean": float(len(samples)), "weighted-mean": float(sum(samples))}
    out = []
    for parts in zip(*grads, strict=True):
        total = sum(w * g.to(torch.float64) for w, g in zip(weights, parts, strict=True))
        out.append(total / divisor[reduce])
    return out


@pytest.mark.parametrize("reduce", ["sum", "mean", "weighted-mean"])
def test_step_applies_the_reduced_node_gradients(serve, hand_node, reduce: str) -> None:
    lr, samples = 0.05, (10, 20, 70)
    task = load_task("linear", {"features": "5"}, seed=1)
    served = serve(task, nodes=3, rounds=1, reduce=reduce, lr=lr, seed=SEED)
    nodes = [hand_node(served, f"n{i}", num_samples=n) for i, n in enumerate(samples)]
    reduction = {"sum": pb.SUM, "mean": pb.MEAN, "weighted-mean": pb.WEIGHTED_MEAN}[reduce]
    assert nodes[0].reply.reduction == reduction
    header, theta0 = nodes[0].pull(0)
    assert header.round == 0 and not header.finished
    torch.manual_seed(SEED)
    init = [p.detach() for p in task.model().parameters()]
    assert all(torch.equal(a, b) for a, b in zip(theta0, init, strict=True))

    grads = [_seeded_gradients(nodes[0].specs, 100 + i) for i in range(3)]
    for node, g in zip(nodes, grads, strict=True):
        reply = node.push(0, g, metrics={"loss": 1.0})
        assert reply.round == 0 and not reply.duplicate
    header, theta1 = nodes[1].pull(1)
    assert header.round == 1 and header.finished
    # theta1 = theta0 - lr * sum_i w_i g_i (float64 model: rounding of a few ulps only).
    for got, t0, g in zip(theta1, theta0, _reduce(grads, samples, reduce), strict=True):
        torch.testing.assert_close(got, t0 - lr * g, rtol=1e-12, atol=1e-15)


def _reference_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    # The aggregator's "momentum" is torch SGD with momentum 0.9 (fedgrad.server.aggregator).
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


#: Tolerances of the optimizer comparison: float64 model (linear) and float32 (synthetic).
OPT_TOL = {torch.float64: (1e-12, 1e-14), torch.float32: (1e-6, 1e-7)}


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize(
    ("task_name", "task_args", "options"),
    [
        ("linear", {"features": "4"}, {}),
        ("synthetic", {"params": "3000", "tensors": "3"}, {}),
        # One tensor per optimizer step (as for models larger than STEP_BATCH_BYTES).
        ("synthetic", {"params": "3000", "tensors": "3"}, {"step_batch_bytes": 1}),
        ("synthetic", {"params": "3000", "tensors": "3"}, {"accumulate": "float32"}),
    ],
    ids=["float64", "float32", "float32-step-per-tensor", "float32-accumulate-float32"],
)
def test_optimizer_step_matches_plain_torch(
    serve,
    hand_node,
    monkeypatch: pytest.MonkeyPatch,
    optimizer: str,
    task_name: str,
    task_args: dict[str, str],
    options: dict[str, Any],
) -> None:
    rounds, lr, samples = 3, 0.01, (30, 70)
    task = load_task(task_name, task_args, seed=0)
    options = dict(options)
    if "step_batch_bytes" in options:
        monkeypatch.setattr(server_model, "STEP_BATCH_BYTES", options.pop("step_batch_bytes"))
    served = serve(task, nodes=2, rounds=rounds, optimizer=optimizer, lr=lr, seed=SEED, **options)
    if options.get("accumulate") == "float32":
        assert served.core.reducer.sum.total.dtype == np.float32
    if server_model.STEP_BATCH_BYTES == 1:
        assert len(served.core.model.step_batches) == 3
    nodes = [hand_node(served, f"n{i}", num_samples=n) for i, n in enumerate(samples)]

    torch.manual_seed(SEED)
    model = task.model()
    params = [p for p in model.parameters() if p.requires_grad]
    reference = _reference_optimizer(optimizer, params, lr)
    rtol, atol = OPT_TOL[params[0].dtype]
    for r in range(rounds):
        grads = [_seeded_gradients(nodes[0].specs, 1000 * r + i) for i in range(2)]
        for node, g in zip(nodes, grads, strict=True):
            node.push(r, g)
        for p, g in zip(params, _reduce(grads, samples, "weighted-mean"), strict=True):
            p.grad = g.to(p.dtype)
        reference.step()
        header, got = nodes[0].pull(r + 1)
        assert header.round == r + 1
        for a, b in zip(got, params, strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=rtol, atol=atol)


# -- (4) determinism ------------------------------------------------------------------------------
PERMUTATIONS = [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1), (1, 3, 0, 2)]


def _run_in_order(serve, hand_node, dtype: str, order: Sequence[int]) -> list[torch.Tensor]:
    task = load_task("synthetic", {"params": "20000", "tensors": "5", "dtype": dtype}, seed=0)
    served = serve(task, nodes=4, rounds=2, seed=SEED, lr=0.5)
    nodes = [hand_node(served, f"node-{i}", num_samples=100 + 37 * i) for i in range(4)]
    for r in range(2):
        grads = [_seeded_gradients(nodes[0].specs, 7 * r + i) for i in range(4)]
        for i in order:
            nodes[i].push(r, grads[i])
        if r == 0:
            nodes[0].pull(1)  # the round closes after the last reply: wait for it, as nodes do
    header, params = nodes[0].pull(2)
    assert header.finished
    return params


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_arrival_order_does_not_change_the_parameters(serve, hand_node, dtype: str) -> None:
    # DESIGN.md: same seeds give bitwise-equal parameters however the uploads raced.
    first = _run_in_order(serve, hand_node, dtype, PERMUTATIONS[0])
    for order in PERMUTATIONS[1:]:
        params = _run_in_order(serve, hand_node, dtype, order)
        for i, (a, b) in enumerate(zip(params, first, strict=True)):
            differ = int((a != b).sum())
            assert torch.equal(a, b), f"order {order}: {differ} of {a.numel()} differ in w.{i}"


def test_two_digits_runs_with_one_seed_are_bitwise_equal() -> None:
    runs = []
    for _ in range(2):
        with LocalCluster("digits", nodes=3, seed=SEED) as cluster:
            runs.append(cluster.run(rounds=3))
    a, b = runs
    assert a.params.keys() == b.params.keys()
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name]), name
    # (5) history: one record per round, finite loss, accuracy a fraction.
    for result in runs:
        assert [r.round for r in result.history] == [0, 1, 2]
        for record in result.history:
            assert math.isfinite(record.train_loss) and record.train_loss > 0
            assert 0.0 <= record.test_accuracy <= 1.0
            assert math.isfinite(record.test_loss) and record.nodes == 3
    assert [r.train_loss for r in a.history] == [r.train_loss for r in b.history]
    assert [r.test_accuracy for r in a.history] == [r.test_accuracy for r in b.history]


# -- LocalCluster API -----------------------------------------------------------------------------
def test_local_cluster_accepts_aggregator_options() -> None:
    # The docstring promises "**aggregator_options: extra AggregatorConfig fields".
    with LocalCluster("linear", nodes=1, finish_grace=2.0, round_timeout=60.0) as cluster:
        result = cluster.run(rounds=1)
    assert len(result.history) == 1
