"""Fuzzing the lossy codecs' check and decode against their documented byte layouts.

Each codec (``int8``, ``int8:7``, ``topk:0.1``, ``topk:0.1,bfloat16``, ``powersgd:2``,
``powersgd:2,float16``) over a small manifest (an empty tensor, a scalar, a float16 vector,
a matrix PowerSGD sends as factors and a small one it sends as it is) is staged chunk by
chunk as the aggregator stages it (``StagedUpload``: the cursor, then ``check`` with the
upload's carry), each chunk's data read from inside a larger buffer as from a message:

(a) arbitrary payloads of the codec's length (random bytes, or values and indices drawn
    field by field so that some pass), cut at random valid chunk sizes: each chunk passes
    or raises ``InvalidArgument``, nothing else; the verdict agrees with a reference
    reading of the layout the codec's docstring describes (written here, independently),
    and an accepted payload decodes to finite values, sparse indices in range and each
    element once, equal to that reading;
(b) valid encodings of random finite tensors with one mutation (a scale, a factor or a
    value made NaN, Inf or huge; two top-k pairs swapped; an index repeated, past the end
    or jumping ahead; a random byte flipped) are refused with a message that names the
    fault and where it is (a flipped byte: whatever the reference reading says);
(c) valid encodings pass and decode to the same values whatever the chunk size (8 * k
    bytes for several k with 8 * k >= the codec's largest record), and splittable codecs
    decode any subset of the chunks, in any order, to exactly those chunks' elements.

Two int8 payloads the fuzzing does not reach by chance (found by it) are pinned at the end.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedgrad.codec import TensorSpec, iter_chunk_pieces
from fedgrad.codecs import Chunk, Codec, codec_for, decode_dense
from fedgrad.errors import InvalidArgument
from fedgrad.server.staging import StagedUpload

SPECS = [
    TensorSpec("empty", torch.float32, (0, 3)),
    TensorSpec("scalar", torch.float32, ()),
    TensorSpec("vector", torch.float16, (13,)),
    TensorSpec("matrix", torch.float32, (6, 5)),
    TensorSpec("thin", torch.float32, (2, 3)),
]
FIRSTS = [sum(s.numel for s in SPECS[:i]) for i in range(len(SPECS))]
NUMEL = sum(s.numel for s in SPECS)
F32_MAX = float(np.finfo(np.float32).max)
WIDTH = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}
#: A chunk's data sits inside a received message: check and decode must read at an offset.
PAD = b"\xa5\x5a\xa5"

# Deterministic: the suite is reproducible; the fixed examples differ per test and codec.
FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
MUTATE = settings(FUZZ, max_examples=20)
VALID = settings(FUZZ, max_examples=15)


@dataclass(frozen=True)
class Declared:
    """A codec under test as its docstring defines it."""

    kind: str  # int8, topk or powersgd
    block: int = 0
    fraction: Fraction = Fraction(0)
    rank: int = 0
    values: torch.dtype | None = None  # None: each tensor's own dtype


DECLARED = {
    "int8": Declared("int8", block=256),
    "int8:7": Declared("int8", block=7),
    "topk:0.1": Declared("topk", fraction=Fraction(1, 10)),
    "topk:0.1,bfloat16": Declared("topk", fraction=Fraction(1, 10), values=torch.bfloat16),
    "powersgd:2": Declared("powersgd", rank=2),
    "powersgd:2,float16": Declared("powersgd", rank=2, values=torch.float16),
}
NAMES = list(DECLARED)


@dataclass(frozen=True)
class Field:
    """One record's field in the payload, as the docstring lays it out.

    ``role``: ``scale`` (an int8 block's; ``size`` int8s follow), ``index`` / ``value`` (a
    top-k pair's), ``P`` / ``Q`` (a PowerSGD factor's element) or ``plain`` (a value PowerSGD
    sends as it is). ``number``: the block, pair or payload element within its tensor.
    """

    tensor: int
    at: int
    role: str
    dtype: torch.dtype | None
    number: int
    size: int = 0


def _factored(spec: TensorSpec, rank: int) -> tuple[int, int] | None:
    """(m, n) of a tensor PowerSGD sends as factors, or None."""
    m = spec.shape[0] if len(spec.shape) >= 2 else 0
    n = spec.numel // m if m else 0
    return (m, n) if m and n and (m + n) * rank < m * n else None


@functools.cache
def _fields(name: str) -> tuple[tuple[Field, ...], int]:
    """Return every field of a payload of codec ``name`` over SPECS, and the payload length."""
    d = DECLARED[name]
    fields: list[Field] = []
    at = 0
    for t, spec in enumerate(SPECS):
        n = spec.numel
        dtype = d.values or spec.dtype
        if d.kind == "int8":
            for b in range(-(-n // d.block)):
                size = min(d.block, n - b * d.block)
                fields.append(Field(t, at, "scale", torch.float32, b, size))
                at += 4 + size
        elif d.kind == "topk":
            for j in range(min(n, math.ceil(n * d.fraction))):
                fields += [Field(t, at, "index", None, j), Field(t, at + 4, "value", dtype, j)]
                at += 4 + WIDTH[dtype]
        else:
            shape = _factored(spec, d.rank)
            p_count = shape[0] * d.rank if shape else 0
            count = (shape[0] + shape[1]) * d.rank if shape else n
            for j in range(count):
                role = "plain" if shape is None else ("P" if j < p_count else "Q")
                fields.append(Field(t, at, role, dtype, j))
                at += WIDTH[dtype]
    return tuple(fields), at


def _pack(value: float, dtype: torch.dtype) -> bytes:
    """Little-endian bytes of ``value`` (representable in ``dtype``; bfloat16 truncates)."""
    if dtype == torch.bfloat16:
        return struct.pack("<f", value)[2:]
    return struct.pack(
        {torch.float16: "<e", torch.float32: "<f", torch.float64: "<d"}[dtype], value
    )


def _unpack(raw: bytes | bytearray, at: int, dtype: torch.dtype | None) -> float:
    if dtype is None:
        return struct.unpack_from("<I", raw, at)[0]
    if dtype == torch.bfloat16:
        return struct.unpack("<f", b"\0\0" + bytes(raw[at : at + 2]))[0]
    return struct.unpack_from(
        {torch.float16: "<e", torch.float32: "<f", torch.float64: "<d"}[dtype], raw, at
    )[0]


def _values(raw: bytes, at: int, count: int, dtype: torch.dtype) -> np.ndarray:
    """``count`` consecutive values of ``dtype`` from byte ``at``, as float64."""
    if dtype == torch.bfloat16:
        bits = np.frombuffer(raw, "<u2", count, at).astype(np.uint32) << 16
        with np.errstate(invalid="ignore"):
            return bits.view(np.float32).astype(np.float64)
    kind = {torch.float16: "<f2", torch.float32: "<f4", torch.float64: "<f8"}[dtype]
    with np.errstate(invalid="ignore"):  # a signalling NaN's cast; NaNs are faults anyway
        return np.frombuffer(raw, kind, count, at).astype(np.float64)


def _largest(dtype: torch.dtype) -> float:
    """The tensor dtype's largest finite value: decoded values must fit the tensor."""
    return float(torch.finfo(dtype).max)


