"""A user-defined fedgrad task: fit a noisy sine wave with a small MLP, FedAvg-style.

To run an aggregator and 3 nodes in this process over real gRPC on loopback, from
the repository root (``python -m examples.custom_task`` does the same)::

    python examples/custom_task.py

fedgrad imports a task from a ``package.module:attr`` spec on the aggregator
and on every node, so this file must be importable on all of them (fedgrad
looks in the working directory first, as ``python -m`` does, then in the
installed packages), and every process must get the same ``--task``,
``--task-arg`` and ``--seed``. As services, from the repository root::

    fedgrad aggregator --task examples.custom_task:MyTask \
        --task-arg samples=512 --nodes 2 --rounds 30 --listen localhost:50051
    fedgrad node --task examples.custom_task:MyTask \
        --task-arg samples=512 --node-id node-0 --shard 0/2 --aggregator localhost:50051
    fedgrad node ... --node-id node-1 --shard 1/2 ...
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from fedgrad import Task
from fedgrad.errors import ConfigError


class MyTask(Task):
    """Regress ``y = sin(x)`` on ``x`` in [-pi, pi] with a 1-32-1 tanh MLP.

    Options arrive as strings: ``--task-arg samples=512`` calls
    ``MyTask(seed=..., samples="512")``. An unknown option is a TypeError,
    which fedgrad reports as a ConfigError.
    """

    # Twenty local SGD steps per round; an aggregator SGD step with lr 1.0 on
    # the returned theta_start - theta_end is FedAvg.
    optimizer = "sgd"
    lr = 1.0
    local_steps = 20
    local_lr = 0.05
    batch_size = 16

    def __init__(self, seed: int = 0, samples: str = "256") -> None:
        """Draw the data set.

        Args:
            seed: seeds the inputs and the noise, identical on every process.
            samples: how many training points to split across the nodes.

        Raises:
            ConfigError: ``samples`` is not a positive integer.
        """
        super().__init__(seed)
        try:
            self.samples = int(samples)
        except ValueError:
            raise ConfigError(f"samples must be an integer, got {samples!r}") from None
        if self.samples < 1:
            raise ConfigError(f"samples must be >= 1, got {self.samples}")
        gen = torch.Generator().manual_seed(seed)
        self.x = (torch.rand(self.samples, 1, generator=gen) * 2 - 1) * math.pi
        self.y = torch.sin(self.x) + 0.05 * torch.randn(self.samples, 1, generator=gen)

    def model(self) -> nn.Module:
        """Build the MLP; fedgrad seeds torch first, so every process agrees."""
        return nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))

    def shard(self, index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return every ``count``-th sample, starting at ``index``."""
        return self.x[index::count], self.y[index::count]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Return the mean squared error on ``batch``."""
        x, y = batch
        return F.mse_loss(model(x), y)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Return the mean squared error against the noiseless curve."""
        x = torch.linspace(-math.pi, math.pi, 200).unsqueeze(1)
        with torch.no_grad():
            return {"loss": float(F.mse_loss(model(x), torch.sin(x)))}


def _demo(nodes: int = 3, rounds: int = 30) -> None:
    """Train on a LocalCluster and print the evaluation after each round."""
    # Imported here: nodes that load this task need not import the server.
    from fedgrad import LocalCluster

    # The task object itself, not "examples.custom_task:MyTask": run as a script, this
    # module is __main__, and the name would import it a second time (or not at all when
    # run from another folder). Each node gets a copy.
    with LocalCluster(MyTask(samples="512"), nodes=nodes) as cluster:
        result = cluster.run(rounds=rounds)
    for record in result.history:
        print(f"round {record.round:2d}: eval loss {record.test_loss:.4f}")


if __name__ == "__main__":
    _demo()
