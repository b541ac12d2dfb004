"""The shard map (fedgrad.shards): byte-balanced, whole-stream, deterministic."""

from __future__ import annotations

import pytest
import torch

from fedgrad.codec import TensorSpec
from fedgrad.errors import ConfigError
from fedgrad.shards import parse_shard, piece_views, plan_shards, settings_differ

SPECS = [
    TensorSpec("a", torch.float32, (10, 7)),
    TensorSpec("b", torch.float64, (3,)),
    TensorSpec("c", torch.float16, (101,)),
    TensorSpec("d", torch.float32, ()),
]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_the_pieces_of_all_shards_are_the_flat_stream_in_order(k: int) -> None:
    plan = plan_shards(SPECS, [f"h:{i}" for i in range(k)])
    flat = [(p.tensor, p.first, p.count) for shard in plan.pieces for p in shard]
    position = {t: 0 for t in range(len(SPECS))}
    order = []
    for t, first, count in flat:
        assert first == position[t] and count > 0
        position[t] += count
        order.append(t)
    assert order == sorted(order)
    assert all(position[t] == s.numel for t, s in enumerate(SPECS))


@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_shards_are_byte_balanced_to_one_element(k: int) -> None:
    plan = plan_shards(SPECS, [f"h:{i}" for i in range(k)])
    sizes = [sum(p.count * SPECS[p.tensor].itemsize for p in shard) for shard in plan.pieces]
    total = sum(s.nbytes for s in SPECS)
    assert sum(sizes) == total
    widest = max(s.itemsize for s in SPECS)
    assert max(sizes) - min(sizes) <= 2 * widest
    assert all(abs(size - total / k) <= 2 * widest for size in sizes)


def test_the_map_is_a_function_of_the_manifest_and_the_peers() -> None:
    one = plan_shards(SPECS, ["h:1", "h:2"])
    assert one == plan_shards(SPECS, ["h:1", "h:2"])
    assert one.map_id != plan_shards(SPECS, ["h:1", "h:3"]).map_id
    assert one.map_id != plan_shards(SPECS[:-1], ["h:1", "h:2"]).map_id


def test_piece_views_write_through_to_the_tensors() -> None:
    tensors = [torch.zeros(s.shape, dtype=s.dtype) for s in SPECS]
    plan = plan_shards(SPECS, ["h:1", "h:2", "h:3"])
    for i, shard in enumerate(plan.pieces):
        for view in piece_views(tensors, shard):
            view.fill_(i + 1)
    assert all(bool((t != 0).all()) for t in tensors)


def test_shard_flags_and_setting_differences_say_what_is_wrong() -> None:
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "x/2", "1", "-1/2"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    differ = settings_differ({"seed": "1", "lr": "0.1"}, {"seed": "2", "lr": "0.1"})
    assert differ == ["seed: '1' here, '2' on shard 0"]