# -- the reference reading ------------------------------------------------------------------------
def _reference(name: str, payload: bytes) -> tuple[set[str], np.ndarray]:
    """Read a payload as the docstrings say: (faults found, float64 values per element).

    A fault is named by the words the aggregator's message must use for it.
    """
    d = DECLARED[name]
    fields, _ = _fields(name)
    faults: set[str] = set()
    dense = np.zeros(NUMEL)
    if d.kind == "int8":
        for f in fields:
            scale = _unpack(payload, f.at, f.dtype)
            # q may be -128: 128 |scale| must fit the tensor's own dtype.
            if not math.isfinite(scale) or 128 * abs(scale) > _largest(SPECS[f.tensor].dtype):
                faults.add("int8 scale")
                continue
            q = np.frombuffer(payload, np.int8, f.size, f.at + 4).astype(np.float64)
            first = FIRSTS[f.tensor] + f.number * d.block
            dense[first : first + f.size] = q * scale
    elif d.kind == "topk":
        before = dict.fromkeys(range(len(SPECS)), -1)
        for index, value in zip(fields[::2], fields[1::2], strict=True):
            i, v = _unpack(payload, index.at, None), _unpack(payload, value.at, value.dtype)
            t = index.tensor
            if i <= before[t]:
                faults.add("does not increase")
            if i >= SPECS[t].numel:
                faults.add("out of range")
            if not math.isfinite(v):
                faults.add("non-finite")
            elif abs(v) > _largest(SPECS[t].dtype):  # finite on the wire, not in the tensor
                faults.add("beyond the range")
            before[t] = max(before[t], i)
            if i < SPECS[t].numel:
                dense[FIRSTS[t] + i] = v
    else:
        for t, spec in enumerate(SPECS):
            mine = [f for f in fields if f.tensor == t]
            if not mine:
                continue
            values = _values(payload, mine[0].at, len(mine), mine[0].dtype)
            if not np.isfinite(values).all():
                faults.add("non-finite")
                continue
            shape = _factored(spec, d.rank)
            if shape is None:
                if np.abs(values).max(initial=0.0) > _largest(spec.dtype):
                    faults.add("beyond the range")
                dense[FIRSTS[t] : FIRSTS[t] + spec.numel] = values
                continue
            (m, n), r = shape, d.rank
            p, q = values[: m * r].reshape(m, r), values[m * r :].reshape(n, r)
            if r * np.abs(p).max() * np.abs(q).max() > _largest(spec.dtype):
                faults.add("too large")
            dense[FIRSTS[t] : FIRSTS[t] + spec.numel] = (p @ q.T).reshape(-1)
    return faults, dense


