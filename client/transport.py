"""The node's transport: every gRPC call, its retries, and what each status code means.

The node loop (``fedgrad.client.node``) never sees grpc. It calls ``Transport.join``,
``pull``, ``push`` and ``leave`` and gets protobuf replies, or one of:

- ``Failure``: the call failed in a way the node recovers from; ``failure.action`` (an
  ``Action``) says how (docs/protocol.md, "Status codes and what a node does");
- ``RefusedError``: the aggregator refused the node for good (bad input, credentials),
  or a TLS handshake failed (``fedgrad.client.tls`` says what to check);
- ``GaveUpError``: transient failures lasted longer than the give-up budget;
- ``Stopped``: ``stop()`` was called; the node leaves.

``stop()`` cancels the call in flight from any thread, signal handlers included; see
``Transport.stop`` for why it takes no lock.
"""

from __future__ import annotations

import enum
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from fedgrad.auth import bearer_metadata
from fedgrad.client.tls import check_tls_files, handshake_problem
from fedgrad.config import NodeConfig
from fedgrad.errors import GaveUpError, RefusedError
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.wire import CURRENT_ROUND_KEY, method_path, open_channel

__all__ = [
    "CHANNEL_OPTIONS",
    "FLEET_WAIT_SLICE",
    "Action",
    "Backoff",
    "Failure",
    "Stopped",
    "Transport",
    "lengthen_grpc_waits",
]

log = logging.getLogger("fedgrad.node")

#: Channel options on top of ``fedgrad.wire``'s message limits.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # Backoff is ours (with jitter and a give-up budget); keep the channel's short.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


#: How long a blocking gRPC wait of ``fedgrad node --count`` sleeps between checks.
FLEET_WAIT_SLICE = 2.0


def lengthen_grpc_waits(seconds: float = FLEET_WAIT_SLICE) -> None:
    """Let grpcio's blocking waits sleep ``seconds`` between checks instead of 0.1 s.

    grpcio wakes every waiting call every 0.1 s so that the *main* thread can take
    signals (grpc/grpc#19464). Many logical nodes wait in their pulls on other threads,
    and ``Node.stop()`` cancels every call (waking it at once), so they need no such
    polling: at 250 waiting nodes it cut the process's idle CPU from 1.35 to 0.37 CPU-s
    per 10 s (``benchmarks/README.md``, "scale_1000"). The knob is grpcio's module
    constant ``grpc._common.MAXIMUM_WAIT_TIMEOUT``; if a grpcio release renames it, this
    does nothing.
    """
    import grpc._common as common

    if hasattr(common, "MAXIMUM_WAIT_TIMEOUT"):
        common.MAXIMUM_WAIT_TIMEOUT = seconds


class Stopped(Exception):
    """A stop was requested: make no further call or try. ``Node.run()`` never raises it."""


class Action(enum.Enum):
    """What the node loop does after a failed call (docs/protocol.md, "Status codes")."""

    CONTINUE_AT = "pull the aggregator's current round"  # ABORTED
    NEXT_ROUND = "go on with the next round"  # ALREADY_EXISTS
    ASK_AGAIN = "ask for the same round again"  # a long wait for a round ran out
    REJOIN = "join again, then pull the round Join names"  # FAILED_PRECONDITION
    BACK_OFF = "back off, join again, then pull the round Join names"  # transient


# Codes after which the same call may succeed later (the aggregator restarts, a link returns).
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    }
)
# Every other code (INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED, ...) is a refusal.
_ACTIONS = {
    grpc.StatusCode.ABORTED: Action.CONTINUE_AT,
    grpc.StatusCode.ALREADY_EXISTS: Action.NEXT_ROUND,
    grpc.StatusCode.FAILED_PRECONDITION: Action.REJOIN,
    **{code: Action.BACK_OFF for code in _TRANSIENT},
}


class Failure(Exception):
    """A call failed in a way the node recovers from.

    Attributes:
        action: what to do next.
        code: the status code's name, e.g. ``"ABORTED"``.
        details: the status details.
        current_round: the aggregator's current round (ABORTED only), else None.
        transient: the same call may succeed after a backoff.
    """

    def __init__(
        self, action: Action, code: str, details: str, current_round: int | None, transient: bool
    ) -> None:
        super().__init__(f"{code}: {details}")
        self.action, self.code, self.details = action, code, details
        self.current_round, self.transient = current_round, transient


