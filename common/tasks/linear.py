"""Built-in task "linear": least squares on seeded synthetic data, trained with FedSGD.

Every round each node sends the gradient of the mean squared error over its
whole shard, so the aggregator's sample-weighted mean is exactly the
full-batch gradient (up to float64 rounding) and a run can be compared with
plain gradient descent on ``full_data()``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fedgrad.task import Task, to_device
from fedgrad.tasks._options import check_shard, float_at_least, int_at_least, parse_options

__all__ = ["LinearTask"]

#: Held-out samples drawn from the same distribution for ``evaluate``.
TEST_SAMPLES = 256


class LinearTask(Task):
    """Fit ``y = x @ w + b + noise`` with ``nn.Linear(features, 1)`` in float64.

    Options (all strings): ``samples`` (training samples, default 1024),
    ``features`` (default 8), ``noise`` (standard deviation of the label
    noise, default 0.1).
    """

    optimizer = "sgd"
    lr = 0.1
    # FedSGD: one gradient over the whole shard per round.
    local_steps = 0

    def __init__(self, seed: int = 0, **options: str) -> None:
        """Generate the training and test data.

        Args:
            seed: seeds the true weights, the inputs and the noise.
            **options: see the class docstring.

        Raises:
            ConfigError: an unknown option or a bad value.
        """
        super().__init__(seed)
        opts = parse_options(
            "linear",
            options,
            {
                "samples": int_at_least(1),
                "features": int_at_least(1),
                "noise": float_at_least(0.0),
            },
        )
        self.samples: int = opts.get("samples", 1024)
        self.features: int = opts.get("features", 8)
        self.noise: float = opts.get("noise", 0.1)
        gen = torch.Generator().manual_seed(seed)

        def draw(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=gen, dtype=torch.float64)

        self.true_weight, self.true_bias = draw(self.features, 1), draw(1)
        x = draw(self.samples + TEST_SAMPLES, self.features)
        y = x @ self.true_weight + self.true_bias + self.noise * draw(len(x), 1)
        self._x, self._x_test = x[: self.samples], x[self.samples :]
        self._y, self._y_test = y[: self.samples], y[self.samples :]

    def model(self) -> nn.Module:
        """Build ``nn.Linear(features, 1)`` with float64 parameters."""
        return nn.Linear(self.features, 1, dtype=torch.float64)

    def shard(self, index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the contiguous slice ``index`` of ``count`` of the training data.

        Args:
            index: this node's shard, ``0 <= index < count``.
            count: the number of shards; when it does not divide ``samples``
                the first ``samples % count`` shards hold one sample more.

        Returns:
            ``(x, y)`` of shapes (n, features) and (n, 1), float64.

        Raises:
            ConfigError: ``index`` is out of range or ``count > samples``.
        """
        check_shard("linear", index, count, self.samples)
        x = torch.tensor_split(self._x, count)[index]
        y = torch.tensor_split(self._y, count)[index]
        return x, y

    def full_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, y)`` of all training samples: the union of the shards, in order."""
        return self._x, self._y

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Return the mean squared error of ``model`` on ``batch``."""
        x, y = to_device(batch, model)
        return F.mse_loss(model(x), y)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Return the mean squared error ``loss`` on the held-out samples."""
        model.eval()
        with torch.no_grad():
            x, y = to_device((self._x_test, self._y_test), model)
            loss = F.mse_loss(model(x), y)
        return {"loss": float(loss)}
