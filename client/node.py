"""The compute node: join, pull parameters, compute, push gradients, repeat."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from fedgrad.auth import bearer_metadata
from fedgrad.client.transport import Backoff, Stopped, open_channel
from fedgrad.codec import (
    ChunkCursor,
    Layout,
    byte_view,
    iter_chunk_pieces,
    manifest_from_proto,
    specs_of,
    write_chunk,
)
from fedgrad.config import NodeConfig
from fedgrad.errors import RefusedError, TaskError
from fedgrad.framing import ChunkView, decode_chunk, encode_chunk
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.seeding import round_generator
from fedgrad.task import Task, check_update, trainable_parameters

__all__ = ["Node", "NodeResult"]

log = logging.getLogger("fedgrad.node")
PULL_METHOD = "/fedgrad.v1.Aggregator/PullParameters"
PUSH_METHOD = "/fedgrad.v1.Aggregator/PushGradients"
_WIRE = {None: pb.DTYPE_UNSPECIFIED, "float16": pb.FLOAT16, "bfloat16": pb.BFLOAT16}


@dataclass(frozen=True)
class NodeResult:
    """What a node did: rounds it uploaded and the final round it saw."""

    node_id: str
    uploads: int
    final_round: int


class Node:
    """One compute node. ``run()`` returns when training is over, or after ``stop()``."""

    def __init__(self, task: Task, cfg: NodeConfig) -> None:
        self.task, self.cfg = task, cfg
        self.stop_event = threading.Event()
        self._stop_reason = "stop requested"
        self._active: Any = None  # the call in flight, for stop() to cancel
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.model = task.model()
        self.params = [p for _, p in trainable_parameters(self.model)]
        self.layout = Layout(specs_of(trainable_parameters(self.model)))
        self.views = [byte_view(p.data) for p in self.params]
        self.data = task.shard(*cfg.shard)
        self.num_samples = task.num_samples(self.data)
        self.metadata = bearer_metadata(cfg.token) if cfg.token else ()
        self.channel, self.stub = open_channel(cfg)
        # Raw-bytes twins of two stub methods: chunks are framed and read in place.
        self._pull_raw = self.channel.unary_stream(
            PULL_METHOD,
            request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=None,
        )
        self._push_raw = self.channel.stream_unary(
            PUSH_METHOD, request_serializer=None, response_deserializer=pb.PushReply.FromString
        )
        self.backoff = Backoff(cfg.give_up_after, stop=self.stop_event)
        self.session_id = ""
        self.uploads = 0

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def stop(self, reason: str = "stop requested") -> None:
        """Make ``run()`` leave the federation and return, whatever the node is doing now.

        Cancels the call in flight and ends a backoff wait; ``run()`` then calls Leave
        and returns its ``NodeResult``. Idempotent, and safe from any thread at any
        moment, before, during or after ``run()``. From a signal handler, keep ``run()``
        off the main thread (as ``fedgrad node`` does): the handler interrupts the main
        thread between any two bytecodes, possibly inside a lock that this method takes.

        Args:
            reason: logged as "REASON: leaving the federation"; the first one wins.
        """
        if not self.stop_event.is_set():
            self._stop_reason = reason
        self.stop_event.set()
        # After set(): a call started later sees the event, so every call is cancelled.
        call = self._active
        if call is not None:
            call.cancel()

    @contextmanager
    def _cancellable(
        self, method: Callable[..., Any], request: Any, timeout: float
    ) -> Iterator[Any]:
        """Start ``method(request)`` where ``stop()`` can cancel it; raise Stopped if it did."""
        if self.stop_event.is_set():
            raise Stopped
        call = method(request, timeout=timeout, metadata=self.metadata)
        self._active = call
        try:
            if self.stop_event.is_set():  # stop() looked before this call existed
                call.cancel()
            yield call
        except (grpc.RpcError, grpc.FutureCancelledError):
            if self.stop_event.is_set():
                raise Stopped from None
            raise
        finally:
            self._active = None

    # -- calls -------------------------------------------------------------------
    def join(self) -> pb.JoinReply:
        """Join (idempotent) and check that the aggregator's model is this task's model."""
        request = pb.JoinRequest(node_id=self.cfg.node_id, num_samples=self.num_samples)

        def call() -> pb.JoinReply:
            with self._cancellable(self.stub.Join.future, request, self.cfg.call_timeout) as join:
                return join.result()

        reply = self.backoff.call("join", call)
        theirs = manifest_from_proto(reply.manifest)
        if theirs != self.layout.specs:
            raise TaskError(
                "the aggregator's model differs from this node's task model "
                f"({len(theirs)} vs {len(self.layout.specs)} tensors): run both with the same --task"
            )
        self.chunk_bytes = reply.chunk_bytes
        self.session_id = reply.session_id
        log.info(
            "joined at round %d of %d",
            reply.round,
            reply.total_rounds,
            extra={"node": self.cfg.node_id, "round": reply.round, "event": "join"},
        )
        return reply

    def pull(self, min_round: int) -> pb.ParameterHeader:
        """Load the parameters of the first round >= ``min_round`` into the model."""
        timeout = (
            self.cfg.round_wait + self.layout.total / self.cfg.min_bandwidth + self.cfg.call_timeout
        )
        request = pb.PullRequest(node_id=self.cfg.node_id, min_round=min_round)
        with self._cancellable(self._pull_raw, request, timeout) as stream:
            first = pb.ParameterMessage.FromString(next(stream))
            if first.WhichOneof("kind") != "header":
                raise TaskError("aggregator sent a chunk before the ParameterHeader")
            header = first.header
            cursor = ChunkCursor(self.layout, max(self.chunk_bytes, 1))
            with torch.no_grad():
                for raw in stream:
                    view = decode_chunk(raw)
                    if view is None:
                        c = pb.ParameterMessage.FromString(raw).chunk
                        view = ChunkView(c.data, c.tensor, c.offset, 0, len(c.data))
                    start = cursor.advance(view.tensor, view.offset, view.data_len)
                    write_chunk(
                        self.views, self.layout, start, view.raw, view.data_start, view.data_len
                    )
        if not cursor.complete:
            raise TaskError(
                f"parameter stream ended after {cursor.position} of {self.layout.total} bytes"
            )
        return header

    def push(
        self,
        round_: int,
        gradients: list[torch.Tensor],
        num_samples: int,
        metrics: dict[str, float],
    ) -> pb.PushReply:
        """Stream one upload; the upload id is the same if this round is recomputed."""
        wire = self.cfg.wire_dtype
        tensors = [
            g.detach().to(getattr(torch, wire) if wire else g.dtype).contiguous().cpu()
            for g in gradients
        ]
        layout = Layout(self.layout.specs, getattr(torch, wire) if wire else None)
        header = pb.UploadHeader(
            round=round_,
            node_id=self.cfg.node_id,
            upload_id=f"{self.cfg.node_id}.r{round_}.{self.session_id[:12]}",
            num_samples=num_samples,
            metrics=metrics,
            wire_dtype=_WIRE[wire],  # type: ignore[arg-type]
        )

        def messages() -> Iterator[bytes]:
            yield pb.GradientMessage(header=header).SerializeToString()
            views = [byte_view(t) for t in tensors]
            for t, o, pieces in iter_chunk_pieces(views, layout, self.chunk_bytes):
                yield encode_chunk(t, o, pieces)
            yield pb.GradientMessage(end=pb.UploadEnd(total_bytes=layout.total)).SerializeToString()

        timeout = self.cfg.call_timeout + layout.total / self.cfg.min_bandwidth
        # The future form: a blocking call could not be cancelled by stop().
        with self._cancellable(self._push_raw.future, messages(), timeout) as call:
            return call.result()

    def leave(self) -> None:
        """Tell the aggregator to stop waiting for this node (best effort)."""
        try:
            self.stub.Leave(
                pb.LeaveRequest(node_id=self.cfg.node_id),
                timeout=self.cfg.call_timeout,
                metadata=self.metadata,
            )
        except grpc.RpcError as exc:
            log.info("leave failed: %s", exc.code().name)

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> NodeResult:
        """Train until the aggregator finishes or ``stop()``; reconnect across aggregator restarts.

        Returns:
            What the node did, also after ``stop()`` (then the node has called Leave).

        Raises:
            GaveUpError: the aggregator was unreachable for ``give_up_after`` seconds.
            RefusedError: the aggregator refused this node (credentials, bad input).
            TaskError: the task or the aggregator's model does not fit.
        """
        try:
            return self._loop()
        except grpc.RpcError as exc:
            raise RefusedError(
                f"the aggregator refused node {self.cfg.node_id!r}: {exc.code().name}: {exc.details()}"
            ) from None

    def _loop(self) -> NodeResult:
        next_round = 0
        try:
            self.join()
            while not self.stop_event.is_set():
                try:
                    header = self.pull(next_round)
                    if header.session_id != self.session_id:
                        next_round = self.join().round
                        continue
                    if header.finished:
                        return NodeResult(self.cfg.node_id, self.uploads, header.round)
                    next_round = self.train_round(header.round)
                    self.backoff.reset()
                except grpc.RpcError as exc:
                    next_round = self._recover(exc, next_round)
        except Stopped:
            pass
        log.info(
            "%s: leaving the federation",
            self._stop_reason,
            extra={"node": self.cfg.node_id, "event": "leave"},
        )
        self.leave()
        return NodeResult(self.cfg.node_id, self.uploads, next_round)

    def train_round(self, round_: int) -> int:
        """Compute and push this round's update; return the next round to pull."""
        generator = round_generator(self.cfg.seed, self.cfg.node_id, round_)
        update = self.task.compute_update(self.model, self.data, generator)
        check_update(update, self.params)
        reply = self.push(round_, update.gradients, update.num_samples, update.metrics)
        self.uploads += 0 if reply.duplicate else 1
        log.info(
            "round %d uploaded (loss %.4f)",
            round_,
            update.metrics.get("loss", float("nan")),
            extra={"node": self.cfg.node_id, "round": round_, "event": "upload"},
        )
        return round_ + 1

    def _recover(self, exc: grpc.RpcError, next_round: int) -> int:
        code = exc.code()
        if code == grpc.StatusCode.ABORTED:
            current = _current_round(exc)
            log.info(
                "round closed before our upload counted; continuing at round %d",
                current,
                extra={"node": self.cfg.node_id, "round": next_round, "event": "stale"},
            )
            return current if current is not None else next_round
        if code == grpc.StatusCode.ALREADY_EXISTS:
            return next_round + 1
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and self.backoff.attempt == 0:
            return next_round  # a long wait for the next round ran out: ask again
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return self.join().round
        if code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.CANCELLED,
            grpc.StatusCode.UNKNOWN,
        ):
            self.backoff.wait("round", exc)
            # After a reconnect, redo the aggregator's open round: if it restarted from a
            # checkpoint our counted upload may be gone; if not, the same upload id is a no-op.
            return self.join().round
        raise exc


def _current_round(exc: grpc.RpcError) -> int | None:
    trailing: Any = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
    for key, value in trailing:
        if key == "fedgrad-current-round":
            return int(value)
    return None
