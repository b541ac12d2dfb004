"""Staging and reduction of uploads: exact sums, non-finite rejection, atomic adds.

The reference is always computed locally in float64 from the same seeded
gradients (``_reference``). Tolerances are stated where the comparison is not
bitwise: float64 accumulation of float32/16 gradients times integer weights
below 2**29 is exact term by term, so only the sums round (relative error of
a few float64 ulps, far below ``RTOL``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np
import pytest
import torch

from fedgrad.codec import Layout, TensorSpec, byte_view, iter_chunks
from fedgrad.codecs import CastCodec
from fedgrad.errors import InvalidArgument
from fedgrad.server.model import batches
from fedgrad.server.reducers import MAX_EXACT_WEIGHT, StreamingReducer
from fedgrad.server.staging import StagedUpload as _Staged

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
#: Relative tolerance against the float64 reference (a handful of float64 ulps).
RTOL = 1e-13
CHUNK = 256


def _specs(dtype: torch.dtype | None = None) -> list[TensorSpec]:
    """A small model: mixed dtypes (or all ``dtype``), a 0-d and an empty tensor."""
    dtypes = [dtype] * 5 if dtype else [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    dtypes += [torch.float32] if not dtype else []
    shapes = [(17, 9), (), (0, 4), (101,), (5, 3)]
    return [TensorSpec(f"t{i}", d, s) for i, (d, s) in enumerate(zip(dtypes, shapes, strict=True))]


def _gradients(specs: Sequence[TensorSpec], seed: int, wire: torch.dtype | None = None):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s.shape, generator=gen, dtype=torch.float64).to(wire or s.dtype) for s in specs
    ]


def StagedUpload(layout: Layout, chunk: int) -> _Staged:
    """Stage uploads laid out like ``layout`` (its wire dtype is the cast codec's)."""
    wire = (
        layout.dtypes[0]
        if layout.specs and layout.dtypes != [s.dtype for s in layout.specs]
        else None
    )
    return _Staged(CastCodec(layout.specs, wire), chunk)


class Accumulator:
    """The streaming reducer with an explicit divisor, as these tests state sums."""

    def __init__(self, layout: Layout, accumulate: str = "float64") -> None:
        self.reducer = StreamingReducer("weighted-mean", Layout(layout.specs), accumulate)
        self.specs = layout.specs

    def commit(self, staged: _Staged, weight: int) -> None:
        self.reducer.add(staged, weight)

    @property
    def count(self) -> int:
        return self.reducer.count

    @property
    def weight(self) -> int:
        return self.reducer.total_weight

    @property
    def total(self) -> np.ndarray:
        return self.reducer.sum.total  # type: ignore[attr-defined]

    def reset(self) -> None:
        self.reducer.reset()

    def result_into(self, outputs, divisor: float, indices=None) -> None:
        # The sum kernel takes the divisor; the reducer's own divisor follows its rule.
        indices = range(len(self.specs)) if indices is None else indices
        for i, out in zip(indices, outputs, strict=True):
            self.reducer.sum.result_into(self.reducer.first_elements[i], out, divisor)

    def result(self, divisor: float) -> list[torch.Tensor]:
        outputs = [torch.empty(s.shape, dtype=torch.float64) for s in self.specs]
        self.result_into(outputs, divisor)
        return outputs


def _stage(layout: Layout, tensors: Sequence[torch.Tensor], chunk: int = CHUNK) -> _Staged:
    staged = StagedUpload(layout, chunk)
    views = [byte_view(t.contiguous()) for t in tensors]
    for tensor, offset, data in iter_chunks(views, layout, chunk):
        staged.add(tensor, offset, data)
    return staged


def _reference(uploads: Sequence[Sequence[torch.Tensor]], weights: Sequence[int], divisor: float):
    sums = [torch.zeros(t.shape, dtype=torch.float64) for t in uploads[0]]
    for tensors, w in zip(uploads, weights, strict=True):
        for s, t in zip(sums, tensors, strict=True):
            s += w * t.to(torch.float64)
    return [s / divisor for s in sums]


def _assert_close(got: Iterable[torch.Tensor], want: Sequence[torch.Tensor]) -> None:
    for g, w in zip(list(got), want, strict=True):
        assert g.dtype == torch.float64 and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=RTOL, atol=0.0)


