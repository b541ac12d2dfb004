"""The Task interface: what a user writes to train their own model with fedgrad.

A task is a model factory, the data of one node's shard, a loss, and
(optionally) an evaluation on held-out data. fedgrad does the rest: the
aggregator builds the model once to own the parameters, every node builds it
to compute gradients, and both load the parameters the aggregator publishes.

Minimal example (see ``examples/custom_task.py``)::

    class MyTask(Task):
        def model(self):
            return torch.nn.Linear(4, 1)

        def shard(self, index, count):
            x = torch.randn(100, 4, generator=torch.Generator().manual_seed(index))
            return x, x.sum(dim=1, keepdim=True)

        def loss(self, model, batch):
            x, y = batch
            return torch.nn.functional.mse_loss(model(x), y)
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedgrad.errors import ConfigError, TaskError

__all__ = [
    "BUILTIN_TASKS",
    "RoundContext",
    "Task",
    "Update",
    "EVAL_PREFIX",
    "EVAL_SAMPLES",
    "EVALUATE_KEY",
    "ModelTask",
    "load_model_task",
    "device_of",
    "resolve_device",
    "load_task",
    "to_device",
    "trainable_parameters",
]

#: Built-in task names and where they live.
BUILTIN_TASKS: dict[str, str] = {
    "digits": "fedgrad.tasks.digits:DigitsTask",
    "linear": "fedgrad.tasks.linear:LinearTask",
    "synthetic": "fedgrad.tasks.synthetic:SyntheticTask",
}


@dataclass
class Update:
    """What a node sends for one round.

    Attributes:
        gradients: one tensor per trainable parameter, in manifest order, with
            the parameter's shape and dtype.
        num_samples: samples behind the gradient (the weight of the weighted mean).
        metrics: scalars to report, e.g. ``{"loss": 0.3}``.
    """

    gradients: list[torch.Tensor]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


#: Upload metrics of a node's held-out evaluation: ``eval_NAME``, and the samples behind them.
EVAL_PREFIX, EVAL_SAMPLES = "eval_", "eval_samples"
#: The round-config key that asks the nodes to evaluate (``--evaluate-every``).
EVALUATE_KEY = "evaluate"


@dataclass(frozen=True)
class RoundContext:
    """The round a node computes, as the aggregator's parameter broadcast says.

    Attributes:
        round: the round (in async mode, the version) the parameters open, from 0.
        total_rounds: rounds in the run.
        config: the aggregator's settings for this round: its ``--round-config KEY=VALUE``
            entries and its task's ``round_config(round, total_rounds)``, as text.
    """

    round: int
    total_rounds: int
    config: Mapping[str, str] = field(default_factory=dict)


def resolve_device(spec: str) -> torch.device:
    """Return the device ``--device`` names: ``cpu``, ``cuda``, ``cuda:N``, or ``auto``
    (the first CUDA device if torch sees one, else the CPU).

    Raises:
        ConfigError: CUDA asked for where torch sees none, or an index beyond its devices.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {spec}: torch sees no CUDA device here (torch.cuda.is_available() is"
                " False); use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {spec}: torch sees {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def device_of(model: nn.Module) -> torch.device:
    """Return the device of ``model``'s first parameter (CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(data: Any, model: nn.Module) -> Any:
    """Return ``data`` (a tensor, or a tuple or list of them) on ``model``'s device.

    Tensors already there are returned as they are (no copy); anything else unchanged.
    """
    device = device_of(model)
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, tuple | list):
        return type(data)(to_device(d, model) if isinstance(d, torch.Tensor) else d for d in data)
    return data


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Return the (name, parameter) pairs fedgrad trains, in a stable order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class Task:
    """Base class of a training task. Override ``model``, ``shard`` and ``loss``.

    Class attributes a task may override:
        optimizer: the aggregator's default optimizer ("sgd", "momentum", "adam").
        lr: the aggregator's default learning rate.
        local_steps: 0 for FedSGD (one gradient over the whole shard per round);
            k > 0 for FedAvg-style training: k local SGD steps with ``local_lr``
            over minibatches, reported as the pseudo-gradient
            ``theta_start - theta_end`` (an aggregator SGD step with lr 1.0 is
            then exactly FedAvg).
        local_lr: learning rate of the local steps.
        batch_size: minibatch size of the local steps (0: the whole shard).
    """

    optimizer: str = "sgd"
    lr: float = 0.1
    local_steps: int = 0
    local_lr: float = 0.1
    batch_size: int = 0
    #: On a node, the round being computed (set before each ``compute_update``).
    context: RoundContext | None = None

    def __init__(self, seed: int = 0, **options: str) -> None:
        """Create the task.

        Args:
            seed: seeds the task's own data generation (not the training).
            **options: ``--task-arg KEY=VALUE`` pairs; unknown keys are errors.
        """
        self.seed = seed
        if options:
            raise ConfigError(f"task {type(self).__name__} takes no option(s) {sorted(options)}")

    # -- to override ---------------------------------------------------------
    def model(self) -> nn.Module:
        """Build the model. fedgrad seeds torch before calling this."""
        raise NotImplementedError

    def shard(self, index: int, count: int) -> Any:
        """Return the training data of shard ``index`` of ``count`` (0-based)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Return the mean loss of ``model`` on ``batch`` (a 0-d tensor)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        """Evaluate on held-out data (e.g. ``{"loss": .., "accuracy": ..}``), or None."""
        return None

    def holdout(self, index: int, count: int) -> Any | None:
        """Return shard ``index`` of ``count``'s held-out data for federated evaluation.

        None (the default): this task's nodes do not evaluate (``--evaluate-every``).
        """
        return None

    def evaluate_holdout(self, model: nn.Module, data: Any) -> dict[str, float]:
        """Evaluate ``model`` on a node's held-out ``data`` (``holdout``'s), in eval mode.

        Default: ``{"loss": self.loss(model, data)}``. The aggregator averages each metric
        over the nodes weighted by ``num_samples(data)``; ``loss`` and ``accuracy`` go
        into the history as ``federated_loss`` and ``federated_accuracy``.
        """
        model.eval()
        with torch.no_grad():
            return {"loss": float(self.loss(model, data))}

    def round_config(self, round_: int, total_rounds: int) -> Mapping[str, str]:
        """On the aggregator: settings sent to every node with round ``round_``'s parameters.

        The node's ``compute_update`` reads them as ``self.context.config`` (also passed as
        ``context=`` to an override that takes it). The built-in ``compute_update`` honours
        ``local_lr`` and ``local_steps``; e.g. return ``{"local_lr": str(0.1 * 0.9**round_)}``
        for a local learning-rate schedule. Default: none.
        """
        return {}

    # -- overridable defaults --------------------------------------------------
    def num_samples(self, data: Any) -> int:
        """Return how many samples ``data`` (a shard) holds. Default: ``len(data[0])``."""
        return len(data[0])

    def batches(self, data: Any, generator: torch.Generator) -> Iterator[Any]:
        """Yield an endless stream of shuffled minibatches of ``batch_size``."""
        n = self.num_samples(data)
        size = self.batch_size or n
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, size):
                idx = order[start : start + size]
                yield tuple(t[idx] for t in data)

    def compute_update(self, model: nn.Module, data: Any, generator: torch.Generator) -> Update:
        """Compute this node's update for one round from the loaded parameters.

        Args:
            model: the model holding the round's parameters.
            data: this node's shard, as returned by ``shard``.
            generator: seeded from (seed, node id, round); use it for all randomness.

        Returns:
            The gradients (FedSGD) or pseudo-gradients (local steps).
        """
        params = [p for _, p in trainable_parameters(model)]
        n = self.num_samples(data)
        config = self.context.config if self.context is not None else {}
        try:
            local_steps = int(config.get("local_steps", self.local_steps))
            local_lr = float(config.get("local_lr", self.local_lr))
        except ValueError as e:
            raise TaskError(f"the aggregator's round config is not a number: {e}") from None
        model.train()
        if local_steps <= 0:
            model.zero_grad(set_to_none=True)
            loss = self.loss(model, data)
            loss.backward()
            grads = [
                p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                for p in params
            ]
            return Update(grads, n, {"loss": float(loss.detach())})
        start = [p.detach().clone() for p in params]
        opt = torch.optim.SGD(params, lr=local_lr)
        stream = self.batches(data, generator)
        total = 0.0
        for _ in range(local_steps):
            opt.zero_grad(set_to_none=True)
            loss = self.loss(model, next(stream))
            loss.backward()
            opt.step()
            total += float(loss.detach())
        deltas = [s - p.detach() for s, p in zip(start, params, strict=True)]
        return Update(deltas, n, {"loss": total / local_steps})