class Backoff:
    """Exponential backoff with full jitter, bounded by a give-up budget; ``stop`` ends waits."""

    def __init__(
        self,
        give_up_after: float,
        first: float = 0.2,
        cap: float = 5.0,
        stop: threading.Event | None = None,
        node_id: str | None = None,
    ) -> None:
        self.give_up_after, self.first, self.cap = give_up_after, first, cap
        self.node_id = node_id  # for the log records of retries
        self.stop = stop if stop is not None else threading.Event()
        self.reset()

    @property
    def fresh(self) -> bool:
        """True if nothing failed since the last success."""
        return self.attempt == 0

    def reset(self) -> None:
        """Start a new budget after a success."""
        self.attempt = 0
        self.since = time.monotonic()

    def wait(self, what: str, failure: Failure) -> None:
        """Sleep before the next try of ``what``, which failed with ``failure``.

        Raises:
            Stopped: ``stop`` is set, or gets set while sleeping.
            GaveUpError: the budget is spent.
        """
        if self.stop.is_set():
            raise Stopped
        elapsed = time.monotonic() - self.since
        if elapsed >= self.give_up_after:
            raise GaveUpError(
                f"gave up after {elapsed:.0f} s: {what} failed with {failure.code}:"
                f" {failure.details} (is the aggregator running and reachable?"
                " raise --give-up-after to wait longer)"
            )
        delay = random.uniform(0, min(self.cap, self.first * 2**self.attempt))
        delay = min(delay, self.give_up_after - elapsed)
        self.attempt += 1
        log.info(
            "%s failed (%s); retrying in %.2f s",
            what,
            failure.code,
            delay,
            extra={"node": self.node_id, "event": "retry", "reason": failure.code},
        )
        if self.stop.wait(delay):
            raise Stopped


