"""``--simulate-attack``: what an attacking node uploads, against locally computed references.

``fedgrad.client.attacks.attacked`` is a pure function of the honest update; the noise
comes from its own generator (seed, node id, round, and a salt), never from torch's
global generator or the task's ``round_generator``. The flag, ``--count`` and
``LocalCluster(attackers=...)`` reach every node's config; nothing here starts a server
(``tests/integration/test_attacks.py`` trains with attackers).
"""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch

from fedgrad.client.attacks import attack_generator, attacked, claimed_samples, warn_attack
from fedgrad.client.node import join_request
from fedgrad.codec import Layout, specs_of
from fedgrad.config import NodeConfig
from fedgrad.errors import ConfigError
from fedgrad.launch.cli import build_parser, subparser
from fedgrad.launch.commands import fleet_node_configs, node_config
from fedgrad.launch.local import LocalCluster
from fedgrad.launch.options import resolve
from fedgrad.seeding import round_generator
from fedgrad.task import Update, trainable_parameters

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _update(dtype: torch.dtype = torch.float32, seed: int = 0) -> Update:
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(shape, generator=g).to(dtype) for shape in ((7, 5), (5,), (3, 2, 2))]
    return Update(grads, 42, {"loss": 0.25})


def _copy(update: Update) -> Update:
    return Update([g.clone() for g in update.gradients], update.num_samples, dict(update.metrics))


def _same(a: Update, b: Update) -> bool:
    return (
        a.num_samples == b.num_samples
        and a.metrics == b.metrics
        and all(torch.equal(x, y) for x, y in zip(a.gradients, b.gradients, strict=True))
    )


# -- the pure function -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("attack", "factor"), [("sign-flip:10", -10.0), ("scale:100", 100.0),
                                                ("sign-flip:0.5", -0.5), ("scale:3", 3.0)])  # fmt: skip
def test_sign_flip_and_scale_are_exact_multiples(attack: str, factor: float, dtype: torch.dtype):
    honest = _update(dtype)
    before = _copy(honest)
    out = attacked(honest, attack, torch.Generator())
    for g, h in zip(out.gradients, honest.gradients, strict=True):
        assert g.dtype == h.dtype and g.shape == h.shape
        assert torch.equal(g, factor * h)
    assert out.num_samples == 42 and out.metrics == {"loss": 0.25}
    assert _same(honest, before), "the honest update was modified"


def _reference_noise(
    cfg: NodeConfig, round_: int, honest: Update, std: float
) -> list[torch.Tensor]:
    """The documented noise, computed here: blake2b of the salted key seeds the draws."""
    key = f"simulate-attack\x00{cfg.seed}\x00{cfg.node_id}\x00{round_}".encode()
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for g in honest.gradients:
        draw = torch.randn(
            g.shape, generator=gen, dtype=torch.promote_types(g.dtype, torch.float32)
        )
        out.append(g + (draw * std).to(g.dtype))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noise_is_the_documented_seeded_gaussian(dtype: torch.dtype) -> None:
    cfg, honest = NodeConfig(node_id="n-3", seed=7), _update(dtype)
    before = _copy(honest)
    out = attacked(honest, "noise:0.5", attack_generator(cfg, 4))
    expected = _reference_noise(cfg, 4, honest, 0.5)
    for g, e in zip(out.gradients, expected, strict=True):
        assert g.dtype == dtype and torch.equal(g, e)
    assert out.num_samples == 42 and out.metrics == {"loss": 0.25}
    assert _same(honest, before)
    again = attacked(honest, "noise:0.5", attack_generator(cfg, 4))
    assert _same(out, again), "the same (seed, node, round) must draw the same noise"


def test_noise_has_standard_deviation_s_and_differs_by_node_round_and_seed() -> None:
    honest = Update([torch.zeros(200_000)], 1)
    cfg = NodeConfig(node_id="n-1", seed=3)
    noise = attacked(honest, "noise:2.5", attack_generator(cfg, 0)).gradients[0]
    # 200,000 draws: the sample std is within 1% of 2.5 (its std is ~0.4%), the mean ~0.
    assert noise.std().item() == pytest.approx(2.5, rel=0.01)
    assert abs(noise.mean().item()) < 0.05
    others = [NodeConfig(node_id="n-2", seed=3), NodeConfig(node_id="n-1", seed=4)]
    draws = [attacked(honest, "noise:2.5", attack_generator(c, 0)).gradients[0] for c in others]
    draws.append(attacked(honest, "noise:2.5", attack_generator(cfg, 1)).gradients[0])
    assert all(not torch.equal(noise, d) for d in draws)


