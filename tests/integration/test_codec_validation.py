"""Lossy codecs over real gRPC: a correct payload counts, a bad one is refused with no trace.

A real aggregator on 127.0.0.1 port 0 serves ``Shapes`` (float32 parameters: an empty
tensor, a scalar, a vector and a matrix PowerSGD factors), with ``chunk_bytes`` 64. A hand
node encodes seeded gradients with the codec its header declares (``UploadHeader.codec``:
``int8``, ``int8:4``, ``topk:0.25``, ``topk:0.25,bfloat16``, ``powersgd:2``,
``powersgd:2,float16``), cuts the payload into 16-byte chunks (or the smallest a codec's
records allow) and edits it byte by byte.

A correct upload is counted and the round steps with exactly its decoded values. Each bad
one (a top-k index out of range, out of order within a chunk or across a chunk boundary,
or repeated; a non-finite top-k value; an int8 scale NaN, Inf or too large; a PowerSGD
factor NaN or too large across chunks; a payload_bytes that is not the codec's; a
truncated upload; a chunk cut inside a record) is INVALID_ARGUMENT with details that say
what is wrong and where, and leaves no trace: the round's sums, count, weight, reported
uploads and staging slots are as before, and the correct upload that follows, from the
same node with the same upload id, is counted, the round's sum being exactly its own.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from faults_support import core_state, slots_free
from polling import wait_until
from torch import nn

from fedgrad.codec import TensorSpec, iter_chunks
from fedgrad.codecs import Codec, codec_for, decode_dense
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.task import Task

CALL = 20.0
#: The aggregator's chunk_bytes: the most one chunk may carry.
CHUNK = 64
#: What the hand node's chunks carry, unless a tensor's one record is longer.
CUT = 16
SAMPLES = 3
SEED = 11


class Shapes(Task):
    """float32 parameters of the shapes the codecs treat apart; updates are made by hand."""

    lr = 0.5
    SHAPES = (("empty", (0, 3)), ("scalar", ()), ("vector", (10,)), ("matrix", (8, 6)))

    def model(self) -> nn.Module:
        module = nn.Module()
        for name, shape in self.SHAPES:
            module.register_parameter(name, nn.Parameter(torch.randn(shape)))
        return module

    def shard(self, index: int, count: int) -> int:
        return index

    def num_samples(self, data: int) -> int:
        return SAMPLES

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return torch.zeros(())


# -- payloads and their chunks --------------------------------------------------------------------
def _gradients(specs: list[TensorSpec]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    return [torch.randn(s.shape, generator=gen) for s in specs]


def _encoded(name: str, specs: list[TensorSpec]) -> tuple[Codec, bytes, np.ndarray]:
    """Encode seeded gradients: the codec, its payload, and the values it decodes to."""
    codec = codec_for(name, specs)
    views = codec.encode(_gradients(specs), torch.Generator().manual_seed(SEED))
    payload = b"".join(v.tobytes() for v in views)
    return codec, payload, decode_dense(codec, views).astype(np.float64)


def _assert_approximates(name: str, grads: list[torch.Tensor], dense: np.ndarray) -> None:
    """Assert the decoded values are what the codec promises of ``grads``, without decode."""
    first = 0
    for g in grads:
        x, got = g.double().reshape(-1).numpy(), dense[first : first + g.numel()]
        first += g.numel()
        if not g.numel():
            continue
        if name.startswith("int8"):  # within half a step of each block's max / 127
            block = int(name.partition(":")[2] or 256)
            for b in range(0, x.size, block):
                step = np.abs(x[b : b + block]).max() / 127
                assert np.abs(got[b : b + block] - x[b : b + block]).max() <= step * 0.5001
        elif name.startswith("topk"):  # the largest ceil(numel / 4), rounded to the value dtype
            kept = np.sort(np.argsort(-np.abs(x), kind="stable")[: -(-x.size // 4)])
            np.testing.assert_array_equal(np.flatnonzero(got), kept)
            np.testing.assert_allclose(got[kept], x[kept], rtol=2**-8 if "bf" in name else 0)
        elif g.dim() < 2:  # PowerSGD sends it as it is
            np.testing.assert_allclose(got, x, rtol=2**-11 if "float16" in name else 0)
        else:  # P P^T M with P orthonormal: rank 2, and M minus it is orthogonal to it
            m, d = x.reshape(g.shape[0], -1), got.reshape(g.shape[0], -1)
            singular = np.linalg.svd(d, compute_uv=False)
            assert singular[2] <= 1e-5 * singular[0], singular
            assert abs(np.sum(d * (m - d))) <= 1e-2 * np.sum(m * m)


def _cut(codec: Codec) -> int:
    """CUT, or a tensor part shorter than its one record (int8: a tensor under 256 values)."""
    layout = codec.layout
    records = [min(u, n) for u, n in zip(layout.itemsizes, layout.nbytes, strict=True) if n]
    return max(CUT, *records)


def _chunks(codec: Codec, payload: bytes | bytearray) -> list[pb.Chunk]:
    """Cut a payload as a node does: in order, between records, at most ``_cut`` bytes."""
    layout = codec.layout
    buffer = np.frombuffer(bytes(payload), np.uint8)
    views = [buffer[s : s + n] for s, n in zip(layout.starts, layout.nbytes, strict=True)]
    return [
        pb.Chunk(tensor=t, offset=o, data=d) for t, o, d in iter_chunks(views, layout, _cut(codec))
    ]


def _chunk_of(codec: Codec, chunks: list[pb.Chunk], at: int) -> int:
    """The index of the chunk that carries payload byte ``at``."""
    starts = [codec.layout.position(c.tensor, c.offset) for c in chunks]
    return max(i for i, start in enumerate(starts) if start <= at)


def _record(codec: Codec, tensor: int, number: int) -> int:
    """Payload offset of record ``number`` (a block, pair or value) of ``tensor``."""
    return codec.layout.starts[tensor] + number * codec.layout.itemsizes[tensor]


def _index(payload: bytearray, at: int) -> int:
    return struct.unpack_from("<I", payload, at)[0]


def _push(node: Any, wire: Any, name: str, chunks: list[pb.Chunk], **header: Any) -> Any:
    head = wire.header(0, node.node_id, num_samples=node.num_samples, codec=name, **header)
    return node.stub.PushGradients(iter(wire.upload(head, chunks)), timeout=CALL)


def _serve(serve: Callable[..., Any], nodes: int, rounds: int) -> Any:
    return serve(
        Shapes(),
        nodes=nodes,
        rounds=rounds,
        chunk_bytes=CHUNK,
        round_timeout=600.0,
        idle_timeout=10.0,
        seed=SEED,
    )


# -- correct payloads -----------------------------------------------------------------------------
NAMES = ["int8", "int8:4", "topk:0.25", "topk:0.25,bfloat16", "powersgd:2", "powersgd:2,float16"]


@pytest.mark.parametrize("name", NAMES)
def test_correct_payload_is_accepted_and_counted(serve, hand_node, wire, name: str) -> None:
    served = _serve(serve, nodes=1, rounds=2)
    node = hand_node(served, "node-0", num_samples=SAMPLES)
    theta0 = served.state_dict()
    codec, payload, dense = _encoded(name, node.specs)
    _assert_approximates(name, _gradients(node.specs), dense)
    chunks = _chunks(codec, payload)
    assert len(chunks) >= 2, "several chunks, so the checks' per-upload carry is used"
    reply = _push(node, wire, name, chunks, payload_bytes=len(payload))
    assert (reply.round, reply.duplicate) == (0, False)
    wait_until(lambda: core_state(served).round == 1, "round 0 to close")
    assert served.call(lambda: served.core.history[-1].nodes) == 1
    # The reference step: torch's SGD on the decoded values (one upload: the mean is itself).
    params = {k: nn.Parameter(v.clone()) for k, v in theta0.items()}
    optimizer = torch.optim.SGD(list(params.values()), lr=Shapes.lr)
    first = 0
    for p in params.values():
        p.grad = torch.from_numpy(dense[first : first + p.numel()]).to(p.dtype).view(p.shape)
        first += p.numel()
    optimizer.step()
    got = served.state_dict()
    for key, p in params.items():
        torch.testing.assert_close(got[key], p.detach(), rtol=0, atol=0, msg=key)
    changed = [k for k in params if not torch.equal(got[k], theta0[k])]
    assert changed, "the round stepped on nothing"


# -- bad payloads ---------------------------------------------------------------------------------
@dataclass
class Bad:
    """A bad upload: its chunks, header fields, and the words its refusal must contain."""

    chunks: list[pb.Chunk]
    needles: list[str]
    header: dict[str, Any]


Build = Callable[[Codec, bytearray], Bad]
MATRIX = 3  # the matrix's index in the manifest; its 48 elements hold 12 top-k pairs


def _bad(codec: Codec, payload: bytearray, *needles: str) -> Bad:
    return Bad(_chunks(codec, payload), list(needles), {"payload_bytes": len(payload)})


def _swap_in_a_chunk(codec: Codec, payload: bytearray) -> Bad:
    a, b = _record(codec, MATRIX, 0), _record(codec, MATRIX, 1)
    unit = codec.layout.itemsizes[MATRIX]
    payload[a : a + unit], payload[b : b + unit] = payload[b : b + unit], payload[a : a + unit]
    bad = _bad(
        codec,
        payload,
        f"topk index {_index(payload, b)} of pair 1 does not increase strictly"
        f" (after {_index(payload, a)}) in tensor 3 ('matrix')",
    )
    assert _chunk_of(codec, bad.chunks, a) == _chunk_of(codec, bad.chunks, b)
    return bad


def _back_across_chunks(codec: Codec, payload: bytearray) -> Bad:
    prev, at = _record(codec, MATRIX, 1), _record(codec, MATRIX, 2)
    back = _index(payload, prev) - 1  # below the last index of the previous chunk
    struct.pack_into("<I", payload, at, back)
    bad = _bad(
        codec,
        payload,
        f"topk index {back} of pair 2 does not increase strictly (after {_index(payload, prev)})",
    )
    assert _chunk_of(codec, bad.chunks, prev) + 1 == _chunk_of(codec, bad.chunks, at)
    return bad


def _duplicate(pair: int) -> Build:
    def build(codec: Codec, payload: bytearray) -> Bad:
        index = _index(payload, _record(codec, MATRIX, pair - 1))
        struct.pack_into("<I", payload, _record(codec, MATRIX, pair), index)
        return _bad(
            codec,
            payload,
            f"topk index {index} of pair {pair} does not increase strictly (after {index})",
            "indices must be unique and sorted",
        )

    return build


def _out_of_range(codec: Codec, payload: bytearray) -> Bad:
    struct.pack_into("<I", payload, _record(codec, MATRIX, 11), 48)
    return _bad(
        codec, payload, "topk index 48 is out of range for tensor 3 ('matrix', 48 elements)"
    )


def _topk_value(bits: bytes) -> Build:
    def build(codec: Codec, payload: bytearray) -> Bad:
        at = _record(codec, MATRIX, 5)
        index = _index(payload, at)
        width = codec.layout.itemsizes[MATRIX] - 4  # float32, or bfloat16: its top half
        payload[at + 4 : at + 4 + width] = bits[-width:]
        return _bad(
            codec,
            payload,
            f"non-finite value (NaN or Inf) at element {index} of tensor 3 ('matrix')",
        )

    return build


def _int8_scale(tensor: int, block: int, scale: float) -> Build:
    def build(codec: Codec, payload: bytearray) -> Bad:
        wire = np.float32(scale)
        payload[_record(codec, tensor, block) : _record(codec, tensor, block) + 4] = wire.tobytes()
        name = Shapes.SHAPES[tensor][0]
        return _bad(
            codec,
            payload,
            f"int8 scale {float(wire)!r} of block {block} is not finite or so large that"
            " q * scale overflows the tensor's dtype",
            f"of tensor {tensor} ({name!r})",
        )

    return build


def _factor_nan(tensor: int, element: int) -> Build:
    def build(codec: Codec, payload: bytearray) -> Bad:
        dtype = np.float16 if codec.layout.itemsizes[tensor] == 2 else np.float32
        at = _record(codec, tensor, element)
        payload[at : at + np.dtype(dtype).itemsize] = np.array([np.nan], dtype).tobytes()
        name = Shapes.SHAPES[tensor][0]
        return _bad(
            codec,
            payload,
            f"non-finite factor value (NaN or Inf) at payload element {element} of tensor"
            f" {tensor} ({name!r})",
        )

    return build


def _factors_too_large(codec: Codec, payload: bytearray) -> Bad:
    """max|P| 2**64 in the matrix's first chunk, max|Q| 2**65 in its last: 2 * 2**129."""
    p, q = _record(codec, MATRIX, 0), _record(codec, MATRIX, (8 + 6) * 2 - 1)
    struct.pack_into("<f", payload, p, 2.0**64)
    struct.pack_into("<f", payload, q, -(2.0**65))
    bad = _bad(
        codec,
        payload,
        "powersgd factors of tensor 3 ('matrix') are too large: rank 2 x max|P| 1.84e+19 x"
        " max|Q| 3.69e+19",
    )
    assert _chunk_of(codec, bad.chunks, p) < _chunk_of(codec, bad.chunks, q)
    return bad


