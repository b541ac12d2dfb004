"""Tests of fedgrad.partition: exact disjoint covers, determinism, skew, and error messages."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedgrad import partition
from fedgrad.errors import ConfigError

#: 10 classes of unequal sizes (37 .. 109 samples), in a shuffled order.
_SIZES = [37 + 8 * c for c in range(10)]
LABELS = torch.from_numpy(np.random.default_rng(123).permutation(np.repeat(np.arange(10), _SIZES)))
N = len(LABELS)

#: Each split as f(index, count, seed), on LABELS (or on N samples).
SPLITS: dict[str, Callable[[int, int, int], torch.Tensor]] = {
    "iid": lambda i, c, s: partition.iid(N, i, c, s),
    # One node needs k = 10 to hold all 10 classes; more nodes use k = 3.
    "classes_per_node": lambda i, c, s: partition.classes_per_node(
        LABELS, i, c, 10 if c == 1 else 3, s
    ),
    "dirichlet": lambda i, c, s: partition.dirichlet(LABELS, i, c, 0.5, s),
    "dirichlet_tiny_alpha": lambda i, c, s: partition.dirichlet(LABELS, i, c, 1e-3, s),
    "unbalanced": lambda i, c, s: partition.unbalanced(N, i, c, 1.5, s),
}


def _shards(split: Callable[[int, int, int], torch.Tensor], count: int, seed: int = 0):
    return [split(i, count, seed) for i in range(count)]


def _tv_from_uniform(labels: np.ndarray, shard: torch.Tensor) -> float:
    """Total variation distance of the shard's class mix from the uniform mix of 10 classes."""
    mix = np.bincount(labels[shard.numpy()], minlength=10) / len(shard)
    return float(0.5 * np.abs(mix - 0.1).sum())


# -- every split ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPLITS))
@pytest.mark.parametrize("count", [1, 4, 7, 50, 200])
def test_shards_cover_range_exactly_and_are_non_empty(name: str, count: int) -> None:
    shards = _shards(SPLITS[name], count)
    for shard in shards:
        assert shard.dtype == torch.int64 and shard.dim() == 1
        assert len(shard) >= 1
        if name != "iid":
            assert torch.equal(shard, shard.sort().values), "indices are sorted ascending"
    everything = torch.cat(shards)
    assert len(everything) == N, "no index twice"
    assert torch.equal(everything.sort().values, torch.arange(N))


@pytest.mark.parametrize("name", ["iid", "dirichlet", "unbalanced"])
def test_one_sample_per_node_when_count_equals_n(name: str) -> None:
    shards = _shards(SPLITS[name], N)
    assert all(len(s) == 1 for s in shards)
    assert sorted(int(s) for s in shards) == list(range(N))


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_deterministic_and_seeded(name: str) -> None:
    split = SPLITS[name]
    first = _shards(split, 7, seed=11)
    again = _shards(split, 7, seed=11)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # The torch global RNG plays no part.
    torch.manual_seed(0)
    a = split(3, 7, 11)
    torch.manual_seed(1)
    assert torch.equal(a, split(3, 7, 11))
    other = _shards(split, 7, seed=12)
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_labels_as_tensor_array_or_list_agree() -> None:
    for split in (partition.classes_per_node, partition.dirichlet):
        got = [split(labels, 2, 5, 2, 9) for labels in (LABELS, LABELS.numpy(), LABELS.tolist())]
        assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


def test_full_range_of_seeds() -> None:
    # numpy takes no negative seed; the module wraps seeds mod 2**64 like torch.
    for seed in (0, 2**63, 2**64 - 1, -1):
        assert len(partition.dirichlet(LABELS, 0, 3, 1.0, seed)) > 0
        assert len(partition.unbalanced(N, 0, 3, 1.0, seed)) > 0
    assert torch.equal(
        partition.dirichlet(LABELS, 0, 3, 1.0, -1),
        partition.dirichlet(LABELS, 0, 3, 1.0, 2**64 - 1),
    )


# -- iid -----------------------------------------------------------------------


@pytest.mark.parametrize(("n", "count"), [(1347, 4), (1347, 7), (10, 10), (5, 1)])
def test_iid_is_the_historical_digits_split(n: int, count: int) -> None:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    expected = torch.tensor_split(order, count)
    shards = [partition.iid(n, i, count, 3) for i in range(count)]
    assert all(torch.equal(a, b) for a, b in zip(shards, expected, strict=True))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


# -- classes_per_node ------------------------------------------------------------


@pytest.mark.parametrize(("count", "k"), [(10, 1), (5, 2), (4, 3), (3, 4), (20, 2), (100, 3)])
def test_classes_per_node_sees_at_most_k_classes(count: int, k: int) -> None:
    shards = _shards(lambda i, c, s: partition.classes_per_node(LABELS, i, c, k, s), count)
    seen = [len(LABELS[s].unique()) for s in shards]
    assert max(seen) <= k, seen
    # Usually exactly k: shards of one class rarely meet on one node.
    assert sum(n == k for n in seen) >= count // 2, seen
    if count * k == 10:  # one shard per class: every node exactly k, every class once
        assert seen == [k] * count
        assert sorted(LABELS[torch.cat(shards)].unique().tolist()) == list(range(10))


