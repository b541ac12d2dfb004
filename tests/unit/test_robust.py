"""Robust reducers against plain reference implementations on random inputs.

Every rule here runs on column blocks of the round's uploads (``fedgrad.server.robust``);
the references below take the whole matrix at once, written the obvious way in numpy,
so a bug in the blocking, the ordering, the spill or the statistics shows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from fedgrad.codec import Layout, TensorSpec, byte_view, iter_chunks
from fedgrad.codecs import CastCodec
from fedgrad.config import AggregatorConfig
from fedgrad.errors import ConfigError
from fedgrad.server import robust
from fedgrad.server.reducers import StreamingReducer, make_reducer
from fedgrad.server.robust import RobustReducer, check_fits
from fedgrad.server.staging import StagedUpload

SPECS = [
    TensorSpec("w", torch.float32, (37, 11)),
    TensorSpec("b", torch.float32, (11,)),
    TensorSpec("s", torch.float32, ()),
]
LAYOUT = Layout(SPECS)
CHUNK = 512


def _rows(n: int, seed: int, outliers: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, LAYOUT.numel)).astype(np.float32)
    rows[:outliers] *= 100.0  # attackers: far from the honest cloud
    return rows


def _staged(row: np.ndarray) -> StagedUpload:
    staged = StagedUpload(CastCodec(SPECS), CHUNK)
    tensors, at = [], 0
    for spec in SPECS:
        n = math.prod(spec.shape)
        tensors.append(torch.from_numpy(row[at : at + n].copy()).reshape(spec.shape))
        at += n
    for tensor, offset, data in iter_chunks([byte_view(t) for t in tensors], LAYOUT, CHUNK):
        staged.add(tensor, offset, data)
    return staged


def _reduce(reducer: object, rows: np.ndarray, keys: Sequence[str]) -> np.ndarray:
    for row, key in zip(rows, keys, strict=True):
        reducer.add(_staged(row), 1, 1.0, key)  # type: ignore[attr-defined]
    outputs = [torch.empty(s.shape, dtype=s.dtype) for s in SPECS]
    reducer.result_into(outputs, range(len(SPECS)))  # type: ignore[attr-defined]
    return torch.cat([o.reshape(-1).double() for o in outputs]).numpy()


def _f32(values: np.ndarray) -> np.ndarray:
    """The float64 reference as the float32 model's gradient holds it."""
    return values.astype(np.float32).astype(np.float64)


def _keys(n: int) -> list[str]:
    return [f"node-{i:02d}" for i in range(n)]


# -- references -------------------------------------------------------------------------
def _ref_trimmed(x: np.ndarray, beta: float) -> np.ndarray:
    k = int(math.floor(beta * len(x)))
    s = np.sort(x.astype(np.float64), axis=0)
    return s[k : len(x) - k].mean(axis=0)


