"""Shared fixtures: real aggregators on 127.0.0.1 port 0, stubs, hand-built uploads, subprocesses.

Fixtures (each documented below):

- ``serve``      factory: start a ``ServerThread`` aggregator, get a ``Served`` (port, core, ...).
- ``connect``    factory: a generated ``AggregatorStub`` on a fresh insecure channel.
- ``hand_node``  factory: a node driven by hand through a stub (join, push, pull).
- ``wire``       the ``Wire`` helpers that build upload messages from tensors.
- ``spawn``      factory: start a subprocess that is killed at teardown.
- ``cli``        the ``fedgrad`` command line, a clean environment, the port-file wait.
- ``closed_port`` a port on 127.0.0.1 that nothing listens on.

No fixed ports, no mocks: every server is a real ``grpc.aio`` server on an
ephemeral loopback port with ``grpc.so_reuseport`` off (``server_options``),
stopped at teardown whatever the test did.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fedgrad.codec import (
    ChunkCursor,
    Layout,
    TensorSpec,
    byte_view,
    dtype_from_proto,
    iter_chunks,
    manifest_from_proto,
    write_chunk,
)
from fedgrad.config import AggregatorConfig
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.proto import fedgrad_pb2_grpc as pb_grpc
from fedgrad.server.aggregator import Aggregator
from fedgrad.server.app import ServerThread
from fedgrad.task import Task, load_task

#: Deadline of every unary call and of every stream the helpers make, seconds.
CALL_TIMEOUT = 20.0
#: The CLI as a command line, for subprocess tests.
CLI = (sys.executable, "-m", "fedgrad.launch.cli")


# -- servers --------------------------------------------------------------------------------------
@dataclass
class Served:
    """A running aggregator on its own loop and thread.

    Attributes:
        port: the bound port on 127.0.0.1.
        thread: the ``ServerThread`` (``thread.server`` is the ``AggregatorServer``).
        cfg: the ``AggregatorConfig`` it runs with.
    """

    port: int
    thread: ServerThread
    cfg: AggregatorConfig

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, for channels and ``--aggregator``."""
        return f"127.0.0.1:{self.port}"

    @property
    def core(self) -> Aggregator:
        """The aggregator core. Read its state with ``call``/``state_dict``, not directly."""
        return self.thread.server.core

    def call(self, fn: Callable[[], Any], timeout: float = CALL_TIMEOUT) -> Any:
        """Run ``fn()`` on the server's event loop (thread-safe reads of the core)."""

        async def run() -> Any:
            return fn()

        return self.thread.call(run(), timeout=timeout)

    def call_settled(self, fn: Callable[[], Any], timeout: float = CALL_TIMEOUT) -> Any:
        """Like ``call``, once no counted upload is still waiting to be added.

        The PushGradients reply comes when an upload is counted; its add into the
        accumulator follows a moment later. Reads of the accumulator use this.
        """

        async def run() -> Any:
            while self.core.engine.pending_adds:
                await asyncio.sleep(0.005)
            return fn()

        return self.thread.call(run(), timeout=timeout)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return a copy of the aggregator model's state dict, taken on the server loop."""
        return self.call(lambda: {k: v.clone() for k, v in self.core.state_dict().items()})

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        if self.thread.loop.is_closed():
            return
        self.thread.stop()


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """Factory ``serve(task, **cfg) -> Served`` that starts an aggregator on 127.0.0.1:0.

    ``task`` is a ``Task`` or a built-in name (then ``task_args=``, a mapping or
    (key, value) pairs, and ``seed=`` in ``cfg`` also build it). ``cfg`` overrides ``AggregatorConfig`` fields; the
    defaults here are test-friendly: one node, no progress output, a short
    finish grace. Every server is stopped at teardown.
    """
    started: list[Served] = []

    def factory(task: Task | str, **cfg: Any) -> Served:
        options: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "progress": False,
            "finish_grace": 1.0,
            "shutdown_grace": 1.0,
        }
        options.update(cfg)
        options["task_args"] = tuple(dict(options.get("task_args", ())).items())
        if isinstance(task, str):
            options.setdefault("task", task)
            task = load_task(task, dict(options["task_args"]), seed=int(options.get("seed", 0)))
        config = replace(AggregatorConfig(), **options)
        thread = ServerThread(task, config)
        served = Served(0, thread, config)
        started.append(served)
        served.port = thread.start()
        return served

    yield factory
    for served in reversed(started):
        served.stop()


@pytest.fixture
def connect() -> Iterator[Callable[[Served | int | str], pb_grpc.AggregatorStub]]:
    """Factory ``connect(served | port | "host:port") -> AggregatorStub``.

    Channels close at teardown.

    The channel keeps gRPC's default limits (4 MiB receive, unlimited send), so a
    test can send an oversized message and see the *server* refuse it.
    """
    channels: list[grpc.Channel] = []

    def factory(target: Served | int | str) -> pb_grpc.AggregatorStub:
        if isinstance(target, Served):
            target = target.address
        elif isinstance(target, int):
            target = f"127.0.0.1:{target}"
        channel = grpc.insecure_channel(target)
        channels.append(channel)
        return pb_grpc.AggregatorStub(channel)

    yield factory
    for channel in channels:
        channel.close()


