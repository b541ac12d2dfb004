"""Logging: readable lines by default, one JSON object per line with --log-format json."""

from __future__ import annotations

import functools
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["JsonFormatter", "once_per_process", "setup_logging"]

_FIELDS = ("node", "round", "event", "reason")
#: Structured fields only the JSON format carries (per-node statistics of a round).
_JSON_FIELDS = (*_FIELDS, "nodes", "stats")


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object with time, level, message and fedgrad fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _JSON_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Format a record as a readable line, with node/round/event appended when present."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{n}={getattr(record, n)}" for n in _FIELDS if getattr(record, n, None) is not None
        ]
        return f"{line} [{' '.join(extras)}]" if extras else line


class _ClearLineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Erase a live progress line before writing a record, so the two never run together."""

    def format(self, record: logging.LogRecord) -> str:
        return "\r\033[K" + super().format(record)


def setup_logging(fmt: str = "text", level: int = logging.INFO, progress: bool = False) -> None:
    """Send fedgrad's logs to stderr in ``fmt`` ("text" or "json").

    Args:
        fmt: "text" (readable lines) or "json" (one object per line).
        level: the root level.
        progress: a progress line is drawn on this terminal: clear it before each record.
    """
    live = progress and fmt == "text" and sys.stderr.isatty()
    handler = _ClearLineHandler(sys.stderr) if live else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def once_per_process(fn: Callable[..., None]) -> Callable[..., None]:
    """Run ``fn`` once per process and arguments (hashable), whichever threads call it.

    For a warning that a process gives once: ``functools.cache`` alone lets two threads
    that call together (a fleet's nodes) both miss the cache and both warn. The result
    keeps ``cache_clear``.
    """
    lock = threading.Lock()
    cached = functools.cache(fn)

    @functools.wraps(fn)
    def once(*args: Any) -> None:
        with lock:
            cached(*args)

    once.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return once