def test_noise_leaves_torch_global_rng_and_the_task_stream_alone() -> None:
    cfg = NodeConfig(node_id="node-2", seed=5)
    task_stream = round_generator(cfg.seed, cfg.node_id, 3)
    task_state, global_state = task_stream.get_state(), torch.get_rng_state()
    attacked(_update(), "noise:1", attack_generator(cfg, 3))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(task_stream.get_state(), task_state)
    # A stream of its own: not the task's seed for this or any nearby (node, round).
    task_seeds = {
        round_generator(cfg.seed, f"node-{n}", r).initial_seed() for n in range(8) for r in range(8)
    }
    assert attack_generator(cfg, 3).initial_seed() not in task_seeds


def test_samples_changes_the_claimed_count_only() -> None:
    honest = _update()
    out = attacked(honest, "samples:1000000000", torch.Generator())
    assert out.num_samples == 1_000_000_000
    assert out.metrics == honest.metrics
    assert all(g is h for g, h in zip(out.gradients, honest.gradients, strict=True))
    assert honest.num_samples == 42
    assert claimed_samples("samples:500", 42) == 500
    assert claimed_samples("sign-flip:10", 42) == 42 and claimed_samples(None, 42) == 42


def test_an_honest_node_uploads_its_update_unchanged() -> None:
    honest = _update()
    assert attacked(honest, None, torch.Generator()) is honest


def test_an_unknown_attack_is_refused() -> None:
    with pytest.raises(ConfigError, match="simulate_attack must be one of"):
        attacked(_update(), "flip:10", torch.Generator())


def test_an_attacking_process_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    warn_attack.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fedgrad.node"):
        warn_attack("sign-flip:10")
        warn_attack("sign-flip:10")
    assert [r.getMessage() for r in caplog.records] == [
        "simulating an attack: each node with --simulate-attack sign-flip:10 uploads"
        " -10 x its honest update"
    ]


def test_the_join_claims_the_attack_samples() -> None:
    cfg = NodeConfig(simulate_attack="samples:600000000")
    model = torch.nn.Linear(2, 1)
    layout = Layout(specs_of(trainable_parameters(model)))
    request = join_request(cfg, layout, claimed_samples(cfg.simulate_attack, 9))
    assert request.num_samples == 600_000_000


# -- reaching the nodes' configs ---------------------------------------------------------------
def _node_values(*argv: str) -> dict:
    parser = build_parser()
    return dict(resolve(subparser(parser, "node"), parser.parse_args(["node", *argv]), "node", {}))


def test_the_flag_sets_the_setting_and_a_bad_one_is_a_config_error() -> None:
    assert (
        node_config(_node_values("--simulate-attack", "scale:100")).simulate_attack == "scale:100"
    )
    assert node_config(_node_values()).simulate_attack is None
    with pytest.raises(ConfigError, match="sign-flip:10"):
        node_config(_node_values("--simulate-attack", "scale:-1"))
    help_text = subparser(build_parser(), "node").format_help()
    assert "--simulate-attack sign-flip:S|scale:S|noise:S|samples:N" in help_text


def test_with_count_every_logical_node_attacks() -> None:
    values = _node_values("--count", "3", "--simulate-attack", "sign-flip:10")
    configs, _ = fleet_node_configs(values)
    assert [(c.node_id, c.simulate_attack) for c in configs] == [
        (f"node-{i}", "sign-flip:10") for i in range(3)
    ]


def test_local_cluster_attackers_apply_per_node() -> None:
    cluster = LocalCluster(
        "linear", nodes=4, attackers={"node-0": "sign-flip:10", "node-2": "scale:100"}
    )
    attacks = [c.simulate_attack for c in cluster._node_configs(1)]
    assert attacks == ["sign-flip:10", None, "scale:100", None]
    every = LocalCluster("linear", nodes=3, node_options={"simulate_attack": "noise:1"},
                         attackers={"node-1": "samples:5"})  # fmt: skip
    assert [c.simulate_attack for c in every._node_configs(1)] == [
        "noise:1",
        "samples:5",
        "noise:1",
    ]


@pytest.mark.parametrize(
    ("attackers", "message"),
    [
        ({"node-4": "scale:10"}, "no node 'node-4' in this cluster of 4"),
        ({"n1": "scale:10"}, "no node 'n1'"),
        ({"node-1": "scale:0"}, "attackers: node node-1: simulate_attack must be one of"),
        ({"node-1": "samples:1.5"}, "attackers: node node-1"),
    ],
)
def test_local_cluster_refuses_unknown_attackers_and_attacks(attackers, message) -> None:
    with pytest.raises(ConfigError, match=message):
        LocalCluster("linear", nodes=4, attackers=attackers)