def _tolerance(name: str, payload: bytes, reference: np.ndarray) -> np.ndarray:
    """Per-element absolute tolerance of the aggregator's float32 decode vs the float64
    ``reference`` reading of ``payload``."""
    d = DECLARED[name]
    fields, _ = _fields(name)
    atol = np.full(NUMEL, 2.0**-145)  # a few of float32's smallest subnormals
    if d.kind != "powersgd":
        if d.kind == "int8":  # q * scale rounds once to float32: half an ulp
            atol += 2.0**-24 * np.abs(reference)
        return atol
    for t, spec in enumerate(SPECS):
        if _factored(spec, d.rank) is None:
            continue
        big = {}
        for role in ("P", "Q"):
            mine = [f for f in fields if f.tensor == t and f.role == role]
            big[role] = np.abs(_values(payload, mine[0].at, len(mine), mine[0].dtype)).max()
        # A float32 dot product of RANK terms: a few roundings, each relative to RANK * |P| |Q|.
        atol[FIRSTS[t] : FIRSTS[t] + spec.numel] += 4 * d.rank * 2.0**-24 * big["P"] * big["Q"]
    return atol


# -- staging and decoding as the aggregator does ---------------------------------------------------
def _smallest_chunk(codec: Codec) -> int:
    """The smallest chunk_bytes at which every tensor's bytes can be cut between records."""
    layout = codec.layout
    pieces = [min(u, n) for u, n in zip(layout.itemsizes, layout.nbytes, strict=True) if n]
    return max(8, *pieces)


def _stage(codec: Codec, payload: bytes, chunk_bytes: int) -> StagedUpload:
    """Cut a payload into the chunks a node sends and stage them; raise what staging raises."""
    layout = codec.layout
    buffer = np.frombuffer(payload, np.uint8)
    views = [buffer[s : s + n] for s, n in zip(layout.starts, layout.nbytes, strict=True)]
    staged = StagedUpload(codec, chunk_bytes)
    for tensor, offset, pieces in iter_chunk_pieces(views, layout, chunk_bytes):
        data = b"".join(p.tobytes() for p in pieces)
        staged.add(tensor, offset, PAD + data + PAD, len(PAD), len(data))
    staged.complete()
    return staged


def _decoded(codec: Codec, chunks: Sequence[Chunk], whole: bool = True) -> np.ndarray:
    """Decode staged chunks into float64 values per element, asserting decode's promises.

    Every value finite, no element twice; a dense codec yields each element of the model
    (``whole``: all chunks given) or of its chunks, a sparse one strictly increasing int64
    indices in range (elements not sent are zero).
    """
    got = np.zeros(NUMEL)
    seen = np.zeros(NUMEL, dtype=bool)
    for where, values in codec.decode(chunks):
        assert np.isfinite(values).all(), f"decoded a non-finite value: {values}"
        if codec.sparse:
            span = np.asarray(where)
            assert span.dtype == np.int64 and span.shape == values.shape
            assert (np.diff(span) > 0).all(), f"indices not strictly increasing: {span}"
            assert ((span >= 0) & (span < NUMEL)).all(), f"index out of range: {span}"
        else:
            assert 0 <= where and where + values.size <= NUMEL, (where, values.size)
            span = np.arange(where, where + values.size)
        assert not seen[span].any(), f"elements decoded twice: {span[seen[span]]}"
        seen[span] = True
        got[span] = values
    assert codec.sparse or not whole or seen.all(), (
        f"elements never decoded: {np.flatnonzero(~seen)}"
    )
    return got


