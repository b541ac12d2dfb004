"""The shard map of a sharded aggregator: which shard owns which elements of the model.

Shard I of K owns the flat stream's bytes [round(I*T/K), round((I+1)*T/K)) of a model
of T bytes (manifest order, each tensor's elements row-major), each boundary moved
down to the nearest element start: whole tensors, and slices of the tensors a boundary
falls inside. The split is a pure function of the manifest and K, so every shard and
every node computes the same one; it is byte-balanced to within one element.

A shard sees its part as a model of its own whose tensors are the pieces (1-d, the
tensor's dtype), so the codecs, the staging, the reducers and the optimizer work on it
unchanged, and an element-wise optimizer steps every element exactly as unsharded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedgrad.codec import TensorSpec
from fedgrad.errors import ConfigError

__all__ = [
    "ShardPlan",
    "Piece",
    "map_id",
    "parse_shard",
    "piece_specs",
    "piece_views",
    "plan_shards",
    "settings_differ",
]


@dataclass(frozen=True)
class Piece:
    """Elements [first, first + count) of manifest tensor ``tensor``."""

    tensor: int
    first: int
    count: int


@dataclass(frozen=True)
class ShardPlan:
    """Every shard's pieces, in shard order, and the map's id."""

    pieces: tuple[tuple[Piece, ...], ...]
    addresses: tuple[str, ...]
    map_id: str

    @property
    def count(self) -> int:
        return len(self.pieces)


def plan_shards(specs: Sequence[TensorSpec], addresses: Sequence[str]) -> ShardPlan:
    """Split the manifest ``specs`` over ``len(addresses)`` shards (see the module doc)."""
    k = len(addresses)
    total = sum(s.nbytes for s in specs)
    cuts = [_element_start(specs, round(i * total / k)) for i in range(k)] + [total]
    shards: list[tuple[Piece, ...]] = []
    for i in range(k):
        shards.append(tuple(_pieces(specs, cuts[i], cuts[i + 1])))
    return ShardPlan(tuple(shards), tuple(addresses), map_id(specs, addresses))


def _element_start(specs: Sequence[TensorSpec], position: int) -> int:
    """The largest element start <= ``position`` in the flat stream."""
    start = 0
    for s in specs:
        if position < start + s.nbytes:
            return start + (position - start) // s.itemsize * s.itemsize
        start += s.nbytes
    return start


def _pieces(specs: Sequence[TensorSpec], lo: int, hi: int) -> list[Piece]:
    out, start = [], 0
    for t, s in enumerate(specs):
        a, b = max(lo, start), min(hi, start + s.nbytes)
        if a < b:
            out.append(Piece(t, (a - start) // s.itemsize, (b - a) // s.itemsize))
        start += s.nbytes
    return out


def map_id(specs: Sequence[TensorSpec], addresses: Sequence[str]) -> str:
    """A digest of the manifest and the shard addresses (16 hex digits)."""
    text = "\n".join([f"{s.name}:{str(s.dtype)}:{list(s.shape)}" for s in specs] + list(addresses))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def piece_specs(specs: Sequence[TensorSpec], pieces: Sequence[Piece]) -> list[TensorSpec]:
    """The manifest a shard's pieces make: ``NAME[first:stop]``, 1-d, the tensor's dtype."""
    return [
        TensorSpec(
            f"{specs[p.tensor].name}[{p.first}:{p.first + p.count}]",
            specs[p.tensor].dtype,
            (p.count,),
        )
        for p in pieces
    ]


def piece_views(tensors: Sequence[torch.Tensor], pieces: Sequence[Piece]) -> list[torch.Tensor]:
    """Flat views of ``tensors`` (contiguous) at each piece: reads and writes go through."""
    return [tensors[p.tensor].view(-1)[p.first : p.first + p.count] for p in pieces]


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``--shard I/K``.

    Raises:
        ConfigError: not two integers with 0 <= I < K.
    """
    index, _, count = text.partition("/")
    try:
        i, k = int(index), int(count)
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/K, e.g. 0/2") from None
    if not 0 <= i < k:
        raise ConfigError(f"--shard {text!r}: need 0 <= I < K")
    return i, k


def settings_differ(mine: Mapping[str, str], theirs: Mapping[str, str]) -> list[str]:
    """Describe each setting that differs, e.g. ``"optimizer: 'sgd' here, 'adam' there"``."""
    return [
        f"{key}: {mine.get(key)!r} here, {theirs.get(key)!r} on shard 0"
        for key in sorted(set(mine) | set(theirs))
        if mine.get(key) != theirs.get(key)
    ]
