"""Central differential privacy in the DP-FedAvg style (McMahan et al. 2018).

Each upload is clipped to L2 norm ``C`` (``--dp-clip``), every clipped upload
weighs 1, Gaussian noise of standard deviation ``z C`` (``--dp-noise-multiplier``)
is added to each coordinate of the sum, and the sum is divided by the expected
number of uploads per round (the sample size, or ``--nodes``). One node changes
the sum by at most ``C``, so each round is a sampled Gaussian mechanism with
sampling rate ``q`` = expected uploads / ``--nodes`` (1 without sampling).

The privacy accountant is Google's ``dp-accounting`` (RDP, Mironov 2017, with the
subsampled-Gaussian analysis of Mironov, Talwar and Zhang 2019), not written
here: epsilon after ``r`` rounds is the library's ``RdpAccountant`` after
composing ``r`` ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, the standard
treatment of per-round client sampling in DP-FedAvg (fedgrad's sample has a fixed
size K; the Poisson event with q = K/N is the usual approximation, stated in
``docs/security.md``).

Noise comes from the operating system's CSPRNG (``os.urandom``), turned into
normals by the Box-Muller transform in float64; only ``--dp-test-seed`` (tests,
research) draws it from a seeded PCG64 generator, and the aggregator warns that
such a run is not private.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from fedgrad.codec import Layout
from fedgrad.config import AggregatorConfig
from fedgrad.errors import ConfigError
from fedgrad.server.reducers import StreamingReducer

__all__ = [
    "RDP_ORDERS",
    "NoisyMean",
    "PrivacyAccountant",
    "expected_uploads",
    "privacy_accountant",
    "private_reducer",
    "secure_normal",
]

log = logging.getLogger("fedgrad.aggregator")

#: Integer RDP orders: fractional ones make the library iterate (and log) for little gain.
RDP_ORDERS = (*range(2, 65), 80, 96, 128, 192, 256, 512)
#: Normals drawn per CSPRNG call (8 bytes each, two per Box-Muller pair).
NOISE_BLOCK = 1 << 20


def expected_uploads(cfg: AggregatorConfig) -> int:
    """Return the number of uploads a round is expected to apply (the mean's divisor)."""
    return cfg.sample_size(cfg.nodes) if cfg.sampled else cfg.nodes


def secure_normal(count: int) -> np.ndarray:
    """Return ``count`` standard normals from ``os.urandom`` (Box-Muller, float64)."""
    pairs = (count + 1) // 2
    bits = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64)
    # 53 random bits each: u1 in (0, 1] (log is finite), u2 in [0, 1).
    u1 = ((bits[0::2] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
    u2 = (bits[1::2] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * math.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]


class PrivacyAccountant:
    """(epsilon, delta) of the rounds applied so far, from ``dp-accounting``'s RDP accountant."""

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float) -> None:
        try:
            import dp_accounting
        except ImportError:
            raise ConfigError(
                "--dp-noise-multiplier needs the privacy accountant: pip install 'fedgrad[dp]'"
                " (Google's dp-accounting)"
            ) from None
        self._dp = dp_accounting
        self.noise_multiplier, self.sampling_rate, self.delta = (
            noise_multiplier,
            sampling_rate,
            delta,
        )

    def epsilon(self, rounds: int) -> float:
        """Return epsilon at ``delta`` after ``rounds`` rounds (0 for none)."""
        if rounds <= 0:
            return 0.0
        dp = self._dp
        accountant = dp.rdp.RdpAccountant(list(RDP_ORDERS))
        event = dp.PoissonSampledDpEvent(
            self.sampling_rate, dp.GaussianDpEvent(self.noise_multiplier)
        )
        accountant.compose(event, rounds)
        return float(accountant.get_epsilon(self.delta))


class NoisyMean(StreamingReducer):
    """The sum of uploads clipped to ``clip``, plus N(0, (z clip)^2), over ``expected``."""

    def __init__(
        self,
        layout: Layout,
        accumulate: str,
        workers: int,
        clip: float,
        noise_multiplier: float,
        expected: int,
        test_seed: int | None = None,
    ) -> None:
        super().__init__("sum", layout, accumulate, workers, clip)
        self.name = "mean"
        self.noise_multiplier, self.expected, self.test_seed = noise_multiplier, expected, test_seed
        self.noise_round = 0  # the shell sets the round before the step (seeded noise)

    def weight(self, num_samples: int) -> int:
        return 1  # a node moves the sum by at most the clip, whatever it claims

    @property
    def divisor(self) -> float:
        return float(self.expected)

    def prepare(self, round_: int) -> None:
        """Key the seeded test noise to ``round_`` (a resumed run draws the same)."""
        self.noise_round = round_

    def result_into(self, outputs: Sequence[torch.Tensor], indices: Sequence[int]) -> None:
        super().result_into(outputs, indices)
        assert self.clip is not None
        std = self.noise_multiplier * self.clip / self.expected
        for i, out in zip(indices, outputs, strict=True):
            noise = self._normal(i, out.numel()) * std
            out.view(-1).add_(torch.from_numpy(noise).to(out.dtype))

    def _normal(self, tensor: int, count: int) -> np.ndarray:
        if self.test_seed is None:
            blocks = [
                secure_normal(min(NOISE_BLOCK, count - at)) for at in range(0, count, NOISE_BLOCK)
            ]
            return np.concatenate(blocks) if blocks else np.zeros(0)
        seed = [self.test_seed, self.noise_round, tensor]
        return np.random.Generator(np.random.PCG64(seed)).standard_normal(count)


def privacy_accountant(cfg: AggregatorConfig) -> PrivacyAccountant | None:
    """Return the accountant of ``cfg``'s DP settings (None without DP).

    Raises:
        ConfigError: the ``dp`` extra (dp-accounting) is not installed.
    """
    if cfg.dp_noise_multiplier is None:
        return None
    rate = min(1.0, expected_uploads(cfg) / cfg.nodes)
    accountant = PrivacyAccountant(cfg.dp_noise_multiplier, rate, cfg.dp_delta)
    target = cfg.dp_target_epsilon
    if target is not None and accountant.epsilon(1) > target:
        raise ConfigError(
            f"--dp-target-epsilon {target:g} is spent by one round already (epsilon"
            f" {accountant.epsilon(1):.3f} at noise multiplier {cfg.dp_noise_multiplier:g},"
            f" sampling rate {rate:g}, delta {cfg.dp_delta:g}): raise the noise multiplier,"
            " sample fewer nodes per round, or allow a larger epsilon"
        )
    return accountant


def private_reducer(
    cfg: AggregatorConfig, layout: Layout, accumulate: str, workers: int
) -> NoisyMean | None:
    """Return the DP-FedAvg reducer of ``cfg`` (None without DP)."""
    if cfg.dp_noise_multiplier is None or cfg.dp_clip is None:
        return None
    if cfg.dp_test_seed is not None:
        log.warning(
            "--dp-test-seed: the DP noise is drawn from a seed, so this run is NOT private;"
            " use it for tests and research only",
            extra={"event": "dp_test_seed"},
        )
    return NoisyMean(
        layout,
        accumulate,
        workers,
        cfg.dp_clip,
        cfg.dp_noise_multiplier,
        expected_uploads(cfg),
        cfg.dp_test_seed,
    )
