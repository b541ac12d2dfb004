"""Turn flags, FEDGRAD_* environment variables and a TOML file into a frozen config.

Precedence: flags > environment > config file > defaults. Unknown config keys
and bad values are errors at start-up, never mid-run.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

from fedgrad.errors import ConfigError

__all__ = ["resolve"]

C = TypeVar("C")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")
    }


def _convert(action: argparse.Action, raw: Any, where: str) -> Any:
    if isinstance(action, argparse._StoreTrueAction):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {raw!r}")
    if isinstance(action, argparse._AppendAction):
        items = raw if isinstance(raw, list) else [s for s in str(raw).split(",") if s]
        return [_convert_one(action, item, where) for item in items]
    return _convert_one(action, raw, where)


def _convert_one(action: argparse.Action, raw: Any, where: str) -> Any:
    try:
        value = action.type(str(raw)) if action.type else str(raw)  # type: ignore[operator]
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"{where}: bad value {raw!r}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {list(action.choices)}")
    return value


def _load_file(path: str, section: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    # Either flat keys, or a [aggregator] / [node] table for one file serving both.
    table = data.get(section, data) if isinstance(data.get(section), dict) else data
    return {k: v for k, v in table.items() if not isinstance(v, dict)}


def resolve(
    parser: argparse.ArgumentParser,
    given: argparse.Namespace,
    section: str,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Merge defaults < config file < environment < flags for one subcommand.

    Args:
        parser: the subcommand's parser (built with ``argument_default=SUPPRESS``).
        given: what was parsed from the command line.
        section: "aggregator" or "node" (table name in a shared config file).
        environ: the environment (default ``os.environ``).

    Raises:
        ConfigError: unknown config keys or bad values, naming where they came from.
    """
    environ = os.environ if environ is None else environ
    actions = _actions(parser)
    values: dict[str, Any] = {}
    config_path = getattr(given, "config", None) or environ.get("FEDGRAD_CONFIG")
    if config_path:
        for key, raw in _load_file(config_path, section).items():
            dest = key.replace("-", "_")
            if dest not in actions:
                raise ConfigError(
                    f"config file {config_path}: unknown key {key!r} for {section}"
                    f" (known: {', '.join(sorted(actions))})"
                )
            values[dest] = _convert(actions[dest], raw, f"config file {config_path}, key {key!r}")
    for dest, action in actions.items():
        env_key = "FEDGRAD_" + dest.upper()
        if env_key in environ:
            values[dest] = _convert(action, environ[env_key], f"environment {env_key}")
    values.update({k: v for k, v in vars(given).items() if k in actions})
    return values


def build_config(cls: type[C], values: Mapping[str, Any]) -> C:
    """Build a frozen config dataclass from resolved values (unknown names ignored)."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in values.items() if k in names})
