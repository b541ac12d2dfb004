"""LocalCluster never hides an error: a node's exception ends ``run()`` at once, chained.

Real in-process federations over gRPC on 127.0.0.1 port 0. Each test passes a
``timeout`` far longer than it may take: a run that waited it out would fail the test
through pytest's own timeout, and the error that comes back must be the node's, not a
``TimeoutError``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from fedgrad import LocalCluster, Task

#: Far beyond what a failing run may take; pytest's timeout (300 s) ends the test first.
GENEROUS = 600.0


class Regression(Task):
    """A small linear regression; ``fail`` picks a shard index and the method that raises."""

    lr = 0.1

    def __init__(self, fail: str = "", on: int = 1, delay: float = 0.0) -> None:
        self.fail, self.on, self.delay = fail, on, delay
        self.index = -1

    def model(self) -> torch.nn.Module:
        return torch.nn.Linear(3, 1)

    def shard(self, index: int, count: int) -> Any:
        self.index = index
        if self.fail == "shard" and index == self.on:
            raise OSError(f"cannot open the data of shard {index}")
        g = torch.Generator().manual_seed(index)
        x = torch.randn(16, 3, generator=g)
        return x, x.sum(dim=1, keepdim=True)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        if self.fail == "loss" and self.index == self.on:
            raise ValueError("boom in loss()")
        time.sleep(self.delay)
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)


def _node_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fedgrad-node-")]


def test_an_exception_in_loss_on_one_node_ends_the_run_with_it() -> None:
    cluster = LocalCluster(Regression(fail="loss", on=1), nodes=3, timeout=GENEROUS)
    with cluster, pytest.raises(RuntimeError) as info:
        cluster.run(rounds=3)
    assert str(info.value) == "node-1 failed: ValueError: boom in loss()"
    assert isinstance(info.value.__cause__, ValueError)
    # The other nodes left and the aggregator stopped: nothing keeps running.
    assert _node_threads() == []
    assert cluster._server is None


def test_a_node_that_cannot_start_ends_the_run_with_its_error() -> None:
    with LocalCluster(Regression(fail="shard", on=0), nodes=2, timeout=GENEROUS) as cluster:
        with pytest.raises(RuntimeError, match=r"^node-0 failed: OSError: cannot open") as info:
            cluster.run(rounds=2)
    assert isinstance(info.value.__cause__, OSError)
    assert _node_threads() == []


def test_a_run_that_runs_out_of_time_says_how_far_it_got() -> None:
    with LocalCluster(Regression(delay=0.5), nodes=1, timeout=0.5) as cluster:
        with pytest.raises(TimeoutError, match=r"within timeout=0.5 s: round \d+ of 50"):
            cluster.run(rounds=50)
    assert _node_threads() == []


def test_after_a_failure_the_same_cluster_runs_again() -> None:
    task = Regression(fail="loss", on=1)
    with LocalCluster(task, nodes=2, timeout=GENEROUS) as cluster:
        with pytest.raises(RuntimeError, match="node-1 failed"):
            cluster.run(rounds=1)
        task.fail = ""  # the cluster copies the task for every run
        assert len(cluster.run(rounds=2).history) == 2