class ModelTask(Task):
    """The aggregator's side of own-loop nodes (``fedgrad aggregator --model``): a model and
    nothing else. No data, no central evaluation; the default optimizer is SGD at lr 0.1
    (``--lr 1.0`` applies the nodes' pseudo-gradients as FedAvg)."""

    def __init__(self, factory: Any, spec: str) -> None:
        super().__init__()
        self.factory, self.spec = factory, spec

    def model(self) -> nn.Module:
        model = self.factory()
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"--model {self.spec} returned {type(model).__name__}, not a torch.nn.Module"
            )
        return model

    def shard(self, index: int, count: int) -> Any:
        raise TaskError("a --model aggregator has no data; its nodes bring their own")

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise TaskError("a --model aggregator has no loss; its nodes compute their updates")


def load_model_task(spec: str) -> ModelTask:
    """Return the task of ``--model package.module:factory`` (a callable returning the model).

    Raises:
        ConfigError: the spec does not import, or is not callable.
    """
    if ":" not in spec:
        raise ConfigError(f"--model must be package.module:factory, got {spec!r}")
    factory = _resolve(spec)
    if not callable(factory):
        raise ConfigError(f"--model {spec} is not callable: name a function that returns the model")
    return ModelTask(factory, spec)


def _resolve(spec: str) -> Any:
    target = BUILTIN_TASKS.get(spec, spec)
    if ":" not in target:
        raise ConfigError(
            f"unknown task {spec!r}: use a built-in ({', '.join(BUILTIN_TASKS)}) "
            "or 'package.module:attr'"
        )
    module_name, attr = target.split(":", 1)
    if spec not in BUILTIN_TASKS:
        _put_working_directory_on_path()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import task module {module_name!r}: {exc} (a task module is imported from"
            f" the working directory, {os.getcwd()}, or from the installed packages)"
        ) from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None


