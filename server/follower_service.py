"""gRPC edge of shard I > 0: the node-facing Aggregator methods and shard 0's ShardPeer."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from fedgrad.errors import FailedPrecondition, InvalidArgument, RpcError
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.server.follower import ShardFollower
from fedgrad.server.security import Authorizer
from fedgrad.server.service import _codec_of, _fail, _parse, next_message, receive_upload
from fedgrad.server.sharding import PEER_SERVICE
from fedgrad.wire import SERVICE_NAME

__all__ = ["FollowerService"]

log = logging.getLogger("fedgrad.service")


class FollowerService:
    """``fedgrad.v1.Aggregator`` (pull, push, status) and ``fedgrad.v1.ShardPeer``."""

    def __init__(
        self, core: ShardFollower, idle_timeout: float, auth: Authorizer | None = None
    ) -> None:
        self.core, self.idle_timeout = core, idle_timeout
        self.auth = auth or Authorizer(None, mutual_tls=False)

    def handlers(self) -> tuple[grpc.GenericRpcHandler, ...]:
        unary = grpc.unary_unary_rpc_method_handler
        nodes = grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Join": unary(self.join, None, pb.JoinReply.SerializeToString),
                "PullParameters": grpc.unary_stream_rpc_method_handler(self.pull, None, None),
                "PushGradients": grpc.stream_unary_rpc_method_handler(
                    self.push, None, pb.PushReply.SerializeToString
                ),
                "Leave": unary(self.leave, None, pb.LeaveReply.SerializeToString),
                "GetStatus": unary(self.status, None, pb.StatusReply.SerializeToString),
            },
        )
        peers = grpc.method_handlers_generic_handler(
            PEER_SERVICE,
            {
                "Sync": unary(self.sync, pb.ShardSyncRequest.FromString, _ser),
                "Hold": unary(self.hold, pb.ShardHoldRequest.FromString, _ser),
                "Commit": unary(self.commit, pb.ShardCommitRequest.FromString, _ser),
                "Close": unary(self.close, pb.ShardCloseRequest.FromString, _ser),
            },
        )
        return nodes, peers

    # -- nodes -------------------------------------------------------------------------
    async def join(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        plan = self.core.setup.plan
        await _fail(
            context,
            FailedPrecondition(
                f"this is shard {self.core.setup.index} of {plan.count}: join shard 0 at"
                f" {plan.addresses[0]}"
            ),
            "?",
            self.core.round,
            self.core,  # type: ignore[arg-type]
        )
        return pb.JoinReply()

    async def pull(self, raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        node = "?"
        try:
            request = _parse(raw, pb.PullRequest)
            node = request.node_id
            self.auth.check(context, node)
            snapshot = await self.core.wait_snapshot(request.min_round)
        except RpcError as exc:
            await _fail(context, exc, node, self.core.round, self.core)  # type: ignore[arg-type]
            return
        try:
            for message in snapshot.messages():
                yield message
            self.core.sent(node, snapshot)
        finally:
            snapshot.readers -= 1

    async def push(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> pb.PushReply:
        node, round_ = "?", "?"
        part = None
        error = "the stream ended early"
        try:
            raw = await next_message(requests, self.idle_timeout)
            first = _parse(raw) if raw is not None else None
            if first is None or first.WhichOneof("kind") != "header":
                raise InvalidArgument("the first message of PushGradients must be an UploadHeader")
            h = first.header
            node, round_ = h.node_id, h.round
            self.auth.check(context, h.node_id)
            try:
                part = await self.core.open_upload(
                    h.node_id, h.round, h.upload_id, h.shard, h.shard_map, _codec_of(h),
                    h.payload_bytes, h.presummed,
                )  # fmt: skip
            except FailedPrecondition as exc:
                if str(exc) == "already counted":
                    return pb.PushReply(duplicate=True, round=h.round)
                raise
            await receive_upload(requests, part.staged, self.idle_timeout, context)
            error = ""
            return pb.PushReply(round=h.round)
        except RpcError as exc:
            error = str(exc)
            await _fail(context, exc, node, round_, self.core)  # type: ignore[arg-type]
            return pb.PushReply()
        finally:
            if part is not None:
                await self.core.part_done(part, error)

    async def leave(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.LeaveReply:
        return pb.LeaveReply()  # membership is shard 0's

    async def status(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.StatusReply:
        core = self.core
        return pb.StatusReply(
            round=core.round,
            total_rounds=core.total_rounds,
            finished=core.finished,
            reported=len(core.added),
            bytes_received=core.counters.bytes_received,
            bytes_sent=core.counters.bytes_sent,
            session_id=core.session_id,
            phase=f"shard {core.setup.index}: " + ("finished" if core.finished else "collecting"),
            mode=core.cfg.mode,
        )

    # -- shard 0 -----------------------------------------------------------------------
    async def sync(self, request: pb.ShardSyncRequest, context: Any) -> pb.ShardSyncReply:
        try:
            self.auth.check_peer(context)
            round_ = await self.core.sync(
                request.shard, request.shards, dict(request.settings), request.round,
                request.session_id,
            )  # fmt: skip
        except RpcError as exc:
            await context.abort(grpc.StatusCode[exc.code], str(exc))
        return pb.ShardSyncReply(round=round_, incarnation=self.core.incarnation)

    async def hold(self, request: pb.ShardHoldRequest, context: Any) -> pb.ShardHoldReply:
        try:
            self.auth.check_peer(context)
        except RpcError as exc:
            await context.abort(grpc.StatusCode[exc.code], str(exc))
        held, reason = await self.core.hold(
            request.node_id, request.round, request.upload_id, request.wait_s, request.presummed
        )
        return pb.ShardHoldReply(held=held, reason=reason)

    async def commit(self, request: pb.ShardCommitRequest, context: Any) -> pb.ShardCommitReply:
        try:
            self.auth.check_peer(context)
            await self.core.commit(
                request.node_id, request.round, request.upload_id, request.weight,
                request.presummed,
            )  # fmt: skip
        except RpcError as exc:
            await context.abort(grpc.StatusCode[exc.code], str(exc))
        return pb.ShardCommitReply()

    async def close(self, request: pb.ShardCloseRequest, context: Any) -> pb.ShardCloseReply:
        try:
            self.auth.check_peer(context)
            round_ = await self.core.close(
                request.round, dict(request.uploads), request.finished, request.gather
            )
        except RpcError as exc:
            await context.abort(grpc.StatusCode[exc.code], str(exc))
        return pb.ShardCloseReply(round=round_)


def _ser(message: Any) -> bytes:
    return message.SerializeToString()
