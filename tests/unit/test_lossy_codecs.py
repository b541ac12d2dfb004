"""int8, top-k and PowerSGD: decode against references written here, error feedback's
sums, recomputed rounds, the state file, and sparse uploads in every reducer.

The references are independent of ``fedgrad.codecs``: numpy block quantization, a
dense top-k by argsort, and a plain P Q^T.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedgrad.client.feedback import ErrorFeedback
from fedgrad.codec import Layout, TensorSpec, iter_chunk_pieces
from fedgrad.codecs import Codec, codec_for, decode_dense
from fedgrad.errors import InvalidArgument
from fedgrad.server.reducers import make_reducer
from fedgrad.server.staging import StagedUpload

SPECS = [
    TensorSpec("w", torch.float32, (40, 30)),
    TensorSpec("s", torch.float32, ()),
    TensorSpec("e", torch.float32, (0, 3)),
    TensorSpec("b", torch.float32, (517,)),
]
NUMEL = sum(s.numel for s in SPECS)


def _tensors(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(s.shape, generator=gen, dtype=s.dtype) for s in SPECS]


def _flat(tensors: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([t.reshape(-1).numpy().astype(np.float64) for t in tensors])


def _staged(codec: Codec, views: list[np.ndarray], chunk: int = 1 << 20) -> StagedUpload:
    staged = StagedUpload(codec, chunk)
    for tensor, offset, pieces in iter_chunk_pieces(views, codec.layout, chunk):
        staged.add(tensor, offset, b"".join(bytes(p) for p in pieces))
    return staged


def _reference_int8(tensors: list[torch.Tensor], block: int) -> np.ndarray:
    """Per block of each tensor: scale = max|x| / 127, q = rint(x / scale), q * scale."""
    out = []
    for t in tensors:
        x = t.reshape(-1).numpy().astype(np.float32)
        for i in range(0, x.size, block):
            part = x[i : i + block]
            scale = np.float32(np.abs(part).max() / np.float32(127))
            q = np.clip(np.rint(part / scale), -127, 127) if scale > 0 else np.zeros_like(part)
            out.append(q.astype(np.int8).astype(np.float32) * scale)
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


@pytest.mark.parametrize(
    ("block", "chunk"),
    [(1, 8 * 600), (7, 8 * 600), (256, 8 * 600), (256, 1 << 20), (4096, 1 << 20)],
)
def test_int8_decode_equals_the_reference_dequantization(block: int, chunk: int) -> None:
    codec = codec_for(f"int8:{block}", SPECS)
    tensors = _tensors(1)
    staged = _staged(codec, codec.encode(tensors), chunk)
    got = np.zeros(NUMEL)
    for first, values in codec.decode(staged.chunks):
        got[first : first + values.size] = values
    np.testing.assert_array_equal(got, _reference_int8(tensors, block))
    blocks = sum(-(-s.numel // block) for s in SPECS)
    assert codec.layout.total == NUMEL + 4 * blocks


def test_int8_stochastic_rounding_is_seeded_and_unbiased() -> None:
    codec = codec_for("int8:64", SPECS, stochastic=True)
    tensors = _tensors(2)
    one = codec.encode(tensors, torch.Generator().manual_seed(9))
    again = codec.encode(tensors, torch.Generator().manual_seed(9))
    other = codec.encode(tensors, torch.Generator().manual_seed(10))
    assert all(np.array_equal(a, b) for a, b in zip(one, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(one, other, strict=True))
    # The mean of many stochastic roundings approaches the value (nearest rounding does not).
    draws = np.mean(
        [
            decode_dense(codec, codec.encode(tensors, torch.Generator().manual_seed(s)))
            for s in range(200)
        ],
        axis=0,
    )
    nearest = decode_dense(codec_for("int8:64", SPECS), codec_for("int8:64", SPECS).encode(tensors))
    exact = _flat(tensors)
    assert np.abs(draws - exact).mean() < 0.5 * np.abs(nearest - exact).mean()


def test_topk_sends_the_largest_entries_of_each_tensor() -> None:
    codec = codec_for("topk:0.05", SPECS)
    tensors = _tensors(3)
    got = decode_dense(codec, codec.encode(tensors))
    want = np.zeros(NUMEL)
    at = 0
    for s, t in zip(SPECS, tensors, strict=True):
        x = t.reshape(-1).numpy().astype(np.float64)
        k = -(-s.numel * 5 // 100)  # ceil(numel * 0.05), exactly
        top = np.argsort(-np.abs(x), kind="stable")[:k]
        want[at + top] = x[top]
        at += s.numel
    np.testing.assert_array_equal(got, want)
    assert codec.layout.total == sum(-(-s.numel * 5 // 100) for s in SPECS) * 8


def test_topk_values_in_bfloat16_are_the_rounded_values() -> None:
    codec = codec_for("topk:0.1,bfloat16", SPECS)
    tensors = _tensors(4)
    got = decode_dense(codec, codec.encode(tensors))
    full = decode_dense(codec_for("topk:0.1", SPECS), codec_for("topk:0.1", SPECS).encode(tensors))
    rounded = torch.from_numpy(full.astype(np.float32)).to(torch.bfloat16).to(torch.float64)
    np.testing.assert_array_equal(got, rounded.numpy())
    assert codec.layout.total == sum(-(-s.numel // 10) for s in SPECS) * 6


def test_powersgd_sends_factors_of_matrices_and_small_tensors_whole() -> None:
    codec = codec_for("powersgd:3", SPECS)
    tensors = _tensors(5)
    views = codec.encode(tensors, torch.Generator().manual_seed(0))
    assert [v.size for v in views] == [(40 + 30) * 3 * 4, 4, 0, 517 * 4]
    w = np.frombuffer(views[0].tobytes(), np.float32)
    p, q = w[: 40 * 3].reshape(40, 3), w[40 * 3 :].reshape(30, 3)
    np.testing.assert_allclose(p.T @ p, np.eye(3), atol=1e-5)  # P is orthonormal
    got = decode_dense(codec, views)
    np.testing.assert_array_equal(got[:1200], (p @ q.T).reshape(-1))
    np.testing.assert_array_equal(got[1200:], _flat(tensors)[1200:])
    # A rank-3 matrix is recovered (to rounding) once Q is warm.
    low = torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 30, dtype=torch.float64)
    exact = [low.float(), *tensors[1:]]
    codec.encode(exact, torch.Generator().manual_seed(0))
    again = decode_dense(codec, codec.encode(exact))
    np.testing.assert_allclose(again[:1200], low.reshape(-1).numpy(), rtol=1e-4, atol=1e-4)


def _dyadic(seed: int) -> list[torch.Tensor]:
    """Updates whose sums in float32 are exact: integers / 64 of modest size."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(-512, 512, s.shape, generator=gen).float() / 64 for s in SPECS]


