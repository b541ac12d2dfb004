"""The aggregator's optimizer by name with its arguments, lr schedules and global-norm
clipping, through real gRPC, against the same training written in plain torch: bitwise
equal (two nodes: the float64 sum of their exact products rounds once, as here)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedgrad import LocalCluster
from fedgrad.optimizers import build_schedule
from fedgrad.seeding import round_generator
from fedgrad.task import load_task, trainable_parameters

SEED = 2
ARGS = {"local_steps": "0"}  # FedSGD: the aggregator's optimizer does all the training


def _plain_torch(
    rounds: int,
    nodes: int,
    optimizer: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    lr: float,
    schedule: str | None,
    clip: float | None,
) -> dict[str, torch.Tensor]:
    """FedSGD on digits in plain torch: the weighted mean gradient, clip_grad_norm_, step."""
    task = load_task("digits", ARGS, seed=SEED)
    torch.manual_seed(SEED)
    model = task.model()
    params = [p for _, p in trainable_parameters(model)]
    opt = optimizer(params, lr=lr, **kwargs)
    sched = build_schedule(opt, schedule, rounds) if schedule else None
    for r in range(rounds):
        sums = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
        total = 0
        for i in range(nodes):
            gen = round_generator(SEED, f"node-{i}", r)
            update = task.compute_update(model, task.shard(i, nodes), gen)
            total += update.num_samples
            for s, g in zip(sums, update.gradients, strict=True):
                s += update.num_samples * g.to(torch.float64)
        for p, s in zip(params, sums, strict=True):
            p.grad = (s / total).to(p.dtype)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


CASES = {
    "adamw with arguments": (
        {"optimizer": "adamw", "optimizer_args": (("weight_decay", "0.01"), ("betas", "0.9,0.99"))},
        torch.optim.AdamW,
        {"weight_decay": 0.01, "betas": (0.9, 0.99)},
    ),
    "rmsprop, cosine": (
        {"optimizer": "rmsprop", "lr_schedule": "cosine"},
        torch.optim.RMSprop,
        {},
    ),
    "sgd, step schedule, clipped": (
        {"optimizer": "sgd", "lr_schedule": "step:2,0.5", "clip_grad_norm": 0.05},
        torch.optim.SGD,
        {},
    ),
    "momentum, warmup+cosine, clipped": (
        {"optimizer": "momentum", "lr_schedule": "warmup:2+cosine", "clip_grad_norm": 0.1},
        torch.optim.SGD,
        {"momentum": 0.9},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_optimizers_schedules_and_clipping_match_plain_torch(case: str) -> None:
    options, cls, kwargs = CASES[case]
    rounds, nodes, lr = 5, 2, 0.05
    with LocalCluster(
        "digits", nodes=nodes, task_args=ARGS, seed=SEED, lr=lr, timeout=120, **options
    ) as cluster:
        got = cluster.run(rounds=rounds).params
    want = _plain_torch(
        rounds, nodes, cls, kwargs, lr, options.get("lr_schedule"), options.get("clip_grad_norm")
    )
    for name, value in want.items():
        assert torch.equal(got[name], value), f"{name} differs from plain torch"