# -- sums -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [*DTYPES, None], ids=lambda d: str(d or "mixed"))
@pytest.mark.parametrize(
    ("weights", "divisor"),
    [((1, 1, 1), 1.0), ((1, 1, 1), 3.0), ((100, 7, 3_000), 3_107.0)],
    ids=["sum", "mean", "weighted-mean"],
)
def test_sums_equal_a_float64_reference(
    dtype: torch.dtype | None, weights: tuple[int, ...], divisor: float
) -> None:
    specs = _specs(dtype)
    layout = Layout(specs)
    uploads = [_gradients(specs, seed) for seed in range(len(weights))]
    acc = Accumulator(layout)
    for tensors, w in zip(uploads, weights, strict=True):
        acc.commit(_stage(layout, tensors), w)
    assert acc.count == len(weights) and acc.weight == sum(weights)
    result = list(acc.result(divisor))
    assert [tuple(r.shape) for r in result] == [s.shape for s in specs]
    _assert_close(result, _reference(uploads, weights, divisor))


@pytest.mark.parametrize("wire", [torch.float16, torch.bfloat16])
def test_compressed_wire_dtype_is_widened_before_summing(wire: torch.dtype) -> None:
    specs = _specs(torch.float32)
    layout = Layout(specs, wire)
    uploads = [_gradients(specs, seed, wire) for seed in range(3)]
    acc = Accumulator(layout)
    for tensors, w in zip(uploads, (5, 6, 7), strict=True):
        acc.commit(_stage(layout, tensors), w)
    _assert_close(acc.result(18.0), _reference(uploads, (5, 6, 7), 18.0))


def test_reset_forgets_everything() -> None:
    layout = Layout(_specs())
    acc = Accumulator(layout)
    acc.commit(_stage(layout, _gradients(layout.specs, 0)), 3)
    acc.reset()
    assert acc.count == 0 and acc.weight == 0
    assert all(not t.any() for t in acc.result(1.0)), "an empty round sums to zero"
    second = _gradients(layout.specs, 1)
    acc.commit(_stage(layout, second), 2)
    _assert_close(acc.result(2.0), _reference([second], [2], 2.0))


# -- non-finite values ----------------------------------------------------------------------------
def _poisoned(dtype: torch.dtype, where: str, bad: str) -> tuple[Layout, list[torch.Tensor]]:
    specs = [TensorSpec("a", dtype, (400,)), TensorSpec("b", dtype, (300,))]
    tensors = _gradients(specs, 3)
    tensor, index = {"first": (0, 0), "middle": (0, 390), "last": (1, 298)}[where]
    if bad == "inf and -inf":  # both in one chunk: their float64 sum is NaN
        tensors[tensor][index : index + 2] = torch.tensor([float("inf"), float("-inf")])
    else:
        tensors[tensor][index] = float(bad)
    return Layout(specs), tensors


def _feed(staged: StagedUpload, layout: Layout, tensors: Sequence[torch.Tensor]) -> int:
    """Stage every chunk of ``tensors``; return how many chunks there were."""
    chunks = list(iter_chunks([byte_view(t) for t in tensors], layout, CHUNK))
    for tensor, offset, data in chunks:
        staged.add(tensor, offset, data)
    return len(chunks)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_anywhere_is_rejected(dtype: torch.dtype, where: str, bad: str) -> None:
    layout, tensors = _poisoned(dtype, where, bad)
    staged = StagedUpload(layout, CHUNK)
    with pytest.raises(InvalidArgument, match="non-finite"):
        _feed(staged, layout, tensors)
    total = len(list(iter_chunks([byte_view(t) for t in tensors], layout, CHUNK)))
    assert total >= 4
    expected = {"first": 0, "last": total - 1}.get(where)
    if expected is not None:
        assert len(staged.chunks) == expected, "the bad chunk itself must be refused"


def test_inf_and_minus_inf_in_one_chunk_is_rejected() -> None:
    # Their float64 sum is NaN: must be InvalidArgument, not a numpy RuntimeWarning
    # (which the test suite, and any -W error deployment, turns into an exception).
    layout, tensors = _poisoned(torch.float32, "middle", "inf and -inf")
    with pytest.raises(InvalidArgument, match="non-finite"):
        _feed(StagedUpload(layout, CHUNK), layout, tensors)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_upload_that_failed_validation_commits_nothing(where: str) -> None:
    layout, tensors = _poisoned(torch.float32, where, "nan")
    staged = StagedUpload(layout, CHUNK)
    with pytest.raises(InvalidArgument, match="non-finite"):
        _feed(staged, layout, tensors)
    # DESIGN.md: a failed upload leaves no trace, even if someone tries to commit it.
    acc = Accumulator(layout)
    with pytest.raises(InvalidArgument):
        acc.commit(staged, 1)
    assert acc.count == 0 and acc.weight == 0
    assert all(not t.any() for t in acc.result(1.0)), "an empty round sums to zero"


