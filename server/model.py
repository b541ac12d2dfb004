"""The aggregator's model: parameters, the torch.optim optimizer, the step and evaluation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedgrad.buffers import MAX_BUFFER_BYTES, buffer_specs, model_buffers, pack
from fedgrad.codec import Layout, TensorSpec, manifest_mismatch, specs_of
from fedgrad.config import AggregatorConfig
from fedgrad.errors import ConfigError, InvalidArgument, TaskError
from fedgrad.optimizers import build_optimizer, build_schedule, eager_step
from fedgrad.server.reducers import Reducer
from fedgrad.task import EVALUATE_KEY, Task, resolve_device, trainable_parameters
from fedgrad.wire import task_identity

__all__ = ["STEP_BATCH_BYTES", "Peer", "ServerModel", "make_optimizer"]

#: Bytes of gradients materialized at once during the optimizer step.
STEP_BATCH_BYTES = 8 << 20


def make_optimizer(
    name: str,
    params: list[torch.nn.Parameter],
    lr: float,
    args: Sequence[tuple[str, str]] = (),
) -> torch.optim.Optimizer:
    """Build the aggregator's torch.optim optimizer by name (``fedgrad.optimizers``).

    Raises:
        ConfigError: an unknown optimizer or an argument it does not take.
    """
    return build_optimizer(name, args, params, lr)


#: Round config entries, key length and value length a broadcast may carry.
MAX_CONFIG_ENTRIES, MAX_CONFIG_KEY, MAX_CONFIG_VALUE = 64, 128, 1024


def check_round_config(config: Mapping[str, Any]) -> None:
    """Raise TaskError unless ``config`` is at most 64 text entries of bounded length."""
    if len(config) > MAX_CONFIG_ENTRIES:
        raise TaskError(f"round config has {len(config)} entries; at most {MAX_CONFIG_ENTRIES}")
    for key, value in config.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TaskError(f"round config entry {key!r}: {value!r} must map text to text")
        if not 1 <= len(key) <= MAX_CONFIG_KEY or len(value) > MAX_CONFIG_VALUE:
            raise TaskError(
                f"round config entry {key[:MAX_CONFIG_KEY]!r}: keys must be 1-{MAX_CONFIG_KEY}"
                f" characters and values at most {MAX_CONFIG_VALUE}"
            )


def batches(sizes: list[int], limit: int) -> list[list[int]]:
    """Split indices 0..len(sizes)-1 into consecutive runs of at most ``limit`` bytes each
    (a single larger entry gets a run of its own)."""
    runs: list[list[int]] = []
    used = limit
    for i, size in enumerate(sizes):
        if not runs or used + size > limit:
            runs.append([])
            used = 0
        runs[-1].append(i)
        used += size
    return runs


@dataclass(frozen=True)
class Peer:
    """What a joining node says of its model and training (each part optional)."""

    specs: list[TensorSpec] | None = None
    seed: int | None = None
    task: str | None = None
    buffers: list[TensorSpec] | None = None

    def check(
        self,
        ours: list[TensorSpec],
        cfg: AggregatorConfig,
        buffers: list[TensorSpec] = (),  # type: ignore[assignment]
    ) -> None:
        """Raise InvalidArgument naming what differs from the aggregator's model or run."""
        if self.specs is not None and (diff := manifest_mismatch(ours, self.specs)):
            raise InvalidArgument(
                f"this node's model differs from the aggregator's: {diff}; run both with the"
                " same --task and --task-arg"
            )
        if self.buffers and (diff := manifest_mismatch(list(buffers), self.buffers)):
            raise InvalidArgument(
                f"this node's buffers differ from the aggregator's: {diff}; run both with the"
                " same --task and --task-arg"
            )
        if self.seed is not None and self.seed != cfg.seed:
            raise InvalidArgument(
                f"this node runs with --seed {self.seed}, the aggregator with --seed {cfg.seed}:"
                " use the same seed on both"
            )
        theirs = task_identity(cfg.task, cfg.task_args)
        if self.task and cfg.model is None and self.task != theirs:
            raise InvalidArgument(
                f"this node runs task {self.task!r}, the aggregator {theirs!r}: use the same"
                " --task and --task-arg on both"
            )