def _put_working_directory_on_path() -> None:
    """Let ``package.module:attr`` name a module in the working directory, as ``python -m`` does.

    The ``fedgrad`` script's ``sys.path[0]`` is its own folder, so without this a task next
    to the user needs ``PYTHONPATH=.``. The directory goes first, like ``python -m``'s.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a module written after start-up (tests) is found too


def load_task(spec: str, args: Mapping[str, str] | None = None, seed: int = 0) -> Task:
    """Build a task from a built-in name or ``package.module:attr``.

    Args:
        spec: "digits", "linear", "synthetic", or "package.module:attr" naming a
            ``Task`` subclass or a callable returning a ``Task``; the module is imported
            from the working directory (as with ``python -m``) or the installed packages.
        args: ``--task-arg`` options, passed as keyword strings.
        seed: the task's data seed.

    Raises:
        ConfigError: the spec cannot be resolved or rejects the options.
    """
    factory = _resolve(spec)
    try:
        task = factory(seed=seed, **dict(args or {}))
    except TypeError as exc:
        raise ConfigError(f"task {spec!r} rejected its options {dict(args or {})}: {exc}") from exc
    if not isinstance(task, Task):
        raise ConfigError(f"task {spec!r} is a {type(task).__name__}, not a fedgrad Task")
    return task


def check_update(update: Update, params: Iterable[torch.Tensor]) -> None:
    """Raise TaskError unless ``update`` matches ``params`` in count, shape and dtype."""
    params = list(params)
    if len(update.gradients) != len(params):
        raise TaskError(
            f"task returned {len(update.gradients)} gradients for {len(params)} parameters"
        )
    for i, (g, p) in enumerate(zip(update.gradients, params, strict=True)):
        if g.shape != p.shape or g.dtype != p.dtype:
            raise TaskError(
                f"gradient {i} has shape {tuple(g.shape)} {g.dtype}, "
                f"parameter has {tuple(p.shape)} {p.dtype}"
            )
    if update.num_samples < 1:
        raise TaskError(f"num_samples must be >= 1, got {update.num_samples}")
