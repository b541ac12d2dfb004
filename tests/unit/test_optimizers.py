"""Optimizers by name, their arguments and schedules: what builds, what is refused and
how it says so, and a checkpoint that resumes optimizer and schedule bitwise."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedgrad.codec import byte_view, iter_chunks
from fedgrad.codecs import CastCodec
from fedgrad.config import AggregatorConfig
from fedgrad.errors import ConfigError
from fedgrad.optimizers import (
    OPTIMIZER_NAMES,
    build_optimizer,
    build_schedule,
    check_optimizer,
    check_schedule,
)
from fedgrad.server.model import ServerModel
from fedgrad.server.reducers import make_reducer
from fedgrad.server.resume import read_checkpoint, write_checkpoint
from fedgrad.server.staging import StagedUpload
from fedgrad.task import Task


def test_every_offered_optimizer_builds_and_steps() -> None:
    assert {"sgd", "momentum", "adam", "adamw", "rmsprop", "adagrad", "nadam"} <= set(
        OPTIMIZER_NAMES
    )
    assert "lbfgs" not in OPTIMIZER_NAMES and "sparseadam" not in OPTIMIZER_NAMES
    for name in OPTIMIZER_NAMES:
        p = torch.nn.Parameter(torch.ones(3))
        opt = build_optimizer(name, (), [p], 0.1)
        p.grad = torch.ones(3)
        opt.step()
        assert not torch.equal(p.detach(), torch.ones(3)), name


def test_arguments_are_parsed_into_the_constructor() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer(
        "AdamW", (("weight_decay", "0.5"), ("betas", "0.8,0.9"), ("amsgrad", "true")), [p], 0.1
    )
    group = opt.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["amsgrad"]) == (0.5, (0.8, 0.9), True)
    momentum = build_optimizer("momentum", (), [p], 0.1)
    assert isinstance(momentum, torch.optim.SGD) and momentum.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize(
    ("name", "args", "words"),
    [
        ("adamx", (), "optimizer must be one of momentum, adadelta"),
        ("lbfgs", (), "optimizer must be one of"),
        ("adam", (("momentum", "0.9"),), "'momentum' must be one that Adam takes: betas, eps"),
        ("adam", (("lr", "0.1"),), "the learning rate is --lr"),
        ("sgd", (("momentum", "fast"),), "must be a number, true/false"),
        ("sgd", (("momentum", "-1"),), "must accept its arguments: Invalid momentum value"),
    ],
)
def test_unknown_optimizers_and_arguments_say_what_is_valid(
    name: str, args: tuple[tuple[str, str], ...], words: str
) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        check_optimizer(name, args)


@pytest.mark.parametrize(
    "text",
    ["linear", "step:2", "step:0,0.5", "step:2,1.5", "warmup:0", "cosine+warmup:2", "warmup:1.5"],
)
def test_bad_schedules_are_refused_with_the_forms(text: str) -> None:
    with pytest.raises(ConfigError, match="lr schedule must"):
        check_schedule(text)


def test_schedules_are_torch_schedulers_stepped_per_round() -> None:
    def lrs(text: str, rounds: int) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
        sched = build_schedule(opt, text, rounds)
        out = []
        for _ in range(rounds):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs("step:2,0.5", 6) == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert lrs("warmup:4", 6) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    cosine = lrs("cosine", 5)
    assert cosine[0] == 1.0 and all(a > b for a, b in zip(cosine, cosine[1:], strict=False))
    both = lrs("warmup:2+cosine", 6)
    assert both[:3] == pytest.approx([0.5, 1.0, 1.0]) and both[3] < 1.0  # cosine from round 2


def test_the_cli_config_refuses_them_before_anything_starts() -> None:
    with pytest.raises(ConfigError, match="optimizer: optimizer must be one of"):
        AggregatorConfig(optimizer="adamx")
    with pytest.raises(ConfigError, match="optimizer_args: optimizer argument 'momentum'"):
        AggregatorConfig(optimizer="adam", optimizer_args=(("momentum", "0.9"),))
    with pytest.raises(ConfigError, match="lr_schedule: lr schedule must be one of cosine"):
        AggregatorConfig(lr_schedule="exp")
    with pytest.raises(ConfigError, match="clip_grad_norm must be a finite number > 0"):
        AggregatorConfig(clip_grad_norm=0.0)


class Bag(Task):
    lr = 0.1

    def model(self) -> torch.nn.Module:
        module = torch.nn.Module()
        module.register_parameter("a", torch.nn.Parameter(torch.linspace(-1, 1, 12)))
        module.register_parameter("b", torch.nn.Parameter(torch.ones(2, 3)))
        return module

    def shard(self, index: int, count: int) -> object:
        return None

    def loss(self, model: torch.nn.Module, batch: object) -> torch.Tensor:
        raise NotImplementedError


def _step(model: ServerModel, round_: int) -> None:
    reducer = make_reducer("weighted-mean", model.layout, "float64", 1)
    gen = torch.Generator().manual_seed(round_)
    grads = [torch.randn(p.shape, generator=gen) for p in model.params]
    staged = StagedUpload(CastCodec(model.layout.specs), 1 << 20)
    for tensor, offset, data in iter_chunks([byte_view(g) for g in grads], model.layout, 1 << 20):
        staged.add(tensor, offset, data)
    reducer.add(staged, 1)
    model.step(reducer)


@pytest.mark.parametrize("schedule", ["warmup:2+cosine", "step:1,0.7"])
def test_a_checkpoint_resumes_optimizer_schedule_and_clipping_bitwise(
    tmp_path: Path, schedule: str
) -> None:
    cfg = AggregatorConfig(
        optimizer="adamw",
        optimizer_args=(("weight_decay", "0.1"),),
        lr_schedule=schedule,
        clip_grad_norm=1.0,
        rounds=6,
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    straight = ServerModel(Bag(), cfg)
    for r in range(6):
        _step(straight, r)
    first = ServerModel(Bag(), cfg)
    for r in range(3):
        _step(first, r)
    write_checkpoint(cfg, 3, first, [], "session", [])
    resumed = ServerModel(Bag(), cfg)
    assert read_checkpoint(cfg, resumed) is not None
    for r in range(3, 6):
        _step(resumed, r)
    for a, b in zip(straight.params, resumed.params, strict=True):
        assert torch.equal(a, b)
    assert straight.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]
    other = ServerModel(Bag(), replace(cfg, lr_schedule="cosine"))
    with pytest.raises(ConfigError, match="written with --lr-schedule"):
        read_checkpoint(replace(cfg, lr_schedule="cosine"), other)
