"""The aggregator's optimizer by name with its arguments, lr schedules and global-norm
clipping, through real gRPC, against the same training written in plain torch: bitwise
equal (two nodes: the float64 sum of their exact products rounds once, as here)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedgrad import LocalCluster, RoundContext, Task, Update
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


class ContextTask(Task):
    """Its gradient is the round context: round + config["shift"] + total_rounds / 100."""

    lr = 1.0

    def model(self) -> torch.nn.Module:
        module = torch.nn.Module()
        module.register_parameter("w", torch.nn.Parameter(torch.zeros(1, dtype=torch.float64)))
        return module

    def shard(self, index: int, count: int) -> object:
        return index

    def num_samples(self, data: object) -> int:
        return 1

    def loss(self, model: torch.nn.Module, batch: object) -> torch.Tensor:
        raise NotImplementedError

    def round_config(self, round_: int, total_rounds: int) -> dict[str, str]:
        return {"shift": str(10 * round_)}  # a schedule computed on the aggregator

    def compute_update(
        self,
        model: torch.nn.Module,
        data: object,
        generator: torch.Generator,
        context: RoundContext | None = None,
    ) -> Update:
        assert context is not None and context is self.context
        value = context.round + float(context.config["shift"]) + context.total_rounds / 100
        assert context.config["tag"] == "static"
        return Update([torch.full((1,), value, dtype=torch.float64)], 1)


def test_compute_update_gets_the_round_context_the_aggregator_sends() -> None:
    rounds = 4
    with LocalCluster(
        ContextTask(), nodes=2, seed=SEED, round_config=(("tag", "static"),), timeout=60
    ) as cluster:
        result = cluster.run(rounds=rounds)
    # Each round's mean gradient is 11 r + 0.04; SGD at lr 1 sums them with a minus sign.
    want = -sum(11 * r + rounds / 100 for r in range(rounds))
    assert float(result.params["w"]) == pytest.approx(want, abs=1e-12)


def test_the_built_in_training_honours_local_lr_from_the_round_config() -> None:
    with LocalCluster("digits", nodes=2, seed=SEED, round_config=(("local_lr", "0"),)) as cluster:
        frozen = cluster.run(rounds=2)
    torch.manual_seed(SEED)
    initial = load_task("digits", {}, seed=SEED).model().state_dict()
    for name, value in initial.items():
        assert torch.equal(frozen.params[name], value), "local_lr 0 moves nothing"