@pytest.mark.parametrize("name", ["topk:0.01", "topk:0.2", "int8:16"])
def test_error_feedback_sends_exactly_the_total_update(name: str) -> None:
    """Sent values over rounds plus the final residual equal the raw updates' sum."""
    codec = codec_for(name, SPECS)
    feedback = ErrorFeedback(codec, enabled=True)
    total, sent = np.zeros(NUMEL), np.zeros(NUMEL)
    for r in range(12):
        update = _dyadic(r)
        total += _flat(update)
        sent += decode_dense(codec, feedback.encode(r, update, None))
    assert feedback.residual is not None
    left = _flat(feedback.residual)
    if name.startswith("topk"):
        np.testing.assert_array_equal(sent + left, total)  # disjoint supports: exact
    else:
        np.testing.assert_allclose(sent + left, total, rtol=0, atol=1e-5)
    assert np.abs(left).max() > 0, "some of the update is still to be sent"


def test_without_feedback_the_rest_is_dropped() -> None:
    codec = codec_for("topk:0.01", SPECS)
    feedback = ErrorFeedback(codec, enabled=False)
    update = _dyadic(0)
    views = feedback.encode(0, update, None)
    assert feedback.residual is None
    np.testing.assert_array_equal(
        decode_dense(codec, views), decode_dense(codec, codec.encode(update))
    )


@pytest.mark.parametrize("name", ["topk:0.05", "powersgd:2"])
def test_a_recomputed_round_sends_the_same_payload(name: str) -> None:
    codec = codec_for(name, SPECS)
    feedback = ErrorFeedback(codec, enabled=True)
    gen = lambda r: torch.Generator().manual_seed(100 + r)  # noqa: E731
    first = [feedback.encode(r, _tensors(r), gen(r)) for r in range(3)]
    redo = feedback.encode(2, _tensors(2), gen(2))  # round 2 again: lost reply, restart
    assert all(np.array_equal(a, b) for a, b in zip(first[2], redo, strict=True))
    nxt = feedback.encode(3, _tensors(3), gen(3))
    fresh = ErrorFeedback(codec_for(name, SPECS), enabled=True)
    want = [fresh.encode(r, _tensors(r), gen(r)) for r in range(4)][3]
    assert all(np.array_equal(a, b) for a, b in zip(nxt, want, strict=True))


