"""The codec an upload header declares, over real gRPC: accepted, or refused with no trace.

Issue 11: the codec seam between the wire and the reducer; the payload length
comes from the header (``payload_bytes``), not from the manifest.
"""

from __future__ import annotations

import grpc
import pytest
import torch
from faults_support import assert_params, core_state, sgd_reference
from polling import wait_until

from fedgrad.proto import fedgrad_pb2 as pb


def _grads(specs, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype) for s in specs]


def _messages(wire, node, gradients, *, chunk_dtype: int, **header) -> list[pb.GradientMessage]:
    head = wire.header(0, node.node_id, num_samples=node.num_samples, **header)
    return wire.upload(head, wire.chunks(node.specs, gradients, node.chunk_bytes, chunk_dtype))


def test_codec_named_in_the_header_equals_the_wire_dtype_field(serve, hand_node, wire) -> None:
    served = serve("linear", nodes=2, rounds=1)
    a, b = hand_node(served, "node-a", num_samples=3), hand_node(served, "node-b", num_samples=5)
    theta0 = served.state_dict()
    ga, gb = _grads(a.specs, 1), _grads(b.specs, 2)
    payload = sum(s.numel for s in a.specs) * 2
    by_codec = _messages(wire, a, ga, chunk_dtype=pb.BFLOAT16, codec="bfloat16",
                         payload_bytes=payload)  # fmt: skip
    assert a.stub.PushGradients(iter(by_codec), timeout=20).round == 0
    by_field = _messages(wire, b, gb, chunk_dtype=pb.BFLOAT16, wire_dtype=pb.BFLOAT16)
    assert b.stub.PushGradients(iter(by_field), timeout=20).round == 0
    bf = [[g.to(torch.bfloat16).float() for g in grads] for grads in (ga, gb)]
    want = sgd_reference(theta0, [(3, bf[0]), (5, bf[1])], lr=0.1)
    wait_until(lambda: core_state(served).finished, "the round to close")
    assert_params(served.state_dict(), want)


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        ({"codec": "int3"}, "unknown codec 'int3'"),
        ({"codec": "identity:7"}, "must have no parameters"),
        ({"codec": "float16", "wire_dtype": pb.BFLOAT16}, "send one of them"),
        ({"payload_bytes": 12}, "payload_bytes 12 does not match codec 'identity'"),
    ],
    ids=["unknown", "parameters", "disagrees-with-wire-dtype", "wrong-payload-length"],
)
def test_bad_codec_headers_are_invalid_argument_and_leave_no_trace(
    serve, hand_node, wire, header: dict, needle: str
) -> None:
    served = serve("linear", nodes=1, rounds=1)
    node = hand_node(served, "node-0", num_samples=4)
    before = core_state(served)
    messages = _messages(wire, node, _grads(node.specs, 0), chunk_dtype=pb.DTYPE_UNSPECIFIED,
                         **header)  # fmt: skip
    with pytest.raises(grpc.RpcError) as info:
        node.stub.PushGradients(iter(messages), timeout=20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()
    assert core_state(served).same_accumulation(before)
    # The same upload with a good header still counts: the refusal left nothing behind.
    good = _messages(wire, node, _grads(node.specs, 0), chunk_dtype=pb.DTYPE_UNSPECIFIED)
    assert node.stub.PushGradients(iter(good), timeout=20).round == 0
