"""Flags of the ``fedgrad`` command, each declared once and added where it is used.

A flag of a config setting reads its default from the config dataclass: ``{default}``
in its help is replaced by the field's default. Values are parsed here (text to
int, ``KEY=VALUE``, ``I/N``) and checked in ``fedgrad.config``, so a bad value
gets the same message from the command line as from ``LocalCluster``.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from typing import Any

from fedgrad.auth import OPERATOR_NAME, TOKEN_ENV
from fedgrad.config import LOG_FORMATS
from fedgrad.task import BUILTIN_TASKS

__all__ = [
    "STATUS_TIMEOUT",
    "add_call_flags",
    "add_client_tls",
    "add_run_flags",
    "add_task_flags",
    "add_token_file",
    "choices",
    "default_of",
    "delay",
    "nonnegative",
    "positive",
    "setting",
    "settings_of",
    "shard",
    "shown",
]

#: Deadline of ``fedgrad status`` and ``fedgrad health`` calls, seconds.
STATUS_TIMEOUT = 5.0


def shown(value: Any) -> str:
    """Format a default for help text (``300`` rather than ``300.0``)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def choices(options: Sequence[str]) -> str:
    """Return a metavar listing ``options``, as argparse shows ``choices``."""
    return "{" + ",".join(options) + "}"


def default_of(config: type, name: str) -> Any:
    """Return the default of setting ``name`` of config dataclass ``config``.

    Raises:
        KeyError: ``config`` has no such setting (a flag names a setting that is gone).
    """
    for f in fields(config):
        if f.name == name:
            return None if f.default is MISSING else f.default
    raise KeyError(f"{config.__name__} has no setting {name!r}")


def settings_of(p: argparse.ArgumentParser, config: type) -> Callable[..., None]:
    """Return ``add(name, help, **kwargs)``: ``setting`` for parser ``p`` and ``config``."""
    return functools.partial(setting, p, config)


def setting(
    p: argparse.ArgumentParser,
    config: type,
    name: str,
    help: str,
    flag: str | None = None,
    **kwargs: Any,
) -> None:
    """Add ``--NAME`` (or ``flag``) for setting ``name`` of ``config``.

    ``{default}`` in ``help`` becomes the setting's default, read from ``config``.
    """
    text = help.format(default=shown(default_of(config, name)))
    p.add_argument(flag or "--" + name.replace("_", "-"), dest=name, help=text, **kwargs)


# -- value parsers (format only; the rules live in fedgrad.config) ----------------------
def task_arg(value: str) -> tuple[str, str]:
    """Parse ``KEY=VALUE``."""
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, val


def shard(value: str) -> tuple[str, int]:
    """Parse ``I/N`` or ``ordinal/N`` into (index text, count)."""
    index, sep, count = value.partition("/")
    if not sep or not count.isdigit() or not (index.isdigit() or index == "ordinal"):
        raise argparse.ArgumentTypeError(f"expected I/N (or ordinal/N), got {value!r}")
    return index, int(count)


def delay(value: str) -> tuple[float, float]:
    """Parse ``SEC`` into (SEC, SEC) or ``MIN:MAX`` into (MIN, MAX), seconds."""
    low, sep, high = value.partition(":")
    try:
        return float(low), float(high if sep else low)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected SEC or MIN:MAX seconds (e.g. 0.5 or 0.1:2), got {value!r}"
        ) from None


def positive(kind: type) -> Any:
    """Return a parser of ``kind`` numbers > 0, for flags that are no config setting."""

    def convert(value: str) -> object:
        number = kind(value)
        if number <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
        return number

    convert.__name__ = kind.__name__
    return convert


def nonnegative(kind: type) -> Any:
    """Return a parser of ``kind`` numbers >= 0, for flags that are no config setting."""

    def convert(value: str) -> object:
        number = kind(value)
        if number < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
        return number

    convert.__name__ = kind.__name__
    return convert


# -- groups ------------------------------------------------------------------------------
def add_task_flags(p: argparse.ArgumentParser, config: type) -> None:
    """Add ``--task`` and ``--task-arg`` (aggregator, node, demo)."""
    setting(
        p,
        config,
        "task",
        f"built-in task ({', '.join(BUILTIN_TASKS)}) or package.module:attr (default {{default}})",
    )
    setting(
        p,
        config,
        "task_args",
        "option for the task, repeatable (e.g. split=non-iid, params=50M)",
        flag="--task-arg",
        action="append",
        type=task_arg,
        metavar="KEY=VALUE",
    )


def add_run_flags(p: argparse.ArgumentParser, config: type) -> None:
    """Add ``--seed``, ``--log-format`` and ``--config`` (aggregator, node)."""
    setting(
        p,
        config,
        "seed",
        "training seed; nodes derive theirs from (seed, node id, round) (default {default})",
        type=int,
    )
    setting(
        p,
        config,
        "log_format",
        "log lines as readable text or one JSON object each (default {default})",
        metavar=choices(LOG_FORMATS),
    )
    p.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE.toml",
        help="TOML file with the same keys as the flags; flags > FEDGRAD_* env > file > defaults",
    )


def add_client_tls(p: argparse.ArgumentParser, example: str = "") -> None:
    """Add ``--tls-ca``, ``--tls-cert``, ``--tls-key`` of a caller (node, status, health)."""
    p.add_argument(
        "--tls-ca", metavar="PEM", help="CA that signed the aggregator certificate (turns on TLS)"
    )
    p.add_argument(
        "--tls-cert",
        metavar="PEM",
        help=f"client certificate for mutual TLS{example} (needs --tls-ca)",
    )
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")


def add_token_file(p: argparse.ArgumentParser, whose: str = "this node's") -> None:
    """Add ``--token-file`` (node, status)."""
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"file holding {whose} token (or set {TOKEN_ENV}; `fedgrad token` makes one)",
    )


def add_call_flags(p: argparse.ArgumentParser) -> None:
    """Add the address, TLS and deadline of a one-call tool (status, health)."""
    p.add_argument("address", metavar="HOST:PORT", help="the aggregator's address")
    add_client_tls(p, f", e.g. the operator's certs/{OPERATOR_NAME}.pem from `fedgrad certs init`")
    p.add_argument(
        "--timeout",
        type=positive(float),
        default=STATUS_TIMEOUT,
        metavar="SEC",
        help=f"deadline of the call (default {shown(STATUS_TIMEOUT)})",
    )
