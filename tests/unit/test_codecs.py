"""The codec seam: names, parameters, payload geometry, check and decode against torch.

References are computed locally with torch casts from seeded tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedgrad.codec import TensorSpec, iter_chunk_pieces
from fedgrad.codecs import CODECS, CastCodec, codec_for, codec_names
from fedgrad.errors import InvalidArgument

SPECS = [
    TensorSpec("w", torch.float32, (33, 7)),
    TensorSpec("s", torch.float64, ()),
    TensorSpec("e", torch.float32, (0, 3)),
    TensorSpec("b", torch.float16, (101,)),
]


def _tensors(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype) for s in SPECS]


def _decode_all(codec: CastCodec, tensors: list[torch.Tensor], chunk: int) -> np.ndarray:
    """Encode, cut into chunks, check and decode each; return the values per element."""
    numel = sum(s.numel for s in SPECS)
    values = np.full(numel, np.nan)
    for tensor, offset, pieces in iter_chunk_pieces(codec.encode(tensors), codec.layout, chunk):
        raw = b"".join(bytes(p) for p in pieces)
        position = codec.layout.position(tensor, offset)
        codec.check(position, raw, 0, len(raw))
        for first, got in codec.decode([(position, raw, 0, len(raw))]):
            values[first : first + got.size] = got
    return values


def test_registry_names_and_errors() -> None:
    assert set(codec_names()) == set(CODECS) >= {"identity", "float16", "bfloat16"}
    assert codec_for("", SPECS).name == "identity"
    assert codec_for("bfloat16", SPECS).name == "bfloat16"
    with pytest.raises(InvalidArgument, match="unknown codec 'int3'.*must be one of identity"):
        codec_for("int3", SPECS)
    with pytest.raises(InvalidArgument, match="must have no parameters"):
        codec_for("float16:0.5", SPECS)


@pytest.mark.parametrize("name", ["identity", "float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("chunk", [8, 64, 1 << 20])
def test_decode_equals_the_torch_cast(name: str, chunk: int) -> None:
    codec = codec_for(name, SPECS)
    assert isinstance(codec, CastCodec)
    tensors = _tensors()
    wire = codec.wire_dtype
    want = np.concatenate(
        [t.to(wire or t.dtype).to(torch.float64).reshape(-1).numpy() for t in tensors]
    )
    size = {None: None, torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}
    if wire is not None:
        assert codec.layout.total == sum(s.numel for s in SPECS) * size[wire]
    else:
        assert codec.layout.total == sum(s.nbytes for s in SPECS)
    np.testing.assert_array_equal(_decode_all(codec, tensors, chunk), want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_refuses_non_finite_values(bad: float) -> None:
    codec = codec_for("float16", SPECS)
    tensors = _tensors()
    tensors[3][50] = bad
    with pytest.raises(InvalidArgument, match="non-finite.*'b'"):
        _decode_all(codec, tensors, 1 << 20)


def test_encode_casts_with_round_to_nearest_even() -> None:
    # 1 + 2**-11 is halfway between two float16 values: nearest even is 1.0.
    x = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11], dtype=torch.float32)
    codec = CastCodec([TensorSpec("x", torch.float32, (2,))], torch.float16)
    (view,) = codec.encode([x])
    assert np.frombuffer(view.tobytes(), np.float16).tolist() == [1.0, 1 + 2 * 2**-10]