# -- building and streaming uploads by hand -------------------------------------------------------
class Wire:
    """Build the protobuf messages of uploads and decode parameter streams, from tensors."""

    @staticmethod
    def header(
        round_: int,
        node_id: str,
        *,
        upload_id: str | None = None,
        num_samples: int = 1,
        metrics: Mapping[str, float] | None = None,
        wire_dtype: int = pb.DTYPE_UNSPECIFIED,
        codec: str = "",
        payload_bytes: int = 0,
        buffers: bytes = b"",
    ) -> pb.UploadHeader:
        """Return an ``UploadHeader``; the upload id defaults to ``NODE.rROUND``."""
        return pb.UploadHeader(
            round=round_,
            node_id=node_id,
            upload_id=upload_id or f"{node_id}.r{round_}",
            num_samples=num_samples,
            metrics=dict(metrics or {}),
            wire_dtype=wire_dtype,  # type: ignore[arg-type]
            codec=codec,
            payload_bytes=payload_bytes,
            buffers=buffers,
        )

    @staticmethod
    def chunks(
        specs: Sequence[TensorSpec],
        tensors: Sequence[torch.Tensor],
        chunk_bytes: int,
        wire_dtype: int = pb.DTYPE_UNSPECIFIED,
    ) -> list[pb.Chunk]:
        """Cut ``tensors``, cast to the wire dtype, into the ``Chunk``s of the flat stream."""
        wire = None if wire_dtype == pb.DTYPE_UNSPECIFIED else dtype_from_proto(wire_dtype)
        layout = Layout(specs, wire)
        cast = [
            t.detach().to(wire or spec.dtype).contiguous()
            for t, spec in zip(tensors, specs, strict=True)
        ]
        views = [byte_view(t) for t in cast]
        return [
            pb.Chunk(tensor=t, offset=o, data=d)
            for t, o, d in iter_chunks(views, layout, chunk_bytes)
        ]

    @staticmethod
    def upload(
        header: pb.UploadHeader, chunks: Sequence[pb.Chunk], end: bool = True
    ) -> list[pb.GradientMessage]:
        """Return the PushGradients stream: header, one message per chunk, then UploadEnd."""
        tail = [Wire.end(chunks)] if end else []
        return (
            [pb.GradientMessage(header=header)]
            + [pb.GradientMessage(chunk=c) for c in chunks]
            + tail
        )

    @staticmethod
    def end(chunks: Sequence[pb.Chunk]) -> pb.GradientMessage:
        """Return the UploadEnd message that closes an upload made of ``chunks``."""
        return pb.GradientMessage(end=pb.UploadEnd(total_bytes=sum(len(c.data) for c in chunks)))

    @staticmethod
    def read_parameters(
        stream: Iterator[pb.ParameterMessage], specs: Sequence[TensorSpec], chunk_bytes: int
    ) -> tuple[pb.ParameterHeader, list[torch.Tensor]]:
        """Consume a PullParameters stream; return its header and the decoded tensors.

        Raises:
            AssertionError: the stream is not one header then in-order chunks covering it all.
        """
        first = next(stream)
        assert first.WhichOneof("kind") == "header", "the stream must start with a header"
        layout = Layout(specs)
        tensors = [torch.zeros(s.shape, dtype=s.dtype) for s in specs]
        views = [byte_view(t) for t in tensors]
        cursor = ChunkCursor(layout, chunk_bytes)
        for message in stream:
            assert message.WhichOneof("kind") == "chunk", "only chunks may follow the header"
            start = cursor.advance(
                message.chunk.tensor, message.chunk.offset, len(message.chunk.data)
            )
            write_chunk(views, layout, start, message.chunk.data)
        assert cursor.complete, f"stream ended after {cursor.position} of {layout.total} bytes"
        assert first.header.total_bytes == layout.total
        return first.header, tensors


@pytest.fixture
def wire() -> type[Wire]:
    """The ``Wire`` helpers (message builders and the parameter-stream decoder)."""
    return Wire


