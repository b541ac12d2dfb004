"""Simulated attacks of ``fedgrad node --simulate-attack``: what a malicious node uploads.

For tests of the aggregator's defences and for users evaluating them
(``--reduce median``, ``--clip-update-norm``, the Join's sample limit). Each
attack is a documented, seeded function of the honest update; the node computes
its honest update first, so the task's ``round_generator`` draws exactly what it
draws in an honest node, and the noise has a stream of its own.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from fedgrad.config import NodeConfig, parse_attack
from fedgrad.logs import once_per_process
from fedgrad.task import Update

__all__ = ["attack_generator", "attacked", "claimed_samples", "warn_attack"]

log = logging.getLogger("fedgrad.node")


def attack_generator(cfg: NodeConfig, round_: int) -> torch.Generator:
    """Return the generator of ``--simulate-attack noise:S`` for this node and round.

    Seeded from (seed, node id, round) with its own salt, so it is a stream apart from
    the task's ``round_generator`` (an honest node's results do not change) and a
    restarted attacker draws the same noise again.
    """
    key = f"simulate-attack\x00{cfg.seed}\x00{cfg.node_id}\x00{round_}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def claimed_samples(attack: str | None, honest: int) -> int:
    """Return the sample count a node claims: N under ``samples:N``, else ``honest``."""
    if attack is None:
        return honest
    kind, value = parse_attack(attack)
    return int(value) if kind == "samples" else honest


def attacked(update: Update, attack: str | None, generator: torch.Generator) -> Update:
    """Return what a node simulating ``attack`` uploads instead of its honest ``update``.

    * ``sign-flip:S``: ``-S * g`` for every tensor ``g``.
    * ``scale:S``: ``S * g`` (model replacement, Bagdasaryan et al. 2018,
      https://arxiv.org/abs/1807.00459).
    * ``noise:S``: ``g`` plus Gaussian noise of standard deviation ``S`` per element,
      drawn from ``generator`` (``attack_generator``) in float32 (float64 for a
      float64 tensor), tensor by tensor in manifest order.
    * ``samples:N``: the honest gradients, claiming ``N`` samples.

    Args:
        update: the honest update (left as it is).
        attack: a ``simulate_attack`` spec (``fedgrad.config.parse_attack``), None: honest.
        generator: the noise's generator; the other attacks draw nothing.

    Returns:
        A new ``Update`` with the same metrics (``update`` itself when honest).
    """
    if attack is None:
        return update
    kind, value = parse_attack(attack)
    if kind == "samples":
        return Update(list(update.gradients), int(value), dict(update.metrics))
    if kind == "noise":
        gradients = [g + _gaussian(g, value, generator) for g in update.gradients]
    else:
        factor = -value if kind == "sign-flip" else value
        gradients = [factor * g for g in update.gradients]
    return Update(gradients, update.num_samples, dict(update.metrics))


def _gaussian(like: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    # Drawn on the CPU generator in at least float32 (half-precision randn is not on
    # every backend), scaled there, then cast to the gradient's dtype and device.
    dtype = torch.promote_types(like.dtype, torch.float32)
    noise = torch.randn(like.shape, generator=generator, dtype=dtype) * std
    return noise.to(dtype=like.dtype, device=like.device)


_EFFECTS = {
    "sign-flip": "-{value:g} x its honest update",
    "scale": "{value:g} x its honest update",
    "noise": "its honest update + Gaussian noise of std {value:g} per element",
    "samples": "its honest update, claiming {value:.0f} samples",
}


@once_per_process
def warn_attack(attack: str) -> None:
    """Say once per process (and attack) that nodes here upload malicious updates."""
    kind, value = parse_attack(attack)
    log.warning(
        "simulating an attack: each node with --simulate-attack %s uploads %s",
        attack,
        _EFFECTS[kind].format(value=value),
        extra={"event": "simulate_attack"},
    )
