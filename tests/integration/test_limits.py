"""Resource limits of a real aggregator: uploads in flight, concurrent RPCs, idle connections.

Uploads are held open mid-stream by hand (a request iterator that stops after the
header and one chunk until the test releases it), so every "in flight" state here
is a fact on the server, never a race. Waits poll the server's state with a bound;
nothing asserts on how long anything took.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from polling import wait_until

from fedgrad.auth import bearer_metadata, generate_token
from fedgrad.certs import init_federation
from fedgrad.client.node import Node
from fedgrad.client.transport import Transport
from fedgrad.codec import Layout, iter_chunk_pieces
from fedgrad.config import NodeConfig
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.server import relay_upstream
from fedgrad.server.app import server_options
from fedgrad.task import load_task
from fedgrad.wire import UPLOAD_READY

TIMEOUT = 20.0
#: Bound of every wait for a state on the server; never reached when things work.
WAIT = 15.0
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
#: Chunks of 16 bytes cut the linear task's 72-byte gradient into 5 chunks.
CHUNK = 16


def admitted(call: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Make the call, retrying while the server refuses it with RESOURCE_EXHAUSTED."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() != RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


class HeldUpload:
    """A PushGradients call that sends the header and one chunk, then waits for ``release``."""

    def __init__(self, node: Any, round_: int, upload_id: str) -> None:
        messages = node.messages(round_, zeros(node), upload_id=upload_id)
        assert len(messages) > 2, "the upload must have chunks left to hold back"
        self.node_id = node.node_id
        self._go = threading.Event()

        def requests() -> Iterator[pb.GradientMessage]:
            yield from messages[:2]
            self._go.wait(TIMEOUT)  # bounded: a forgotten upload still ends
            yield from messages[2:]

        self.future = node.stub.PushGradients.future(requests(), timeout=3 * TIMEOUT)

    def release(self) -> pb.PushReply:
        """Send the rest of the upload and return the reply."""
        self._go.set()
        return self.future.result(timeout=TIMEOUT)

    def close(self) -> None:
        self._go.set()
        self.future.cancel()


@pytest.fixture
def held() -> Iterator[Callable[..., HeldUpload]]:
    """Factory ``held(hand_node, round, upload_id)``; every held upload ends at teardown."""
    uploads: list[HeldUpload] = []

    def factory(node: Any, round_: int = 0, upload_id: str | None = None) -> HeldUpload:
        upload = HeldUpload(node, round_, upload_id or f"{node.node_id}.r{round_}")
        uploads.append(upload)
        return upload

    yield factory
    for upload in uploads:
        upload.close()


def zeros(node: Any) -> list[torch.Tensor]:
    return [torch.zeros(s.shape, dtype=s.dtype) for s in node.specs]


def holding(served: Any, *nodes: str) -> Callable[[], bool]:
    """Condition: exactly these nodes hold a staging slot (their upload is staged)."""
    return lambda: (
        served.call(lambda: sorted(t.node_id for t in served.core.intake.inflight)) == sorted(nodes)
    )


def published(served: Any, round_: int) -> Callable[[], bool]:
    """Condition: round ``round_`` is open (the step runs after the last upload's reply)."""
    return lambda: served.call(lambda: served.core.round) >= round_


def marked_uploading(served: Any, node: str) -> Callable[[], bool]:
    """Condition: the aggregator has read ``node``'s upload header (it is staged or queued)."""
    return lambda: served.call(lambda: served.core.nodes[node].uploading)


# -- uploads in flight -----------------------------------------------------------------------
def test_second_concurrent_upload_from_one_node_is_resource_exhausted(serve, hand_node, held):
    served = serve("linear", nodes=2, rounds=2, chunk_bytes=CHUNK)
    n1, n2 = hand_node(served, "n1"), hand_node(served, "n2")
    first = held(n1, upload_id="n1.first")
    wait_until(holding(served, "n1"), "n1's first upload is staged")
    for upload_id in ("n1.second", "n1.first"):  # a different upload, or the same one again
        stream = iter(n1.messages(0, zeros(n1), upload_id=upload_id))
        with pytest.raises(grpc.RpcError) as info:
            n1.stub.PushGradients(stream, timeout=TIMEOUT)
        assert info.value.code() == RESOURCE_EXHAUSTED
        assert "already has an upload in flight" in info.value.details()
    # The limit is per node: n2 uploads meanwhile, and n1's first upload then completes.
    assert n2.push(0, zeros(n2)).round == 0
    assert first.release().round == 0
    wait_until(published(served, 1), "round 0 closes")


def test_uploads_beyond_max_inflight_wait_for_a_slot_then_give_up(
    serve, hand_node, held, monkeypatch
):
    served = serve("linear", nodes=4, rounds=2, chunk_bytes=CHUNK, max_inflight=2, slot_wait=0.5)
    n1, n2, n3, n4 = (hand_node(served, f"n{i}") for i in range(1, 5))
    a, b = held(n1), held(n2)
    wait_until(holding(served, "n1", "n2"), "n1 and n2 hold both staging slots")
    # No slot frees up within the wait (--slot-wait, shortened here): the overflow is refused.
    with pytest.raises(grpc.RpcError) as info:
        n3.push(0, zeros(n3))
    assert info.value.code() == RESOURCE_EXHAUSTED
    assert "2 uploads in flight" in info.value.details()
    assert served.call(lambda: not served.core.nodes["n3"].uploading), "refused: no trace"
    # Within the wait, a queued upload takes the first slot that frees up.
    monkeypatch.setattr(served.core, "cfg", replace(served.core.cfg, slot_wait=3 * TIMEOUT))
    queued = n3.stub.PushGradients.future(iter(n3.messages(0, zeros(n3))), timeout=3 * TIMEOUT)
    wait_until(marked_uploading(served, "n3"), "n3's upload is queued")
    assert served.call(lambda: len(served.core.intake.inflight)) == 2, (
        "never more than max_inflight"
    )
    assert a.release().round == 0
    assert queued.result(timeout=TIMEOUT).round == 0
    assert b.release().round == 0
    assert n4.push(0, zeros(n4)).round == 0
    wait_until(published(served, 1), "round 0 closes")
    assert served.call(lambda: served.core.history[-1].nodes) == 4


def test_upload_cancelled_while_queued_does_not_lock_its_node_out(serve, hand_node, held):
    # Bug (reported): Aggregator.open_upload sets record.uploading = True, then awaits a
    # slot, and resets it only on TimeoutError. A call cancelled during the wait (client
    # cancel or deadline, e.g. a real node's push deadline under slot contention) leaves
    # the flag set, and every later upload of that node is RESOURCE_EXHAUSTED "already has
    # an upload in flight" for the rest of the session.
    served = serve("linear", nodes=2, rounds=2, chunk_bytes=CHUNK, max_inflight=1)
    n1, n2 = hand_node(served, "n1"), hand_node(served, "n2")
    a = held(n1)
    wait_until(holding(served, "n1"), "n1 holds the only slot")
    queued = n2.stub.PushGradients.future(iter(n2.messages(0, zeros(n2))), timeout=3 * TIMEOUT)
    wait_until(marked_uploading(served, "n2"), "n2's upload is queued")
    queued.cancel()
    assert a.release().round == 0
    wait_until(
        lambda: served.call(lambda: not served.core.nodes["n2"].uploading),
        "n2 is free to upload again after its queued upload was cancelled",
        timeout=5.0,
    )
    assert n2.push(0, zeros(n2)).round == 0


# -- concurrent RPCs -------------------------------------------------------------------------
def wait_pulls(nodes: Sequence[Any], per_node: int) -> list[Any]:
    """Open ``per_node`` PullParameters per node that wait for a round that never comes.

    They wait for round 2, the final parameters of these 2-round federations, which no
    test here reaches (a round past the last would be OUT_OF_RANGE at once).
    """
    return [
        n.stub.PullParameters(pb.PullRequest(node_id=n.node_id, min_round=2), timeout=3 * TIMEOUT)
        for n in nodes
        for _ in range(per_node)
    ]


def test_max_rpcs_caps_concurrent_calls(serve, hand_node, connect):
    served = serve("linear", nodes=3, rounds=2, max_rpcs=3)
    nodes = [hand_node(served, f"n{i}") for i in range(1, 4)]
    probe = connect(served)
    pulls = wait_pulls(nodes, per_node=1)
    try:
        wait_until(
            lambda: (
                code_of(lambda: probe.GetStatus(pb.StatusRequest(), timeout=TIMEOUT))
                == RESOURCE_EXHAUSTED
            ),
            "the 4th concurrent call is refused",
        )
        # Every kind of call, from anyone, is refused while max_rpcs calls are open.
        for call in (
            lambda: probe.Join(pb.JoinRequest(node_id="n1", num_samples=1), timeout=TIMEOUT),
            lambda: nodes[0].push(0, zeros(nodes[0])),
            lambda: probe.GetStatus(pb.StatusRequest(), timeout=TIMEOUT),
        ):
            assert code_of(call) == RESOURCE_EXHAUSTED
    finally:
        for p in pulls:
            p.cancel()
    # Once they end, the federation goes on (a call may still be refused until the server
    # has retired the cancelled ones: nodes retry RESOURCE_EXHAUSTED, and so does this test).
    for n in nodes:
        assert admitted(lambda n=n: n.push(0, zeros(n))).round == 0
    wait_until(published(served, 1), "round 0 closes")


def test_one_node_cannot_take_every_rpc_slot(serve, hand_node, connect):
    # Gap (reported): issue 4 asks for caps on "concurrent uploads and streams per node";
    # uploads are capped per node, PullParameters streams are not. One authenticated node
    # opening max_rpcs waiting pulls (default 2048) starves every other node.
    served = serve("linear", nodes=2, rounds=2, max_rpcs=4)
    greedy, victim = hand_node(served, "greedy"), hand_node(served, "victim")
    pulls = wait_pulls([greedy], per_node=4)
    refused: list[Any] = []
    for p in pulls:
        p.add_done_callback(lambda call: refused.append(call.code()))
    try:
        # Either a per-node cap refuses some of greedy's pulls, or greedy fills the server.
        wait_until(
            lambda: (
                RESOURCE_EXHAUSTED in refused
                or code_of(lambda: victim.stub.GetStatus(pb.StatusRequest(), timeout=TIMEOUT))
                == RESOURCE_EXHAUSTED
            ),
            "a per-node cap refuses greedy's extra pulls, or greedy fills every slot",
        )
        # The victim may retry, as real nodes do, for a few seconds.
        starved = code_of(lambda: admitted(victim.join, timeout=3.0))
    finally:
        for p in pulls:
            p.cancel()
    assert starved == grpc.StatusCode.OK, "one node's streams starved another node's Join"


def test_callers_without_credentials_cannot_hold_rpc_slots(serve, hand_node, connect, tmp_path):
    # Bug (reported): AggregatorService.push reads the first message (waiting up to the
    # 30 s idle timeout) before it checks credentials. With tokens, anyone who can reach
    # the port opens max_rpcs PushGradients calls, sends nothing, and every node is
    # RESOURCE_EXHAUSTED; repeated every 30 s it is a denial of service by an outsider.
    token = generate_token()
    token_file = tmp_path / "tokens.txt"
    token_file.write_text(f"n1 {token}\n")
    token_file.chmod(0o600)
    served = serve("linear", nodes=1, rounds=2, max_rpcs=4, tokens=str(token_file))
    outsider = connect(served)
    silence = threading.Event()

    def nothing() -> Iterator[pb.GradientMessage]:
        silence.wait(TIMEOUT)  # bounded
        return
        yield

    calls = [outsider.PushGradients.future(nothing(), timeout=3 * TIMEOUT) for _ in range(4)]
    refused: list[grpc.StatusCode] = []
    for call in calls:
        call.add_done_callback(lambda c: refused.append(c.code()))
    member = connect(served)
    md = bearer_metadata(token)
    try:
        wait_until(
            lambda: (
                len(refused) == 4
                or code_of(
                    lambda: member.GetStatus(pb.StatusRequest(), timeout=TIMEOUT, metadata=md)
                )
                == RESOURCE_EXHAUSTED
            ),
            "the outsider's calls are refused, or they fill every slot",
        )
        join = pb.JoinRequest(node_id="n1", num_samples=1)
        blocked = code_of(
            lambda: admitted(lambda: member.Join(join, timeout=TIMEOUT, metadata=md), timeout=3.0)
        )
    finally:
        silence.set()
        for call in calls:
            call.cancel()
    assert blocked == grpc.StatusCode.OK, "callers without credentials starved a member"
    assert set(refused) == {grpc.StatusCode.UNAUTHENTICATED}


# -- idle connections ------------------------------------------------------------------------
def test_idle_reaping_is_configured():
    options = dict(server_options())
    # DESIGN.md, "Defaults": idle connections are closed after 5 minutes.
    assert options["grpc.max_connection_idle_ms"] == 300_000
    # ...and the message limit stays at gRPC's 4 MiB default, set explicitly.
    assert options["grpc.max_receive_message_length"] == 4 * 1024 * 1024


def test_idle_reaping_option_is_one_grpc_honours():
    # The same option list with the idle time cut to 300 ms: the server sends GOAWAY to an
    # idle client (a misspelt option name would be silently ignored by gRPC).
    options = [(k, 300 if k == "grpc.max_connection_idle_ms" else v) for k, v in server_options()]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=options)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    states: list[grpc.ChannelConnectivity] = []
    reaped = threading.Event()

    def seen(state: grpc.ChannelConnectivity) -> None:
        states.append(state)
        if state == grpc.ChannelConnectivity.IDLE and grpc.ChannelConnectivity.READY in states:
            reaped.set()

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        channel.subscribe(seen, try_to_connect=True)
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert reaped.wait(WAIT), f"idle connection not closed by the server: {states}"
    finally:
        channel.unsubscribe(seen)
        channel.close()
        server.stop(None)