def _assert_close(got: np.ndarray, want: np.ndarray, atol: np.ndarray) -> None:
    """Assert |got - want| <= atol per element (numpy's assert_allclose takes one atol)."""
    bad = np.flatnonzero(~(np.abs(got - want) <= atol))
    assert not bad.size, f"elements {bad[:5]}: got {got[bad[:5]]}, want {want[bad[:5]]}"


def _payload(views: list[np.ndarray]) -> bytes:
    return b"".join(v.tobytes() for v in views)


# -- strategies -----------------------------------------------------------------------------------
#: How a shaped payload's values are drawn: modest finite numbers (most such payloads
#: pass), any finite number of the dtype, or any bit pattern (NaNs and infinities too).
MAGNITUDES = ("modest", "finite", "bits")


@functools.cache  # one strategy per kind: building strategies per field dominated the run time
def _value_bytes(dtype: torch.dtype, magnitude: str) -> st.SearchStrategy[bytes]:
    """Little-endian bytes of one value of ``dtype``."""
    if magnitude == "bits":
        width = WIDTH[dtype]
        return st.integers(0, 2 ** (8 * width) - 1).map(lambda b: b.to_bytes(width, "little"))
    width = 16 if dtype == torch.float16 else 32  # bfloat16: a float32's top half
    top = 1e4 if magnitude == "modest" else float(torch.finfo(dtype).max)
    finite = st.floats(-top, top, width=width)
    return finite.map(lambda x: _pack(x, dtype))


@functools.cache
def _bytes(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size)


@st.composite
def shaped_payloads(draw: st.DrawFn, name: str) -> bytes:
    """A payload built field by field: values where the layout puts values, top-k indices
    often sorted, unique and in range, so that some payloads pass."""
    fields, total = _fields(name)
    buf = bytearray(total)
    magnitude = draw(st.sampled_from(MAGNITUDES), label="values")
    for f in fields:
        if f.role == "scale":
            buf[f.at : f.at + 4] = draw(_value_bytes(torch.float32, magnitude))
            buf[f.at + 4 : f.at + 4 + f.size] = draw(_bytes(f.size))
        elif f.role != "index":
            assert f.dtype is not None
            buf[f.at : f.at + WIDTH[f.dtype]] = draw(_value_bytes(f.dtype, magnitude))
    for t, spec in enumerate(SPECS):
        slots = [f for f in fields if f.tensor == t and f.role == "index"]
        if not slots:
            continue
        k, n = len(slots), spec.numel
        indices = draw(
            st.lists(st.integers(0, n - 1), min_size=k, max_size=k, unique=True).map(sorted)
            | st.lists(st.integers(0, n + 1), min_size=k, max_size=k)
            | st.lists(st.integers(0, 2**32 - 1), min_size=k, max_size=k),
            label=f"indices of {spec.name}",
        )
        for f, i in zip(slots, indices, strict=True):
            buf[f.at : f.at + 4] = struct.pack("<I", i)
    return bytes(buf)


def payloads(name: str) -> st.SearchStrategy[bytes]:
    total = _fields(name)[1]
    return st.binary(min_size=total, max_size=total) | shaped_payloads(name)


