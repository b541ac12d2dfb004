"""The node's transport: each status code becomes the action docs/protocol.md gives it.

A real gRPC server on 127.0.0.1 port 0 (``grpc.so_reuseport`` off) stands in for the
aggregator: its generic handlers end each call with the status code a test sets, so
every rule of ``fedgrad.client.transport`` is driven through real calls, no mocks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from fedgrad.client.transport import Action, Failure, Stopped, Transport
from fedgrad.config import NodeConfig
from fedgrad.errors import GaveUpError, RefusedError
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.wire import SERVICE_NAME

CODE = grpc.StatusCode
#: The Join request of the tests' node.
JOIN = pb.JoinRequest(node_id="n1", num_samples=4)


@dataclass
class Scripted:
    """What the fake aggregator answers: ``fail`` codes in turn, then success.

    Attributes:
        fail: status codes the next calls end with, first one first.
        trailing: trailing metadata sent with each failure.
        hold_pull: after the header, keep the parameter stream open until it ends.
        pull_ended: set once a held parameter stream ended (e.g. the node cancelled it).
        calls: rpc names as they arrived.
    """

    fail: list[grpc.StatusCode] = field(default_factory=list)
    trailing: tuple[tuple[str, str], ...] = ()
    hold_pull: bool = False
    pull_ended: threading.Event = field(default_factory=threading.Event)
    calls: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, name: str, context: grpc.ServicerContext) -> None:
        """Record the call; end it with the next scripted code, if any."""
        with self.lock:
            self.calls.append(name)
            code = self.fail.pop(0) if self.fail else None
        if code is not None:
            context.set_trailing_metadata(self.trailing)
            context.abort(code, f"scripted {code.name}")


@pytest.fixture
def scripted() -> Iterator[tuple[Scripted, int]]:
    """A real gRPC server on 127.0.0.1:0 answering as its ``Scripted``; yields both and the port."""
    script = Scripted()

    def join(request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        script.answer("Join", context)
        return pb.JoinReply(round=3, chunk_bytes=1024, session_id="s")

    def pull(
        request: pb.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ParameterMessage]:
        script.answer("PullParameters", context)
        # Registered before the header goes out: a callback added once the node has
        # already cancelled is never called (add_callback returns False then).
        if script.hold_pull and not context.add_callback(script.pull_ended.set):
            script.pull_ended.set()
        yield pb.ParameterMessage(header=pb.ParameterHeader(round=request.min_round))
        if script.hold_pull:
            script.pull_ended.wait(60)

    def push(requests: Iterator[pb.GradientMessage], context: grpc.ServicerContext) -> pb.PushReply:
        for _ in requests:
            pass
        script.answer("PushGradients", context)
        return pb.PushReply(round=0)

    handlers = {
        "Join": grpc.unary_unary_rpc_method_handler(
            join, pb.JoinRequest.FromString, pb.JoinReply.SerializeToString
        ),
        "PullParameters": grpc.unary_stream_rpc_method_handler(
            pull, pb.PullRequest.FromString, pb.ParameterMessage.SerializeToString
        ),
        "PushGradients": grpc.stream_unary_rpc_method_handler(
            push, pb.GradientMessage.FromString, pb.PushReply.SerializeToString
        ),
    }
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield script, port
    server.stop(None)


@pytest.fixture
def transport(scripted: tuple[Scripted, int]) -> Iterator[Transport]:
    """A ``Transport`` to the scripted server (node n1, a 5 s give-up budget)."""
    _, port = scripted
    t = Transport(NodeConfig(aggregator=f"127.0.0.1:{port}", node_id="n1", give_up_after=5.0))
    yield t
    t.close()


def pull_once(transport: Transport, min_round: int = 0) -> pb.ParameterHeader:
    """Pull with the transport; return the header."""
    with transport.pull(min_round, timeout=10.0) as stream:
        messages = [pb.ParameterMessage.FromString(raw) for raw in stream]
    return messages[0].header


def push_once(transport: Transport) -> pb.PushReply:
    """Push a header-only upload (the scripted server does not check it)."""
    header = pb.GradientMessage(header=pb.UploadHeader(round=0, node_id="n1"))
    return transport.push(iter([header.SerializeToString()]), timeout=10.0)


def failure_of(call: Any) -> Failure:
    with pytest.raises(Failure) as info:
        call()
    return info.value


# -- status code -> action ---------------------------------------------------------------------
RECOVERABLE = {
    CODE.ALREADY_EXISTS: Action.NEXT_ROUND,
    CODE.FAILED_PRECONDITION: Action.REJOIN,
    CODE.UNAVAILABLE: Action.BACK_OFF,
    CODE.RESOURCE_EXHAUSTED: Action.BACK_OFF,
    CODE.UNKNOWN: Action.BACK_OFF,
    CODE.DEADLINE_EXCEEDED: Action.ASK_AGAIN,  # nothing failed before: a long wait ran out
}


@pytest.mark.parametrize("code", list(RECOVERABLE), ids=lambda c: c.name)
@pytest.mark.parametrize("rpc", ["pull", "push"])
def test_recoverable_codes_become_their_action(code, rpc, scripted, transport) -> None:
    script, _ = scripted
    script.fail = [code]
    failure = failure_of(lambda: pull_once(transport) if rpc == "pull" else push_once(transport))
    assert failure.action is RECOVERABLE[code]
    assert failure.code == code.name and failure.details == f"scripted {code.name}"
    assert failure.transient == (RECOVERABLE[code] in (Action.BACK_OFF, Action.ASK_AGAIN))


def test_aborted_continues_at_the_round_in_the_trailing_metadata(scripted, transport) -> None:
    script, _ = scripted
    script.fail, script.trailing = [CODE.ABORTED], (("fedgrad-current-round", "7"),)
    failure = failure_of(lambda: push_once(transport))
    assert (failure.action, failure.current_round) == (Action.CONTINUE_AT, 7)


def test_aborted_without_the_round_says_so(scripted, transport) -> None:
    script, _ = scripted
    script.fail = [CODE.ABORTED]
    failure = failure_of(lambda: push_once(transport))
    assert (failure.action, failure.current_round) == (Action.CONTINUE_AT, None)


def test_deadline_after_a_failure_backs_off(scripted, transport) -> None:
    """Once a call failed since the last success, DEADLINE_EXCEEDED is one more transient failure."""
    script, _ = scripted
    script.fail = [CODE.DEADLINE_EXCEEDED]
    transport.backoff.attempt = 1
    assert failure_of(lambda: pull_once(transport)).action is Action.BACK_OFF


@pytest.mark.parametrize(
    "code", [CODE.INVALID_ARGUMENT, CODE.UNAUTHENTICATED, CODE.PERMISSION_DENIED, CODE.INTERNAL]
)
def test_refusals_stop_with_a_clear_error(code, scripted, transport) -> None:
    script, _ = scripted
    script.fail = [code]
    with pytest.raises(RefusedError, match=f"refused node 'n1': {code.name}: scripted"):
        pull_once(transport)


# -- Join: retries, budget, stop ---------------------------------------------------------------
def test_join_retries_transient_failures_then_resets_the_budget(scripted, transport) -> None:
    script, _ = scripted
    script.fail = [CODE.UNAVAILABLE, CODE.RESOURCE_EXHAUSTED]
    assert transport.join(JOIN).round == 3
    assert script.calls == ["Join"] * 3
    assert transport.backoff.fresh


def test_join_raises_a_non_transient_failure(scripted, transport) -> None:
    script, _ = scripted
    script.fail = [CODE.FAILED_PRECONDITION]
    assert failure_of(lambda: transport.join(JOIN)).action is Action.REJOIN
    assert script.calls == ["Join"]


def test_join_after_a_transient_failure_backs_off_first(scripted, transport) -> None:
    script, _ = scripted
    script.fail = [CODE.UNAVAILABLE]
    failure = failure_of(lambda: pull_once(transport))
    transport.join(JOIN, after=failure)
    assert script.calls == ["PullParameters", "Join"]
    assert transport.backoff.fresh  # the Join succeeded


def test_join_gives_up_once_the_budget_is_spent(scripted) -> None:
    script, port = scripted
    script.fail = [CODE.UNAVAILABLE] * 100
    t = Transport(NodeConfig(aggregator=f"127.0.0.1:{port}", node_id="n1", give_up_after=0.3))
    try:
        with pytest.raises(GaveUpError, match="join failed with UNAVAILABLE: scripted"):
            t.join(JOIN)
    finally:
        t.close()


def test_after_stop_no_call_is_made(scripted, transport) -> None:
    script, _ = scripted
    transport.stop("test")
    for call in (
        lambda: transport.join(JOIN),
        lambda: pull_once(transport),
        lambda: push_once(transport),
    ):
        with pytest.raises(Stopped):
            call()
    assert script.calls == []
    assert transport.stop_reason == "test"


def test_successful_calls_return_the_replies(scripted, transport) -> None:
    script, _ = scripted
    assert pull_once(transport, min_round=5).round == 5
    assert push_once(transport).round == 0
    transport.leave()  # unimplemented here: best effort, logged, no error
    assert script.calls == ["PullParameters", "PushGradients"]


@pytest.mark.serial  # inside an xdist worker the server never saw the cancel; alone it does
def test_a_stream_its_reader_abandons_is_cancelled(scripted, transport) -> None:
    """A reader that gives up mid-stream (e.g. a bad chunk) does not leave the stream open."""
    script, _ = scripted
    script.hold_pull = True
    with pytest.raises(RuntimeError, match="the reader gives up"):
        with transport.pull(0, timeout=60.0) as stream:
            next(stream)
            raise RuntimeError("the reader gives up")
    # Generous: the cancel is immediate, but a loaded CI worker may take a while to see it.
    assert script.pull_ended.wait(60), "the abandoned stream stayed open on the server"
