"""The aggregator's flags of how rounds run: deadlines, sampling and async, defences, privacy.

Each flag is a setting of ``AggregatorConfig`` (its default and its rule live there);
``fedgrad.launch.serve_parsers`` adds these groups to ``fedgrad aggregator``.
"""

from __future__ import annotations

from collections.abc import Callable

from fedgrad.config import MODES
from fedgrad.launch.flags import choices

__all__ = ["add_defence_flags", "add_privacy_flags", "add_round_flags", "add_sampling_flags"]

#: ``settings_of(parser, AggregatorConfig)``: ``add(name, help, **kwargs)``.
Add = Callable[..., None]


def add_defence_flags(add: Add) -> None:
    """How gradients combine, and the bounds on what one node can do (docs/security.md)."""
    add(
        "reduce",
        "how gradients combine: weighted-mean by samples, mean, sum; or a robust rule that"
        " holds the round's uploads: median, trimmed-mean:BETA, krum:F, multi-krum:F,M,"
        " geometric-median (default {default}; docs/security.md)",
        metavar="RULE",
    )
    add(
        "clip_update_norm",
        "scale every upload to L2 norm at most C before any rule (default: no bound)",
        type=float,
        metavar="C",
    )
    add(
        "max_samples_per_node",
        "cap the sample count a node's weight may claim in the weighted mean (default: none)",
        type=int,
        metavar="N",
    )
    add(
        "spill_dir",
        "where a robust rule keeps a round's uploads past --staging-mb, and a shard the"
        " parts it holds past its memory share (default: the temp dir)",
        metavar="DIR",
    )


def add_round_flags(add: Add) -> None:
    add(
        "round_timeout",
        "round deadline; after it the round closes with >= --min-nodes uploads (default {default})",
        type=float,
        metavar="SEC",
    )
    add(
        "start_timeout",
        "seconds to wait for --nodes nodes before the first round; after it, training starts"
        " with at least --min-nodes (default: the round timeout)",
        type=float,
        metavar="SEC",
    )
    add(
        "min_nodes",
        "uploads needed to close a round at the deadline (default {default})",
        type=int,
        metavar="M",
    )
    add(
        "checkpoint_dir", "checkpoint every round here and resume from it on restart", metavar="DIR"
    )
    add(
        "finish_grace",
        "after the last round, wait this long for nodes to fetch the final parameters"
        " (default {default})",
        type=float,
        metavar="SEC",
    )


def add_sampling_flags(add: Add) -> None:
    """Sampled rounds (FedAvg's C), over-commitment, and buffered asynchronous training."""
    add(
        "mode",
        "sync: a round waits for every (selected) node, or --min-nodes at the deadline;"
        " async: buffered asynchronous training (FedBuff), a version every --buffer uploads"
        " (default {default})",
        metavar=choices(MODES),
    )
    add(
        "sample",
        "sync: each round selects K of the active nodes, seeded from (seed, round)",
        type=int,
        metavar="K",
    )
    add(
        "sample_fraction",
        "sync: each round selects ceil(C x active nodes) (McMahan et al.'s C)",
        type=float,
        metavar="C",
    )
    add(
        "min_available",
        "with --sample/--sample-fraction: joined nodes needed before the first round"
        " (default: the sample size)",
        type=int,
        metavar="M",
    )
    add(
        "overcommit",
        "select ceil(K x F) nodes and close with the first K uploads; faster, but which K"
        " arrive first is timing, so not bitwise reproducible (default {default})",
        type=float,
        metavar="F",
    )
    add(
        "buffer",
        "async: uploads per version (default: half of --nodes, rounded up)",
        type=int,
        metavar="K",
    )
    add(
        "max_staleness",
        "async: uploads computed more than S versions ago are ABORTED (default {default})",
        type=int,
        metavar="S",
    )
    add(
        "staleness",
        "async: weight s(tau) of an upload tau versions old: constant, polynomial:A"
        " ((1+tau)^-A) or hinge:A,B (1 up to B, then 1/(1+A(tau-B))) (default {default})",
        metavar="FORM",
    )


def add_privacy_flags(add: Add) -> None:
    """Central differential privacy (DP-FedAvg) and its accountant."""
    add(
        "dp_noise_multiplier",
        "central DP: add Gaussian noise of std Z x --dp-clip to the sum of clipped uploads"
        " (needs --reduce mean, the dp extra; docs/security.md)",
        type=float,
        metavar="Z",
    )
    add("dp_clip", "central DP: clip every upload to L2 norm C", type=float, metavar="C")
    add("dp_delta", "central DP: the delta of the reported epsilon (default {default})", type=float)
    add(
        "dp_target_epsilon",
        "central DP: end training before epsilon passes E",
        type=float,
        metavar="E",
    )
    add(
        "dp_test_seed",
        "tests and research only: draw the DP noise from this seed (the run is NOT private)",
        type=int,
        metavar="S",
    )