def test_idle_connection_flood_does_not_starve_a_node(serve, tmp_path):
    certs = tmp_path / "certs"
    init_federation(certs, ["n1", "idler"])
    ca, node = str(certs / "ca.pem"), certs / "nodes"
    served = serve(
        "linear",
        nodes=1,
        rounds=3,
        tls_cert=str(certs / "server.pem"),
        tls_key=str(certs / "server.key"),
        tls_client_ca=ca,
    )
    sockets: list[socket.socket] = []
    channels: list[grpc.Channel] = []
    try:
        # 300 TCP connections that never say a word, 20 that stop inside a TLS record ...
        for i in range(320):
            sock = socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT)
            if i >= 300:
                sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            sockets.append(sock)
        # ... and 30 authenticated gRPC connections (one each) that make no call.
        creds = grpc.ssl_channel_credentials(
            Path(ca).read_bytes(),
            (node / "idler.key").read_bytes(),
            (node / "idler.pem").read_bytes(),
        )
        for _ in range(30):
            channel = grpc.secure_channel(
                served.address, creds, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            channels.append(channel)
            grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        # A legitimate node still trains every round.
        cfg = NodeConfig(
            task="linear",
            aggregator=served.address,
            node_id="n1",
            tls_ca=ca,
            tls_cert=str(node / "n1.pem"),
            tls_key=str(node / "n1.key"),
            give_up_after=15.0,
            round_wait=TIMEOUT,
        )
        trainer = Node(load_task("linear"), cfg)
        try:
            result = trainer.run()
        finally:
            trainer.close()
        assert (result.uploads, result.final_round) == (3, 3)
        assert served.call(lambda: served.core.round) == 3
    finally:
        for channel in channels:
            channel.close()
        for sock in sockets:
            sock.close()


QUEUE_CHUNK = 64 << 10


def queue_two(
    serve: Any, hand_node: Any, held: Any, third: str
) -> tuple[Any, Any, HeldUpload, HeldUpload]:
    """An aggregator with one staging slot: n1 holds it, n2's upload is next in line.

    Returns (served, the ``third`` hand node, n1's upload, n2's upload); 64 KiB chunks.
    """
    served = serve(
        "synthetic",
        task_args={"params": 1 << 20, "tensors": 1},  # 4 MiB of float32
        nodes=3,
        rounds=1,
        chunk_bytes=QUEUE_CHUNK,
        max_inflight=1,
    )
    n1, n2, last = (hand_node(served, n) for n in ("n1", "n2", third))  # round 0 opens
    assert last.reply.upload_ready
    first = held(n1)
    wait_until(holding(served, "n1"), "n1 holds the only slot")
    second = held(n2)
    wait_until(marked_uploading(served, "n2"), "n2's upload is queued")
    # The next in line is told to stream (its first chunks are here when the slot frees).
    assert dict(second.future.initial_metadata()) == dict(UPLOAD_READY)
    return served, last, first, second


@pytest.mark.parametrize("wait_ready", [True, False])
def test_a_node_that_waits_for_the_ready_headers_sends_only_its_header_while_queued(
    serve, hand_node, held, wait_ready
):
    # JoinReply.upload_ready: the aggregator sends PushGradients' response headers once the
    # upload is next in line for a staging slot, and the node's transport sends the chunks
    # only then, so the uploads queued behind hold nothing in the aggregator's buffers.
    # Without waiting (a node that ignores the field) the chunks go at once, up to the
    # stream window.
    served, n3, first, second = queue_two(serve, hand_node, held, "n3")
    messages = [m.SerializeToString() for m in n3.messages(0, zeros(n3))]
    sent = [0]

    def counted() -> Iterator[bytes]:
        for message in messages:
            sent[0] += 1
            yield message

    transport = Transport(NodeConfig(aggregator=served.address, node_id="n3"))
    replies: list[pb.PushReply] = []
    pushing = threading.Thread(
        target=lambda: replies.append(transport.push(counted(), 3 * TIMEOUT, wait_ready))
    )
    pushing.start()
    try:
        wait_until(marked_uploading(served, "n3"), "n3's upload is queued")
        time.sleep(0.5)  # what the node would send by now is sent (no timing is asserted)
        if wait_ready:
            assert sent[0] == 1, f"{sent[0]} messages sent while queued: only the header may be"
        else:
            assert sent[0] > 1
        assert first.release().round == 0
        assert second.release().round == 0
        pushing.join(TIMEOUT)
        assert replies and replies[0].round == 0
        assert sent[0] == len(messages)
    finally:
        transport.close()
        pushing.join(TIMEOUT)


def test_a_relays_upload_waits_for_the_ready_headers_while_queued(
    serve, hand_node, held, monkeypatch
):
    # The relay's upstream push (grpc.aio) waits for the upstream's UPLOAD_READY too: no
    # chunk of it is even encoded while it queues behind the upload next in line.
    served, relay, first, second = queue_two(serve, hand_node, held, "relay-0")
    encoded = [0]

    def counted(*args: Any) -> Iterator[Any]:
        for item in iter_chunk_pieces(*args):
            encoded[0] += 1
            yield item

    monkeypatch.setattr(relay_upstream, "iter_chunk_pieces", counted)
    layout = Layout(relay.specs)
    views = [np.zeros(n, dtype=np.uint8) for n in layout.nbytes]
    header = pb.UploadHeader(round=0, node_id="relay-0", upload_id="relay-0.r0", num_samples=1)

    async def push() -> pb.PushReply:
        async with grpc.aio.insecure_channel(served.address) as channel:
            return await relay_upstream.push_upload(
                channel, header, views, layout, QUEUE_CHUNK, 3 * TIMEOUT, None, True
            )

    with futures.ThreadPoolExecutor(1) as pool:
        pushed = pool.submit(asyncio.run, push())
        wait_until(marked_uploading(served, "relay-0"), "the relay's upload is queued")
        time.sleep(0.5)  # what the relay would send by now is sent (no timing is asserted)
        assert encoded[0] == 0, f"{encoded[0]} chunks encoded while queued"
        assert first.release().round == 0
        assert second.release().round == 0
        assert pushed.result(TIMEOUT).round == 0
    assert encoded[0] == len(list(iter_chunk_pieces(views, layout, QUEUE_CHUNK)))


@pytest.mark.parametrize("window_mb", [1, 2])
def test_upload_queued_for_a_slot_is_held_back_by_the_stream_window(
    serve, hand_node, held, window_mb
):
    # An upload that waits for a staging slot is not read by the aggregator; what its node
    # can send meanwhile sits in gRPC's buffers. --upload-window-mb bounds it per stream
    # (with gRPC's adaptive window it grows to tens of MB on loopback).
    chunk = 64 << 10
    served = serve(
        "synthetic",
        task_args={"params": 4 << 20, "tensors": 1},  # 16 MiB of float32
        nodes=2,
        rounds=1,
        chunk_bytes=chunk,
        max_inflight=1,
        upload_window_mb=window_mb,
    )
    n1, n2 = hand_node(served, "n1"), hand_node(served, "n2")
    a = held(n1)
    wait_until(holding(served, "n1"), "n1 holds the only slot")
    messages = n2.messages(0, zeros(n2))
    sent = [0]

    def counted() -> Iterator[pb.GradientMessage]:
        for message in messages:
            sent[0] += 1
            yield message

    queued = n2.stub.PushGradients.future(counted(), timeout=3 * TIMEOUT)
    wait_until(marked_uploading(served, "n2"), "n2's upload is queued")
    time.sleep(1.0)  # what the window lets through is sent by now (no timing is asserted)
    held_back = sent[0] * chunk
    assert held_back <= (window_mb + 2) << 20, f"{held_back} bytes sent while queued"
    assert a.release().round == 0
    assert queued.result(timeout=TIMEOUT).round == 0
    assert sent[0] == len(messages)
