"""Parse the string options (``--task-arg KEY=VALUE``) of the built-in tasks."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from fedgrad.errors import ConfigError

#: Multipliers of the size suffixes ``parse_count`` accepts (case-insensitive).
_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parse_options(
    task: str, options: Mapping[str, str], parsers: Mapping[str, Callable[[str], Any]]
) -> dict[str, Any]:
    """Parse ``options`` with one parser per allowed key.

    Args:
        task: the task name, for messages.
        options: the raw ``KEY=VALUE`` strings.
        parsers: allowed key -> function turning the string into a value; it
            raises ValueError on a bad value.

    Returns:
        The parsed values of the keys present in ``options``.

    Raises:
        ConfigError: an unknown key or a value its parser rejects.
    """
    unknown = sorted(set(options) - set(parsers))
    if unknown:
        raise ConfigError(
            f"task {task!r} has no option(s) {unknown}; valid options: {sorted(parsers)}"
        )
    parsed = {}
    for key, raw in options.items():
        try:
            parsed[key] = parsers[key](str(raw))
        except ValueError as exc:
            raise ConfigError(f"task {task!r}: bad value {key}={raw!r}: {exc}") from None
    return parsed


def int_at_least(low: int) -> Callable[[str], int]:
    """Return a parser of integers ``>= low``."""

    def parse(text: str) -> int:
        value = int(text.strip())
        if value < low:
            raise ValueError(f"must be an integer >= {low}")
        return value

    return parse


def float_at_least(low: float) -> Callable[[str], float]:
    """Return a parser of finite floats ``>= low``."""

    def parse(text: str) -> float:
        value = float(text.strip())
        if not (math.isfinite(value) and value >= low):
            raise ValueError(f"must be a finite number >= {low}")
        return value

    return parse


def positive_float(text: str) -> float:
    """Parse a finite float ``> 0``."""
    value = float(text.strip())
    if not (math.isfinite(value) and value > 0):
        raise ValueError("must be a finite number > 0")
    return value


def choice(*allowed: str) -> Callable[[str], str]:
    """Return a parser that accepts only the strings in ``allowed``."""

    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"must be one of {list(allowed)}")
        return text

    return parse


def parse_count(text: str) -> int:
    """Parse a non-negative whole count such as ``50000000``, ``50M``, ``1.5k`` or ``1e6``.

    Raises:
        ValueError: not a whole number, or negative.
    """
    body = text.strip().lower().replace("_", "")
    scale = 1
    if body and body[-1] in _SUFFIXES:
        body, scale = body[:-1], _SUFFIXES[body[-1]]
    try:
        value: float = int(body) * scale
    except ValueError:
        value = float(body) * scale
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"{text!r} is not a whole number")
    if value < 0:
        raise ValueError("must be >= 0")
    return int(value)


def check_shard(task: str, index: int, count: int, samples: int) -> None:
    """Raise ConfigError unless shard ``index`` of ``count`` gets at least one of ``samples``."""
    if not 0 <= index < count:
        raise ConfigError(f"task {task!r}: shard index {index} is not in [0, {count})")
    if count > samples:
        raise ConfigError(f"task {task!r}: cannot split {samples} samples into {count} shards")
