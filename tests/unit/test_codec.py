"""The tensor codec: manifests, the flat stream, its chunks and the receiver's cursor.

Pure code, no gRPC: tensors go through ``iter_chunks`` and come back through
``ChunkCursor`` + ``write_chunk`` exactly as the aggregator and the node use them.
Round trips compare raw bytes, so they are bitwise, NaN-proof checks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pytest
import torch

from fedgrad.codec import (
    DEFAULT_CHUNK_BYTES,
    ChunkCursor,
    Layout,
    TensorSpec,
    byte_view,
    decode_floats,
    dtype_to_proto,
    iter_chunks,
    manifest_from_proto,
    manifest_to_proto,
    specs_of,
    write_chunk,
)
from fedgrad.errors import InvalidArgument
from fedgrad.proto import fedgrad_pb2 as pb

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
MiB = 1 << 20


def _random(shape: Sequence[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(dtype)


def _named(tensors: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(f"t{i}", t) for i, t in enumerate(tensors)]


def _encode(
    tensors: Sequence[torch.Tensor], chunk_bytes: int
) -> tuple[Layout, list[tuple[int, int, bytes]]]:
    layout = Layout(specs_of(_named(tensors)))
    views = [byte_view(t.contiguous()) for t in tensors]
    return layout, list(iter_chunks(views, layout, chunk_bytes))


def _decode(layout: Layout, chunks: Sequence[tuple[int, int, bytes]], chunk_bytes: int):
    out = [torch.zeros(s.shape, dtype=s.dtype) for s in layout.specs]
    views = [byte_view(t) for t in out]
    cursor = ChunkCursor(layout, chunk_bytes)
    for tensor, offset, data in chunks:
        start = cursor.advance(tensor, offset, len(data))
        write_chunk(views, layout, start, data)
    assert cursor.complete
    return out


def _assert_bitwise_equal(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert bytes(byte_view(g)) == bytes(byte_view(w.contiguous()))


def _check_chunk_geometry(layout: Layout, chunks, chunk_bytes: int) -> None:
    """Every chunk is non-empty, small enough, starts where the last ended, never splits."""
    position = 0
    for tensor, offset, data in chunks:
        assert 0 < len(data) <= chunk_bytes
        assert layout.position(tensor, offset) == position
        assert layout.nbytes[tensor] > 0 and offset < layout.nbytes[tensor]
        assert offset % layout.itemsizes[tensor] == 0
        position += len(data)
        assert layout.element_aligned(position), f"cut at {position} splits an element"
    assert position == layout.total


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk_bytes", [8, 24, 1000, DEFAULT_CHUNK_BYTES])
def test_round_trip_each_dtype(dtype: torch.dtype, chunk_bytes: int) -> None:
    tensors = [_random((7, 13), dtype, 1), _random((5,), dtype, 2), _random((3, 2, 4), dtype, 3)]
    layout, chunks = _encode(tensors, chunk_bytes)
    assert layout.total == sum(t.numel() * t.element_size() for t in tensors)
    _check_chunk_geometry(layout, chunks, chunk_bytes)
    _assert_bitwise_equal(_decode(layout, chunks, chunk_bytes), tensors)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_dim_and_empty_tensors(dtype: torch.dtype) -> None:
    tensors = [
        torch.empty(0, dtype=dtype),
        _random((), dtype, 1),
        torch.empty(3, 0, dtype=dtype),
        _random((4,), dtype, 2),
        _random((), dtype, 3),
        torch.empty(0, 5, dtype=dtype),
    ]
    layout, chunks = _encode(tensors, 16)
    assert layout.specs[1].shape == () and layout.specs[1].numel == 1
    assert layout.nbytes[0] == layout.nbytes[2] == layout.nbytes[5] == 0
    _check_chunk_geometry(layout, chunks, 16)
    _assert_bitwise_equal(_decode(layout, chunks, 16), tensors)


def test_model_of_only_empty_tensors_has_no_chunks() -> None:
    tensors = [torch.empty(0), torch.empty(2, 0, dtype=torch.float64)]
    layout, chunks = _encode(tensors, 64)
    assert layout.total == 0 and chunks == []
    assert ChunkCursor(layout, 64).complete
    assert _decode(layout, chunks, 64)[1].shape == (2, 0)


@pytest.mark.parametrize("chunk_bytes", [8, 9, 13, 30, 64, 4099])
def test_mixed_dtypes_cuts_never_split_an_element(chunk_bytes: int) -> None:
    # Itemsizes 2, 8, 4, 2 in odd sizes: many cuts fall where an element would split.
    tensors = []
    for i in range(12):
        dtype = DTYPES[(i * 3) % 4]
        tensors.append(_random((2 * i + 1,), dtype, i))
    tensors.insert(5, torch.empty(0, dtype=torch.float16))
    tensors.insert(8, _random((), torch.float64, 99))
    layout, chunks = _encode(tensors, chunk_bytes)
    assert len({r.dtype for r in layout.runs}) == 4
    _check_chunk_geometry(layout, chunks, chunk_bytes)
    _assert_bitwise_equal(_decode(layout, chunks, chunk_bytes), tensors)


def test_two_thousand_small_tensors_share_few_chunks() -> None:
    tensors = [_random((1 + i % 7,), torch.float32, i) for i in range(2000)]
    layout, chunks = _encode(tensors, DEFAULT_CHUNK_BYTES)
    assert layout.total < DEFAULT_CHUNK_BYTES
    assert len(chunks) == 1, "2,000 tiny tensors must share one chunk message"
    _assert_bitwise_equal(_decode(layout, chunks, DEFAULT_CHUNK_BYTES), tensors)
    # With smaller chunks every chunk but the last is full: packing spans tensor boundaries.
    layout, chunks = _encode(tensors, 4096)
    assert len(chunks) == math.ceil(layout.total / 4096)
    _check_chunk_geometry(layout, chunks, 4096)
    _assert_bitwise_equal(_decode(layout, chunks, 4096), tensors)


def test_one_tensor_larger_than_four_mib() -> None:
    big = _random((1536, 1024), torch.float32, 7)  # 6 MiB
    tensors = [_random((3,), torch.float16, 1), big, _random((), torch.float64, 2)]
    layout, chunks = _encode(tensors, DEFAULT_CHUNK_BYTES)
    assert layout.nbytes[1] > 4 * MiB
    assert max(len(d) for _, _, d in chunks) <= DEFAULT_CHUNK_BYTES
    assert len(chunks) == math.ceil(layout.total / DEFAULT_CHUNK_BYTES)
    _check_chunk_geometry(layout, chunks, DEFAULT_CHUNK_BYTES)
    _assert_bitwise_equal(_decode(layout, chunks, DEFAULT_CHUNK_BYTES), tensors)


def test_wire_dtype_layout_uses_the_wire_itemsize() -> None:
    specs = specs_of(_named([torch.zeros(3, 5), torch.zeros((), dtype=torch.float64)]))
    layout = Layout(specs, torch.float16)
    assert layout.dtypes == [torch.float16, torch.float16]
    assert layout.total == 16 * 2
    assert len(layout.runs) == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_floats_matches_torch(dtype: torch.dtype) -> None:
    t = _random((33,), dtype, 5)
    data = b"\x00" * 6 + bytes(byte_view(t))
    got = decode_floats(data, 6 + 2 * t.element_size(), 30 * t.element_size(), dtype)
    want = t[2:32].to(torch.float64).numpy()
    assert got.shape == (30,)
    assert (got.astype("float64") == want).all()


# -- the receiver's cursor ------------------------------------------------------------------------
@pytest.fixture
def layout() -> Layout:
    """float32[4] (16 B), empty, float16[3] (6 B), 0-d float64 (8 B): 30 bytes in all."""
    return Layout(
        [
            TensorSpec("a", torch.float32, (4,)),
            TensorSpec("e", torch.float32, (0,)),
            TensorSpec("h", torch.float16, (3,)),
            TensorSpec("s", torch.float64, ()),
        ]
    )


def test_cursor_accepts_a_valid_sequence(layout: Layout) -> None:
    cursor = ChunkCursor(layout, 16)
    assert cursor.advance(0, 0, 8) == 0
    assert not cursor.complete
    assert cursor.advance(0, 8, 12) == 8  # the rest of "a", skips "e", then 2 halves of "h"
    assert cursor.advance(2, 4, 10) == 20  # last half of "h" and the float64
    assert cursor.complete


def test_cursor_rejects_out_of_order(layout: Layout) -> None:
    cursor = ChunkCursor(layout, 16)
    with pytest.raises(InvalidArgument, match="out of order"):
        cursor.advance(0, 8, 8)  # skips the first 8 bytes
    assert cursor.position == 0


def test_cursor_rejects_overlap(layout: Layout) -> None:
    cursor = ChunkCursor(layout, 16)
    cursor.advance(0, 0, 8)
    with pytest.raises(InvalidArgument, match="out of order"):
        cursor.advance(0, 4, 8)  # starts inside the previous chunk
    with pytest.raises(InvalidArgument, match="out of order"):
        cursor.advance(0, 0, 8)  # a repeat
    assert cursor.position == 8


def test_cursor_rejects_beyond_the_end(layout: Layout) -> None:
    cursor = ChunkCursor(layout, 64)
    cursor.advance(0, 0, 16)
    with pytest.raises(InvalidArgument, match="beyond"):
        cursor.advance(2, 0, 16)  # 14 bytes remain
    assert cursor.position == 16 and not cursor.complete


def test_cursor_rejects_a_split_element(layout: Layout) -> None:
    cursor = ChunkCursor(layout, 16)
    with pytest.raises(InvalidArgument, match="splits an element"):
        cursor.advance(0, 0, 6)  # ends inside the second float32
    cursor.advance(0, 0, 16)
    with pytest.raises(InvalidArgument, match="splits an element"):
        cursor.advance(2, 0, 9)  # ends inside the float64
    assert cursor.position == 16


def test_cursor_rejects_a_misaligned_offset(layout: Layout) -> None:
    cursor = ChunkCursor(layout, 16)
    cursor.advance(0, 0, 16)
    with pytest.raises(InvalidArgument):
        cursor.advance(2, 1, 2)  # starts inside an element


def test_cursor_rejects_empty_and_oversized(layout: Layout) -> None:
    cursor = ChunkCursor(layout, 8)
    with pytest.raises(InvalidArgument, match="no data"):
        cursor.advance(0, 0, 0)
    with pytest.raises(InvalidArgument, match="limit"):
        cursor.advance(0, 0, 12)
    assert cursor.position == 0


@pytest.mark.parametrize(
    ("tensor", "offset"),
    [(4, 0), (99, 0), (-1, 0), (0, 16), (0, 17), (2, 6), (3, 8)],
)
def test_cursor_rejects_a_bad_tensor_index_or_offset(
    layout: Layout, tensor: int, offset: int
) -> None:
    with pytest.raises(InvalidArgument):
        ChunkCursor(layout, 64).advance(tensor, offset, 2)


# -- manifests ------------------------------------------------------------------------------------
def test_manifest_round_trip() -> None:
    specs = [
        TensorSpec("fc1.weight", torch.float32, (64, 8)),
        TensorSpec("fc1.bias", torch.float16, (64,)),
        TensorSpec("scale", torch.bfloat16, ()),
        TensorSpec("empty", torch.float64, (3, 0)),
        TensorSpec("big", torch.float64, (1 << 20, 16)),
    ]
    msg = manifest_to_proto(specs)
    assert [t.dtype for t in msg.tensors] == [pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16, pb.FLOAT64] + [
        pb.FLOAT64
    ]
    assert list(msg.tensors[2].shape) == []
    again = pb.Manifest.FromString(msg.SerializeToString())
    assert manifest_from_proto(again) == specs


def test_manifest_of_a_model() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2, dtype=torch.float64))
    specs = specs_of(list(model.named_parameters()))
    assert manifest_from_proto(manifest_to_proto(specs)) == specs
    assert [s.name for s in specs] == list(model.state_dict())


def _manifest(*tensors: pb.TensorSpec) -> pb.Manifest:
    return pb.Manifest(tensors=list(tensors))


def test_manifest_rejects_a_negative_dimension() -> None:
    msg = _manifest(pb.TensorSpec(name="w", dtype=pb.FLOAT32, shape=[3, -1]))
    with pytest.raises(InvalidArgument, match="negative"):
        manifest_from_proto(msg)


def test_manifest_rejects_a_duplicate_name() -> None:
    spec = pb.TensorSpec(name="w", dtype=pb.FLOAT32, shape=[2])
    with pytest.raises(InvalidArgument, match="repeats"):
        manifest_from_proto(_manifest(spec, spec))


@pytest.mark.parametrize("dtype", [pb.DTYPE_UNSPECIFIED, 5, 99])
def test_manifest_rejects_an_unknown_dtype(dtype: int) -> None:
    msg = _manifest(pb.TensorSpec(name="w", dtype=dtype, shape=[2]))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="dtype"):
        manifest_from_proto(msg)


def test_manifest_rejects_overflow() -> None:
    huge = _manifest(pb.TensorSpec(name="w", dtype=pb.FLOAT64, shape=[1 << 31, 1 << 31, 1 << 31]))
    with pytest.raises(InvalidArgument, match="larger than"):
        manifest_from_proto(huge)
    # The limit counts the whole flat stream, not one tensor.
    two = _manifest(
        pb.TensorSpec(name="a", dtype=pb.FLOAT32, shape=[100]),
        pb.TensorSpec(name="b", dtype=pb.FLOAT32, shape=[100]),
    )
    assert len(manifest_from_proto(two, max_bytes=800)) == 2
    with pytest.raises(InvalidArgument, match="larger than"):
        manifest_from_proto(two, max_bytes=799)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.complex64, torch.bool])
def test_unsupported_torch_dtypes_are_refused(dtype: torch.dtype) -> None:
    with pytest.raises(InvalidArgument, match="not supported"):
        dtype_to_proto(dtype)
    with pytest.raises(InvalidArgument):
        manifest_to_proto([TensorSpec("w", dtype, (2,))])


def test_int64_is_a_buffer_dtype_only() -> None:
    msg = manifest_to_proto([TensorSpec("num_batches_tracked", torch.int64, ())])
    assert manifest_from_proto(msg, integers=True) == [
        TensorSpec("num_batches_tracked", torch.int64, ())
    ]
    with pytest.raises(InvalidArgument, match="INT64 is for buffers only"):
        manifest_from_proto(msg)


def test_byte_view_refuses_non_contiguous() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        byte_view(torch.zeros(4, 4).t())


@pytest.mark.parametrize(("dtype", "chunk_bytes"), [(torch.float64, 4), (torch.float32, 2)])
def test_chunk_smaller_than_an_element_is_refused(dtype: torch.dtype, chunk_bytes: int) -> None:
    # No chunk can carry an element: the encoder must refuse, not emit empty chunks forever
    # (the aggregator builds its broadcast as a list, so that would exhaust memory).
    t = _random((3,), dtype, 0)
    layout = Layout(specs_of(_named([t])))
    with pytest.raises((ValueError, InvalidArgument)):
        chunks = list(itertools.islice(iter_chunks([byte_view(t)], layout, chunk_bytes), 100))
        assert all(data for _, _, data in chunks), "empty chunk emitted"
