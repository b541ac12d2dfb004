"""Buffers (BatchNorm statistics) through real gRPC: averaged and broadcast, or kept on the
nodes (``--buffers local``), against a plain-torch reference; saved and resumed; bad
buffers refused."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from torch import nn

from fedgrad import LocalCluster, Task
from fedgrad.buffers import model_buffers, pack
from fedgrad.config import AggregatorConfig
from fedgrad.seeding import round_generator
from fedgrad.server.model import ServerModel
from fedgrad.server.resume import read_checkpoint, write_checkpoint
from fedgrad.task import trainable_parameters

SEED = 4


class BatchNormTask(Task):
    """A tiny regression MLP with BatchNorm1d; each shard's inputs are shifted differently,
    so the nodes' running statistics differ."""

    lr = 1.0  # FedAvg: the aggregator applies the mean pseudo-gradient
    local_steps = 3
    local_lr = 0.05
    batch_size = 16

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

    def shard(self, index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(100 + index)
        x = torch.randn(32 + 8 * index, 4, generator=gen) + index
        return x, x.sum(dim=1, keepdim=True)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x), y)


def _reference(rounds: int, nodes: int, local: bool) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """FedAvg by hand: buffers averaged by num_samples (num_batches_tracked: the largest)
    and loaded with the parameters, or (local) kept by each node."""
    task = BatchNormTask()
    torch.manual_seed(SEED)
    server = task.model()
    torch.manual_seed(SEED)
    models = [copy.deepcopy(task.model()) for _ in range(nodes)]
    params = [p for _, p in trainable_parameters(server)]
    opt = torch.optim.SGD(params, lr=task.lr)
    for r in range(rounds):
        sums = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
        buffers: list[list[torch.Tensor]] = []
        total = 0
        for i, model in enumerate(models):
            with torch.no_grad():
                for mine, theirs in zip(params, trainable_parameters(model), strict=True):
                    theirs[1].copy_(mine)
                if not local:
                    for (_, b), (_, s) in zip(
                        model_buffers(model), model_buffers(server), strict=True
                    ):
                        b.copy_(s)
            update = task.compute_update(
                model, task.shard(i, nodes), round_generator(SEED, f"node-{i}", r)
            )
            total += update.num_samples
            for s, g in zip(sums, update.gradients, strict=True):
                s += update.num_samples * g.double()
            buffers.append([b.detach().clone() for _, b in model_buffers(model)])
        for p, s in zip(params, sums, strict=True):
            p.grad = (s / total).to(p.dtype)
        opt.step()
        if not local:
            weights = [task.num_samples(task.shard(i, nodes)) for i in range(nodes)]
            with torch.no_grad():
                for k, (_, b) in enumerate(model_buffers(server)):
                    if b.dtype == torch.int64:
                        b.copy_(max(node[k] for node in buffers))
                    else:
                        mean = (
                            sum(
                                w * node[k].double()
                                for w, node in zip(weights, buffers, strict=True)
                            )
                            / total
                        )
                        b.copy_(mean.to(b.dtype))
    return {k: v.detach() for k, v in server.state_dict().items()}, models


@pytest.mark.parametrize("mode", ["shared", "local"])
def test_buffers_are_averaged_or_kept_local_as_the_reference(mode: str) -> None:
    rounds, nodes = 4, 3
    with LocalCluster(BatchNormTask(), nodes=nodes, seed=SEED, buffers=mode, timeout=60) as cluster:
        got = cluster.run(rounds=rounds).params
    want, _ = _reference(rounds, nodes, local=mode == "local")
    assert set(got) == set(want) and "1.running_mean" in got
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-7, msg=name)
    initial = BatchNormTask().model().state_dict()
    moved = not torch.equal(got["1.running_mean"], initial["1.running_mean"])
    assert moved is (mode == "shared"), "the aggregator's statistics move only when shared"
    if mode == "shared":
        assert int(got["1.num_batches_tracked"]) == rounds * BatchNormTask.local_steps


def test_a_checkpoint_holds_the_buffers(tmp_path: Path) -> None:
    cfg = AggregatorConfig(checkpoint_dir=str(tmp_path / "ckpt"))
    model = ServerModel(BatchNormTask(), cfg)
    with torch.no_grad():
        for _, b in model_buffers(model.module):
            b.add_(3)
    write_checkpoint(cfg, 1, model, [], "s", [])
    fresh = ServerModel(BatchNormTask(), cfg)
    assert read_checkpoint(cfg, fresh) is not None
    for (name, a), (_, b) in zip(
        model_buffers(model.module), model_buffers(fresh.module), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("buffers", "words"),
    [
        (lambda good: good[:-4], "bytes of buffers, the buffer manifest needs"),
        (lambda good: b"\x00\x00\xc0\x7f" + good[4:], "holds a NaN or infinite value"),
    ],
    ids=["short", "nan"],
)
def test_bad_buffers_are_refused_and_leave_no_trace(
    serve, hand_node, buffers: Any, words: str
) -> None:
    served = serve(BatchNormTask(), nodes=1, rounds=1)
    node = hand_node(served, "node-0", num_samples=10)
    good = pack([b for _, b in model_buffers(BatchNormTask().model())])
    grads = [torch.zeros(p.shape) for _, p in trainable_parameters(BatchNormTask().model())]
    with pytest.raises(grpc.RpcError) as info:
        node.push(0, grads, buffers=buffers(good))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.details()
    assert node.push(0, grads, buffers=good).round == 0  # the same round, still open
