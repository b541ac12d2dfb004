"""The wire through real gRPC: any model size and shape, every dtype, compression, message limits.

Each training run is compared with a reference computed here from the same
seeds: the nodes' updates come from the task's own ``compute_update`` with the
round generator a node uses, reduced in float64 and applied with plain torch SGD.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
import pytest
import torch
from torch import nn

from fedgrad import LocalCluster, Task, Update
from fedgrad.codec import DEFAULT_CHUNK_BYTES, Layout, specs_of
from fedgrad.seeding import round_generator
from fedgrad.server.app import server_options
from fedgrad.task import load_task, trainable_parameters

SEED = 5
MiB = 1 << 20
#: gRPC's default receive limit, plus the headroom a chunk message needs for its fields.
GRPC_DEFAULT_LIMIT = 4 * MiB
HEADROOM = 64 * 1024
#: (rtol, atol) per parameter dtype. Two nodes: the products n_i * g_i are exact in
#: float64 and their sum rounds once, so the result matches to about one ulp of the
#: parameter dtype.
TOL = {
    torch.float32: (1e-6, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
    torch.float64: (1e-12, 1e-12),
}


class OddShapesTask(Task):
    """0-d, empty and mixed-dtype parameters with seeded gradients (no data)."""

    lr = 0.1
    SHAPES = (
        ("scale", (), torch.float32),
        ("nothing", (0,), torch.float32),
        ("flat_nothing", (3, 0), torch.float64),
        ("f16", (5,), torch.float16),
        ("bf16", (2, 3), torch.bfloat16),
        ("f64", (7,), torch.float64),
        ("matrix", (4, 3), torch.float32),
    )

    def model(self) -> nn.Module:
        module = nn.Module()
        for name, shape, dtype in self.SHAPES:
            module.register_parameter(name, nn.Parameter(torch.randn(shape).to(dtype)))
        return module

    def shard(self, index: int, count: int) -> int:
        return index

    def num_samples(self, data: int) -> int:
        return 10 + data

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return torch.zeros(())

    def compute_update(self, model: nn.Module, data: int, generator: torch.Generator) -> Update:
        grads = [
            torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
            for _, p in trainable_parameters(model)
        ]
        return Update(grads, self.num_samples(data), {"loss": 1.0})


def _reference(
    task: Task, nodes: int, rounds: int, wire: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """What ``rounds`` rounds of ``nodes`` nodes must produce (weighted mean, SGD, task lr)."""
    torch.manual_seed(SEED)
    model = task.model()
    named = trainable_parameters(model)
    params = [p for _, p in named]
    opt = torch.optim.SGD(params, lr=task.lr)
    for r in range(rounds):
        sums = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
        total = 0
        for i in range(nodes):
            data = task.shard(i, nodes)
            gen = round_generator(SEED, f"node-{i}", r)
            update = task.compute_update(model, data, gen)
            total += update.num_samples
            for s, g in zip(sums, update.gradients, strict=True):
                s += update.num_samples * g.to(wire or g.dtype).to(torch.float64)
        for p, s in zip(params, sums, strict=True):
            p.grad = (s / total).to(p.dtype)
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def _train_and_compare(
    task: str | Task,
    task_args: Mapping[str, str] | None = None,
    nodes: int = 2,
    rounds: int = 2,
    node_options: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    with LocalCluster(
        task, nodes=nodes, task_args=task_args, seed=SEED, node_options=node_options, timeout=120
    ) as cluster:
        result = cluster.run(rounds=rounds)
    assert len(result.history) == rounds and all(r.nodes == nodes for r in result.history)
    local = task if isinstance(task, Task) else load_task(task, task_args, seed=SEED)
    wire = (node_options or {}).get("compress")
    want = _reference(local, nodes, rounds, getattr(torch, wire) if wire else None)
    assert list(result.params) == list(want)
    for name, value in want.items():
        got = result.params[name]
        assert got.dtype == value.dtype and got.shape == value.shape, name
        rtol, atol = TOL[value.dtype]
        torch.testing.assert_close(got, value, rtol=rtol, atol=atol, msg=name)
    return result.params


# -- limits ---------------------------------------------------------------------------------------
def test_message_limit_is_not_raised() -> None:
    options = dict(server_options())
    for key in ("grpc.max_receive_message_length", "grpc.max_send_message_length"):
        assert DEFAULT_CHUNK_BYTES < options[key] <= GRPC_DEFAULT_LIMIT + HEADROOM, key
    assert options["grpc.so_reuseport"] == 0


def test_oversized_message_is_refused_and_big_models_still_flow(serve, hand_node) -> None:
    # 2M float32 = 8 MiB in one tensor: twice the 4 MiB limit each way.
    task = load_task("synthetic", {"params": "2M", "tensors": "1"}, seed=SEED)
    served = serve(task, nodes=1, rounds=1, seed=SEED)
    node = hand_node(served, "n0", num_samples=3)
    assert node.specs[0].shape == (2_000_000,)

    # One chunk message of 5 MiB: refused by gRPC before fedgrad's code sees it.
    big = node.messages(0, [torch.zeros(2_000_000)])
    big[1].chunk.data = bytes(5 * MiB)
    with pytest.raises(grpc.RpcError) as info:
        node.stub.PushGradients(iter(big[:2]), timeout=20)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # Chunked, the same model goes up and comes down through a default-limit channel.
    gradient = torch.randn(2_000_000, generator=torch.Generator().manual_seed(1))
    chunks = node.messages(0, [gradient])[1:-1]  # without the header and the UploadEnd
    assert len(chunks) == 8 and max(len(m.chunk.data) for m in chunks) <= node.chunk_bytes
    assert node.push(0, [gradient]).round == 0
    header, (theta1,) = node.pull(1)
    assert header.finished and header.total_bytes == 8_000_000
    torch.testing.assert_close(theta1, -task.lr * gradient, rtol=1e-6, atol=1e-9)


# -- shapes and sizes -----------------------------------------------------------------------------
def test_one_tensor_larger_than_the_message_limit() -> None:
    params = _train_and_compare("synthetic", {"params": "3M", "tensors": "1"})
    assert params["w.0"].numel() * 4 > 2 * GRPC_DEFAULT_LIMIT


def test_zero_dim_empty_and_mixed_dtype_tensors() -> None:
    params = _train_and_compare(OddShapesTask(seed=SEED))
    assert params["scale"].shape == () and params["nothing"].numel() == 0
    assert params["flat_nothing"].shape == (3, 0)
    assert {v.dtype for v in params.values()} == set(TOL)


def test_two_thousand_tensors() -> None:
    params = _train_and_compare("synthetic", {"params": "6000", "tensors": "2000"})
    assert len(params) == 2000
    # All 2,000 share one chunk message each way.
    assert Layout(specs_of(list(params.items()))).total < DEFAULT_CHUNK_BYTES


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_every_dtype(dtype: str) -> None:
    params = _train_and_compare("synthetic", {"params": "50000", "tensors": "7", "dtype": dtype})
    assert all(v.dtype == getattr(torch, dtype) for v in params.values())


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
def test_compressed_uploads(wire: str) -> None:
    _train_and_compare(
        "synthetic", {"params": "50000", "tensors": "3"}, node_options={"compress": wire}
    )


def test_compressed_uploads_of_odd_shapes() -> None:
    _train_and_compare(OddShapesTask(seed=SEED), node_options={"compress": "float16"})
