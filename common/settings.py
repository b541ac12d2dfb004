"""The rules a setting of ``fedgrad.config`` can follow, and its choices and limits.

A field of ``AggregatorConfig`` or ``NodeConfig`` declares its default and its
rule together with ``_setting(default, rule)``; a rule is ``check(name, value)``
and raises ``ConfigError`` naming the setting and the fix. ``_check_fields`` runs
every field's rule once the config is built, and ``check_setting`` one of them,
so the command line can say which flag a bad value came from. The choice tuples
and the chunk limits live here, beside the rules that read them; ``fedgrad.config``
re-exports them.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import field, fields
from typing import Any, TypeVar

from fedgrad.errors import ConfigError, InvalidArgument
from fedgrad.optimizers import OPTIMIZER_NAMES, check_schedule, optimizer_class
from fedgrad.parsing import CODEC_FORMS, parse_attack, parse_codec, parse_reduce, parse_staleness
from fedgrad.wire import MAX_MESSAGE_BYTES, check_id

__all__ = [
    "ACCUMULATORS",
    "BROADCAST_DTYPES",
    "BUFFER_MODES",
    "ERROR_FEEDBACK",
    "LOG_FORMATS",
    "MAX_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "MODES",
    "OPTIMIZERS",
    "ROUNDINGS",
    "Check",
    "check_setting",
    "is_loopback",
    "parse_hostport",
]

#: ``--optimizer``: any element-wise torch.optim optimizer, lower case (fedgrad.optimizers).
OPTIMIZERS = OPTIMIZER_NAMES
#: Accumulator dtypes: float64 sums of float32/16 uploads do not depend on arrival order.
ACCUMULATORS = ("auto", "float64", "float32", "reproducible")
LOG_FORMATS = ("text", "json")
#: How rounds run: sync (every selected node, or a quorum at the deadline) or async (FedBuff).
MODES = ("sync", "async")
#: How buffers are kept: averaged and broadcast (shared), or on each node (local, FedBN).
BUFFER_MODES = ("shared", "local")
#: Dtypes the parameter broadcast may be sent in (None: the model's own dtypes).
BROADCAST_DTYPES = ("float16", "bfloat16", "float32")
#: Error feedback on the node: auto is on for topk and powersgd, off for the rest.
ERROR_FEEDBACK = ("auto", "on", "off")
#: How int8 rounds on the node.
ROUNDINGS = ("nearest", "stochastic")
#: Largest chunk payload: below gRPC's message limit with room for the framing.
MAX_CHUNK_BYTES = MAX_MESSAGE_BYTES - 64 * 1024
#: Smallest chunk payload: one float64 element.
MIN_CHUNK_BYTES = 8

T = TypeVar("T")
#: A rule: ``check(name, value)`` raises ConfigError saying what to fix, else returns.
Check = Callable[[str, Any], None]


def _setting(default: T, check: Check | None = None) -> T:
    """Declare a field with its default and the rule its values must follow."""
    return field(default=default, metadata={"check": check} if check else {})


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(low: int) -> Check:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")

    return check


def _seconds(*, zero: bool = False) -> Check:
    def check(name: str, value: Any) -> None:
        # `not value > 0` also refuses NaN; infinity is a valid "never".
        if not _number(value) or math.isnan(value) or (value < 0 if zero else not value > 0):
            bound = ">= 0" if zero else "> 0"
            raise ConfigError(f"{name} must be a number of seconds {bound}, got {value!r}")

    return check


def _positive(name: str, value: Any) -> None:
    if not _number(value) or not value > 0 or math.isinf(value):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def _one_of(choices: Sequence[str]) -> Check:
    def check(name: str, value: Any) -> None:
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")

    return check


def _optional(rule: Check) -> Check:
    def check(name: str, value: Any) -> None:
        if value is not None:
            rule(name, value)

    return check


def _port(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ConfigError(f"{name} must be a port in 0..65535 (0 picks one), got {value!r}")


def _address(name: str, value: Any) -> None:
    try:
        parse_hostport(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name} must be HOST:PORT, e.g. 127.0.0.1:50051 ([v6]:PORT for IPv6, port"
            f" 0..65535), got {value!r}"
        ) from None


def _node_id(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    try:
        check_id(name, value)
    except InvalidArgument as exc:
        raise ConfigError(str(exc)) from None


def _node_ids(name: str, value: Any) -> None:
    if isinstance(value, str) or not isinstance(value, tuple | list | frozenset | set):
        raise ConfigError(f"{name} must be a sequence of node ids, got {value!r}")
    for node_id in value:
        _node_id(f"{name}: node id", node_id)


def _chunk_bytes(name: str, value: Any) -> None:
    # A multiple of 8, the largest itemsize: a full chunk then ends on an element boundary
    # of every dtype, so no node has to cut chunks shorter than chunk_bytes.
    if (
        not isinstance(value, int)
        or not MIN_CHUNK_BYTES <= value <= MAX_CHUNK_BYTES
        or value % MIN_CHUNK_BYTES
    ):
        raise ConfigError(
            f"{name} must be a multiple of {MIN_CHUNK_BYTES} in [{MIN_CHUNK_BYTES},"
            f" {MAX_CHUNK_BYTES}] (whole elements of every dtype; below gRPC's"
            f" {MAX_MESSAGE_BYTES >> 20} MiB message limit), got {value!r}"
        )


def _shard(name: str, value: Any) -> None:
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ConfigError(f"{name} must be (index, count), got {value!r}")
    index, count = value
    if not isinstance(count, int) or count < 1:
        raise ConfigError(f"{name} {index}/{count}: N must be an integer >= 1 (shard I of N)")
    if not isinstance(index, int) or not 0 <= index < count:
        raise ConfigError(f"{name} {index}/{count}: index must be in [0, {count}) (0-based)")


def _fraction(name: str, value: Any) -> None:
    if not _number(value) or not 0 < value <= 1:
        raise ConfigError(f"{name} must be a fraction in (0, 1], got {value!r}")


def _at_least_one(name: str, value: Any) -> None:
    if not _number(value) or math.isnan(value) or math.isinf(value) or value < 1:
        raise ConfigError(f"{name} must be a finite number >= 1, got {value!r}")


def _reduce(name: str, value: Any) -> None:
    parse_reduce(value)


def _staleness(name: str, value: Any) -> None:
    parse_staleness(value)


def _optimizer(name: str, value: Any) -> None:
    try:
        optimizer_class(str(value))
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


def _schedule(name: str, value: Any) -> None:
    try:
        check_schedule(str(value))
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


def _device(name: str, value: Any) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ConfigError(f"{name} must be auto, cpu, cuda or cuda:N, got {value!r}")


def _codec(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a codec ({', '.join(CODEC_FORMS)}), got {value!r}")
    try:
        parse_codec(value)
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


def _attack(name: str, value: Any) -> None:
    parse_attack(value)


def _delay(name: str, value: Any) -> None:
    if (
        not isinstance(value, tuple | list)
        or len(value) != 2
        or not all(_number(v) and math.isfinite(v) and v >= 0 for v in value)
        or value[0] > value[1]
    ):
        raise ConfigError(
            f"{name} must be SEC or MIN:MAX seconds with 0 <= MIN <= MAX, got {value!r}"
        )


def _check_fields(config: object) -> None:
    for f in fields(config):  # type: ignore[arg-type]
        rule = f.metadata.get("check")
        if rule is not None:
            rule(f.name, getattr(config, f.name))


def _check_tls_pair(cert: str | None, key: str | None) -> None:
    if bool(cert) != bool(key):
        raise ConfigError("tls_cert and tls_key go together: give both or neither")


def check_setting(config: type, name: str, value: Any) -> None:
    """Check one value against the rule of setting ``name`` of ``config``.

    Cross-setting rules (``min_nodes <= nodes``, TLS pairs) are checked when the
    config is built; this lets a caller say where one bad value came from.

    Raises:
        ConfigError: ``value`` breaks the rule, or ``config`` has no such setting.
    """
    for f in fields(config):
        if f.name == name:
            rule = f.metadata.get("check")
            if rule is not None:
                rule(name, value)
            return
    raise ConfigError(f"{config.__name__} has no setting {name!r}")


def is_loopback(host: str) -> bool:
    """Return True only for "localhost" and loopback IP addresses (not look-alike names)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_hostport(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too) into host and port.

    Raises:
        ValueError: no port, or the port is not 0-65535.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)
