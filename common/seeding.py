"""Node-side randomness derived from (seed, node id, round), never from process lifetime."""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "round_generator"]


def derive_seed(seed: int, node_id: str, round_: int) -> int:
    """Return a 63-bit seed that depends only on (seed, node_id, round_)."""
    digest = hashlib.blake2b(f"{seed}\x00{node_id}\x00{round_}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def round_generator(seed: int, node_id: str, round_: int) -> torch.Generator:
    """Return a torch.Generator seeded for this node and round, so a restart recomputes it."""
    return torch.Generator().manual_seed(derive_seed(seed, node_id, round_))
