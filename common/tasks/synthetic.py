"""Built-in task "synthetic": a bag of parameters and seeded fake gradients, for benchmarks.

No data and no training compute: the model is ``tensors`` flat parameters
holding ``params`` numbers in total, and a node's update is a cached random
base (fixed per task seed and shard) times a scalar drawn from the round's
generator. That isolates what fedgrad itself costs (encoding, transfer,
aggregation) from the cost of a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedgrad.errors import ConfigError
from fedgrad.task import Task, Update, trainable_parameters
from fedgrad.tasks._options import choice, int_at_least, parse_count, parse_options

__all__ = ["SyntheticShard", "SyntheticTask"]

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

_Layout = tuple[tuple[tuple[int, ...], torch.dtype], ...]


@dataclass(frozen=True)
class SyntheticShard:
    """The "data" of a synthetic shard: only which shard it is."""

    index: int
    count: int


class _Bag(nn.Module):
    """Parameters ``w.0``, ``w.1``, ... of the given shapes."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> None:
        super().__init__()
        # A fill, not randn: ~0.05 s instead of ~0.3 s for 50M parameters.
        self.w = nn.ParameterList(nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes)


def _matrix(size: int) -> tuple[int, ...]:
    """Return (m, n) with m * n = size and m the largest divisor of size <= sqrt(size)."""
    m = max((d for d in range(1, math.isqrt(size) + 1) if size % d == 0), default=0)
    return (m, size // m) if m else (0,)


class SyntheticTask(Task):
    """Serve ``params`` parameters in ``tensors`` tensors with cheap, seeded gradients.

    Options (all strings): ``params`` (total parameter count, e.g. ``50000000``,
    ``50M`` or ``1e6``; default 1M), ``tensors`` (default 20; sizes differ by at
    most one, and are 0 when ``tensors > params``), ``dtype`` (``float32``,
    ``float16``, ``bfloat16`` or ``float64``; default float32), ``shape`` (``flat``, the
    default, or ``matrix``: each tensor m x n with m the largest divisor of its size up to
    its square root, e.g. 1250 x 2000 for 2.5M, as a codec that factors matrices needs).

    Memory: besides the model, a process keeps one gradient base per shard it
    computes for (``params`` numbers each).
    """

    optimizer = "sgd"
    lr = 0.01

    def __init__(self, seed: int = 0, **options: str) -> None:
        """Parse the options.

        Args:
            seed: seeds the gradient bases.
            **options: see the class docstring.

        Raises:
            ConfigError: an unknown option or a bad value.
        """
        super().__init__(seed)
        opts = parse_options(
            "synthetic",
            options,
            {
                "params": parse_count,
                "tensors": int_at_least(1),
                "dtype": choice(*DTYPES),
                "shape": choice("flat", "matrix"),
            },
        )
        self.params: int = opts.get("params", 1_000_000)
        if self.params < 1:
            raise ConfigError("task 'synthetic': params must be >= 1")
        self.tensors: int = opts.get("tensors", 20)
        self.dtype: torch.dtype = DTYPES[opts.get("dtype", "float32")]
        q, r = divmod(self.params, self.tensors)
        #: Size of each parameter tensor, in ``w.<i>`` order.
        self.sizes = [q + 1 if i < r else q for i in range(self.tensors)]
        matrix = opts.get("shape", "flat") == "matrix"
        #: Shape of each parameter tensor.
        self.shapes = [_matrix(s) if matrix else (s,) for s in self.sizes]
        self._bases: dict[tuple[int, _Layout], list[torch.Tensor]] = {}
        self._outputs: dict[int, list[torch.Tensor]] = {}

    def model(self) -> nn.Module:
        """Build the parameter bag, all zeros."""
        return _Bag(self.shapes, self.dtype)

    def shard(self, index: int, count: int) -> SyntheticShard:
        """Return the placeholder of shard ``index`` of ``count``.

        Raises:
            ConfigError: ``index`` is not in ``[0, count)``.
        """
        if not 0 <= index < count:
            raise ConfigError(f"task 'synthetic': shard index {index} is not in [0, {count})")
        return SyntheticShard(index, count)

    def num_samples(self, data: SyntheticShard) -> int:
        """Return ``100 + index``: unequal weights, so a plain mean is told from a weighted one."""
        return 100 + data.index

    def loss(self, model: nn.Module, batch: object) -> torch.Tensor:
        """Return 0: there is no data, and ``compute_update`` does not call this."""
        return torch.zeros(())

    def compute_update(
        self, model: nn.Module, data: SyntheticShard, generator: torch.Generator
    ) -> Update:
        """Return the shard's base gradients times a scalar in [0.5, 1.5) from ``generator``.

        Args:
            model: the model holding the round's parameters (only shapes are used).
            data: this node's shard.
            generator: the round's generator; it draws the scalar.

        Returns:
            Finite gradients shaped like the parameters; ``metrics["loss"]`` is the scalar.
        """
        params = [p for _, p in trainable_parameters(model)]
        base = self._base(data.index, params)
        scale = 0.5 + float(torch.rand((), generator=generator, dtype=torch.float64))
        # Reuse one output buffer per tensor: a fresh 200 MB allocation per round costs
        # page faults that dwarf the multiply. The node sends them before the next call.
        out = self._outputs.setdefault(id(base), [torch.empty_like(b) for b in base])
        grads = [torch.mul(b, scale, out=o) for b, o in zip(base, out, strict=True)]
        return Update(grads, self.num_samples(data), {"loss": scale})

    def _base(self, index: int, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        layout = tuple((tuple(p.shape), p.dtype) for p in params)
        key = (index, layout)
        if key not in self._bases:
            # Seeded by task seed and shard, not by the round's generator, so a
            # restarted node computes the same gradients as before.
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + index) % 2**63)
            self._bases[key] = [
                torch.randn(shape, generator=gen).to(dtype) for shape, dtype in layout
            ]
        return self._bases[key]