def _ref_krum_scores(x: np.ndarray, f: int) -> list[float]:
    x = x.astype(np.float64)
    n = len(x)
    d = [[float(((x[i] - x[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    m = n - f - 2
    return [sum(sorted(d[i][j] for j in range(n) if j != i)[:m]) for i in range(n)]


def _ref_geometric_median(x: np.ndarray, iterations: int = 200) -> np.ndarray:
    x = x.astype(np.float64)
    z = x.mean(axis=0)
    for _ in range(iterations):
        w = 1.0 / np.maximum(1e-12, np.linalg.norm(x - z, axis=1))
        z = (w[:, None] * x).sum(axis=0) / w.sum()
    return z


def _objective(x: np.ndarray, z: np.ndarray) -> float:
    return float(np.linalg.norm(x.astype(np.float64) - z, axis=1).sum())


# -- the rules ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_median_is_the_coordinate_wise_median(n: int) -> None:
    x = _rows(n, seed=n)
    got = _reduce(RobustReducer("median", LAYOUT, 1 << 30), x, _keys(n))
    assert np.array_equal(got, _f32(np.median(x.astype(np.float64), axis=0)))


@pytest.mark.parametrize(("n", "beta"), [(5, 0.2), (10, 0.1), (10, 0.3), (7, 0.0)])
def test_trimmed_mean_drops_beta_n_from_each_end(n: int, beta: float) -> None:
    x = _rows(n, seed=3, outliers=2)
    reducer = RobustReducer(f"trimmed-mean:{beta}", LAYOUT, 1 << 30)
    got = _reduce(reducer, x, _keys(n))
    np.testing.assert_array_equal(got, _f32(_ref_trimmed(x, beta)))
    trimmed = [reducer.stats[k]["trimmed_fraction"] for k in _keys(n)]
    if int(beta * n):
        assert trimmed[0] > 0.5 and trimmed[1] > 0.5, "the outliers are trimmed most"
    else:
        assert trimmed == [0.0] * n


@pytest.mark.parametrize(("n", "f", "m"), [(7, 2, 1), (10, 2, 1), (10, 2, 4), (9, 1, 6)])
def test_krum_and_multi_krum_pick_the_lowest_scores(n: int, f: int, m: int) -> None:
    x = _rows(n, seed=n + f, outliers=f)
    rule = f"krum:{f}" if m == 1 else f"multi-krum:{f},{m}"
    reducer = RobustReducer(rule, LAYOUT, 1 << 30)
    got = _reduce(reducer, x, _keys(n))
    scores = _ref_krum_scores(x, f)
    chosen = sorted(np.argsort(scores, kind="stable")[:m].tolist())
    np.testing.assert_array_equal(got, _f32(x[chosen].astype(np.float64).mean(axis=0)))
    assert not set(chosen) & set(range(f)), "no attacker is chosen"
    selected = [reducer.stats[k]["selected"] for k in _keys(n)]
    assert [i for i, s in enumerate(selected) if s == 1.0] == chosen
    np.testing.assert_allclose(
        [reducer.stats[k]["krum_score"] for k in _keys(n)], scores, rtol=1e-6
    )


@pytest.mark.parametrize("n", [3, 6, 11])
def test_geometric_median_nearly_minimises_the_sum_of_distances(n: int) -> None:
    x = _rows(n, seed=11 * n, outliers=1)
    got = _reduce(RobustReducer("geometric-median", LAYOUT, 1 << 30), x, _keys(n))
    want = _ref_geometric_median(x)
    best, ours, mean = _objective(x, want), _objective(x, got), _objective(x, x.mean(axis=0))
    assert ours <= best * (1 + 1e-3), "within 0.1% of the converged Weiszfeld optimum"
    assert ours < mean, "better than the mean, which the outlier drags"
    assert np.linalg.norm(got) < np.linalg.norm(x.mean(axis=0))


@pytest.mark.parametrize("rule", ["median", "trimmed-mean:0.2", "krum:1", "geometric-median"])
def test_arrival_order_does_not_change_a_robust_result(rule: str) -> None:
    x, keys = _rows(5, seed=9, outliers=1), _keys(5)
    results = set()
    for order in itertools.islice(itertools.permutations(range(5)), 0, 120, 17):
        reducer = RobustReducer(rule, LAYOUT, 1 << 30)
        results.add(_reduce(reducer, x[list(order)], [keys[i] for i in order]).tobytes())
    assert len(results) == 1


def test_uploads_past_the_budget_spill_to_files_and_give_the_same_result(tmp_path: Path) -> None:
    x, keys = _rows(6, seed=5), _keys(6)
    in_memory = _reduce(RobustReducer("median", LAYOUT, 1 << 30), x, keys)
    reducer = RobustReducer("median", LAYOUT, 2 * LAYOUT.numel * 4, spill_dir=str(tmp_path))
    for row, key in zip(x, keys, strict=True):
        reducer.add(_staged(row), 1, 1.0, key)
    assert len(list(tmp_path.iterdir())) == 4, "two rows in memory, four spilled"
    outputs = [torch.empty(s.shape, dtype=s.dtype) for s in SPECS]
    reducer.result_into(outputs, range(len(SPECS)))
    got = torch.cat([o.reshape(-1).double() for o in outputs]).numpy()
    assert np.array_equal(got, in_memory)
    reducer.reset()
    assert list(tmp_path.iterdir()) == [], "a round's spill files go with the round"


def test_clipping_bounds_every_upload_for_streaming_and_robust_rules() -> None:
    x = _rows(3, seed=2)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    clip = float(norms.min() / 2)
    want = np.median(x.astype(np.float64) * (clip / norms)[:, None], axis=0)
    robust_got = _reduce(RobustReducer("median", LAYOUT, 1 << 30, clip=clip), x, _keys(3))
    np.testing.assert_allclose(robust_got, want, rtol=1e-5, atol=1e-6)
    streaming = StreamingReducer("sum", LAYOUT, "float64", clip=clip)
    got = _reduce(streaming, x, _keys(3))
    np.testing.assert_allclose(got, (x * (clip / norms)[:, None]).sum(axis=0), rtol=1e-5, atol=1e-6)
    unclipped = _staged(x[0])
    norm = StreamingReducer("sum", LAYOUT, "float64").add(unclipped, 1)
    assert norm == pytest.approx(norms[0], rel=1e-6), "add returns the upload's norm"


def test_max_samples_per_node_caps_the_weight() -> None:
    reducer = make_reducer("weighted-mean", LAYOUT, "float64", 1, max_samples=100)
    assert (reducer.weight(5), reducer.weight(100), reducer.weight(10**8)) == (5, 100, 100)
    assert make_reducer("median", LAYOUT, "float64", 1).weight(10**8) == 1


# -- start-up checks ---------------------------------------------------------------------
def test_krum_refuses_too_few_uploads_per_round() -> None:
    with pytest.raises(ConfigError, match="at least 2F\\+3 = 7 uploads"):
        check_fits(AggregatorConfig(nodes=6, reduce="krum:2"), LAYOUT)
    check_fits(AggregatorConfig(nodes=7, reduce="krum:2"), LAYOUT)
    with pytest.raises(ConfigError, match="M = 6 must be <= n - F = 5"):
        check_fits(AggregatorConfig(nodes=7, reduce="multi-krum:2,6"), LAYOUT)


def test_a_round_that_fits_neither_memory_nor_disk_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = Layout([TensorSpec("w", torch.float32, (64, 1 << 20))])  # 256 MiB a row
    cfg = AggregatorConfig(nodes=10, reduce="median", staging_mb=256, spill_dir=str(tmp_path))
    free = 512 << 20

    class Usage:
        def __init__(self, free: int) -> None:
            self.free = free

    monkeypatch.setattr(robust.shutil, "disk_usage", lambda where: Usage(free))
    with pytest.raises(ConfigError, match=r"10 x 268 MB = 2684 MB.*--spill-dir"):
        check_fits(cfg, big)
    free = 10 << 30
    check_fits(cfg, big)  # fits once the spill disk is big enough


def test_a_huge_finite_upload_has_a_finite_norm_and_no_warning() -> None:
    # Squares of values near float32's limit overflow; the norm must not (warnings are errors).
    row = np.full(LAYOUT.numel, 3e37, dtype=np.float32)
    norm = RobustReducer("median", LAYOUT, 1 << 30).add(_staged(row), 1, 1.0, "n")
    assert math.isfinite(norm) and norm == pytest.approx(3e37 * math.sqrt(LAYOUT.numel))
