"""Process tuning of the CLI commands (fedgrad.launch.tuning)."""

from __future__ import annotations

import gc
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedgrad.launch.tuning import freeze_startup_objects, limit_malloc_arenas, pin_mmap_threshold
from fedgrad.optimizers import OPTIMIZER_NAMES, eager_step


def test_arena_cap_leaves_an_operators_setting_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


def test_arena_cap_applies_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    on_glibc = platform.libc_ver()[0] == "glibc"
    # Capping this test process's arenas at 8 (glibc's default for 1 core) changes nothing visible.
    assert limit_malloc_arenas(8) is on_glibc


def test_mmap_threshold_leaves_an_operators_setting_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert pin_mmap_threshold() is False


def test_mmap_threshold_applies_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    on_glibc = platform.libc_ver()[0] == "glibc"
    # 32 MiB, glibc's own ceiling for the dynamic threshold: nothing visible changes.
    assert pin_mmap_threshold(32 << 20) is on_glibc


def test_freeze_moves_live_objects_out_of_the_collectors_sight() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


# Builds, steps, schedules, saves and reloads every offered optimizer; prints whether
# torch._dynamo was imported and writes the final parameters to argv[2].
_EVERY_OPTIMIZER = """
import sys
import torch
from fedgrad.launch.tuning import eager_optimizers
from fedgrad.optimizers import OPTIMIZER_NAMES, build_optimizer, build_schedule, eager_step
eager = sys.argv[1] == "eager"
if eager:
    eager_optimizers()
final = {}
for name in OPTIMIZER_NAMES:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(3, 4))]
    opt = build_optimizer(name, (), params, 0.01)
    schedule = build_schedule(opt, "warmup:2+cosine", 5)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        eager_step(opt) if eager else opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
    opt.load_state_dict(opt.state_dict())
    final[name] = torch.cat([p.detach().flatten() for p in params])
torch.save(final, sys.argv[2])
print("torch._dynamo" in sys.modules)
"""


def test_eager_optimizers_step_bitwise_as_torch_does_without_torch_dynamo(
    tmp_path: Path,
) -> None:
    runs = {}
    for mode in ("eager", "torch"):
        out = subprocess.run(
            [sys.executable, "-W", "error::UserWarning", "-c", _EVERY_OPTIMIZER, mode,
             str(tmp_path / f"{mode}.pt")],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        runs[mode] = out.stdout.split()[-1]
    assert runs == {"eager": "False", "torch": "True"}  # the plain run does import it
    eager = torch.load(tmp_path / "eager.pt", weights_only=True)
    plain = torch.load(tmp_path / "torch.pt", weights_only=True)
    assert set(eager) == set(OPTIMIZER_NAMES)
    for name in OPTIMIZER_NAMES:
        assert torch.equal(eager[name], plain[name]), name


def test_eager_step_takes_the_plain_step_when_a_hook_is_registered() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.5)
    seen = []
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(o))
    p.grad = torch.ones(3)
    eager_step(opt)
    assert seen == [opt]
    assert torch.equal(p.detach(), torch.full((3,), 0.5))
