"""``--device``: the CPU path is the default and unchanged; CUDA nodes and a CUDA optimizer
step where torch sees a GPU (these skip elsewhere, saying why; ``benchmarks/gpu_check.py``
is the maintainer's timing script)."""

from __future__ import annotations

import pytest
import torch

from fedgrad import LocalCluster
from fedgrad.errors import ConfigError
from fedgrad.task import resolve_device

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch sees none here)")


def test_auto_is_cuda_where_torch_sees_it_and_the_cpu_elsewhere() -> None:
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(CUDA, reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_config_error() -> None:
    with pytest.raises(ConfigError, match="--device cuda:1: torch sees no CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(RuntimeError, match="node-0 failed: ConfigError: --device cuda: torch sees"):
        with LocalCluster("digits", nodes=1, node_options={"device": "cuda"}, timeout=30) as c:
            c.run(rounds=1)


def test_an_explicit_cpu_device_is_the_default_bitwise() -> None:
    args = {"local_steps": "2"}
    with LocalCluster("digits", nodes=2, task_args=args) as cluster:
        default = cluster.run(rounds=2).params
    with LocalCluster(
        "digits", nodes=2, task_args=args, device="cpu", node_options={"device": "cpu"}
    ) as cluster:
        explicit = cluster.run(rounds=2).params
    assert all(torch.equal(default[k], explicit[k]) for k in default)


@needs_cuda
@pytest.mark.parametrize("where", ["nodes", "aggregator", "both"])
def test_cuda_training_matches_the_cpu(where: str) -> None:
    args = {"model": "cnn", "local_steps": "3"}
    with LocalCluster("digits", nodes=2, task_args=args) as cluster:
        cpu = cluster.run(rounds=3)
    node_options = {"device": "cuda"} if where in ("nodes", "both") else {}
    aggregator = {"device": "cuda"} if where in ("aggregator", "both") else {}
    with LocalCluster(
        "digits", nodes=2, task_args=args, node_options=node_options, **aggregator
    ) as cluster:
        gpu = cluster.run(rounds=3)
    for name, value in cpu.params.items():
        torch.testing.assert_close(gpu.params[name].cpu(), value, rtol=1e-3, atol=1e-4)
    assert abs(gpu.history[-1].test_accuracy - cpu.history[-1].test_accuracy) < 0.02
