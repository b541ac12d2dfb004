"""The relay's two faces: ``fedgrad.v1.Aggregator`` for its nodes, on its own server.

The nodes see an aggregator (``RelayService``): Join, PullParameters, PushGradients,
Leave and GetStatus, with the aggregator's TLS, mutual TLS and token checks
(``fedgrad.server.security``): a call that names a node id must come from that node.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from fedgrad.auth import load_token_file
from fedgrad.codec import manifest_from_proto, manifest_to_proto
from fedgrad.errors import ConfigError, InvalidArgument, RpcError, Unavailable
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.relay_config import RelayConfig
from fedgrad.server.app import server_options
from fedgrad.server.relay import Relay
from fedgrad.server.security import Authorizer, tls_server_credentials
from fedgrad.server.service import _fail, _parse, next_message
from fedgrad.task import Task
from fedgrad.wire import CONTRACT_VERSION, SERVICE_NAME

__all__ = ["RelayServer", "RelayService"]

log = logging.getLogger("fedgrad.relay")


class RelayService:
    """``fedgrad.v1.Aggregator`` for the relay's nodes."""

    def __init__(self, core: Relay, auth: Authorizer | None = None) -> None:
        self.core = core
        self.auth = auth or Authorizer(None, False)

    def handler(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(
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

    async def join(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        core, node = self.core, "?"
        try:
            request = _parse(raw, pb.JoinRequest)
            node = request.node_id
            self.auth.check(context, node)
            if not core.session_id:
                raise Unavailable("the relay has not reached its upstream yet; retry")
            manifest = (
                manifest_from_proto(request.manifest) if request.HasField("manifest") else None
            )
            core.join(node, request.num_samples, manifest)
        except RpcError as exc:
            await _fail(context, exc, node, core.round, core)  # type: ignore[arg-type]
        return pb.JoinReply(
            manifest=manifest_to_proto(core.specs),
            reduce_rule=core.reduce_rule,
            chunk_bytes=core.chunk_bytes,
            round=core.round,
            total_rounds=core.total_rounds,
            session_id=core.session_id,
            finished=core.finished,
            round_open=core.collecting,
            seed=core.seed,
            contract_version=CONTRACT_VERSION,
            buffers_local=True,
            upload_ready=True,
        )

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
        for message in snapshot.messages():
            yield message
        self.core.counters.bytes_sent += snapshot.wire_bytes
        if snapshot.finished:
            self.core.final_pulled.add(node)

    async def push(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> pb.PushReply:
        node, round_ = "?", "?"
        try:
            raw = await next_message(requests, self.core.cfg.idle_timeout)
            first = _parse(raw) if raw is not None else None
            if first is None or first.WhichOneof("kind") != "header":
                raise InvalidArgument("the first message of PushGradients must be an UploadHeader")
            node, round_ = first.header.node_id, first.header.round
            self.auth.check(context, node)
            return await self.core.upload(first.header, requests, context)
        except RpcError as exc:
            await _fail(context, exc, node, round_, self.core)  # type: ignore[arg-type]
            return pb.PushReply()

    async def leave(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.LeaveReply:
        node = "?"
        try:
            request = _parse(raw, pb.LeaveRequest)
            node = request.node_id
            self.auth.check(context, node)
        except RpcError as exc:
            await _fail(context, exc, node, self.core.round, self.core)  # type: ignore[arg-type]
            return pb.LeaveReply()
        self.core.left.add(request.node_id)
        async with self.core._changed:
            self.core._changed.notify_all()
        return pb.LeaveReply()

    async def status(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.StatusReply:
        core = self.core
        try:
            self.auth.identify(context)
        except RpcError as exc:
            await _fail(context, exc, "?", core.round, core)  # type: ignore[arg-type]
            return pb.StatusReply()
        return pb.StatusReply(
            round=core.round,
            total_rounds=core.total_rounds,
            finished=core.finished,
            reported=len(core.counted),
            bytes_received=core.counters.bytes_received,
            bytes_sent=core.counters.bytes_sent,
            session_id=core.session_id,
            phase="relay: "
            + ("finished" if core.finished else "collecting" if core.collecting else "forwarding"),
            mode="sync",
        )


#: The relay's upload stream window, MiB (the aggregator's ``--upload-window-mb`` default).
UPLOAD_WINDOW_MB = 4


class RelayServer:
    """A relay on its own grpc.aio server."""

    def __init__(self, task: Task, cfg: RelayConfig) -> None:
        self.cfg, self.core = cfg, Relay(task, cfg)
        self.credentials = tls_server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        tokens = load_token_file(cfg.tokens) if cfg.tokens else None
        self.auth = Authorizer(tokens, bool(cfg.tls_client_ca))
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        server = grpc.aio.server(options=server_options(UPLOAD_WINDOW_MB))
        server.add_generic_rpc_handlers((RelayService(self.core, self.auth).handler(),))
        try:
            self.port = (
                server.add_secure_port(self.cfg.listen, self.credentials)
                if self.credentials is not None
                else server.add_insecure_port(self.cfg.listen)
            )
        except RuntimeError:  # grpcio: "Failed to bind to address ..."
            self.port = 0
        if not self.port:
            raise ConfigError(f"cannot listen on {self.cfg.listen}")
        await server.start()
        self.server = server
        log.info("relay listening on port %d", self.port, extra={"event": "listen"})
        return self.port

    async def run(self) -> None:
        try:
            await self.core.run()
        finally:
            if self.server is not None:
                await self.server.stop(1.0)
