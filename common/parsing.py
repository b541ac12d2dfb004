"""Settings with a syntax of their own: reduction rules, staleness weightings, attacks, codecs.

``RULE:PARAMS`` text as the command line, a config file and ``LocalCluster`` give it;
``fedgrad.config`` checks settings with these parsers, the aggregator and the node
read the parsed values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from fedgrad.errors import ConfigError

__all__ = [
    "ATTACKS",
    "CODEC_FORMS",
    "CodecSpec",
    "REDUCTIONS",
    "ROBUST_REDUCTIONS",
    "STALENESS_FORMS",
    "parse_attack",
    "parse_codec",
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


#: Upload codecs as ``--compress`` spells them (``none`` is ``identity``).
CODEC_FORMS = (
    "identity",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "int8[:BLOCK]",
    "topk:FRACTION[,DTYPE]",
    "powersgd:RANK[,DTYPE]",
)
_CASTS = ("identity", "float16", "bfloat16", "float32", "float64")
#: int8's default block: one float32 scale per 256 values (1.6% overhead).
INT8_BLOCK, MAX_INT8_BLOCK, MAX_POWERSGD_RANK = 256, 65536, 1024


@dataclass(frozen=True)
class CodecSpec:
    """A parsed codec: its name and the parameters that shape its payload.

    Attributes:
        text: the text as declared (what the upload header carries).
        name: identity, float16, bfloat16, float32, float64, int8, topk or powersgd.
        block: int8's values per scale.
        fraction: top-k's share of each tensor, exact (``0.01`` is 1/100).
        rank: PowerSGD's rank.
        values: top-k's values' / PowerSGD's factors' dtype ("": each tensor's own).
    """

    text: str
    name: str
    block: int = 0
    fraction: Fraction | None = None
    rank: int = 0
    values: str = ""


def parse_codec(text: str) -> CodecSpec:
    """Parse an upload codec: a cast, ``int8[:BLOCK]``, ``topk:FRACTION[,DTYPE]`` or
    ``powersgd:RANK[,DTYPE]`` (DTYPE: float16, bfloat16, float32 or float64).

    Raises:
        ConfigError: an unknown codec, or parameters it does not take, with the forms.
    """
    name, colon, params = text.partition(":")
    args = params.split(",") if colon else []
    forms = ", ".join(CODEC_FORMS)
    if name in _CASTS:
        if colon:
            raise ConfigError(f"codec {name} must have no parameters, got {params!r}")
        return CodecSpec(text, name)
    if name == "int8":
        if len(args) > 1:
            raise ConfigError(
                f"int8 must have at most one parameter, the block size; got {params!r}"
            )
        block = _integer(args[0], "int8's block size", 1, MAX_INT8_BLOCK) if args else INT8_BLOCK
        return CodecSpec(text, name, block=block)
    if name in ("topk", "powersgd"):
        if not 1 <= len(args) <= 2:
            form = "FRACTION" if name == "topk" else "RANK"
            raise ConfigError(f"{name} must be written {name}:{form}[,DTYPE], got {text!r}")
        values = args[1] if len(args) == 2 else ""
        if values and values not in _CASTS[1:]:
            raise ConfigError(
                f"{name}'s value dtype must be one of {', '.join(_CASTS[1:])}, got {values!r}"
            )
        if name == "powersgd":
            rank = _integer(args[0], "powersgd's rank", 1, MAX_POWERSGD_RANK)
            return CodecSpec(text, name, rank=rank, values=values)
        try:
            fraction = Fraction(args[0])
        except (ValueError, ZeroDivisionError):
            fraction = None
        if fraction is None or not 0 < fraction <= 1 or "/" in args[0]:
            raise ConfigError(f"topk's fraction must be a decimal in (0, 1], got {args[0]!r}")
        return CodecSpec(text, name, fraction=fraction, values=values)
    raise ConfigError(f"unknown codec {text!r}: a codec must be one of {forms}")


def _integer(text: str, what: str, low: int, high: int) -> int:
    if not text.isdigit() or not low <= int(text) <= high:
        raise ConfigError(f"{what} must be an integer in [{low}, {high}], got {text!r}")
    return int(text)
