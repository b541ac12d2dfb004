"""A relay (``fedgrad relay``): an aggregator to its M nodes, one node to its upstream.

Each round the relay pulls the upstream's parameters and serves those same bytes to its
nodes; it reduces its nodes' uploads (any codec) into one float64 sum of weight x values
with the upstream's reduction weights, and pushes that as one *presummed* upload
(``UploadHeader.presummed``) whose ``num_samples`` is the sum of the weights. The upstream
adds it as it is, so its step is the one it would take with every node connected
directly, and its traffic grows with the number of relays, not nodes.

A relay keeps no state across restarts: its upload id is ``RELAY.rROUND.SESSION``, so a
restarted relay that collects the round again sends an upload the upstream already
counted as a duplicate (applied once), and its nodes reconnect and redo the round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc
import numpy as np
import torch

from fedgrad.auth import bearer_metadata, load_node_token
from fedgrad.codec import (
    Layout,
    manifest_to_proto,
    specs_of,
)
from fedgrad.codecs import Codec, codec_for
from fedgrad.errors import (
    FailedPrecondition,
    InvalidArgument,
    OutOfRange,
    StaleRound,
)
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.relay_config import RelayConfig
from fedgrad.server.broadcast import Snapshot, make_snapshot
from fedgrad.server.counters import Counters
from fedgrad.server.reducers import StreamingReducer
from fedgrad.server.relay_shards import ShardedUpstream
from fedgrad.server.relay_upstream import (
    Redo,
    RpcFailed,
    aborted_round,
    push_upload,
    upstream_credentials,
)
from fedgrad.server.service import _codec_of, receive_upload
from fedgrad.server.staging import StagedUpload, check_metrics
from fedgrad.task import Task, trainable_parameters
from fedgrad.wire import MAX_MESSAGE_BYTES, SERVICE_NAME, check_id

__all__ = ["Relay", "RelayConfig", "RpcFailed", "upstream_credentials"]

log = logging.getLogger("fedgrad.relay")
_REDUCTIONS = {"weighted-mean", "mean", "sum"}


class Relay:
    """The relay's state: the upstream's round and parameters, its nodes' sum."""

    def __init__(self, task: Task, cfg: RelayConfig) -> None:
        self.cfg = cfg
        self.specs = specs_of(trainable_parameters(task.model()))
        self.layout = Layout(self.specs)
        self.counters = Counters()
        self.round, self.total_rounds, self.finished = 0, 0, False
        self.session_id, self.reduce_rule, self.chunk_bytes, self.seed = "", "", 0, 0
        #: The upstream's ``JoinReply.upload_ready`` (``push_upload``).
        self.upload_ready = False
        self.snapshot: Snapshot | None = None
        self.nodes: dict[str, int] = {}  # node id -> num_samples (from Join)
        self.left: set[str] = set()
        self.counted: dict[str, str] = {}  # node id -> upload id counted this round
        self.losses: dict[str, tuple[float, int]] = {}
        self.final_pulled: set[str] = set()
        self.collecting = False
        #: Counts the upstream's restarts of an open round (``_redo``).
        self.redo_epoch = 0
        self.reducer: StreamingReducer | None = None
        #: Shards 1..K-1 and the map, when the upstream is a sharded aggregator.
        self.shards: ShardedUpstream | None = None
        self.codecs: dict[str, Codec] = {}
        self._inflight: set[str] = set()
        self.credentials = upstream_credentials(cfg)
        token = load_node_token(cfg.upstream_token_file) if cfg.upstream_token_file else None
        self.metadata = bearer_metadata(token) if token else ()

    # -- upstream ------------------------------------------------------------------------
    async def run(self) -> None:
        """Relay rounds until the upstream's training is over."""
        self._changed = asyncio.Condition()
        self._adding = asyncio.Lock()
        self._slots = asyncio.Semaphore(2)
        self.channel = self._open(self.cfg.upstream)
        try:
            reply = await self._call(self._join)
            min_round = reply.round
            while True:
                try:
                    header = await self._call(lambda m=min_round: self._pull(m))
                except Redo as redo:  # a shard restarted: round redo.round is open again
                    min_round = self._redo(redo.round)
                    continue
                if header.finished:
                    await self._wait_final_pulls()
                    return
                await self._collect(header.round)
                await self._call(lambda r=header.round: self._forward(r))
                min_round = header.round + 1
        finally:
            if self.shards is not None:
                await self.shards.aclose()
            await self.channel.close()

    def _redo(self, round_: int) -> int:
        """The upstream restarted ``round_`` (a sharded one, after a shard restarted):
        collect it again. The nodes waiting for the next round are told so (``wait_snapshot``:
        ABORTED with ``round_``), as the aggregator tells its own nodes."""
        log.warning(
            "the upstream restarted round %d; collecting it again", round_,
            extra={"round": round_, "event": "redo"},
        )  # fmt: skip
        self.redo_epoch += 1
        self.collecting = False
        assert self.reducer is not None
        self.reducer.reset()
        self.counted.clear()
        self.losses.clear()
        return round_

    def _open(self, address: str) -> grpc.aio.Channel:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if self.credentials is not None:
            return grpc.aio.secure_channel(address, self.credentials, options=options)
        return grpc.aio.insecure_channel(address, options=options)

    async def _call(self, attempt: Any) -> Any:
        """Retry ``attempt`` while the upstream is unreachable (up to ``give_up_after``).

        In front of shards FAILED_PRECONDITION is retried too: a restarted shard answers
        it until shard 0 has synced it (then shard 0 restarts the round, and the retry of
        the same upload counts).
        """
        deadline = time.monotonic() + self.cfg.give_up_after
        delay = 0.1
        transient = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
        while True:
            try:
                return await attempt()
            except grpc.aio.AioRpcError as exc:
                retry = transient | (
                    {grpc.StatusCode.FAILED_PRECONDITION} if self.shards is not None else set()
                )
                if exc.code() not in retry:
                    raise RpcFailed(
                        f"the upstream refused: {exc.code().name}: {exc.details()}"
                    ) from None
                if time.monotonic() > deadline:
                    raise RpcFailed(
                        f"the upstream was unreachable for {self.cfg.give_up_after:.0f} s"
                        f" (last: {exc.code().name}: {exc.details()})"
                    ) from None
                log.info(
                    "upstream unreachable (%s); retrying", exc.code().name, extra={"event": "retry"}
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _join(self) -> pb.JoinReply:
        join = self.channel.unary_unary(
            f"/{SERVICE_NAME}/Join",
            request_serializer=pb.JoinRequest.SerializeToString,
            response_deserializer=pb.JoinReply.FromString,
        )
        request = pb.JoinRequest(
            node_id=self.cfg.node_id, num_samples=1, manifest=manifest_to_proto(self.specs)
        )
        reply: pb.JoinReply = await join(
            request, timeout=self.cfg.call_timeout, metadata=self.metadata
        )
        rule = reply.reduce_rule or "weighted-mean"
        if rule not in _REDUCTIONS:
            raise RpcFailed(f"the upstream reduces with {rule!r}; a relay forwards sums only")
        if self.shards is not None:
            await self.shards.aclose()
            self.shards = None
        if len(reply.shard_map.shards) > 1:  # pull and push every shard (relay_shards)
            self.shards = ShardedUpstream(reply.shard_map, self.specs, self._open)
        self.session_id, self.reduce_rule, self.chunk_bytes = (
            reply.session_id,
            rule,
            reply.chunk_bytes,
        )
        self.upload_ready = reply.upload_ready
        self.seed, self.total_rounds = reply.seed, reply.total_rounds
        self.reducer = StreamingReducer(rule, self.layout, "float64", 1)
        log.info("joined the upstream at round %d", reply.round, extra={"event": "join"})
        return reply

    async def _pull(self, min_round: int) -> pb.ParameterHeader:
        pull = self.channel.unary_stream(
            f"/{SERVICE_NAME}/PullParameters",
            request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=None,
        )
        wait = self.cfg.round_timeout * 2 + self.cfg.call_timeout
        if self.shards is not None:
            try:
                return await self._pull_shards(min_round, wait)
            except grpc.aio.AioRpcError as exc:
                if (current := aborted_round(exc)) is not None:
                    raise Redo(current) from None
                raise
        call = pull(
            pb.PullRequest(node_id=self.cfg.node_id, min_round=min_round),
            timeout=wait,
            metadata=self.metadata,
        )
        messages = [raw async for raw in call]
        first = pb.ParameterMessage.FromString(messages[0])
        if first.WhichOneof("kind") != "header":
            raise RpcFailed("the upstream sent a chunk before the ParameterHeader")
        header = first.header
        if header.session_id != self.session_id:
            await self._join()  # a new federation upstream
        snapshot = Snapshot.received(header.round, header.finished, messages)
        await self._publish(header, snapshot)
        return header

    async def _pull_shards(self, min_round: int, wait: float) -> pb.ParameterHeader:
        """Every shard's pieces into one model, served to the nodes as one broadcast."""
        assert self.shards is not None
        header, params = await self.shards.pull(
            self.channel, min_round, self.cfg.node_id, wait, self.chunk_bytes or (1 << 20),
            self.metadata,
        )  # fmt: skip
        if header.session_id != self.session_id:
            await self._join()
            return await self._pull(min_round)
        snapshot = make_snapshot(
            params, self.layout, self.chunk_bytes or (1 << 20), header.round, header.finished,
            header.session_id, None, header.total_rounds, dict(header.config), header.buffers,
        )  # fmt: skip
        await self._publish(header, snapshot)
        return header

    async def _publish(self, header: pb.ParameterHeader, snapshot: Snapshot) -> None:
        async with self._changed:
            self.round, self.finished, self.snapshot = header.round, header.finished, snapshot
            self.total_rounds = header.total_rounds or self.total_rounds
            self.collecting = not header.finished
            self._changed.notify_all()

    async def _collect(self, round_: int) -> None:
        """Wait for every expected node's upload of ``round_`` (or the deadline's quorum)."""
        deadline = time.monotonic() + self.cfg.round_timeout
        need = self.cfg.min_nodes or self.cfg.nodes

        def enough() -> bool:
            expected = self.cfg.nodes - len(self.left)
            full = len(self.counted) >= max(1, expected) and not self._inflight
            late = time.monotonic() >= deadline and len(self.counted) >= need and not self._inflight
            return full or late

        async with self._changed:
            while not enough():
                try:
                    async with asyncio.timeout(max(0.05, deadline - time.monotonic())):
                        await self._changed.wait()
                except TimeoutError:
                    pass
            self.collecting = False
        async with self._adding:  # the last add is done
            pass

    async def _forward(self, round_: int) -> None:
        """Push the round's sum upstream as one presummed upload; then start afresh."""
        assert self.reducer is not None
        if not self.counted:
            return
        total = self.reducer.sum.total  # type: ignore[attr-defined]
        weight = self.reducer.total_weight
        dtype = getattr(torch, self.cfg.forward_dtype)
        wire = Layout(self.specs, dtype)
        sent = total if dtype == torch.float64 else total.astype(np.float32)
        views, start = [], 0
        for spec in self.specs:
            views.append(sent[start : start + spec.numel].view(np.uint8))
            start += spec.numel
        metrics = {}
        if self.losses:
            samples = sum(w for _, w in self.losses.values())
            metrics["loss"] = sum(v * w for v, w in self.losses.values()) / max(1, samples)
        header = pb.UploadHeader(
            round=round_,
            node_id=self.cfg.node_id,
            upload_id=f"{self.cfg.node_id}.r{round_}.{self.session_id[:12]}",
            num_samples=weight,
            metrics=metrics,
            codec=self.cfg.forward_dtype,
            payload_bytes=wire.total,
            presummed=True,
        )
        chunk_bytes = self.chunk_bytes or (1 << 20)
        timeout = self.cfg.call_timeout
        sending: Coroutine[Any, Any, object]
        if self.shards is not None:  # each shard its pieces (relay_shards)
            args = (self.channel, header, sent, dtype, chunk_bytes, timeout, self.metadata,
                    self.upload_ready)  # fmt: skip
            sending = self.shards.push(*args)
        else:
            sending = self._push_whole(header, views, wire, chunk_bytes)
        try:
            await sending
            self.counters.bytes_sent += wire.total
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED:
                raise
            log.warning("the upstream closed round %d before this relay's upload", round_)
        log.info(
            "round %d forwarded: %d uploads, weight %d", round_, len(self.counted), weight,
            extra={"round": round_, "event": "forward"},
        )  # fmt: skip
        self.reducer.reset()
        self.counted.clear()
        self.losses.clear()

    async def _push_whole(
        self, header: pb.UploadHeader, views: list[np.ndarray], wire: Layout, chunk_bytes: int
    ) -> None:
        """The sum to an unsharded upstream: one stream."""
        timeout = self.cfg.call_timeout + wire.total / 1e6
        await push_upload(
            self.channel, header, views, wire, chunk_bytes, timeout, self.metadata,
            self.upload_ready,
        )  # fmt: skip

    async def _wait_final_pulls(self) -> None:
        deadline = time.monotonic() + self.cfg.finish_grace
        active = set(self.nodes) - self.left
        while time.monotonic() < deadline and not active <= self.final_pulled:
            await asyncio.sleep(0.05)

    # -- nodes ---------------------------------------------------------------------------
    def join(self, node_id: str, num_samples: int, manifest: Any) -> None:
        check_id("node_id", node_id)
        if manifest is not None and manifest != self.specs:
            raise InvalidArgument(
                "this node's model is not the relay's task model: run both with the same --task"
            )
        if node_id not in self.nodes and len(set(self.nodes) - self.left) >= self.cfg.nodes:
            raise FailedPrecondition(f"this relay takes {self.cfg.nodes} nodes; it has them")
        self.nodes[node_id] = num_samples
        self.left.discard(node_id)

    async def wait_snapshot(self, min_round: int) -> Snapshot:
        if self.total_rounds and min_round > self.total_rounds:
            raise OutOfRange(f"round {min_round} is past the last round ({self.total_rounds})")

        epoch = self.redo_epoch

        def redone() -> bool:  # the round this node uploaded restarted upstream: redo it
            return self.redo_epoch != epoch and self.collecting and min_round > self.round

        def ready() -> bool:
            s = self.snapshot
            return redone() or (s is not None and (s.finished or s.round >= min_round))

        async with self._changed:
            await self._changed.wait_for(ready)
            if redone():
                raise StaleRound(
                    f"round {self.round} restarted upstream: upload it again", self.round
                )
            assert self.snapshot is not None
            return self.snapshot

    async def upload(
        self,
        h: pb.UploadHeader,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
    ) -> pb.PushReply:
        check_id("upload_id", h.upload_id)
        check_metrics(dict(h.metrics))
        if h.node_id not in self.nodes:
            raise FailedPrecondition(f"node {h.node_id!r} has not joined this relay: call Join")
        if self.counted.get(h.node_id) == h.upload_id:
            return pb.PushReply(duplicate=True, round=h.round)
        if h.round != self.round or not self.collecting:
            current = self.round + (0 if self.collecting else 1)
            raise StaleRound(f"round {h.round} is not open at this relay", current)
        if h.node_id in self.counted or h.node_id in self._inflight:
            raise FailedPrecondition(f"node {h.node_id!r} already uploads round {h.round}")
        assert self.reducer is not None
        weight = self.reducer.weight(h.num_samples)
        codec = _codec_of(h)
        decoder = self.codecs.get(codec) or self.codecs.setdefault(
            codec, codec_for(codec, self.specs)
        )
        self._inflight.add(h.node_id)
        try:
            async with asyncio.timeout(self.cfg.round_timeout):
                await self._slots.acquire()
            try:
                staged = StagedUpload(decoder, self.chunk_bytes or (1 << 20))
                await receive_upload(requests, staged, self.cfg.idle_timeout, context)
                async with self._changed:
                    if h.round != self.round or not self.collecting:
                        raise StaleRound(
                            f"round {h.round} closed during the upload", self.round + 1
                        )
                async with self._adding:
                    await asyncio.to_thread(self.reducer.add, staged, weight, 1.0, h.node_id)
                self.counters.bytes_received += staged.nbytes
            finally:
                self._slots.release()
            async with self._changed:
                self.counted[h.node_id] = h.upload_id
                if "loss" in h.metrics:
                    self.losses[h.node_id] = (h.metrics["loss"], weight)
        finally:
            self._inflight.discard(h.node_id)
            async with self._changed:
                self._changed.notify_all()
        return pb.PushReply(round=h.round)
