"""Central differential privacy: the noisy mean, the noise source and the accountant.

The reported epsilon is checked against ``dp-accounting`` itself, called here with
the same event; the noisy mean against the sum of clipped uploads plus the same
seeded noise, computed in the test.
"""

from __future__ import annotations

import sys

import dp_accounting
import numpy as np
import pytest
import torch

from fedgrad.codec import Layout, TensorSpec, byte_view, iter_chunks
from fedgrad.codecs import CastCodec
from fedgrad.config import AggregatorConfig
from fedgrad.errors import ConfigError
from fedgrad.server.privacy import (
    RDP_ORDERS,
    NoisyMean,
    PrivacyAccountant,
    privacy_accountant,
    secure_normal,
)
from fedgrad.server.staging import StagedUpload

SPECS = [TensorSpec("w", torch.float64, (40, 5)), TensorSpec("b", torch.float64, (5,))]
LAYOUT = Layout(SPECS)


def _library_epsilon(z: float, q: float, delta: float, rounds: int) -> float:
    accountant = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(("z", "q", "rounds"), [(1.1, 0.2, 100), (0.8, 1.0, 5), (2.0, 0.05, 1000)])
def test_epsilon_is_the_accountants_own(z: float, q: float, rounds: int) -> None:
    ours = PrivacyAccountant(z, q, 1e-5)
    assert ours.epsilon(rounds) == _library_epsilon(z, q, 1e-5, rounds)
    assert ours.epsilon(0) == 0.0
    assert ours.epsilon(rounds) > ours.epsilon(rounds // 2), "epsilon grows with rounds"


def test_the_sampling_rate_is_the_sample_over_the_nodes() -> None:
    cfg = AggregatorConfig(nodes=50, sample=10, reduce="mean", dp_noise_multiplier=1.0, dp_clip=1.0)
    accountant = privacy_accountant(cfg)
    assert accountant is not None and accountant.sampling_rate == pytest.approx(0.2)
    full = privacy_accountant(
        AggregatorConfig(nodes=4, reduce="mean", dp_noise_multiplier=1.0, dp_clip=1.0)
    )
    assert full is not None and full.sampling_rate == 1.0


def _upload(values: np.ndarray) -> StagedUpload:
    staged = StagedUpload(CastCodec(SPECS), 256)
    w = torch.from_numpy(values[:200].reshape(40, 5).copy())
    b = torch.from_numpy(values[200:].copy())
    for tensor, offset, data in iter_chunks([byte_view(w), byte_view(b)], LAYOUT, 256):
        staged.add(tensor, offset, data)
    return staged


def test_the_noisy_mean_is_clipped_sum_plus_seeded_noise_over_the_expected_count() -> None:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((3, LAYOUT.numel)) * np.array([[0.1], [1.0], [30.0]])
    clip, z, expected, seed, round_ = 2.0, 1.5, 4, 7, 3
    reducer = NoisyMean(LAYOUT, "float64", 1, clip, z, expected, test_seed=seed)
    for row in rows:
        assert reducer.weight(10**6) == 1, "a claimed sample count buys nothing"
        reducer.add(_upload(row), 1)
    reducer.prepare(round_)
    outputs = [torch.empty(s.shape, dtype=s.dtype) for s in SPECS]
    reducer.result_into(outputs, [0, 1])
    norms = np.linalg.norm(rows, axis=1)
    clipped = rows * np.minimum(1.0, clip / norms)[:, None]
    noise = np.concatenate(
        [
            np.random.Generator(np.random.PCG64([seed, round_, i])).standard_normal(n)
            for i, n in enumerate((200, 5))
        ]
    )
    want = clipped.sum(axis=0) / expected + noise * z * clip / expected
    got = torch.cat([o.reshape(-1) for o in outputs]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_secure_noise_is_standard_normal_and_never_repeats() -> None:
    a, b = secure_normal(400_001), secure_normal(400_001)
    assert a.shape == (400_001,) and np.isfinite(a).all()
    assert abs(a.mean()) < 0.01 and abs(a.std() - 1.0) < 0.01  # ~6 standard errors
    assert abs(np.mean(a**4) - 3.0) < 0.1, "normal tails (kurtosis 3), not uniform"
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dp_noise_multiplier": 1.0}, "needs dp_clip"),
        ({"dp_noise_multiplier": 1.0, "dp_clip": 1.0}, "needs reduce mean"),
        ({"dp_clip": 1.0}, "need dp_noise_multiplier"),
        ({"dp_test_seed": 1}, "needs dp_noise_multiplier"),
        (
            {"dp_noise_multiplier": 1.0, "dp_clip": 1.0, "reduce": "mean", "clip_update_norm": 2},
            "dp_clip alone",
        ),
        ({"dp_noise_multiplier": 1.0, "dp_clip": 1.0, "dp_delta": 0.0}, "fraction"),
    ],
)
def test_bad_privacy_settings_say_what_to_fix(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AggregatorConfig(**options)  # type: ignore[arg-type]


def test_a_target_one_round_already_spends_is_refused_at_start_up() -> None:
    cfg = AggregatorConfig(
        nodes=4, reduce="mean", dp_noise_multiplier=0.5, dp_clip=1.0, dp_target_epsilon=1.0
    )
    with pytest.raises(ConfigError, match="spent by one round already"):
        privacy_accountant(cfg)


def test_without_the_extra_the_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'fedgrad\[dp\]'"):
        PrivacyAccountant(1.0, 1.0, 1e-5)