@st.composite
def updates(draw: st.DrawFn) -> list[torch.Tensor]:
    """Random finite tensors of SPECS: seeded normals at a drawn scale, some all zero."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1), label="seed"))
    scale = 10.0 ** draw(st.integers(-6, 3), label="log10 scale")
    zero = draw(st.sets(st.sampled_from(range(len(SPECS)))), label="all-zero tensors")
    return [
        (
            torch.zeros(s.shape)
            if i in zero
            else torch.randn(s.shape, generator=gen, dtype=torch.float64) * scale
        ).to(s.dtype)
        for i, s in enumerate(SPECS)
    ]


def _encode(name: str, tensors: list[torch.Tensor], seed: int) -> tuple[Codec, list[np.ndarray]]:
    codec = codec_for(name, SPECS)  # a fresh codec: PowerSGD's encode keeps its warm start
    return codec, codec.encode(tensors, torch.Generator().manual_seed(seed))


def chunk_sizes(codec: Codec) -> st.SearchStrategy[int]:
    low = _smallest_chunk(codec)
    return st.integers(low, max(low, codec.layout.total))


# -- (a) arbitrary payloads -----------------------------------------------------------------------
def test_reference_reading_has_the_codecs_length() -> None:
    for name in NAMES:
        codec = codec_for(name, SPECS)
        assert codec.layout.total == _fields(name)[1], name
        assert codec.sparse == (DECLARED[name].kind == "topk"), name


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(data=st.data())
def test_arbitrary_payload_is_refused_or_decodes_finite_in_range(
    name: str, data: st.DataObject
) -> None:
    codec = codec_for(name, SPECS)
    payload = data.draw(payloads(name), label="payload")
    chunk_bytes = data.draw(chunk_sizes(codec), label="chunk_bytes")
    faults, want = _reference(name, payload)
    try:
        staged = _stage(codec, payload, chunk_bytes)
    except InvalidArgument as exc:
        event(f"refused: {sorted(faults)}")
        assert faults, f"refused a payload the layout allows: {exc}"
        assert any(fault in str(exc) for fault in faults), (str(exc), faults)
        return
    event("accepted")
    assert not faults, f"accepted a payload with {faults}"
    got = _decoded(codec, staged.chunks)
    _assert_close(got, want, _tolerance(name, payload, want))


# -- (b) mutated valid encodings ------------------------------------------------------------------
Mutation = Callable[[bytearray, Sequence[Field], st.DataObject], list[str] | None]


def _where(f: Field) -> str:
    return f"tensor {f.tensor} ({SPECS[f.tensor].name!r}"


def _set_scale(values: list[float]) -> Mutation:
    def mutate(buf: bytearray, fields: Sequence[Field], data: st.DataObject) -> list[str]:
        f = data.draw(st.sampled_from([f for f in fields if f.role == "scale"]), label="block")
        value = data.draw(st.sampled_from(values), label="scale")
        buf[f.at : f.at + 4] = _pack(value, torch.float32)
        return ["int8 scale", f"of block {f.number} is not finite or so large", _where(f)]

    return mutate


def _pair_fields(fields: Sequence[Field], min_pairs: int) -> dict[int, list[Field]]:
    """The index fields of each tensor that has at least ``min_pairs`` pairs."""
    by_tensor: dict[int, list[Field]] = {}
    for f in fields:
        if f.role == "index":
            by_tensor.setdefault(f.tensor, []).append(f)
    return {t: fs for t, fs in by_tensor.items() if len(fs) >= min_pairs}


def _swap(buf: bytearray, fields: Sequence[Field], data: st.DataObject) -> list[str]:
    pairs = data.draw(st.sampled_from(list(_pair_fields(fields, 2).values())), label="tensor")
    i = data.draw(st.integers(0, len(pairs) - 2), label="first pair")
    j = data.draw(st.integers(i + 1, len(pairs) - 1), label="second pair")
    unit = pairs[1].at - pairs[0].at
    a, b = pairs[i].at, pairs[j].at
    buf[a : a + unit], buf[b : b + unit] = buf[b : b + unit], buf[a : a + unit]
    return [
        "does not increase strictly",
        "indices must be unique and sorted",
        f"in {_where(pairs[i])}",
    ]


def _duplicate(buf: bytearray, fields: Sequence[Field], data: st.DataObject) -> list[str]:
    pairs = data.draw(st.sampled_from(list(_pair_fields(fields, 2).values())), label="tensor")
    j = data.draw(st.integers(1, len(pairs) - 1), label="pair")
    index = _unpack(buf, pairs[j - 1].at, None)
    buf[pairs[j].at : pairs[j].at + 4] = struct.pack("<I", index)
    return [
        f"topk index {index} of pair {j} does not increase strictly (after {index})",
        f"in {_where(pairs[j])}",
    ]


def _past_end(buf: bytearray, fields: Sequence[Field], data: st.DataObject) -> list[str]:
    pairs = data.draw(st.sampled_from(list(_pair_fields(fields, 1).values())), label="tensor")
    last = pairs[-1]
    numel = SPECS[last.tensor].numel
    index = data.draw(st.integers(numel, numel + 2) | st.integers(numel, 2**32 - 1), label="index")
    buf[last.at : last.at + 4] = struct.pack("<I", index)
    return [f"topk index {index} is out of range for {_where(last)}, {numel} elements)"]


def _jump(buf: bytearray, fields: Sequence[Field], data: st.DataObject) -> list[str]:
    """An index before the last jumps to or past the next one: out of order or out of range."""
    pairs = data.draw(st.sampled_from(list(_pair_fields(fields, 2).values())), label="tensor")
    j = data.draw(st.integers(0, len(pairs) - 2), label="pair")
    index = data.draw(st.integers(_unpack(buf, pairs[j + 1].at, None), 2**32 - 1), label="index")
    buf[pairs[j].at : pairs[j].at + 4] = struct.pack("<I", index)
    return ["topk index", _where(pairs[j])]  # which of the two depends on the cut: see below


def _set_value(value: float) -> Mutation:
    def mutate(buf: bytearray, fields: Sequence[Field], data: st.DataObject) -> list[str]:
        f = data.draw(st.sampled_from([f for f in fields if f.role == "value"]), label="pair")
        index = _unpack(buf, f.at - 4, None)
        buf[f.at : f.at + WIDTH[f.dtype]] = _pack(value, f.dtype)
        return ["non-finite value (NaN or Inf)", f"element {index} of {_where(f)})"]

    return mutate


def _set_factor(value: float) -> Mutation:
    def mutate(buf: bytearray, fields: Sequence[Field], data: st.DataObject) -> list[str]:
        f = data.draw(st.sampled_from(fields), label="value")
        buf[f.at : f.at + WIDTH[f.dtype]] = _pack(value, f.dtype)
        return [
            "non-finite factor value (NaN or Inf)",
            f"payload element {f.number} of {_where(f)})",
        ]

    return mutate


def _huge_factors(buf: bytearray, fields: Sequence[Field], data: st.DataObject) -> list[str]:
    """One P and one Q element whose product, times the rank, is 2**129 > float32's max."""
    exponent = data.draw(st.integers(1, 127), label="log2 |P|")
    for role, value in (("P", 2.0**exponent), ("Q", 2.0 ** (128 - exponent))):
        f = data.draw(st.sampled_from([f for f in fields if f.role == role]), label=role)
        buf[f.at : f.at + WIDTH[f.dtype]] = _pack(value, f.dtype)
    return ["powersgd factors of tensor 3 ('matrix') are too large: rank 2", "P Q^T could overflow"]


