"""The node's gRPC channel, credentials and retry policy."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from fedgrad.config import NodeConfig
from fedgrad.errors import GaveUpError
from fedgrad.proto import fedgrad_pb2_grpc as pb_grpc

__all__ = ["TRANSIENT", "Backoff", "Stopped", "open_channel"]

log = logging.getLogger("fedgrad.node")
T = TypeVar("T")
MAX_MESSAGE_BYTES = 4 * 1024 * 1024 + 64 * 1024
#: Codes after which the same call may succeed later (the aggregator restarts, a link returns).
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    }
)


class Stopped(Exception):
    """A stop was requested: make no further call or try. ``Node.run()`` never raises it."""


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def open_channel(cfg: NodeConfig) -> tuple[grpc.Channel, pb_grpc.AggregatorStub]:
    """Open a channel (TLS when ``cfg.tls_ca`` is set) and its stub."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Backoff is ours (with jitter and a give-up budget); keep the channel's short.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
    if cfg.tls_ca:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(cfg.tls_ca),
            private_key=_read(cfg.tls_key),
            certificate_chain=_read(cfg.tls_cert),
        )
        channel = grpc.secure_channel(cfg.aggregator, creds, options=options)
    else:
        channel = grpc.insecure_channel(cfg.aggregator, options=options)
    return channel, pb_grpc.AggregatorStub(channel)


class Backoff:
    """Exponential backoff with full jitter, bounded by a give-up budget; ``stop`` ends waits."""

    def __init__(
        self,
        give_up_after: float,
        first: float = 0.2,
        cap: float = 5.0,
        stop: threading.Event | None = None,
    ) -> None:
        self.give_up_after, self.first, self.cap = give_up_after, first, cap
        self.stop = stop if stop is not None else threading.Event()
        self.reset()

    def reset(self) -> None:
        """Start a new budget after a success."""
        self.attempt = 0
        self.since = time.monotonic()

    def wait(self, what: str, error: grpc.RpcError) -> None:
        """Sleep before the next try.

        Raises:
            Stopped: ``stop`` is set, or gets set while sleeping.
            GaveUpError: the budget is spent.
        """
        if self.stop.is_set():
            raise Stopped
        elapsed = time.monotonic() - self.since
        if elapsed >= self.give_up_after:
            raise GaveUpError(
                f"gave up after {elapsed:.0f} s: {what} failed with {error.code().name}:"
                f" {error.details()} (is the aggregator running and reachable?"
                " raise --give-up-after to wait longer)"
            )
        delay = random.uniform(0, min(self.cap, self.first * 2**self.attempt))
        delay = min(delay, self.give_up_after - elapsed)
        self.attempt += 1
        log.info("%s failed (%s); retrying in %.2f s", what, error.code().name, delay)
        if self.stop.wait(delay):
            raise Stopped

    def call(self, what: str, fn: Callable[[], T], retry_on: Any = TRANSIENT) -> T:
        """Call ``fn`` until it succeeds, retrying transient errors with backoff (see ``wait``)."""
        while True:
            try:
                result = fn()
            except grpc.RpcError as exc:
                if exc.code() not in retry_on:
                    raise
                self.wait(what, exc)
                continue
            self.reset()
            return result