def _wrong_payload_bytes(codec: Codec, payload: bytearray) -> Bad:
    dense = sum(s.numel for s in codec.layout.specs) * 4  # the identity payload's length
    bad = _bad(
        codec,
        payload,
        f"payload_bytes {dense} does not match codec {codec.name!r}: this model's payload is"
        f" {len(payload)} bytes",
    )
    bad.header["payload_bytes"] = dense
    return bad


def _truncated(codec: Codec, payload: bytearray) -> Bad:
    bad = _bad(codec, payload)
    sent = len(payload) - len(bad.chunks[-1].data)
    bad.chunks = bad.chunks[:-1]  # the UploadEnd then counts only what was sent
    bad.needles = [f"upload ended after {sent} of {len(payload)} bytes"]
    return bad


def _cut_inside_a_record(end: int) -> Build:
    """A first chunk of ``end`` bytes, which ends inside the record after the scalar's."""

    def build(codec: Codec, payload: bytearray) -> Bad:
        scalar = codec.layout.nbytes[1]
        assert scalar < end < scalar + codec.layout.itemsizes[2], "the cut is inside a record"
        return Bad(
            [pb.Chunk(tensor=1, offset=0, data=bytes(payload[:end]))],
            [f"chunk ending at flat byte {end} splits an element"],
            {"payload_bytes": len(payload)},
        )

    return build


