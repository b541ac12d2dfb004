"""A small TCP fault proxy on 127.0.0.1 for the finer network faults of the fault tests.

``FaultProxy(upstream_port)`` listens on an ephemeral loopback port and forwards
every accepted connection to ``127.0.0.1:upstream_port``. The fault applies to
all connections, current and future, from the moment it is set:

- ``pass_through()``: forward both directions unchanged (the default).
- ``delay(seconds)``: hold every piece of data ``seconds`` before forwarding it,
  order preserved (a slow, long link).
- ``blackhole()``: read and discard everything in both directions, never close
  (packets that vanish; the peers only notice through their own deadlines).
- ``drop_responses()``: forward client -> server, discard server -> client
  (the request arrives and is processed, the reply is lost).
- ``reset()``: an action, not a mode: abort every open connection with a TCP RST.

It runs an asyncio loop on one daemon thread, reads at most ``_READ`` bytes at a
time and waits for each write to drain, so its memory stays bounded whatever
the peers do; at most ``max_connections`` connections are served at once
(further ones are refused with an RST). ``close()`` (or leaving the ``with``
block) stops everything and joins the thread. Usage::

    with FaultProxy(server_port) as proxy:
        channel = grpc.insecure_channel(proxy.address)
        proxy.drop_responses()
        ...
        proxy.reset()
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any

__all__ = ["FaultProxy"]

_READ = 64 * 1024
_PASS, _DELAY, _BLACKHOLE, _DROP_RESPONSES = "pass", "delay", "blackhole", "drop-responses"


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close a connection with an RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultProxy:
    """Forward 127.0.0.1:``port`` to 127.0.0.1:``upstream_port`` with switchable faults."""

    def __init__(self, upstream_port: int, max_connections: int = 32) -> None:
        self.upstream_port = upstream_port
        self.max_connections = max_connections
        self.port = 0
        self.mode = _PASS
        self.delay_seconds = 0.0
        #: Connections accepted so far (a test can check that traffic went through).
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy")
        self._thread.daemon = True
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> int:
        """Start listening; return the proxy's port."""
        self._thread.start()
        self.port = self._run(self._start())
        return self.port

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the proxy, for channels."""
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop listening, abort every connection, stop the loop and join the thread."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            self._run(self._stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    # -- faults --------------------------------------------------------------------------
    def pass_through(self) -> None:
        """Forward both directions unchanged."""
        self.mode = _PASS

    def delay(self, seconds: float) -> None:
        """Hold each piece of data ``seconds`` before forwarding it."""
        self.delay_seconds = seconds
        self.mode = _DELAY

    def blackhole(self) -> None:
        """Discard everything in both directions; keep connections open."""
        self.mode = _BLACKHOLE

    def drop_responses(self) -> None:
        """Forward client -> server; discard server -> client."""
        self.mode = _DROP_RESPONSES

    def reset(self) -> int:
        """Abort every open connection with an RST; return how many were open."""
        return self._run(self._reset())

    # -- on the proxy loop -------------------------------------------------------------
    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _reset(self) -> int:
        conns = list(self._conns)
        for client, upstream in conns:
            _rst(client)
            _rst(upstream)
        self._conns.clear()
        return len(conns)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if len(self._conns) >= self.max_connections:
                _rst(writer)
                return
            self.accepted += 1
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    "127.0.0.1", self.upstream_port
                )
            except OSError:
                _rst(writer)
                return
            pair = (writer, up_writer)
            self._conns.add(pair)
            try:
                await asyncio.gather(
                    self._pump(reader, up_writer, upstream=True),
                    self._pump(up_reader, writer, upstream=False),
                )
            finally:
                self._conns.discard(pair)
                for w in pair:
                    w.transport.abort()
        finally:
            self._tasks.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool
    ) -> None:
        try:
            while data := await reader.read(_READ):
                mode = self.mode
                if mode == _BLACKHOLE or (mode == _DROP_RESPONSES and not upstream):
                    continue
                if mode == _DELAY:
                    await asyncio.sleep(self.delay_seconds)
                writer.write(data)
                await writer.drain()
            if self.mode != _BLACKHOLE and writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            # The other side went away (or we reset it): drop this direction too.
            writer.transport.abort()
