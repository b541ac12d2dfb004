"""Central differential privacy over real gRPC: epsilon in the history, the budget stop.

``tests/unit/test_privacy.py`` checks the noisy mean and the accountant in isolation.
"""

from __future__ import annotations

import dp_accounting
import pytest
import torch

from fedgrad.launch.local import LocalCluster
from fedgrad.server.privacy import RDP_ORDERS

DP = {"reduce": "mean", "dp_noise_multiplier": 1.2, "dp_clip": 1.0, "sample": 4}


def _epsilon(rounds: int, q: float, z: float = 1.2) -> float:
    accountant = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    return float(accountant.get_epsilon(1e-5))


def test_each_round_reports_the_epsilon_the_accountant_gives() -> None:
    with LocalCluster("digits", nodes=8, dp_test_seed=3, **DP) as cluster:
        first = cluster.run(rounds=4)
        again = cluster.run(rounds=4)
    assert [r.epsilon for r in first.history] == [_epsilon(r + 1, 0.5) for r in range(4)]
    assert all(r.nodes == 4 for r in first.history)
    assert all(torch.equal(first.params[k], again.params[k]) for k in first.params), (
        "seeded test noise is reproducible"
    )


def test_production_noise_is_not_reproducible() -> None:
    with LocalCluster("digits", nodes=4, **{**DP, "sample": 0}) as cluster:
        a, b = cluster.run(rounds=1), cluster.run(rounds=1)
    assert any(not torch.equal(a.params[k], b.params[k]) for k in a.params)


def test_training_stops_before_the_target_epsilon_is_passed() -> None:
    target = _epsilon(5, 0.5) + 1e-9  # five rounds fit, the sixth would not
    with LocalCluster("digits", nodes=8, dp_test_seed=1, dp_target_epsilon=target, **DP) as c:
        result = c.run(rounds=50)
    assert len(result.history) == 5
    assert result.history[-1].epsilon <= target < _epsilon(6, 0.5)


@pytest.mark.parametrize("rule", ["weighted-mean", "median"])
def test_dp_refuses_other_rules_before_training(rule: str) -> None:
    from fedgrad.errors import ConfigError

    with pytest.raises(ConfigError, match="needs reduce mean"):
        LocalCluster("digits", nodes=4, **{**DP, "reduce": rule})