def test_large_but_finite_float64_is_accepted() -> None:
    # The fast finiteness test sums in float64; an overflowing sum of finite values is
    # fine, and must not surface as a numpy RuntimeWarning (an error under -W error).
    specs = [TensorSpec("a", torch.float64, (4,))]
    layout = Layout(specs)
    tensors = [torch.tensor([1.7e308, 1.7e308, -1e308, 3.0], dtype=torch.float64)]
    acc = Accumulator(layout)
    acc.commit(_stage(layout, tensors), 1)
    assert next(iter(acc.result(1.0))).tolist() == tensors[0].tolist()


# -- atomicity ------------------------------------------------------------------------------------
def test_incomplete_upload_commits_nothing() -> None:
    layout = Layout(_specs())
    acc = Accumulator(layout)
    first = _gradients(layout.specs, 0)
    acc.commit(_stage(layout, first), 2)
    before = acc.total.copy()
    views = [byte_view(t) for t in _gradients(layout.specs, 1)]
    partial = StagedUpload(layout, CHUNK)
    chunks = list(iter_chunks(views, layout, CHUNK))
    for tensor, offset, data in chunks[:-1]:
        partial.add(tensor, offset, data)
    with pytest.raises(InvalidArgument, match="ended after"):
        partial.complete()
    with pytest.raises(InvalidArgument, match="ended after"):
        acc.commit(partial, 5)
    assert np.array_equal(acc.total, before) and acc.count == 1 and acc.weight == 2
    _assert_close(acc.result(2.0), _reference([first], [2], 2.0))


def test_failed_upload_midway_commits_nothing() -> None:
    layout = Layout(_specs())
    acc = Accumulator(layout)
    staged = StagedUpload(layout, CHUNK)
    chunks = list(iter_chunks([byte_view(t) for t in _gradients(layout.specs, 1)], layout, CHUNK))
    staged.add(*chunks[0])
    with pytest.raises(InvalidArgument, match="out of order"):
        staged.add(*chunks[2])
    with pytest.raises(InvalidArgument):
        acc.commit(staged, 1)
    assert acc.count == 0 and not acc.total.any()


@pytest.mark.parametrize("weight", [0, -1, MAX_EXACT_WEIGHT])
def test_bad_weight_commits_nothing(weight: int) -> None:
    layout = Layout(_specs())
    acc = Accumulator(layout)
    with pytest.raises(InvalidArgument, match="weight"):
        acc.commit(_stage(layout, _gradients(layout.specs, 0)), weight)
    assert acc.count == 0 and acc.weight == 0
    assert all(not t.any() for t in acc.result(1.0)), "an empty round sums to zero"


# -- arrival order ----------------------------------------------------------------------------------
def _commit_in_order(layout: Layout, uploads, weights, order, accumulate: str) -> np.ndarray:
    acc = Accumulator(layout, accumulate)
    for i in order:
        acc.commit(_stage(layout, uploads[i]), weights[i])
    return np.concatenate([t.reshape(-1).numpy() for t in acc.result(1.0)])


def _assert_order_independent(
    specs: Sequence[TensorSpec], weights: Sequence[int], accumulate: str = "float64"
) -> None:
    layout = Layout(specs)
    uploads = [_gradients(specs, 10 + i) for i in range(len(weights))]
    first = _commit_in_order(layout, uploads, weights, range(len(weights)), accumulate)
    for order in itertools.permutations(range(len(weights))):
        total = _commit_in_order(layout, uploads, weights, order, accumulate)
        differ = int((total.view(np.uint64) != first.view(np.uint64)).sum())
        assert differ == 0, f"arrival order {order} changed {differ} of {total.size} sums"


@pytest.mark.parametrize("accumulate", ["float64", "reproducible"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_commit_order_does_not_change_the_sum(dtype: torch.dtype, accumulate: str) -> None:
    _assert_order_independent(_specs(dtype), (101, 250, 3, 77), accumulate)


def test_commit_order_does_not_change_the_sum_of_mixed_low_precision() -> None:
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float16, torch.float32]
    specs = [TensorSpec(s.name, d, s.shape) for s, d in zip(_specs(), dtypes, strict=True)]
    _assert_order_independent(specs, (9, 1_000, 3, 77))


@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (3, 1_000_003, 7, 2**29 - 1)])
def test_commit_order_does_not_change_the_reproducible_sum_of_float64_gradients(
    weights: tuple[int, ...],
) -> None:
    # DESIGN.md: "Arrival order must not change the result". The built-in `linear` task is
    # float64; its default sum kernel is the reproducible one (server/binned.py).
    _assert_order_independent(_specs(torch.float64), weights, "reproducible")
    _assert_order_independent(_specs(), weights, "reproducible")  # mixed dtypes


