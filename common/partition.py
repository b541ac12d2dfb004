"""Seeded splits of a data set across ``count`` nodes: IID and the usual non-IID recipes.

Every function computes the whole partition from its arguments alone (no global
random state) and returns the sample indices of shard ``index`` as a 1-D int64
tensor. The shards of ``index = 0 .. count - 1`` are disjoint and together cover
``range(n)`` exactly, every shard is non-empty, and the same arguments always
give the same shards, so each node can compute its own shard independently.

``iid(n, index, count, seed)``
    A seeded permutation (``torch.randperm``) cut into ``count`` parts whose
    sizes differ by at most one. Unlike the other splits, the indices keep the
    permutation's order (they are *not* sorted): this is exactly what the
    ``digits`` task always did, so its IID shards stay bitwise identical.

``classes_per_node(labels, index, count, k, seed)``
    The "pathological non-IID" split of McMahan et al., *Communication-Efficient
    Learning of Deep Networks from Decentralized Data* (AISTATS 2017, sec. 3):
    sort the samples by label, cut them into ``count * k`` shards, and give each
    node ``k`` shards drawn by a seeded permutation of the shards. One change
    makes the bound exact: shards never straddle a class boundary (each class is
    cut into a number of shards proportional to its size, at least one, as equal
    as possible overall), so a node sees at most ``k`` classes, and exactly ``k``
    unless two of its shards come from the same class. Covering ``C`` classes
    this way needs ``count * k >= C``.

``dirichlet(labels, index, count, alpha, seed)``
    The label-skew split of Yurochkin et al., *Bayesian Nonparametric Federated
    Learning of Neural Networks* (ICML 2019), also used by Wang et al. (FedMA,
    ICLR 2020); Hsu et al. (2019) draw per node instead: for each class, draw
    proportions over the nodes from Dirichlet(``alpha``) and cut that class's
    (seeded-shuffled) samples accordingly. Small ``alpha`` (0.1) gives each node
    a few dominant classes; large ``alpha`` (1000) approaches IID. A node left
    with no sample gets one moved from the largest shard (the lowest-numbered
    node on ties): a deterministic repair, so no re-drawing loop is needed.

``unbalanced(n, index, count, sigma, seed)``
    IID samples in unequal amounts per node: the quantity skew of the
    "unbalanced" experiments of Acar et al., *Federated Learning Based on Dynamic
    Regularization* (FedDyn, ICLR 2021), whose node sizes are log-normal with
    spread ``sigma``. Here sizes are proportional to log-normal(0,
    ``sigma``) weights, each node at least one sample; ``sigma = 0`` gives the
    sizes (and, as sets, the shards) of ``iid``.

Randomness: ``iid``, ``unbalanced`` and the shard permutation of
``classes_per_node`` use ``torch.Generator().manual_seed(seed)``; the Dirichlet
and log-normal draws use ``numpy.random.default_rng(seed mod 2**64)`` (the same
wrap-around torch applies to a seed). Bad arguments raise ``ConfigError``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import numpy as np
import torch

from fedgrad.errors import ConfigError

__all__ = ["classes_per_node", "dirichlet", "iid", "unbalanced"]

#: What the label arguments accept: one integer label per sample.
Labels = torch.Tensor | np.ndarray | Sequence[int]


def iid(n: int, index: int, count: int, seed: int) -> torch.Tensor:
    """Return shard ``index`` of a seeded IID split of ``range(n)`` into ``count`` parts.

    Sizes differ by at most one (the first ``n % count`` shards get one more).
    The indices keep the permutation's order and are not sorted, so the shards
    are exactly ``torch.tensor_split(torch.randperm(n, generator=g), count)``
    with ``g`` seeded by ``seed``.

    Raises:
        ConfigError: ``count`` exceeds ``n`` or ``index`` is out of range.
    """
    _check_shard("iid", n, index, count)
    order = torch.randperm(n, generator=_torch_generator(seed))
    return torch.tensor_split(order, count)[index]


def classes_per_node(labels: Labels, index: int, count: int, k: int, seed: int) -> torch.Tensor:
    """Return shard ``index`` of McMahan et al.'s split: ``k`` label-sorted shards per node.

    Args:
        labels: one integer label per sample.
        index: the shard to return, ``0 <= index < count``.
        count: the number of nodes.
        k: shards (so at most classes) per node, ``>= 1``.
        seed: seeds the permutation that deals the shards to nodes.

    Returns:
        The sorted sample indices of the node's ``k`` shards.

    Raises:
        ConfigError: a bad ``k``, ``count * k`` below the number of classes or
            above the number of samples, or a bad ``index``/``count``.
    """
    y = _labels(labels)
    n = len(y)
    _check_shard("classes_per_node", n, index, count)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ConfigError(f"classes_per_node: k must be an integer >= 1, got {k!r}")
    classes, class_sizes = np.unique(y, return_counts=True)
    shards = int(count) * int(k)
    if shards < len(classes):
        need = math.ceil(len(classes) / count)
        raise ConfigError(
            f"classes_per_node: {count} nodes x k={k} = {shards} shards cannot cover "
            f"{len(classes)} classes with at most {k} classes per node; use k >= {need} "
            f"or at least {math.ceil(len(classes) / k)} nodes"
        )
    if shards > n:
        raise ConfigError(
            f"classes_per_node: {count} nodes x k={k} = {shards} shards exceed the {n} "
            f"samples; use k <= {n // count}"
        )
    per_class = _shards_per_class(class_sizes.tolist(), shards)
    order = np.argsort(y, kind="stable")  # grouped by class, ascending within a class
    pieces: list[np.ndarray] = []
    start = 0
    for size, pieces_of_class in zip(class_sizes.tolist(), per_class, strict=True):
        pieces.extend(np.array_split(order[start : start + size], pieces_of_class))
        start += size
    dealt = torch.randperm(shards, generator=_torch_generator(seed))
    mine = dealt[index * k : (index + 1) * k].tolist()
    return _sorted_tensor(np.concatenate([pieces[s] for s in mine]))


def dirichlet(labels: Labels, index: int, count: int, alpha: float, seed: int) -> torch.Tensor:
    """Return shard ``index`` of a Dirichlet(``alpha``) label-skew split.

    For each class in ascending label order, the class's samples are shuffled
    and cut in the proportions of one Dirichlet(``alpha``) draw over the
    ``count`` nodes. Then each empty node, in node order, takes one sample from
    the currently largest shard (lowest-numbered node on ties): the sample that
    shard received last.

    Args:
        labels: one integer label per sample.
        index: the shard to return, ``0 <= index < count``.
        count: the number of nodes, at most the number of samples.
        alpha: the concentration, a finite number ``> 0``; smaller is more skewed.
        seed: seeds the shuffles and the Dirichlet draws.

    Returns:
        The sorted sample indices of the node's shard (never empty).

    Raises:
        ConfigError: a bad ``alpha``, ``index`` or ``count``.
    """
    y = _labels(labels)
    n = len(y)
    _check_shard("dirichlet", n, index, count)
    if not _is_real(alpha) or not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(
            f"dirichlet: alpha must be a finite number > 0, got {alpha!r} "
            "(e.g. 0.1 for strong label skew, 100 for nearly IID)"
        )
    rng = _numpy_generator(seed)
    # ``order`` lists the samples class by class, each class shuffled; ``owner``
    # says which node each gets, so a node receives its samples in ``order``.
    order_parts, owner_parts = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        proportions = rng.dirichlet(np.full(count, float(alpha)))
        # Rounded cumulative cut points: monotone, so no part has a negative size.
        cuts = np.rint(np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        bounds = np.concatenate(([0], np.clip(cuts, 0, len(members)), [len(members)]))
        order_parts.append(members)
        owner_parts.append(np.repeat(np.arange(count), np.diff(bounds)))
    order, owner = np.concatenate(order_parts), np.concatenate(owner_parts)
    sizes = np.bincount(owner, minlength=count)
    # Largest shard first, the lowest node on ties; each node is in the heap at most once.
    largest = [(-int(size), node) for node, size in enumerate(sizes) if size]
    heapq.heapify(largest)
    for node in np.flatnonzero(sizes == 0).tolist():  # only empty nodes gain: none empties
        _, donor = heapq.heappop(largest)  # has >= 2 samples while some node has none
        owner[np.flatnonzero(owner == donor)[-1]] = node  # the donor's last-received sample
        sizes[donor] -= 1
        sizes[node] = 1
        heapq.heappush(largest, (-int(sizes[donor]), donor))
        heapq.heappush(largest, (-1, node))
    return _sorted_tensor(order[owner == index])


def unbalanced(n: int, index: int, count: int, sigma: float, seed: int) -> torch.Tensor:
    """Return shard ``index`` of an IID split whose sizes follow log-normal(0, ``sigma``).

    Each node first gets one sample; the other ``n - count`` are shared in
    proportion to log-normal weights (largest remainders, lowest node first on
    ties). The samples are then dealt from the same permutation as ``iid``.

    Args:
        n: the number of samples.
        index: the shard to return, ``0 <= index < count``.
        count: the number of nodes, at most ``n``.
        sigma: the log-normal spread, a finite number ``>= 0``; ``0`` gives equal sizes.
        seed: seeds the weights and the permutation.

    Returns:
        The sorted sample indices of the node's shard (never empty).

    Raises:
        ConfigError: a bad ``sigma``, ``index`` or ``count``.
    """
    _check_shard("unbalanced", n, index, count)
    if not _is_real(sigma) or not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigError(
            f"unbalanced: sigma must be a finite number >= 0, got {sigma!r} "
            "(0 for equal sizes, ~1 to 2 for strongly unequal ones)"
        )
    # log-normal(0, sigma) weights, rescaled by their largest one so no sigma overflows.
    log_weights = _numpy_generator(seed).normal(0.0, float(sigma), size=count)
    weights = np.exp(log_weights - log_weights.max())
    sizes = 1 + _apportion(weights, n - count)
    order = torch.randperm(n, generator=_torch_generator(seed))
    ends = np.cumsum(sizes)
    return _sorted_tensor(order[int(ends[index] - sizes[index]) : int(ends[index])].numpy())


# -- helpers -------------------------------------------------------------------


def _check_shard(split: str, n: int, index: int, count: int) -> None:
    for name, value in (("n", n), ("index", index), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ConfigError(f"{split}: {name} must be an integer, got {value!r}")
    if count < 1:
        raise ConfigError(f"{split}: count must be at least 1 shard, got {count}")
    if not 0 <= index < count:
        raise ConfigError(f"{split}: shard index {index} is out of range; use 0 <= index < {count}")
    if count > n:
        raise ConfigError(
            f"{split}: cannot split {n} samples into {count} non-empty shards; "
            f"use at most {n} shards"
        )


def _is_real(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _labels(labels: Labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ConfigError(f"labels must be 1-D (one per sample), got shape {tuple(y.shape)}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"labels must be integers, got dtype {y.dtype}")
    return y


def _torch_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _numpy_generator(seed: int) -> np.random.Generator:
    # numpy takes no negative seed; torch wraps one mod 2**64, so do the same.
    return np.random.default_rng(int(seed) % 2**64)


def _sorted_tensor(indices: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.sort(indices.astype(np.int64, copy=False)))


def _shards_per_class(class_sizes: list[int], shards: int) -> list[int]:
    """Split ``shards`` over classes: at least one each, at most the class size, and the
    largest mean shard size as small as possible (each next shard goes to the class
    whose shards are currently the largest; the lower class first on ties)."""
    per_class = [1] * len(class_sizes)
    heap: list[tuple[float, int]] = [(-float(n), c) for c, n in enumerate(class_sizes) if n > 1]
    heapq.heapify(heap)
    for _ in range(shards - len(class_sizes)):
        _, c = heapq.heappop(heap)  # never empty: shards <= sum(class_sizes)
        per_class[c] += 1
        if per_class[c] < class_sizes[c]:
            heapq.heappush(heap, (-class_sizes[c] / per_class[c], c))
    return per_class


def _apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Share ``total`` whole units in proportion to ``weights`` (largest remainders)."""
    quotas = weights / weights.sum() * total
    sizes = np.floor(quotas).astype(np.int64)
    fractions = quotas - sizes
    short = total - int(sizes.sum())
    if short >= 0:
        # Stable sort: among equal remainders the lowest node gets the extra unit first.
        sizes[np.argsort(-fractions, kind="stable")[:short]] += 1
    else:  # float rounding overshot: take the units back from the smallest remainders
        candidates = [i for i in np.argsort(fractions, kind="stable") if sizes[i] > 0]
        sizes[candidates[:-short]] -= 1
    return sizes
