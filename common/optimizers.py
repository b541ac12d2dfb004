"""The aggregator's optimizer and learning-rate schedule, by name, from ``torch.optim``.

``--optimizer NAME`` is any element-wise ``torch.optim`` optimizer by its lower-case
class name (``sgd``, ``adam``, ``adamw``, ``rmsprop``, ...) or ``momentum`` (SGD with
momentum 0.9, the older shortcut); ``--optimizer-arg KEY=VALUE`` passes one of its
constructor's arguments (numbers, ``true``/``false``, or comma-separated numbers for a
tuple such as ``betas=0.9,0.99``). ``--lr-schedule`` is a ``torch.optim.lr_scheduler``
stepped once per round: ``cosine`` (CosineAnnealingLR over the run's rounds),
``step:EVERY,GAMMA`` (StepLR), ``warmup:ROUNDS`` (LinearLR from lr / ROUNDS up to lr over
ROUNDS rounds, then constant), or ``warmup:ROUNDS+cosine`` (the two in sequence).

Element-wise means that each parameter's update reads only its own gradient and state,
so the aggregator may step its parameters a batch of tensors at a time (it never holds a
second whole model of gradients) and get the parameters one step over all of them gives.
LBFGS (it needs a closure and the whole gradient), SparseAdam (sparse gradients) and
Muon (2-D parameters only, no biases) are not offered.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim import optimizer as _torch_optimizer

from fedgrad.errors import ConfigError

__all__ = [
    "LR_SCHEDULES",
    "OPTIMIZER_NAMES",
    "build_optimizer",
    "build_schedule",
    "check_optimizer",
    "check_schedule",
    "eager_step",
    "optimizer_class",
]

_EXCLUDED = {"lbfgs", "sparseadam", "muon"}
#: Optimizer names ``--optimizer`` takes, lower case, with ``momentum``.
OPTIMIZER_NAMES: tuple[str, ...] = (
    "momentum",
    *sorted(
        name.lower()
        for name, cls in vars(torch.optim).items()
        if isinstance(cls, type)
        and issubclass(cls, torch.optim.Optimizer)
        and cls is not torch.optim.Optimizer
        and name.lower() not in _EXCLUDED
    ),
)
LR_SCHEDULES = ("cosine", "step:EVERY,GAMMA", "warmup:ROUNDS", "warmup:ROUNDS+cosine")


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """Return the torch.optim class of ``name`` (``momentum`` is SGD).

    Raises:
        ConfigError: not an optimizer ``--optimizer`` offers; the message lists them.
    """
    lower = name.lower()
    if lower not in OPTIMIZER_NAMES:
        raise ConfigError(
            f"optimizer must be one of {', '.join(OPTIMIZER_NAMES)} (torch.optim), got {name!r}"
        )
    if lower == "momentum":
        return torch.optim.SGD
    return next(
        cls
        for key, cls in vars(torch.optim).items()
        if key.lower() == lower and isinstance(cls, type)
    )


def _value(text: str) -> Any:
    lower = text.strip().lower()
    if lower in ("true", "false"):
        return lower == "true"
    if lower in ("none", "null"):
        return None
    if "," in text:
        return tuple(_value(part) for part in text.split(","))
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ConfigError(
            f"optimizer argument value must be a number, true/false or comma-separated"
            f" numbers, got {text!r}"
        ) from None


def _arguments(name: str, args: Sequence[tuple[str, str]]) -> dict[str, Any]:
    cls = optimizer_class(name)
    accepted = [
        p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params", "lr")
    ]
    kwargs: dict[str, Any] = {"momentum": 0.9} if name.lower() == "momentum" else {}
    for key, text in args:
        if key not in accepted:
            raise ConfigError(
                f"optimizer argument {key!r} must be one that {cls.__name__} takes:"
                f" {', '.join(accepted)} (the learning rate is --lr)"
            )
        kwargs[key] = _value(text)
    return kwargs


def check_optimizer(name: str, args: Sequence[tuple[str, str]]) -> None:
    """Raise ConfigError unless ``name`` with ``args`` builds (tried on one tensor)."""
    build_optimizer(name, args, [torch.nn.Parameter(torch.zeros(1))], 0.01)


def build_optimizer(
    name: str, args: Sequence[tuple[str, str]], params: list[torch.nn.Parameter], lr: float
) -> torch.optim.Optimizer:
    """Build the aggregator's optimizer.

    Raises:
        ConfigError: an unknown optimizer, an argument it does not take, or a value it refuses.
    """
    cls = optimizer_class(name)
    kwargs = _arguments(name, args)
    try:
        return cls(params, lr=lr, **kwargs)  # type: ignore[call-arg]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optimizer {cls.__name__} must accept its arguments: {e}") from None


def eager_step(optimizer: torch.optim.Optimizer) -> None:
    """Run ``optimizer.step()`` without importing torch._dynamo, where that is the same.

    torch.optim wraps a built-in optimizer's ``step`` twice: its hooks and profiler label
    (``profile_hook_step``), then its grad mode (``_use_grad_for_differentiable``), whose
    ``torch._dynamo.graph_break()`` imports torch._dynamo on the first call: 68 MB
    resident and 0.9 s here, in an aggregator that never compiles its optimizer.
    With no step hooks registered, this runs the update under that same grad mode and
    tells an lr scheduler the step was taken (the flag ``lr_scheduler`` reads), so the
    parameters and state are bitwise ``optimizer.step()``'s. Any other case (hooks, a
    torch that wraps ``step`` differently) calls ``optimizer.step()``.
    """
    hooked = type(optimizer).step
    grad_mode = getattr(hooked, "__wrapped__", None)
    update = getattr(grad_mode, "__wrapped__", None)
    code = getattr(grad_mode, "__code__", None)
    pre = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
    post = getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
    plain = (
        getattr(hooked, "hooked", False)
        and update is not None
        and code is not None
        and code.co_name == "_use_grad"
        and pre == {}
        and post == {}
        and not optimizer._optimizer_step_pre_hooks
        and not optimizer._optimizer_step_post_hooks
    )
    if not plain or update is None:
        optimizer.step()
        return
    with torch.set_grad_enabled(bool(optimizer.defaults.get("differentiable", False))):
        update(optimizer)
    optimizer._opt_called = True  # type: ignore[attr-defined]


def check_schedule(text: str) -> None:
    """Raise ConfigError unless ``text`` is a schedule ``--lr-schedule`` takes."""
    _parse_schedule(text)


def _parse_schedule(text: str) -> list[tuple[str, tuple[float, ...]]]:
    parts = []
    for part in text.split("+"):
        name, _, params = part.partition(":")
        values: tuple[float, ...] = ()
        try:
            values = tuple(float(v) for v in params.split(",")) if params else ()
        except ValueError:
            values = (float("nan"),)
        if name == "cosine" and not values:
            parts.append((name, values))
        elif name == "step" and len(values) == 2 and values[0] >= 1 and 0 < values[1] <= 1:
            if values[0] != int(values[0]):
                raise ConfigError(f"lr schedule step's EVERY must be whole rounds, got {part!r}")
            parts.append((name, values))
        elif (
            name == "warmup" and len(values) == 1 and values[0] >= 1 and values[0] == int(values[0])
        ):
            parts.append((name, values))
        else:
            raise ConfigError(
                f"lr schedule must be one of {', '.join(LR_SCHEDULES)} (EVERY and ROUNDS whole"
                f" rounds >= 1, 0 < GAMMA <= 1), got {text!r}"
            )
    names = [n for n, _ in parts]
    if len(parts) > 1 and names != ["warmup", "cosine"]:
        raise ConfigError(f"lr schedule must combine only as warmup:ROUNDS+cosine, got {text!r}")
    return parts


def build_schedule(
    optimizer: torch.optim.Optimizer, text: str, rounds: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Return the ``torch.optim.lr_scheduler`` of ``text`` over a run of ``rounds`` rounds.

    Raises:
        ConfigError: not a schedule ``--lr-schedule`` takes.
    """
    parts = _parse_schedule(text)
    sched = torch.optim.lr_scheduler
    built: list[sched.LRScheduler] = []
    used = 0
    for name, values in parts:
        if name == "warmup":
            length = int(values[0])
            built.append(sched.LinearLR(optimizer, 1 / length, 1.0, total_iters=length - 1 or 1))
            used = length
        elif name == "step":
            built.append(sched.StepLR(optimizer, int(values[0]), values[1]))
        else:
            built.append(sched.CosineAnnealingLR(optimizer, max(1, rounds - used)))
    if len(built) == 1:
        return built[0]
    return sched.SequentialLR(optimizer, built, milestones=[used])