def _flip(buf: bytearray, fields: Sequence[Field], data: st.DataObject) -> None:
    """Flip bits of one byte; the reference reading decides what must happen."""
    at = data.draw(st.integers(0, len(buf) - 1), label="byte")
    buf[at] ^= data.draw(st.integers(1, 255), label="mask")


NAN, INF = float("nan"), float("inf")
HUGE_SCALES = [F32_MAX, -F32_MAX, 1e38, -3e37, 2.7e36]  # above float32's max / 127 = 2.679e36
MUTATIONS: dict[str, dict[str, Mutation]] = {
    "int8": {
        "scale-nan": _set_scale([NAN, -NAN]),
        "scale-inf": _set_scale([INF, -INF]),
        "scale-huge": _set_scale(HUGE_SCALES),
        "flip": _flip,
    },
    "topk": {
        "swap-pairs": _swap,
        "duplicate-index": _duplicate,
        "index-past-the-end": _past_end,
        "index-jumps-ahead": _jump,
        "value-nan": _set_value(NAN),
        "value-inf": _set_value(-INF),
        "flip": _flip,
    },
    "powersgd": {
        "factor-nan": _set_factor(NAN),
        "factor-inf": _set_factor(INF),
        "factors-too-large": _huge_factors,
        "flip": _flip,
    },
}
CASES = [
    (name, mutation)
    for name in NAMES
    for mutation in MUTATIONS[DECLARED[name].kind]
    # float16 factors cannot overflow float32: 2 * 65504**2 is far below its max.
    if not (mutation == "factors-too-large" and DECLARED[name].values == torch.float16)
]