class Transport:
    """The node's channel and calls; ``stop()`` cancels the call in flight.

    Args:
        cfg: the node's config (aggregator address, TLS files, token, deadlines, budget).

    Raises:
        ConfigError: a TLS file is missing, unreadable or not PEM, or the pair is wrong.
    """

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg, self.node_id, self.call_timeout = cfg, cfg.node_id, cfg.call_timeout
        self.stopped = threading.Event()
        self.backoff = Backoff(cfg.give_up_after, stop=self.stopped, node_id=cfg.node_id)
        self.stop_reason = ""  # the first stop()'s reason
        self._stops = itertools.count()  # numbers the stop() calls; see stop()
        self._call: Any = None  # the call in flight, for stop() to cancel; see _started()
        self._metadata = bearer_metadata(cfg.token) if cfg.token else ()
        check_tls_files(cfg)  # before gRPC reads them: it would only fail every handshake
        self.channel = open_channel(
            cfg.aggregator, cfg.tls_ca, cfg.tls_cert, cfg.tls_key, options=CHANNEL_OPTIONS
        )
        self._join = self.channel.unary_unary(
            method_path("Join"),
            request_serializer=pb.JoinRequest.SerializeToString,
            response_deserializer=pb.JoinReply.FromString,
        )
        self._leave = self.channel.unary_unary(
            method_path("Leave"),
            request_serializer=pb.LeaveRequest.SerializeToString,
            response_deserializer=pb.LeaveReply.FromString,
        )
        # Raw bytes both ways for the tensors: the node frames and reads chunks in place.
        self._pull = self.channel.unary_stream(
            method_path("PullParameters"),
            request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=None,
        )
        self._push = self.channel.stream_unary(
            method_path("PushGradients"),
            request_serializer=None,
            response_deserializer=pb.PushReply.FromString,
        )

    def close(self) -> None:
        """Close the channel; a call still in flight ends with CANCELLED."""
        self.channel.close()

    def stop(self, reason: str) -> None:
        """Cancel the call in flight, end a backoff wait, and make every later call raise Stopped.

        Idempotent and safe from any thread, including signal handlers while the calls
        run on another thread. Only the first call acts; later ones return at once:
        a second signal's handler can interrupt the first one between any two bytecodes,
        e.g. inside ``Event.set()`` while it holds its non-reentrant lock, where a second
        ``set()`` would wait for that lock forever. So nothing here takes a lock before
        it knows it is the first.

        Args:
            reason: kept in ``stop_reason`` if this is the first call.
        """
        if next(self._stops):  # one C call, atomic under the GIL: exactly one caller gets 0
            return
        self.stop_reason = reason  # before set(): whoever wakes up reads it
        self.stopped.set()
        # After set(): a call published later is re-checked by _started and cancelled there.
        call = self._call
        if call is not None:
            call.cancel()

    # -- the calls -------------------------------------------------------------------------
    def join(self, request: pb.JoinRequest, after: Failure | None = None) -> pb.JoinReply:
        """Join (idempotent), retrying transient failures with backoff.

        Args:
            request: what the node says of itself (id, samples, model, seed, task).
            after: the failure that sent the node back to Join; a transient one is
                backed off first.

        Returns:
            The aggregator's reply (manifest, chunk size, round, session).

        Raises:
            Stopped, GaveUpError, RefusedError: see the module docstring.
            Failure: a non-transient failure (e.g. ABORTED, FAILED_PRECONDITION).
        """
        if after is not None and after.action is Action.BACK_OFF:
            self.backoff.wait("round", after)
        while True:
            try:
                with self._started(self._join.future, request, self.call_timeout) as call:
                    reply: pb.JoinReply = call.result()
            except Failure as failure:
                if not failure.transient:
                    raise
                self.backoff.wait("join", failure)
                continue
            self.backoff.reset()
            return reply

    @contextmanager
    def pull(self, min_round: int, timeout: float) -> Iterator[Iterator[bytes]]:
        """Open the parameter stream of the first round >= ``min_round``; yield its messages.

        Each message is a serialized ``ParameterMessage``: the header, then the chunks.

        Raises:
            Stopped, Failure, RefusedError: also while the ``with`` block reads the stream.
        """
        request = pb.PullRequest(node_id=self.node_id, min_round=min_round)
        with self._started(self._pull, request, timeout) as stream:
            yield stream

    def push(
        self, messages: Iterator[bytes], timeout: float, wait_ready: bool = False
    ) -> pb.PushReply:
        """Stream one upload (serialized ``GradientMessage``s); return the reply once counted.

        ``wait_ready`` (``JoinReply.upload_ready``): send the header, then wait for the
        aggregator's response headers (``fedgrad.wire.UPLOAD_READY``, sent once the upload
        is next in line for a staging slot) before the chunks, so that an upload queued
        behind the next one holds none of its chunks in the aggregator's buffers.

        Raises:
            Stopped, Failure, RefusedError: see the module docstring.
        """
        calls: list[grpc.Future] = []
        published = threading.Event()

        def gated() -> Iterator[bytes]:
            yield next(messages)  # the UploadHeader
            # gRPC's own thread runs this; the call is published right after it starts.
            if published.wait(timeout) and calls:
                calls[0].initial_metadata()  # type: ignore[attr-defined]  # or the call ended
                if calls[0].done():
                    return
            yield from messages

        # The future form: a blocking call could not be cancelled by stop().
        try:
            with self._started(
                self._push.future, gated() if wait_ready else messages, timeout
            ) as call:
                calls.append(call)
                published.set()
                reply: pb.PushReply = call.result()
        finally:
            published.set()
        self.backoff.reset()  # a round went through: a new budget
        return reply

    def leave(self) -> None:
        """Tell the aggregator to stop waiting for this node (best effort, never raises)."""
        try:
            self._leave(
                pb.LeaveRequest(node_id=self.node_id),
                timeout=self.call_timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            code = exc.code().name
            log.info(
                "leave failed: %s",
                code,
                extra={"node": self.node_id, "event": "leave_failed", "reason": code},
            )

    # -- one call ----------------------------------------------------------------------------
    @contextmanager
    def _started(self, method: Callable[..., Any], request: Any, timeout: float) -> Iterator[Any]:
        """Start ``method(request)`` where ``stop()`` can cancel it; translate its errors.

        Raises:
            Stopped: ``stop()`` was called before or during the call.
            Failure, RefusedError: the call failed (``_error``).
        """
        if self.stopped.is_set():
            raise Stopped
        call = method(request, timeout=timeout, metadata=self._metadata)
        # Publish, then re-check: stop() sets the event, then reads _call. Whatever the
        # interleaving (bytecodes run one at a time under the GIL), either stop() reads
        # this call, or the re-check below sees the event; both cancel.
        self._call = call
        try:
            if self.stopped.is_set():
                call.cancel()
            yield call
        except (grpc.RpcError, grpc.FutureCancelledError) as exc:
            if self.stopped.is_set():
                raise Stopped from None
            if not isinstance(exc, grpc.RpcError):
                raise
            raise self._error(exc) from None
        finally:
            self._call = None
            # A caller that left early (e.g. a TaskError mid-stream) ends the call here;
            # otherwise the stream would stay open on the aggregator until its deadline.
            call.cancel()  # no-op for a call that completed

    def _error(self, error: grpc.RpcError) -> Failure | RefusedError:
        """Return what ``error`` means for the node loop: a ``Failure``, or a refusal."""
        code = error.code()
        details = error.details() or ""
        action = _ACTIONS.get(code)
        if action is None:
            return RefusedError(
                f"the aggregator refused node {self.node_id!r}: {code.name}: {details}"
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            # A failed handshake cannot heal by retrying: say so, and what to check.
            problem = handshake_problem(details, self.cfg)
            if problem is not None:
                return RefusedError(
                    f"TLS handshake with the aggregator at {self.cfg.aggregator} failed: {problem}"
                )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and self.backoff.fresh:
            action = Action.ASK_AGAIN  # a long wait for the next round ran out: ask again
        current = _current_round(error) if action is Action.CONTINUE_AT else None
        return Failure(action, code.name, details, current, code in _TRANSIENT)


def _current_round(error: grpc.RpcError) -> int | None:
    trailing: Any = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    for key, value in trailing:
        if key == CURRENT_ROUND_KEY:
            return int(value)
    return None
