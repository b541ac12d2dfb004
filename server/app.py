"""Run the aggregator: the grpc.aio server, health, and the end of training."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from safetensors.torch import save_file

from fedgrad.config import AggregatorConfig, parse_hostport
from fedgrad.errors import ConfigError
from fedgrad.history import RoundRecord, write_history
from fedgrad.server.aggregator import Aggregator
from fedgrad.server.follower import ShardFollower
from fedgrad.server.follower_service import FollowerService
from fedgrad.server.security import Authorizer, check_listen_policy, server_credentials
from fedgrad.server.service import AggregatorService
from fedgrad.server.sharding import ShardSetup
from fedgrad.task import Task
from fedgrad.wire import MAX_MESSAGE_BYTES, SERVICE_NAME

__all__ = ["AggregatorServer", "ServerThread", "server_options"]

log = logging.getLogger("fedgrad.server")


def server_options(upload_window_mb: int = 0) -> list[tuple[str, Any]]:
    """Return the channel options of the aggregator (see DESIGN.md, "Defaults").

    ``upload_window_mb``: a fixed HTTP/2 stream window in MiB instead of gRPC's adaptive
    one. With BDP probing the window of an upload that waits for a staging slot grows to
    tens of MB on a fast link, all of it held in the transport's buffers (95 MiB model,
    8 nodes, one slot: peak RSS 989 MB adaptive, 825 MB with 4 MiB).
    """
    window: list[tuple[str, Any]] = []
    if upload_window_mb:
        window = [
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", upload_window_mb << 20),
        ]
    # Fixed, never raised with the chunk size: oversized input is refused before our code.
    return window + [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # A second server on the same port must fail, not silently share it.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_connection_idle_ms", 300_000),
    ]


class AggregatorServer:
    """The aggregator service on one grpc.aio server."""

    def __init__(self, task: Task, cfg: AggregatorConfig) -> None:
        self.cfg = cfg
        index, count = cfg.shard_index
        #: Shard I > 0 of a sharded aggregator runs a follower instead of the round engine.
        self.follower: ShardFollower | None = None
        if index > 0:
            self.follower = ShardFollower(task, cfg, ShardSetup(task, cfg))
        # None on a follower (typed as the shard-0 case every caller outside this file sees).
        self.core: Aggregator = Aggregator(task, cfg) if index == 0 else None  # type: ignore[assignment]
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_server: Any = None
        self.metrics_port = 0
        self.tensorboard: Any = None

    async def start(self) -> int:
        """Start serving on ``cfg.listen``; return the bound port.

        Raises:
            ConfigError: plaintext off loopback, a bad TLS file, a taken port or an
                address gRPC cannot bind; nothing serves then.
        """
        check_listen_policy(self.cfg)
        # Every mistake of the operator's is found before anything starts.
        creds = server_credentials(self.cfg)
        _check_bindable(self.cfg.listen)
        if self.follower is not None:
            return await self._start_follower(creds)
        self._start_metrics()  # before the core: a taken metrics port fails early too
        try:
            await self.core.start()
            self._start_tensorboard()
            server = self._build_server()
            self.port = _add_port(server, self.cfg.listen, creds)
        except BaseException:
            self._stop_metrics()
            self._stop_tracking()
            raise
        await server.start()
        self.server = server
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("aggregator listening on port %d", self.port, extra={"event": "listen"})
        return self.port

    async def _start_follower(self, creds: grpc.ServerCredentials | None) -> int:
        assert self.follower is not None
        await self.follower.start()
        server = grpc.aio.server(
            options=server_options(self.cfg.upload_window_mb),
            maximum_concurrent_rpcs=self.cfg.max_rpcs,
        )
        service = FollowerService(
            self.follower, self.cfg.idle_timeout, Authorizer.from_config(self.cfg)
        )
        server.add_generic_rpc_handlers(service.handlers())
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.port = _add_port(server, self.cfg.listen, creds)
        await server.start()
        self.server = server
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "aggregator shard %s listening on port %d",
            self.cfg.shard,
            self.port,
            extra={"event": "listen"},
        )
        return self.port

    def _build_server(self) -> grpc.aio.Server:
        server = grpc.aio.server(
            options=server_options(self.cfg.upload_window_mb),
            maximum_concurrent_rpcs=self.cfg.max_rpcs,
        )
        service = AggregatorService(
            self.core, self.cfg.idle_timeout, Authorizer.from_config(self.cfg)
        )
        server.add_generic_rpc_handlers((service.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.cfg.reflection:
            from grpc_reflection.v1alpha import reflection

            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
        return server

    def _start_metrics(self) -> None:
        if self.cfg.metrics_port is None:
            return
        from fedgrad.server.metrics import serve_metrics

        host = parse_hostport(self.cfg.listen)[0]
        try:
            self.metrics_server, self.metrics_port = serve_metrics(
                self.core, host, self.cfg.metrics_port
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {host}:{self.cfg.metrics_port}: {exc.strerror}"
            ) from None
        log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)

    def _start_tensorboard(self) -> None:
        if not self.cfg.tensorboard:
            return
        from fedgrad.server.tracking import open_tensorboard

        # A resumed run rewrites from its round on: TensorBoard hides what an earlier
        # run wrote there (purge_step), so no round is drawn twice.
        writer = open_tensorboard(self.cfg.tensorboard, first_round=self.core.round or None)
        self.tensorboard = writer
        ledger = self.core.ledger

        def write(record: RoundRecord) -> None:
            # Held-out metrics beyond loss and accuracy (those are record fields).
            others = ledger.federated.get(record.round, {})
            extra = {
                f"federated/{k}": v for k, v in others.items() if k not in ("loss", "accuracy")
            }
            writer.write(record, extra)

        self.core.on_round.append(write)

    def _stop_tracking(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def _stop_metrics(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None

    async def wait_finished(self) -> None:
        """Wait for the end of training, then save the results."""
        if self.follower is not None:
            await self.follower.wait_finished()
            return
        await self.core.wait_finished()
        if self.core.peers is not None and self.cfg.save:
            # The evaluation copy already holds the final model (the other shards may be
            # gone once their nodes pulled): otherwise pull every shard's final pieces.
            self._gathered = self.core.gathered_state() or await self.core.peers.gather(self.core)
        self.save()

    def save(self) -> None:
        """Write the final parameters and the history, if asked to."""
        if self.cfg.save:
            Path(self.cfg.save).parent.mkdir(parents=True, exist_ok=True)
            state = getattr(self, "_gathered", None) or self.core.state_dict()
            tensors = {k: v.cpu().contiguous() for k, v in state.items()}
            save_file(tensors, self.cfg.save, metadata={"round": str(self.core.round)})
        if self.cfg.history:
            write_history(self.cfg.history, self.core.history)

    async def shutdown(self) -> None:
        """Graceful stop on SIGTERM/SIGINT: NOT_SERVING, finish in-flight work, checkpoint."""
        if self.follower is not None:
            await self.stop(grace=self.cfg.shutdown_grace)
            return
        self.core.shut_down()
        await self.stop(grace=self.cfg.shutdown_grace)
        await self.core.final_checkpoint()
        if self.cfg.history:
            write_history(self.cfg.history, self.core.history)

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, then stop the server after ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        if self.core is not None:
            self.core.close()
            if self.core.peers is not None:
                await self.core.peers.aclose()
        self._stop_metrics()
        self._stop_tracking()
        if self.server is not None:
            await self.server.stop(grace if grace is not None else self.cfg.shutdown_grace)


def _check_bindable(listen: str) -> None:
    """Check that ``listen`` can be bound now, so that a taken port is one clear line.

    gRPC reports a taken port only as "Failed to bind" after logging its own error line.
    Like gRPC, succeed if any address the host resolves to binds (SO_REUSEADDR as gRPC
    sets it, so a port in TIME_WAIT passes). Port 0 always binds.

    Raises:
        ConfigError: the host does not resolve, or no address of it can be bound.
    """
    host, port = parse_hostport(listen)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(
            f"cannot listen on {listen}: {host!r} does not resolve ({exc.strerror})"
        ) from None
    errors: list[OSError] = []
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
                return
            except OSError as exc:
                errors.append(exc)
    raise ConfigError(f"cannot listen on {listen}: {_why(errors[0], port)}")


def _why(error: OSError, port: int) -> str:
    if error.errno == errno.EADDRINUSE:
        return (
            f"port {port} is already in use (another aggregator?); stop it, or pick another"
            " --listen port (0 picks a free one, see --port-file)"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return "no interface of this machine has that address; use one of its addresses or 0.0.0.0"
    if error.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges); pick a port above 1023"
    return str(error.strerror)


def _add_port(server: grpc.aio.Server, listen: str, creds: grpc.ServerCredentials | None) -> int:
    """Bind ``listen``; a failure (e.g. the port taken since ``_check_bindable``) is a ConfigError."""
    try:
        if creds is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, creds)
    except RuntimeError:  # grpcio: "Failed to bind to address ..."
        port = 0
    if port == 0:
        raise ConfigError(
            f"cannot listen on {listen}: gRPC could not bind it (is the port taken? pick another"
            " --listen port, or 0 for a free one)"
        )
    return port


class ServerThread:
    """Run an ``AggregatorServer`` on its own event loop in a background thread."""

    def __init__(self, task: Task, cfg: AggregatorConfig) -> None:
        self.server = AggregatorServer(task, cfg)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="fedgrad-aggregator", daemon=True
        )

    def start(self) -> int:
        """Start the loop and the server; return the bound port."""
        self._thread.start()
        return self.call(self.server.start())

    def call(self, coro: Any, timeout: float | None = 60.0) -> Any:
        """Run a coroutine on the server loop and return its result."""
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        """Stop the server and the loop, and join the thread."""
        if self._thread.is_alive():
            self.call(self.server.stop(grace=1.0))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()