@pytest.mark.parametrize(("name", "mutation"), CASES)
@MUTATE
@given(tensors=updates(), seed=st.integers(0, 2**16), data=st.data())
def test_mutated_encoding_is_refused_naming_the_fault(
    name: str, mutation: str, tensors: list[torch.Tensor], seed: int, data: st.DataObject
) -> None:
    codec, views = _encode(name, tensors, seed)
    buf = bytearray(_payload(views))
    needles = MUTATIONS[DECLARED[name].kind][mutation](buf, _fields(name)[0], data)
    payload = bytes(buf)
    chunk_bytes = data.draw(chunk_sizes(codec), label="chunk_bytes")
    if needles is None:  # a flipped byte: the reference reading is the oracle
        faults, want = _reference(name, payload)
        try:
            staged = _stage(codec, payload, chunk_bytes)
        except InvalidArgument as exc:
            event(f"refused: {sorted(faults)}")
            assert any(fault in str(exc) for fault in faults), (str(exc), faults)
            return
        event("accepted")
        assert not faults, f"accepted a payload with {faults}"
        _assert_close(_decoded(codec, staged.chunks), want, _tolerance(name, payload, want))
        return
    with pytest.raises(InvalidArgument) as info:
        _stage(codec, payload, chunk_bytes)
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    if mutation == "index-jumps-ahead":
        assert "does not increase strictly" in message or "is out of range" in message, message


# -- (c) valid encodings --------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@VALID
@given(tensors=updates(), seed=st.integers(0, 2**16))
def test_valid_encoding_decodes_the_same_whatever_the_chunk_size(
    name: str, tensors: list[torch.Tensor], seed: int
) -> None:
    codec, views = _encode(name, tensors, seed)
    payload = _payload(views)
    assert len(payload) == codec.layout.total
    faults, reference = _reference(name, payload)
    assert not faults, faults
    want = decode_dense(codec, views).astype(np.float64)  # what the node's error feedback keeps
    _assert_close(want, reference, _tolerance(name, payload, reference))
    first = -(-max(codec.layout.itemsizes) // 8)
    for k in sorted({first, first + 1, first + 2, first + 5, -(-codec.layout.total // 8)}):
        staged = _stage(codec, payload, 8 * k)
        got = _decoded(codec, staged.chunks)
        np.testing.assert_array_equal(got, want, err_msg=f"chunk_bytes {8 * k}")
        if codec.splittable and len(staged.chunks) >= 2:  # reduce threads split the chunks
            mixed = _decoded(codec, staged.chunks[1::2] + staged.chunks[0::2])
            np.testing.assert_array_equal(mixed, want, err_msg=f"reordered at {8 * k}")
            halves = [_decoded(codec, staged.chunks[i::2], whole=False) for i in (0, 1)]
            np.testing.assert_array_equal(halves[0] + halves[1], want, err_msg=f"split at {8 * k}")


# -- known gaps -----------------------------------------------------------------------------------
def _int8_block(scale: np.float32, q: int) -> bytes:
    """An ``int8:7`` payload over SPECS: the scalar's block is (scale, q), the rest zeros."""
    fields, total = _fields("int8:7")
    buf = bytearray(total)
    scalar = next(f for f in fields if f.tensor == 1)
    buf[scalar.at : scalar.at + 5] = scale.tobytes() + struct.pack("<b", q)
    return bytes(buf)


@pytest.mark.parametrize(
    ("scale", "q"),
    [
        # int8 holds -128: a bound of max / 127 for |q| <= 127 let -128 * scale overflow.
        pytest.param(np.float32(F32_MAX / 128) * np.float32(1.001), -128, id="q-minus-128"),
        # max / 127 compared in float32 rounds up: 127 * scale overflowed to inf.
        pytest.param(np.float32(F32_MAX / 127), 127, id="scale-at-the-rounded-bound"),
    ],
)
def test_int8_payload_that_passes_check_decodes_finite(scale: np.float32, q: int) -> None:
    codec = codec_for("int8:7", SPECS)
    payload = _int8_block(scale, q)
    try:
        staged = _stage(codec, payload, 64)
    except InvalidArgument as exc:
        assert "int8" in str(exc)  # refusing it is right too
        return
    with np.errstate(over="ignore"):  # the overflow itself is what this test reports
        values = np.concatenate([v for _, v in codec.decode(staged.chunks)])
    assert np.isfinite(values).all(), f"scale {float(scale)!r}, q {q} decodes to {values[:1]}"
