"""The aggregator's step against plain torch, for one-dtype and mixed-dtype models.

Uploads are staged through the codec and reduced as the aggregator does; the step must
equal torch's own SGD step with the same sample-weighted mean, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from fedgrad.codec import byte_view, iter_chunks
from fedgrad.codecs import CastCodec
from fedgrad.config import AggregatorConfig
from fedgrad.server.model import ServerModel
from fedgrad.server.reducers import make_reducer
from fedgrad.server.staging import StagedUpload
from fedgrad.task import Task


class Mixed(Task):
    lr = 0.5

    def __init__(self, dtypes: tuple[torch.dtype, ...]) -> None:
        self.dtypes = dtypes

    def model(self) -> torch.nn.Module:
        module = torch.nn.Module()
        for i, dtype in enumerate(self.dtypes):
            module.register_parameter(f"p{i}", torch.nn.Parameter(torch.ones(3 + i, dtype=dtype)))
        return module

    def shard(self, index: int, count: int) -> object:
        return None

    def loss(self, model: torch.nn.Module, batch: object) -> torch.Tensor:
        raise NotImplementedError


@pytest.mark.parametrize(
    "dtypes",
    [(torch.float32,) * 4, (torch.float32, torch.float64, torch.float32), (torch.float16,) * 2],
    ids=["one-dtype", "mixed", "float16"],
)
def test_step_equals_plain_torch(dtypes: tuple[torch.dtype, ...]) -> None:
    model = ServerModel(Mixed(dtypes), AggregatorConfig(optimizer="sgd", accumulate="float64"))
    reducer = make_reducer("weighted-mean", model.layout, "float64", 1)
    gen = torch.Generator().manual_seed(0)
    uploads = [
        [torch.randn(p.shape, generator=gen).to(p.dtype) for p in model.params] for _ in "ab"
    ]
    for grads, weight in zip(uploads, (2, 6), strict=True):
        staged = StagedUpload(CastCodec(model.layout.specs), 16)
        for tensor, offset, data in iter_chunks([byte_view(g) for g in grads], model.layout, 16):
            staged.add(tensor, offset, data)
        reducer.add(staged, weight)
    before = [p.detach().clone() for p in model.params]
    model.step(reducer)
    for b, p, g0, g1 in zip(before, model.params, *uploads, strict=True):
        mean = ((2 * g0.double() + 6 * g1.double()) / 8).to(p.dtype)
        assert torch.equal(p.detach(), b - 0.5 * mean), p.dtype
