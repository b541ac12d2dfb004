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


def test_a_robust_rule_and_dp_run_as_services(spawn, cli, tmp_path) -> None:
    """`fedgrad aggregator` with a robust rule, and with DP, against `fedgrad node --count`."""
    from fedgrad.history import read_history

    runs = {
        "median": ("--reduce", "median", "--clip-update-norm", "5"),
        "dp": ("--reduce", "mean", "--dp-noise-multiplier", "1.0", "--dp-clip", "0.5",
               "--sample", "3", "--dp-test-seed", "2"),
    }  # fmt: skip
    for name, flags in runs.items():
        port_file, history = tmp_path / f"{name}.port", tmp_path / f"{name}.csv"
        aggregator = spawn(*cli.argv, "aggregator", "--task", "digits", "--listen",
                           "127.0.0.1:0", "--port-file", port_file, "--nodes", "5",
                           "--rounds", "3", "--history", history, "--no-progress",
                           "--finish-grace", "5", *flags)  # fmt: skip
        port = cli.wait_port(port_file, aggregator)
        nodes = spawn(*cli.argv, "node", "--task", "digits", "--aggregator",
                      f"127.0.0.1:{port}", "--count", "5", "--node-id", name)  # fmt: skip
        assert nodes.wait(timeout=120) == 0, nodes.communicate()[1]
        out, err = aggregator.communicate(timeout=60)
        assert aggregator.returncode == 0, err
        rows = read_history(history)
        assert [r.round for r in rows] == [0, 1, 2]
        if name == "dp":
            assert all(r.nodes == 3 and r.epsilon > 0 for r in rows)
            assert rows[2].epsilon > rows[0].epsilon
            assert "NOT private" in err
        else:
            assert all(r.nodes == 5 for r in rows)
            assert "round 2 applied 5 uploads" in err