def test_reproducible_sum_is_close_to_the_float64_reference() -> None:
    specs = _specs()
    layout = Layout(specs)
    uploads = [_gradients(specs, seed) for seed in range(3)]
    acc = Accumulator(layout, "reproducible")
    for tensors, w in zip(uploads, (100, 7, 3_000), strict=True):
        acc.commit(_stage(layout, tensors), w)
    _assert_close(acc.result(3_107.0), _reference(uploads, (100, 7, 3_000), 3_107.0))


# -- float32 accumulation, partial results, step batches ------------------------------------------
def test_float32_accumulator_is_within_float32_rounding_of_the_reference() -> None:
    specs = _specs(torch.float32)
    layout = Layout(specs)
    uploads = [_gradients(specs, seed) for seed in range(3)]
    acc = Accumulator(layout, "float32")
    for tensors, w in zip(uploads, (100, 7, 3_000), strict=True):
        acc.commit(_stage(layout, tensors), w)
    assert acc.total.dtype == np.float32 and acc.total.nbytes == layout.numel * 4
    outputs = [torch.empty(s.shape, dtype=torch.float32) for s in specs]
    acc.result_into(outputs, 3_107.0)
    for got, want in zip(outputs, _reference(uploads, (100, 7, 3_000), 3_107.0), strict=True):
        torch.testing.assert_close(got, want.to(torch.float32), rtol=1e-5, atol=1e-6)


def test_result_into_a_subset_writes_exactly_those_tensors() -> None:
    specs = _specs()
    layout = Layout(specs)
    uploads = [_gradients(specs, seed) for seed in range(2)]
    acc = Accumulator(layout)
    for tensors in uploads:
        acc.commit(_stage(layout, tensors), 3)
    full = list(acc.result(6.0))
    picked = [4, 0, 3]
    outputs = [torch.empty(specs[i].shape, dtype=torch.float64) for i in picked]
    acc.result_into(outputs, 6.0, picked)
    for i, out in zip(picked, outputs, strict=True):
        assert torch.equal(out, full[i])


@pytest.mark.parametrize(
    ("sizes", "limit", "want"),
    [
        ([10, 10, 10], 25, [[0, 1], [2]]),
        ([10, 10, 10], 1, [[0], [1], [2]]),
        ([10, 10, 10], 1 << 30, [[0, 1, 2]]),
        ([50, 1, 1, 50], 20, [[0], [1, 2], [3]]),
        ([], 10, []),
    ],
)
def test_step_batches_cover_every_tensor_in_order_within_the_limit(
    sizes: list[int], limit: int, want: list[list[int]]
) -> None:
    assert batches(sizes, limit) == want


@pytest.mark.parametrize("workers", [1, 2])
def test_add_lets_each_chunk_go_once_added_and_sums_the_same(workers: int) -> None:
    # The staging budget frees up while the add runs: every chunk is reported exactly
    # once, with its payload bytes, and dropped; the sum is bitwise the one of an add
    # that keeps its chunks.
    layout = Layout([TensorSpec("w", torch.float32, (1000,)), TensorSpec("b", torch.float32, (7,))])
    uploads = [_gradients(layout.specs, seed) for seed in (1, 2)]
    sums = []
    for report in (False, True):
        reducer = StreamingReducer("weighted-mean", layout, "float64", workers=workers)
        consumed: list[int] = []
        for tensors, weight in zip(uploads, (3, 5), strict=True):
            staged = _stage(layout, tensors, chunk=64)
            if report:
                staged.on_consumed = consumed.append
            reducer.add(staged, weight)
            if report:
                assert all(chunk is None for chunk in staged.chunks), "every chunk let go"
            else:
                assert all(chunk is not None for chunk in staged.chunks)
        reducer.close()
        if report:
            assert sum(consumed) == 2 * layout.total
            assert max(consumed) <= 64, "one report per chunk"
        outputs = [torch.empty(s.shape, dtype=torch.float64) for s in layout.specs]
        reducer.result_into(outputs, range(len(outputs)))
        sums.append(torch.cat([o.reshape(-1) for o in outputs]))
    assert torch.equal(sums[0], sums[1])