def test_classes_per_node_shards_are_near_equal() -> None:
    # 20 nodes x 2 = 40 single-class shards over classes of 37..109 samples: sizes
    # as equal as whole classes allow (a node has two shards of ~24-28 samples).
    sizes = [len(s) for s in _shards(SPLITS["classes_per_node"], 20)]
    assert sum(sizes) == N
    assert max(sizes) <= 1.5 * min(sizes), sizes


def test_classes_per_node_seed_deals_different_classes() -> None:
    def classes(seed: int) -> list[list[int]]:
        shards = [partition.classes_per_node(LABELS, i, 5, 2, seed) for i in range(5)]
        return [sorted(LABELS[s].unique().tolist()) for s in shards]

    assert classes(0) == classes(0)
    assert classes(0) != classes(1)


# -- dirichlet -------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirichlet_small_alpha_is_skewed(seed: int) -> None:
    labels = np.repeat(np.arange(10), 100)
    shards = [partition.dirichlet(labels, i, 10, 0.1, seed) for i in range(10)]
    distances = [_tv_from_uniform(labels, s) for s in shards]
    # Measured 0.66-0.74 mean over seeds 0-19; IID would give ~0.
    assert np.mean(distances) > 0.5, distances
    assert min(len(np.unique(labels[s.numpy()])) for s in shards) < 10
    sizes = [len(s) for s in shards]
    assert max(sizes) > 2 * min(sizes), sizes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirichlet_large_alpha_is_near_uniform(seed: int) -> None:
    labels = np.repeat(np.arange(10), 100)
    shards = [partition.dirichlet(labels, i, 10, 1000.0, seed) for i in range(10)]
    distances = [_tv_from_uniform(labels, s) for s in shards]
    # Measured <= 0.036 over seeds 0-19.
    assert max(distances) < 0.1, distances
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) < 20, sizes


def test_dirichlet_repairs_empty_nodes() -> None:
    # alpha 1e-3 puts each class on ~one node: most of 50 nodes would be empty.
    shards = _shards(SPLITS["dirichlet_tiny_alpha"], 50)
    sizes = sorted(len(s) for s in shards)
    assert sizes[0] == 1 and sizes.count(1) >= 30, sizes


# -- unbalanced --------------------------------------------------------------------


def test_unbalanced_sigma_zero_is_iid() -> None:
    for count in (4, 7):
        for i in range(count):
            expected = partition.iid(N, i, count, 5).sort().values
            assert torch.equal(partition.unbalanced(N, i, count, 0.0, 5), expected)


def test_unbalanced_sizes_spread_with_sigma() -> None:
    sizes = [len(s) for s in _shards(SPLITS["unbalanced"], 10)]
    assert max(sizes) > 5 * min(sizes), sizes
    huge = [len(partition.unbalanced(N, i, 10, 1e6, 0)) for i in range(10)]
    assert sorted(huge) == [1] * 9 + [N - 9], "a huge sigma neither overflows nor empties a node"


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: partition.iid(10, 0, 11, 0), r"cannot split 10 samples into 11 .*at most 10"),
        (lambda: partition.iid(10, 4, 4, 0), r"index 4 is out of range; use 0 <= index < 4"),
        (lambda: partition.iid(10, -1, 4, 0), r"index -1 is out of range"),
        (lambda: partition.iid(10, 0, 0, 0), r"count must be at least 1"),
        (lambda: partition.unbalanced(5, 0, 6, 1.0, 0), r"cannot split 5 samples into 6"),
        (lambda: partition.unbalanced(5, 0, 2, -1.0, 0), r"sigma must be a finite number >= 0"),
        (lambda: partition.unbalanced(5, 0, 2, float("nan"), 0), r"sigma must be"),
        (lambda: partition.classes_per_node(LABELS, 0, 4, 0, 0), r"k must be an integer >= 1"),
        (lambda: partition.classes_per_node(LABELS, 0, 4, 2, 0), r"cannot cover 10 classes.*k >= 3"),
        (lambda: partition.classes_per_node(LABELS, 0, 4, 2, 0), r"at least 5 nodes"),
        (lambda: partition.classes_per_node(LABELS, 0, 100, 8, 0), r"exceed the 730 samples; use k <= 7"),
        (lambda: partition.classes_per_node(LABELS, 7, 5, 2, 0), r"classes_per_node: shard index 7"),
        (lambda: partition.dirichlet(LABELS, 0, 4, 0.0, 0), r"alpha must be a finite number > 0"),
        (lambda: partition.dirichlet(LABELS, 0, 4, -0.5, 0), r"alpha must be a finite number > 0"),
        (lambda: partition.dirichlet(LABELS, 0, 4, float("inf"), 0), r"alpha must be"),
        (lambda: partition.dirichlet(LABELS, 0, N + 1, 1.0, 0), r"into 731 non-empty shards"),
        (lambda: partition.dirichlet([[0, 1]], 0, 1, 1.0, 0), r"labels must be 1-D"),
        (lambda: partition.dirichlet([0.5, 1.5], 0, 1, 1.0, 0), r"labels must be integers"),
    ],
)  # fmt: skip
def test_bad_arguments_say_what_to_fix(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        call()