@pytest.mark.parametrize("name", ["topk:0.05", "powersgd:2"])
def test_the_state_dir_carries_feedback_across_a_restart(name: str, tmp_path: Path) -> None:
    gen = lambda r: torch.Generator().manual_seed(100 + r)  # noqa: E731
    straight = ErrorFeedback(codec_for(name, SPECS), enabled=True)
    want = [straight.encode(r, _tensors(r), gen(r)) for r in range(5)]
    before = ErrorFeedback(codec_for(name, SPECS), True, str(tmp_path), "n1")
    for r in range(3):
        before.encode(r, _tensors(r), gen(r))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "n1.feedback-r1.npz",
        "n1.feedback-r2.npz",
    ]
    after = ErrorFeedback(codec_for(name, SPECS), True, str(tmp_path), "n1")  # a new process
    got = [after.encode(r, _tensors(r), gen(r)) for r in (3, 4)]
    for a, b in zip(got, want[3:], strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    other = ErrorFeedback(codec_for("topk:0.5", SPECS), True, str(tmp_path), "n1")
    assert other.states == [], "a state written for another codec is not resumed"


def _reduce(name: str, uploads: list[StagedUpload], accumulate: str = "float64") -> np.ndarray:
    reducer = make_reducer(name, Layout(SPECS), accumulate, workers=2)
    for i, upload in enumerate(uploads):
        reducer.add(upload, 1, key=f"n{i}")
    outs = [torch.empty(s.shape, dtype=torch.float64) for s in SPECS]
    reducer.result_into(outs, range(len(SPECS)))
    return _flat(outs)


@pytest.mark.parametrize("accumulate", ["float64", "float32", "reproducible"])
def test_a_sparse_first_upload_zeroes_the_rest_of_the_sum(accumulate: str) -> None:
    topk, ident = codec_for("topk:0.1", SPECS), codec_for("identity", SPECS)
    a, b = _tensors(6), _tensors(7)
    sparse = decode_dense(topk, topk.encode(a))
    for order in ([0, 1], [1, 0]):
        uploads = [_staged(topk, topk.encode(a)), _staged(ident, ident.encode(b))]
        got = _reduce("mean", [uploads[i] for i in order], accumulate)
        np.testing.assert_allclose(got, (sparse + _flat(b)) / 2, rtol=1e-6, atol=1e-7)
    # Two rounds: the second starts from zero again, not from the first round's sum.
    only = _reduce("sum", [_staged(topk, topk.encode(a))], accumulate)
    np.testing.assert_allclose(only, sparse, rtol=1e-6, atol=1e-7)


def test_robust_rules_read_sparse_and_factored_uploads() -> None:
    codecs = [codec_for(n, SPECS) for n in ("topk:0.2", "powersgd:2", "int8", "identity")]
    tensors = [_tensors(10 + i) for i in range(len(codecs))]
    views = [
        c.encode(t, torch.Generator().manual_seed(0)) for c, t in zip(codecs, tensors, strict=True)
    ]
    uploads = [_staged(c, v) for c, v in zip(codecs, views, strict=True)]
    dense = [decode_dense(c, v) for c, v in zip(codecs, views, strict=True)]
    got = _reduce("median", uploads)
    np.testing.assert_allclose(got, np.median(np.stack(dense), axis=0), rtol=1e-6, atol=1e-7)


HALF = [TensorSpec("h", torch.float16, (6,))]


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("float32", "beyond the range of the tensor's dtype float16"),
        ("topk:0.5,float32", "beyond the range of the tensor's dtype float16"),
        ("powersgd:1,float32", "beyond the range of the tensor's dtype float16"),
        ("int8:3", "128 x scale must be at most 65504"),
    ],
)
def test_values_finite_on_the_wire_but_not_in_the_tensor_are_refused(name: str, words: str) -> None:
    """A float16 tensor cannot hold 1e30 even if float32 (or an int8 scale) can carry it."""
    codec = codec_for(name, HALF)
    huge = [torch.full((6,), 1e30, dtype=torch.float32)]
    views = codec.encode(huge, torch.Generator().manual_seed(0))
    with pytest.raises(InvalidArgument, match=words):
        _staged(codec, views)
    fine = codec.encode([torch.full((6,), 1e3)], torch.Generator().manual_seed(0))
    assert _staged(codec, fine).nbytes == codec.layout.total
