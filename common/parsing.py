"""Settings with a syntax of their own: reduction rules, staleness weightings, attacks.

``RULE:PARAMS`` text as the command line, a config file and ``LocalCluster`` give it;
``fedgrad.config`` checks settings with these parsers, the aggregator and the node
read the parsed values.
"""

from __future__ import annotations

import math

from fedgrad.errors import ConfigError

__all__ = [
    "ATTACKS",
    "REDUCTIONS",
    "ROBUST_REDUCTIONS",
    "STALENESS_FORMS",
    "parse_attack",
    "parse_reduce",
    "parse_staleness",
]

#: The streaming reductions: ``w_i = n_i / sum n``, ``1/N``, ``1``.
REDUCTIONS = ("weighted-mean", "mean", "sum")
#: Robust rules (they hold a round's uploads), as ``--reduce`` spells them.
ROBUST_REDUCTIONS = ("median", "trimmed-mean:BETA", "krum:F", "multi-krum:F,M", "geometric-median")
#: Staleness weightings of async mode: s(tau) for an upload computed tau versions ago.
STALENESS_FORMS = ("constant", "polynomial:A", "hinge:A,B")


def parse_staleness(text: str) -> tuple[str, tuple[float, ...]]:
    """Parse a staleness weighting: ``constant``, ``polynomial:A`` or ``hinge:A,B``.

    Returns:
        The form and its parameters, e.g. ``("hinge", (10.0, 4.0))``.

    Raises:
        ConfigError: another form, or parameters that are not finite numbers >= 0.
    """
    form, _, raw = str(text).partition(":")
    wanted = {"constant": 0, "polynomial": 1, "hinge": 2}
    try:
        params = tuple(float(p) for p in raw.split(",")) if raw else ()
    except ValueError:
        params = (math.nan,)
    if (
        form not in wanted
        or len(params) != wanted[form]
        or not all(math.isfinite(p) and p >= 0 for p in params)
    ):
        raise ConfigError(
            f"staleness must be constant, polynomial:A or hinge:A,B with numbers >= 0"
            f" (e.g. polynomial:0.5), got {text!r}"
        )
    return form, params


def parse_reduce(text: str) -> tuple[str, tuple[float, ...]]:
    """Parse ``--reduce``: a streaming rule or a robust one with its parameters.

    Returns:
        The rule and its parameters, e.g. ``("multi-krum", (2.0, 5.0))``.

    Raises:
        ConfigError: an unknown rule, or parameters it does not take.
    """
    rule, _, raw = str(text).partition(":")
    wanted = {
        "weighted-mean": 0,
        "mean": 0,
        "sum": 0,
        "median": 0,
        "geometric-median": 0,
        "trimmed-mean": 1,
        "krum": 1,
        "multi-krum": 2,
    }
    try:
        params = tuple(float(p) for p in raw.split(",")) if raw else ()
    except ValueError:
        params = (math.nan,)
    valid = (
        rule in wanted
        and len(params) == wanted[rule]
        and all(math.isfinite(p) and p >= 0 for p in params)
    )
    if valid and rule == "trimmed-mean":
        valid = params[0] < 0.5
    if valid and rule in ("krum", "multi-krum"):
        valid = all(p == int(p) for p in params) and (rule == "krum" or params[1] >= 1)
    if not valid:
        raise ConfigError(
            f"reduce must be one of {', '.join(REDUCTIONS + ROBUST_REDUCTIONS)} (BETA in"
            f" [0, 0.5), F >= 0 and M >= 1 whole numbers), got {text!r}"
        )
    return rule, params


#: Simulated attacks of ``fedgrad node --simulate-attack`` (for tests and research).
ATTACKS = ("sign-flip:S", "scale:S", "noise:S", "samples:N")


def parse_attack(text: str) -> tuple[str, float]:
    """Parse ``sign-flip:S``, ``scale:S``, ``noise:S`` or ``samples:N``.

    Raises:
        ConfigError: another attack, or a parameter that is not a finite number > 0.
    """
    kind, _, raw = str(text).partition(":")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if (
        kind not in ("sign-flip", "scale", "noise", "samples")
        or not (math.isfinite(value) and value > 0)
        or (kind == "samples" and value != int(value))
    ):
        raise ConfigError(
            f"simulate_attack must be one of {', '.join(ATTACKS)} with a finite number > 0"
            f" (N whole), e.g. sign-flip:10; got {text!r}"
        )
    return kind, value