class BufferMean:
    """A round's buffers: the weighted mean of each float buffer, the largest of each integer
    one (``num_batches_tracked``), over the counted uploads that carried them."""

    def __init__(self, specs: Sequence[TensorSpec]) -> None:
        self.specs = list(specs)
        self.integer = [s.dtype == torch.int64 for s in self.specs]
        self.sums = [
            np.zeros(s.numel, np.int64 if i else np.float64)
            for s, i in zip(self.specs, self.integer, strict=True)
        ]
        self.weight = 0

    def add(self, values: Sequence[np.ndarray], weight: int) -> None:
        """Add one upload's buffers (``fedgrad.buffers.unpack``'s arrays) with its weight."""
        first = self.weight == 0
        for total, value, integer in zip(self.sums, values, self.integer, strict=True):
            if integer and first:
                np.copyto(total, value)
            elif integer:
                np.maximum(total, value, out=total)
            elif first:
                np.multiply(value, weight, out=total, dtype=np.float64)
            else:
                np.add(total, np.multiply(value, weight, dtype=np.float64), out=total)
        self.weight += weight

    def apply_into(self, buffers: Sequence[torch.Tensor]) -> None:
        """Write the round's result into ``buffers`` (unchanged if no upload had any); reset."""
        if self.weight:
            with torch.no_grad():
                for b, total, integer in zip(buffers, self.sums, self.integer, strict=True):
                    value = total if integer else total / self.weight
                    b.copy_(torch.from_numpy(value).view(b.shape).to(b.dtype))
        self.weight = 0


