"""Turn flags, FEDGRAD_* environment variables and a TOML file into a frozen config.

Precedence: flags > environment > config file > defaults. Unknown config keys
and bad values are errors at start-up, never mid-run. The rules a value must
follow live in ``fedgrad.config``; this module only parses and says where a bad
value came from (a file's key or an environment variable).
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

from fedgrad.config import check_setting
from fedgrad.errors import ConfigError

__all__ = ["Resolved", "build_config", "resolve"]

C = TypeVar("C")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


_SECTIONS = ("aggregator", "node")


class Resolved(dict[str, Any]):
    """Option values by dest; ``origin`` names the file key or variable a value came from.

    Values given as flags have no origin: their errors read exactly as the config's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.origin: dict[str, str] = {}


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Map every name a setting may go by (flag name and dest, with underscores) to its action."""
    names: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if not a.option_strings or a.dest in ("help", "config"):
            continue
        names[a.dest] = a
        for flag in a.option_strings:
            if flag.startswith("--"):
                names[flag[2:].replace("-", "_")] = a
    return names


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
    # Flat keys shared by both sides, overridden by an [aggregator] / [node] table.
    values: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(value, dict):
            values[key] = value
        elif key not in _SECTIONS:
            raise ConfigError(
                f"config file {path}: unknown table [{key}] (tables: [aggregator], [node])"
            )
    table = data.get(section, {})
    for key, value in table.items():
        if isinstance(value, dict):
            raise ConfigError(f"config file {path}: nested table [{section}.{key}] is not allowed")
        values[key] = value
    return values


def resolve(
    parser: argparse.ArgumentParser,
    given: argparse.Namespace,
    section: str,
    environ: Mapping[str, str] | None = None,
) -> Resolved:
    """Merge defaults < config file < environment < flags for one subcommand.

    Args:
        parser: the subcommand's parser (built with ``argument_default=SUPPRESS``).
        given: what was parsed from the command line.
        section: "aggregator" or "node" (table name in a shared config file).
        environ: the environment (default ``os.environ``).

    Returns:
        values by dest, with the origin of those from the file or the environment.

    Raises:
        ConfigError: unknown config keys or bad values, naming where they came from.
    """
    environ = os.environ if environ is None else environ
    actions = _actions(parser)
    values = Resolved()
    config_path = getattr(given, "config", None) or environ.get("FEDGRAD_CONFIG")
    if config_path:
        for key, raw in _load_file(config_path, section).items():
            dest = key.replace("-", "_")
            if dest not in actions:
                raise ConfigError(
                    f"config file {config_path}: unknown key {key!r} for {section}"
                    f" (known: {', '.join(sorted(actions))})"
                )
            action = actions[dest]
            where = f"config file {config_path}, key {key!r}"
            values[action.dest] = _convert(action, raw, where)
            values.origin[action.dest] = where
    for name, action in actions.items():
        env_key = "FEDGRAD_" + name.upper()
        if env_key in environ:
            where = f"environment {env_key}"
            values[action.dest] = _convert(action, environ[env_key], where)
            values.origin[action.dest] = where
    for dest, value in vars(given).items():
        if dest in actions:
            values[dest] = value
            values.origin.pop(dest, None)
    return values


def build_config(cls: type[C], values: Mapping[str, Any], origin: Mapping[str, str]) -> C:
    """Build a frozen config dataclass from resolved values (unknown names ignored).

    Args:
        cls: ``AggregatorConfig`` or ``NodeConfig``.
        values: setting name -> value, in the dataclass's own types.
        origin: setting name -> where its value came from, prefixed to its error.

    Raises:
        ConfigError: a value breaks its rule in ``fedgrad.config``.
    """
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    known = {k: v for k, v in values.items() if k in names}
    for name, where in origin.items():
        if name in known:
            try:
                check_setting(cls, name, known[name])
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
    return cls(**known)
