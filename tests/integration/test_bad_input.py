"""Bad input: the right status code, a message naming the problem, state intact, still serving.

Issue 3, "Bad input". Every case runs against a real in-process aggregator on
127.0.0.1 port 0 (``linear``: a (1, 8) float64 weight and a (1,) bias, 72 bytes
in chunks of 16) with two joined nodes, round 0 open. Uploads are sent as raw
bytes through a generic ``stream_unary`` with identity serializers, so any byte
sequence can be sent. After every case the test checks:

1. the status code, and that the details name the problem (a regex);
2. all state intact: round, accumulator, reported uploads, staging slots,
   in-flight marks, registered nodes and the parameters are unchanged;
3. a ``fedgrad.service`` log line with the node, the round and the reason
   (``record.node``, ``record.round``, ``record.reason``);
4. the server keeps serving: node-0 then uploads a valid gradient with the same
   upload id and it is counted.

Manifest problems (wrong tensor count, names, shapes, dtypes; negative or
overflowing dimensions) are caught by the node when it joins, and by the codec.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
from faults_support import accumulated
from torch import nn

from fedgrad.codec import (
    Layout,
    TensorSpec,
    byte_view,
    dtype_from_proto,
    iter_chunks,
    manifest_from_proto,
)
from fedgrad.config import NodeConfig
from fedgrad.errors import InvalidArgument, RefusedError
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.task import Task, load_task

CALL = 20.0
CHUNK = 16
FEATURES = 8
TOTAL = (FEATURES + 1) * 8
PUSH = "/fedgrad.v1.Aggregator/PushGradients"
MiB = 1 << 20
G = pb.GradientMessage


def _same(raw: bytes) -> bytes:
    return raw


@dataclass(frozen=True)
class State:
    round: int
    reported: dict[str, str]
    count: int
    total: bytes
    free_slots: int
    max_inflight: int
    held_bytes: int
    uploading: frozenset[str]
    nodes: dict[str, tuple[int, str]]
    params: dict[str, bytes]


@dataclass
class Bench:
    """A served aggregator, its two joined hand nodes and a raw channel to it."""

    served: Any
    a: Any
    b: Any
    channel: grpc.Channel
    caplog: pytest.LogCaptureFixture

    @property
    def specs(self) -> list[TensorSpec]:
        return self.a.specs

    def state(self) -> State:
        """Read the aggregator's state once counted uploads are added."""

        def read() -> State:
            core = self.served.core
            return State(
                round=core.round,
                reported=dict(core.reported),
                count=core.reducer.count,
                total=accumulated(core).tobytes(),
                free_slots=core.intake.max_inflight
                - sum(1 for t in core.intake.inflight if t.slot),
                max_inflight=core.intake.max_inflight,
                held_bytes=core.intake.held_bytes,
                uploading=frozenset(n for n, r in core.nodes.items() if r.uploading),
                nodes={n: (r.num_samples, r.state) for n, r in core.nodes.items()},
                params={k: v.numpy().tobytes() for k, v in core.state_dict().items()},
            )

        return self.served.call_settled(read)

    def push_raw(self, messages: Sequence[bytes]) -> grpc.RpcError | Any:
        """Send raw messages as one PushGradients stream; return the error (or the reply)."""
        call = self.channel.stream_unary(
            PUSH, request_serializer=_same, response_deserializer=_same
        )
        try:
            return call(iter(messages), timeout=CALL)
        except grpc.RpcError as exc:
            return exc

    def unary_raw(self, method: str, request: bytes) -> grpc.RpcError | Any:
        call = self.channel.unary_unary(
            f"/fedgrad.v1.Aggregator/{method}",
            request_serializer=_same,
            response_deserializer=_same,
        )
        try:
            return call(request, timeout=CALL)
        except grpc.RpcError as exc:
            return exc