@dataclass
class HandNode:
    """A node driven by hand: every call is one real RPC through a generated stub.

    Attributes:
        stub: the stub it calls.
        node_id, num_samples: what it joined with.
        reply: the ``JoinReply`` (manifest, reduction, chunk size, round).
        specs: the decoded manifest.
    """

    stub: pb_grpc.AggregatorStub
    node_id: str
    num_samples: int
    reply: pb.JoinReply = field(init=False)
    specs: list[TensorSpec] = field(init=False)

    def join(self) -> pb.JoinReply:
        """Join (again); refresh the manifest."""
        self.reply = self.stub.Join(
            pb.JoinRequest(node_id=self.node_id, num_samples=self.num_samples), timeout=CALL_TIMEOUT
        )
        self.specs = manifest_from_proto(self.reply.manifest)
        return self.reply

    @property
    def chunk_bytes(self) -> int:
        return self.reply.chunk_bytes

    def messages(
        self,
        round_: int,
        gradients: Sequence[torch.Tensor],
        *,
        num_samples: int | None = None,
        wire_dtype: int = pb.DTYPE_UNSPECIFIED,
        **header: Any,
    ) -> list[pb.GradientMessage]:
        """Return the whole PushGradients stream of one upload (header + chunks)."""
        head = Wire.header(
            round_,
            self.node_id,
            num_samples=self.num_samples if num_samples is None else num_samples,
            wire_dtype=wire_dtype,
            **header,
        )
        return Wire.upload(head, Wire.chunks(self.specs, gradients, self.chunk_bytes, wire_dtype))

    def push(self, round_: int, gradients: Sequence[torch.Tensor], **kwargs: Any) -> pb.PushReply:
        """Stream one upload (see ``messages`` for the options); return the ``PushReply``."""
        messages = self.messages(round_, gradients, **kwargs)
        return self.stub.PushGradients(iter(messages), timeout=CALL_TIMEOUT)

    def pull(self, min_round: int = 0) -> tuple[pb.ParameterHeader, list[torch.Tensor]]:
        """Pull the parameters of the first round >= ``min_round``: (header, tensors)."""
        stream = self.stub.PullParameters(
            pb.PullRequest(node_id=self.node_id, min_round=min_round), timeout=CALL_TIMEOUT
        )
        return Wire.read_parameters(stream, self.specs, self.chunk_bytes)


@pytest.fixture
def hand_node(
    connect: Callable[[Served | int | str], pb_grpc.AggregatorStub],
) -> Callable[..., HandNode]:
    """Factory ``hand_node(served, node_id, num_samples=1, join=True) -> HandNode``.

    Each hand node has its own channel. With ``join=True`` (the default) it has
    joined; round 0 opens once ``cfg.nodes`` nodes joined.
    """

    def factory(
        target: Served | int | str, node_id: str, num_samples: int = 1, join: bool = True
    ) -> HandNode:
        node = HandNode(connect(target), node_id, num_samples)
        if join:
            node.join()
        return node

    return factory


# -- subprocesses ---------------------------------------------------------------------------------
def cli_env(**extra: str) -> dict[str, str]:
    """Return this environment without FEDGRAD_* variables, plus ``extra``, unbuffered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGRAD_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Factory ``spawn(*argv, env=None, cwd=None, log=None) -> Popen`` (text mode).

    stdout and stderr are pipes (drain them with ``communicate``; a chatty process
    that is never read blocks once a pipe fills), or, with ``log=PATH``, both go to
    that file. ``env`` defaults to ``cli_env()``. Each process leads its own process
    group; a group whose leader still runs at teardown is killed (so are the
    processes it started, e.g. ``fedgrad demo``'s aggregator and nodes), and reaped.
    """
    procs: list[subprocess.Popen[str]] = []
    logs: list[Any] = []

    def factory(
        *argv: str | Path,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log: str | Path | None = None,
    ) -> subprocess.Popen[str]:
        out: Any = subprocess.PIPE
        err: Any = subprocess.PIPE
        if log is not None:
            out = open(log, "w")  # closed at teardown
            logs.append(out)
            err = subprocess.STDOUT
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdout=out,
            stderr=err,
            text=True,
            env=dict(env) if env is not None else cli_env(),
            cwd=cwd,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield factory
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.communicate(timeout=10)
        except (subprocess.TimeoutExpired, ValueError):
            pass
    for fh in logs:
        fh.close()


def wait_port_file(path: Path, proc: subprocess.Popen[str], timeout: float = 60.0) -> int:
    """Wait until ``path`` holds a port number; fail early if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text().strip() if path.exists() else ""
        if text.isdigit():
            return int(text)
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited with {proc.returncode} before serving:\n{out}\n{err}")
        time.sleep(0.05)
    raise AssertionError(f"no port in {path} after {timeout} s")


def free_port() -> int:
    """Return a 127.0.0.1 port that was free a moment ago and that nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def closed_port() -> int:
    """A 127.0.0.1 port that nothing listens on (see ``free_port``)."""
    return free_port()


@dataclass(frozen=True)
class Cli:
    """How tests run the ``fedgrad`` command line as separate processes.

    Attributes:
        argv: ``python -m fedgrad.launch.cli`` with this interpreter.
        env: builds a clean environment (``cli_env``).
        wait_port: waits for a ``--port-file`` (``wait_port_file``).
        closed_port: returns a port nothing listens on (``free_port``).
    """

    argv: tuple[str, ...] = CLI
    env: Callable[..., dict[str, str]] = cli_env
    wait_port: Callable[..., int] = wait_port_file
    closed_port: Callable[[], int] = free_port


@pytest.fixture(scope="session")
def cli() -> Cli:
    """The ``Cli`` helpers: the command line, a clean environment, the port-file wait."""
    return Cli()