NAN32, INF32 = struct.pack("<f", float("nan")), struct.pack("<f", float("inf"))
F32_MAX = float(np.finfo(np.float32).max)
CASES: dict[str, tuple[str, Build]] = {
    # top-k indices
    "topk-index-out-of-range": ("topk:0.25", _out_of_range),
    "topk-indices-decrease-within-a-chunk": ("topk:0.25", _swap_in_a_chunk),
    "topk-index-decreases-across-a-chunk-boundary": ("topk:0.25", _back_across_chunks),
    "topk-index-repeated-within-a-chunk": ("topk:0.25", _duplicate(3)),
    "topk-index-repeated-across-a-chunk-boundary": ("topk:0.25", _duplicate(2)),
    "topk-bfloat16-index-decreases-across-a-chunk-boundary": (
        "topk:0.25,bfloat16",
        _back_across_chunks,
    ),
    "topk-bfloat16-index-out-of-range": ("topk:0.25,bfloat16", _out_of_range),
    # top-k values
    "topk-nan-value": ("topk:0.25", _topk_value(NAN32)),
    "topk-bfloat16-inf-value": ("topk:0.25,bfloat16", _topk_value(INF32)),
    # int8 scales
    "int8-scale-nan": ("int8:4", _int8_scale(MATRIX, 3, float("nan"))),
    "int8-scale-inf": ("int8:4", _int8_scale(MATRIX, 11, float("-inf"))),
    "int8-scale-too-large": ("int8:4", _int8_scale(2, 1, 1e37)),
    "int8-scale-float32-max": ("int8", _int8_scale(1, 0, F32_MAX)),
    # PowerSGD factors
    "powersgd-factor-nan": ("powersgd:2", _factor_nan(MATRIX, 5)),
    "powersgd-float16-nan-in-a-tensor-sent-as-it-is": ("powersgd:2,float16", _factor_nan(2, 4)),
    "powersgd-factors-too-large-across-chunks": ("powersgd:2", _factors_too_large),
    # lengths and cuts
    **{f"{name}-wrong-payload-bytes": (name, _wrong_payload_bytes) for name in NAMES},
    "int8-truncated": ("int8:4", _truncated),
    "topk-truncated": ("topk:0.25,bfloat16", _truncated),
    "powersgd-truncated": ("powersgd:2,float16", _truncated),
    "int8-chunk-cut-inside-a-block": ("int8:4", _cut_inside_a_record(9)),
    "topk-chunk-cut-inside-a-pair": ("topk:0.25", _cut_inside_a_record(12)),
    "powersgd-float16-chunk-cut-inside-a-value": ("powersgd:2,float16", _cut_inside_a_record(3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_payload_is_invalid_argument_and_leaves_no_trace(
    serve, hand_node, wire, case: str
) -> None:
    name, build = CASES[case]
    served = _serve(serve, nodes=2, rounds=1)  # node-1 never uploads: round 0 stays open
    node = hand_node(served, "node-0", num_samples=SAMPLES)
    hand_node(served, "node-1")
    codec, payload, dense = _encoded(name, node.specs)
    bad = build(codec, bytearray(payload))
    before = core_state(served)
    with pytest.raises(grpc.RpcError) as info:
        _push(node, wire, name, bad.chunks, **bad.header)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    for needle in bad.needles:
        assert needle in (info.value.details() or ""), (needle, info.value.details())
    wait_until(lambda: slots_free(served), "the refused upload's staging slot to come back")
    assert core_state(served).same_accumulation(before)
    # The correct upload, same node, round and upload id: counted, and alone in the sum.
    reply = _push(node, wire, name, _chunks(codec, payload), payload_bytes=len(payload))
    assert (reply.round, reply.duplicate) == (0, False)
    after = core_state(served)
    assert after.reported == {"node-0": "node-0.r0"}
    assert (after.count, after.weight) == (1, SAMPLES)
    np.testing.assert_array_equal(after.total, SAMPLES * dense)