@pytest.fixture
def bench(serve, hand_node, caplog) -> Iterator[Bench]:
    caplog.set_level(logging.INFO)
    served = serve(
        "linear",
        task_args=(("features", str(FEATURES)),),
        nodes=2,
        rounds=2,
        chunk_bytes=CHUNK,
        round_timeout=600.0,
        idle_timeout=10.0,
    )
    a = hand_node(served, "node-0", num_samples=4)
    b = hand_node(served, "node-1", num_samples=4)
    channel = grpc.insecure_channel(served.address)
    try:
        yield Bench(served, a, b, channel, caplog)
    finally:
        channel.close()


# -- message builders -----------------------------------------------------------------------------
def header(**fields: Any) -> pb.UploadHeader:
    values: dict[str, Any] = dict(round=0, node_id="node-0", upload_id="node-0.r0", num_samples=4)
    values.update(fields)
    return pb.UploadHeader(**values)


def hdr(**fields: Any) -> bytes:
    return G(header=header(**fields)).SerializeToString()


def grads(specs: Sequence[TensorSpec], value: float = 0.5) -> list[torch.Tensor]:
    return [torch.full(s.shape, value, dtype=s.dtype) for s in specs]


def chunk_msgs(
    specs: Sequence[TensorSpec],
    tensors: Sequence[torch.Tensor] | None = None,
    wire_dtype: int = pb.DTYPE_UNSPECIFIED,
    chunk_bytes: int = CHUNK,
) -> list[pb.Chunk]:
    """Cut ``tensors`` (cast to the wire dtype) into the chunks of the flat stream."""
    wire = None if wire_dtype == pb.DTYPE_UNSPECIFIED else dtype_from_proto(wire_dtype)
    cast = [t.to(wire or t.dtype).contiguous() for t in (tensors or grads(specs))]
    views = [byte_view(t) for t in cast]
    return [
        pb.Chunk(tensor=t, offset=o, data=d)
        for t, o, d in iter_chunks(views, Layout(specs, wire), chunk_bytes)
    ]


def ser(chunks: Sequence[pb.Chunk]) -> list[bytes]:
    return [G(chunk=c).SerializeToString() for c in chunks]


def raw_chunk(tensor: int, offset: int, data: bytes) -> bytes:
    return G(chunk=pb.Chunk(tensor=tensor, offset=offset, data=data)).SerializeToString()


def model_specs(features: int) -> list[TensorSpec]:
    model = load_task("linear", {"features": str(features)}).model()
    return [TensorSpec(n, p.dtype, tuple(p.shape)) for n, p in model.named_parameters()]