class ServerModel:
    """The task's model on the aggregator, its trainable parameters and their optimizer."""

    def __init__(self, task: Task, cfg: AggregatorConfig) -> None:
        self.task, self.cfg = task, cfg
        torch.manual_seed(cfg.seed)
        #: Where the parameters, buffers and optimizer state live (``--device``).
        self.device = resolve_device(cfg.device)
        self.module = task.model().to(self.device)
        named = trainable_parameters(self.module)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.layout = Layout(specs_of(named))
        buffers = model_buffers(self.module)
        #: The model's buffers (BatchNorm statistics), their manifest and their round mean.
        self.buffer_names = [n for n, _ in buffers]
        self.buffers = [b for _, b in buffers]
        self.buffer_specs = buffer_specs(self.module)
        self.share_buffers = cfg.buffers == "shared" and bool(self.buffers)
        if self.share_buffers and sum(s.nbytes for s in self.buffer_specs) > MAX_BUFFER_BYTES:
            raise ConfigError(
                f"the model's buffers take {sum(s.nbytes for s in self.buffer_specs)} bytes, more"
                f" than the {MAX_BUFFER_BYTES} one message carries: run with --buffers local"
            )
        self.buffer_mean = BufferMean(self.buffer_specs)
        lr = cfg.lr if cfg.lr is not None else task.lr
        self.optimizer = make_optimizer(
            cfg.optimizer or task.optimizer, self.params, lr, cfg.optimizer_args
        )
        self.schedule = (
            build_schedule(self.optimizer, cfg.lr_schedule, cfg.rounds) if cfg.lr_schedule else None
        )
        self.clip_grad_norm = cfg.clip_grad_norm
        self.step_batches = batches(self.layout.nbytes, STEP_BATCH_BYTES)
        #: The reduced gradient's global L2 norm of the last step (before clipping).
        self.grad_norm = math.nan

    def step(self, reducer: Reducer) -> dict[str, float]:
        """Apply the reduced gradient with the optimizer; return the task's evaluation."""
        # Gradients exist a batch of tensors at a time, never a whole second model:
        # torch.optim skips parameters whose grad is None, and its element-wise
        # optimizers update each parameter from its own gradient and state, so stepping
        # batch by batch gives the same parameters as one step over all of them.
        scale = self._clip_scale(reducer) if self.clip_grad_norm is not None else None
        for batch in self.step_batches:
            grads = [torch.empty_like(self.params[i], device="cpu") for i in batch]
            reducer.result_into(grads, batch)  # the reducers' sums live in host memory
            for i, g in zip(batch, grads, strict=True):
                if scale is not None:
                    g.mul_(scale)
                self.params[i].grad = g.to(self.device, non_blocking=True)
            del grads
            eager_step(self.optimizer)
            for i in batch:
                self.params[i].grad = None  # zero_grad(set_to_none=True), batch by batch
        if self.schedule is not None:
            self.schedule.step()
        if self.share_buffers:
            self.buffer_mean.apply_into(self.buffers)
        with torch.no_grad():
            self.module.eval()
            return self.task.evaluate(self.module) or {}

    def _clip_scale(self, reducer: Reducer) -> torch.Tensor:
        """Return torch.nn.utils.clip_grad_norm_'s factor for the reduced gradient.

        One pass over the gradient a batch at a time computes each tensor's norm as torch
        does (``torch.linalg.vector_norm``); the total is the norm of those norms, and the
        factor ``min(1, C / (total + 1e-6))`` multiplies every gradient, as in plain torch.
        """
        assert self.clip_grad_norm is not None
        norms = []
        for batch in self.step_batches:
            grads = [torch.empty_like(self.params[i], device="cpu") for i in batch]
            reducer.result_into(grads, batch)
            norms += [torch.linalg.vector_norm(g, 2.0) for g in grads]
            del grads
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0) if norms else torch.zeros(())
        self.grad_norm = float(total)
        return torch.clamp(self.clip_grad_norm / (total + 1e-6), max=1.0)

    def round_config(self, round_: int, total_rounds: int) -> dict[str, str]:
        """Return the settings sent with round ``round_``: ``--round-config``, then the task's.

        Raises:
            TaskError: the task's entries are too many, too long, or not text.
        """
        config = {
            **dict(self.cfg.round_config),
            **dict(self.task.round_config(round_, total_rounds)),
        }
        every = self.cfg.evaluate_every
        if every and round_ % every == 0 and round_ < total_rounds:
            config[EVALUATE_KEY] = "1"
        check_round_config(config)
        return config

    def named_params(self) -> dict[str, torch.Tensor]:
        """Return the trainable parameters by name (the tensors themselves)."""
        return dict(zip(self.names, self.params, strict=True))

    def named_buffers(self) -> dict[str, torch.Tensor]:
        """Return the buffers by name (the tensors themselves)."""
        return dict(zip(self.buffer_names, self.buffers, strict=True))

    def buffer_bytes(self) -> bytes:
        """Return the buffers as a broadcast carries them (empty unless shared)."""
        return pack(self.buffers) if self.share_buffers else b""

    def load(self, params: Mapping[str, torch.Tensor], optim_state: dict[str, Any]) -> None:
        """Take parameters, buffers and optimizer state from a checkpoint.

        Buffers (``buffer/NAME`` entries) are optional: an older checkpoint keeps the
        model's initial ones.

        Raises:
            ConfigError: a tensor is missing or does not match the task's model.
        """
        with torch.no_grad():
            for spec, p in zip(self.layout.specs, self.params, strict=True):
                saved = params.get(spec.name)
                if saved is None or saved.shape != p.shape or saved.dtype != p.dtype:
                    raise ConfigError(
                        f"checkpoint tensor {spec.name!r} does not match the task's model"
                    )
                p.copy_(saved)
            for spec, b in zip(self.buffer_specs, self.buffers, strict=True):
                saved = params.get(f"buffer/{spec.name}")
                if saved is None:
                    continue
                if saved.shape != b.shape or saved.dtype != b.dtype:
                    raise ConfigError(
                        f"checkpoint buffer {spec.name!r} does not match the task's model"
                    )
                b.copy_(saved)
        self.optimizer.load_state_dict(optim_state)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return the model's full state dict (parameters and buffers), detached."""
        return {k: v.detach() for k, v in self.module.state_dict().items()}