def poisoned(specs: Sequence[TensorSpec], where: str, value: float) -> list[torch.Tensor]:
    """Gradients that are finite except for one element: first, middle or last of the stream."""
    tensors = grads(specs)
    if where == "first":
        tensors[0].view(-1)[0] = value
    elif where == "middle":
        tensors[0].view(-1)[tensors[0].numel() // 2] = value
    else:
        tensors[-1].view(-1)[-1] = value
    return tensors


def end(chunks: Sequence[pb.Chunk]) -> bytes:
    total = sum(len(c.data) for c in chunks)
    return G(end=pb.UploadEnd(total_bytes=total)).SerializeToString()


def valid(b: Bench) -> list[bytes]:
    chunks = chunk_msgs(b.specs)
    return [hdr(), *ser(chunks), end(chunks)]


# -- the cases ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One bad upload: how to build it, and what must come back."""

    build: Callable[[Bench], list[bytes]]
    code: grpc.StatusCode
    details: str  # a regex the status details must match
    node: str = "node-0"
    round: Any = 0


IA, FP = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
NO_HEADER = "first message of PushGradients must be an UploadHeader"


def _with_chunks(
    b: Bench, edit: Callable[[list[bytes]], list[bytes]], **hdr_fields: Any
) -> list[bytes]:
    return [hdr(**hdr_fields), *edit(ser(chunk_msgs(b.specs)))]


def _overlap(b: Bench) -> list[bytes]:
    c = chunk_msgs(b.specs)
    half = pb.Chunk(tensor=0, offset=8, data=c[1].data)  # starts inside chunk 0
    return [hdr(), *ser([c[0], half, *c[1:]])]


def _wire(b: Bench, wire_dtype: int, where: str, value: float) -> list[bytes]:
    return [
        hdr(wire_dtype=wire_dtype),
        *ser(chunk_msgs(b.specs, poisoned(b.specs, where, value), wire_dtype)),
    ]


CASES: dict[str, Case] = {
    # malformed or truncated streams; missing or repeated headers
    "empty-stream": Case(lambda b: [], IA, NO_HEADER, "?", "?"),
    "chunk-first": Case(lambda b: ser(chunk_msgs(b.specs)), IA, NO_HEADER, "?", "?"),
    "empty-message-first": Case(lambda b: [b""], IA, NO_HEADER, "?", "?"),
    "garbage-first": Case(lambda b: [b"\xff\xfe\xfd"], IA, "malformed|protobuf", "?", "?"),
    "garbage-after-header": Case(lambda b: [hdr(), b"\xff\xfe\xfd"], IA, "malformed|protobuf"),
    "truncated-message": Case(
        lambda b: _with_chunks(b, lambda c: [c[0], c[1][:-3]]), IA, "malformed|protobuf"
    ),
    "header-repeated": Case(
        lambda b: _with_chunks(b, lambda c: [c[0], hdr(), *c[1:]]), IA, "header"
    ),
    "empty-message-after-header": Case(
        lambda b: _with_chunks(b, lambda c: [c[0], b"", *c[1:]]), IA, "only chunks"
    ),
    "stream-ends-early": Case(
        lambda b: _with_chunks(b, lambda c: c[:-1]), IA, f"ended after 64 of {TOTAL} bytes"
    ),
    "header-only": Case(lambda b: [hdr()], IA, f"ended after 0 of {TOTAL} bytes"),
    # unknown node, wrong round, bad ids
    "unknown-node": Case(
        lambda b: _with_chunks(b, lambda c: c, node_id="node-9"), FP, "node-9.*not joined", "node-9"
    ),
    "malformed-node-id": Case(
        lambda b: _with_chunks(b, lambda c: c, node_id="no de/"), FP, "not joined", "no de/"
    ),
    "empty-upload-id": Case(lambda b: _with_chunks(b, lambda c: c, upload_id=""), IA, "upload_id"),
    "future-round": Case(
        lambda b: _with_chunks(b, lambda c: c, round=1), FP, "round 1 is not open", round=1
    ),
    "absurd-round": Case(
        lambda b: _with_chunks(b, lambda c: c, round=2**64 - 1), FP, "not open", round=2**64 - 1
    ),
    # chunks out of order, overlapping, beyond the declared size, bad sizes
    "chunks-swapped": Case(
        lambda b: _with_chunks(b, lambda c: [c[1], c[0], *c[2:]]), IA, "out of order"
    ),
    "chunk-skipped": Case(lambda b: _with_chunks(b, lambda c: [c[0], *c[2:]]), IA, "out of order"),
    "chunk-repeated": Case(lambda b: _with_chunks(b, lambda c: [c[0], *c]), IA, "out of order"),
    "chunk-overlaps": Case(_overlap, IA, "out of order"),
    "chunk-after-the-end": Case(
        lambda b: _with_chunks(b, lambda c: [*c, raw_chunk(1, 8, b"\0" * 8)]), IA, "beyond"
    ),
    "chunk-runs-past-the-end": Case(
        lambda b: _with_chunks(b, lambda c: [*c[:-1], raw_chunk(1, 0, b"\0" * 16)]), IA, "beyond"
    ),
    "chunk-names-a-missing-tensor": Case(
        lambda b: [hdr(), raw_chunk(7, 0, b"\0" * 8)], IA, "tensor 7, the manifest has 2"
    ),
    "chunk-offset-absurd": Case(
        lambda b: [hdr(), raw_chunk(0, 2**64 - 8, b"\0" * 8)], IA, "beyond"
    ),
    "chunk-without-data": Case(lambda b: [hdr(), raw_chunk(0, 0, b"")], IA, "no data"),
    "chunk-over-chunk-bytes": Case(
        lambda b: [hdr(), raw_chunk(0, 0, b"\0" * 32)], IA, f"limit is {CHUNK}"
    ),
    "chunk-splits-an-element": Case(
        lambda b: [hdr(), raw_chunk(0, 0, b"\0" * 12)], IA, "splits an element"
    ),
    # wrong tensor count / shapes / dtypes as the server sees them: byte counts
    "smaller-model": Case(lambda b: [hdr(), *ser(chunk_msgs(model_specs(4)))], IA, "out of order"),
    "larger-model": Case(lambda b: [hdr(), *ser(chunk_msgs(model_specs(16)))], IA, "beyond"),
    "unknown-wire-dtype": Case(
        lambda b: _with_chunks(b, lambda c: c, wire_dtype=9), IA, "dtype enum value 9"
    ),
    "float64-bytes-declared-float16": Case(
        lambda b: _with_chunks(b, lambda c: c, wire_dtype=pb.FLOAT16), IA, "beyond"
    ),
    "float16-bytes-declared-float64": Case(
        lambda b: [hdr(), *ser(chunk_msgs(b.specs, wire_dtype=pb.FLOAT16))], IA, "out of order"
    ),
    # absurd sample counts
    "zero-samples": Case(lambda b: _with_chunks(b, lambda c: c, num_samples=0), IA, "num_samples"),
    "absurd-samples": Case(
        lambda b: _with_chunks(b, lambda c: c, num_samples=2**40), IA, "num_samples"
    ),
    "max-uint64-samples": Case(
        lambda b: _with_chunks(b, lambda c: c, num_samples=2**64 - 1), IA, "num_samples"
    ),
}

# NaN or Inf anywhere, including the last chunk, in every wire dtype.
for _dtype, _name in [
    (pb.DTYPE_UNSPECIFIED, "float64"),
    (pb.FLOAT32, "float32"),
    (pb.FLOAT16, "float16"),
    (pb.BFLOAT16, "bfloat16"),
]:
    for _where, _value in [("first", math.nan), ("middle", -math.inf), ("last", math.inf)]:
        CASES[f"{_value}-{_where}-{_name}"] = Case(
            lambda b, d=_dtype, w=_where, v=_value: _wire(b, d, w, v), IA, "non-finite"
        )


def settle(b: Bench, before: State, timeout: float = 10.0) -> None:
    """Wait (bounded) for the rejected call's bookkeeping, then assert the state is unchanged."""
    deadline = time.monotonic() + timeout
    while (after := b.state()) != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert after == before, "state changed"


def check_rejected(b: Bench, result: Any, case: Case, before: State, since: int) -> None:
    """Assert the status, the message, the state, the log line, and that serving goes on."""
    assert isinstance(result, grpc.RpcError), f"accepted: {result!r}"
    assert result.code() == case.code, (result.code(), result.details())
    assert re.search(case.details, result.details() or ""), result.details()
    settle(b, before)
    lines = [r for r in b.caplog.records[since:] if r.name == "fedgrad.service"]
    assert any(
        getattr(r, "node", None) == case.node
        and getattr(r, "round", None) == case.round
        and getattr(r, "reason", None) == case.code.name
        for r in lines
    ), [(r.getMessage(), r.__dict__.get("node"), r.__dict__.get("round")) for r in lines]
    reply = b.push_raw(valid(b))
    assert not isinstance(reply, grpc.RpcError), reply
    parsed = pb.PushReply.FromString(reply)
    assert (parsed.round, parsed.duplicate) == (0, False)
    assert b.state().reported == {"node-0": "node-0.r0"}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_upload(name: str, bench: Bench) -> None:
    case = CASES[name]
    messages = case.build(bench)
    before, since = bench.state(), len(bench.caplog.records)
    check_rejected(bench, bench.push_raw(messages), case, before, since)


def test_non_finite_metric_is_rejected(bench: Bench) -> None:
    """NaN or Inf anywhere means the header's metrics too: a NaN loss would poison the history."""
    messages = _with_chunks(bench, lambda c: c, metrics={"loss": math.nan})
    before, since = bench.state(), len(bench.caplog.records)
    case = Case(lambda b: messages, IA, "loss|metric|non-finite")
    check_rejected(bench, bench.push_raw(messages), case, before, since)


# -- oversized messages: refused by grpc itself (4 MiB receive limit) ---------------------------------
@pytest.mark.parametrize("where", ["first", "after-header"])
def test_oversized_message_is_resource_exhausted(where: str, bench: Bench) -> None:
    big = raw_chunk(0, 0, b"\0" * (4 * MiB + 1))
    messages = [big] if where == "first" else [hdr(), big]
    before, since = bench.state(), len(bench.caplog.records)
    result = bench.push_raw(messages)
    assert isinstance(result, grpc.RpcError)
    assert result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (result.details() or "")
    settle(bench, before)
    node = "?" if where == "first" else "node-0"
    lines = [r for r in bench.caplog.records[since:] if r.name == "fedgrad.service"]
    assert any(getattr(r, "node", None) == node for r in lines), [r.getMessage() for r in lines]
    reply = bench.push_raw(valid(bench))
    assert not isinstance(reply, grpc.RpcError), reply


def test_oversized_join_is_resource_exhausted(bench: Bench) -> None:
    before = bench.state()
    request = pb.JoinRequest(node_id="n" * (4 * MiB + 1), num_samples=1).SerializeToString()
    result = bench.unary_raw("Join", request)
    assert isinstance(result, grpc.RpcError)
    assert result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert bench.state() == before
    assert bench.a.join().round == 0


# -- unary calls ------------------------------------------------------------------------------------------
UNARY: dict[str, tuple[str, bytes, grpc.StatusCode, str, str]] = {
    "join-malformed-id": (
        "Join",
        pb.JoinRequest(node_id="bad id", num_samples=1).SerializeToString(),
        IA,
        "node_id",
        "bad id",
    ),
    "join-empty-id": ("Join", pb.JoinRequest(num_samples=1).SerializeToString(), IA, "node_id", ""),
    "join-absurd-samples": (
        "Join",
        pb.JoinRequest(node_id="node-7", num_samples=2**40).SerializeToString(),
        IA,
        "num_samples",
        "node-7",
    ),
    "pull-unknown-node": (
        "PullParameters",
        pb.PullRequest(node_id="node-9").SerializeToString(),
        FP,
        "not joined",
        "node-9",
    ),
    "leave-unknown-node": (
        "Leave",
        pb.LeaveRequest(node_id="node-9").SerializeToString(),
        FP,
        "not joined",
        "node-9",
    ),
}
for _method in ("Join", "Leave", "GetStatus", "PullParameters"):
    UNARY[f"{_method.lower()}-garbage"] = (_method, b"\xff\xfe\xfd", IA, "malformed|protobuf", "?")


@pytest.mark.parametrize("name", list(UNARY))
def test_bad_unary_request(name: str, bench: Bench) -> None:
    method, request, code, details, node = UNARY[name]
    before, since = bench.state(), len(bench.caplog.records)
    if method == "PullParameters":
        stream = bench.channel.unary_stream(
            f"/fedgrad.v1.Aggregator/{method}",
            request_serializer=_same,
            response_deserializer=_same,
        )
        try:
            result: Any = list(stream(request, timeout=CALL))
        except grpc.RpcError as exc:
            result = exc
    else:
        result = bench.unary_raw(method, request)
    assert isinstance(result, grpc.RpcError), f"accepted: {result!r}"
    assert (result.code(), bool(re.search(details, result.details() or ""))) == (code, True), (
        result.code(),
        result.details(),
    )
    settle(bench, before)
    lines = [r for r in bench.caplog.records[since:] if r.name == "fedgrad.service"]
    assert any(
        getattr(r, "node", None) == node and getattr(r, "reason", None) == code.name for r in lines
    ), [r.getMessage() for r in lines]
    reply = bench.push_raw(valid(bench))
    assert not isinstance(reply, grpc.RpcError), reply


# -- manifest mismatch: a node error, caught at Join ------------------------------------------------------
class _Variant(Task):
    """The linear model with one thing changed."""

    def __init__(self, change: str) -> None:
        super().__init__(0)
        self.change = change

    def model(self) -> nn.Module:
        if self.change == "count":
            return nn.Sequential(nn.Linear(FEATURES, 1, dtype=torch.float64), nn.Linear(1, 1))
        if self.change == "shape":
            return nn.Linear(FEATURES + 1, 1, dtype=torch.float64)
        if self.change == "dtype":
            return nn.Linear(FEATURES, 1, dtype=torch.float32)
        module = nn.Module()  # same shapes and dtypes, other names
        module.w = nn.Parameter(torch.zeros(1, FEATURES, dtype=torch.float64))
        module.b = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        return module

    def shard(self, index: int, count: int) -> Any:
        x = torch.zeros(4, FEATURES + 1)
        return x, x

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return torch.zeros(())


@pytest.mark.parametrize("change", ["count", "names", "shape", "dtype"])
def test_node_with_another_model_fails_at_join(change: str, bench: Bench) -> None:
    from fedgrad.client.node import Node

    before = bench.state()
    cfg = NodeConfig(task="variant", aggregator=bench.served.address, node_id="node-5")
    node = Node(_Variant(change), cfg)
    try:
        with pytest.raises(RefusedError, match="model differs"):
            node.run()
    finally:
        node.close()
    # Issue 12: the node sends its manifest at Join and is refused there: never
    # registered, nothing changed.
    assert bench.state() == before


# -- negative or overflowing dimensions: the codec refuses the manifest -------------------------------------
MANIFESTS = {
    "negative-dim": ([("w", pb.FLOAT32, [3, -1])], "negative dimension"),
    "overflowing-dims": ([("w", pb.FLOAT32, [2**62, 2**62])], "larger than the limit"),
    "max-int64-dims": ([("w", pb.FLOAT64, [2**63 - 1] * 3)], "larger than the limit"),
    "overflow-across-tensors": (
        [(f"w{i}", pb.FLOAT32, [2**37]) for i in range(3)],
        "larger than the limit",
    ),
    "unknown-dtype": ([("w", 9, [2])], "dtype enum value 9"),
    "unspecified-dtype": ([("w", pb.DTYPE_UNSPECIFIED, [2])], "dtype enum value 0"),
    "repeated-name": ([("w", pb.FLOAT32, [2]), ("w", pb.FLOAT32, [2])], "repeats the name"),
}


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_bad_manifest_is_refused_by_the_codec(name: str) -> None:
    tensors, message = MANIFESTS[name]
    manifest = pb.Manifest(
        tensors=[pb.TensorSpec(name=n, dtype=d, shape=s) for n, d, s in tensors]  # type: ignore[arg-type]
    )
    with pytest.raises(InvalidArgument, match=message):
        manifest_from_proto(manifest)


def test_manifest_limit_is_exact() -> None:
    ok = pb.Manifest(tensors=[pb.TensorSpec(name="w", dtype=pb.FLOAT32, shape=[256])])
    assert manifest_from_proto(ok, max_bytes=1024)[0].nbytes == 1024
    with pytest.raises(InvalidArgument):
        manifest_from_proto(ok, max_bytes=1023)
    empty = pb.Manifest(tensors=[pb.TensorSpec(name="e", dtype=pb.FLOAT16, shape=[0, 2**62])])
    assert manifest_from_proto(empty)[0].numel == 0
