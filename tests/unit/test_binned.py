"""BinnedSum: bitwise the same for every arrival order, and close to the exact sum.

References are exact: ``fractions.Fraction`` sums of the products ``weight * value``.
Bitwise comparisons use ``tobytes()`` of the float64 results.
"""

from __future__ import annotations

import itertools
import math
import threading
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgrad.server.binned import BINS, MAX_ADDS, WINDOW_BITS, BinnedSum

MAX_WEIGHT = (1 << 29) - 1
Upload = tuple[np.ndarray, int]


def _bfloat16(values: np.ndarray) -> np.ndarray:
    """Return float32 values truncated to what bfloat16 can carry."""
    bits = values.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


def _adversarial(dtype: str, numel: int = 96) -> list[Upload]:
    """Return 4 uploads of mixed magnitudes, exact cancellations, tiny and huge values."""
    rng = np.random.default_rng(7)
    wire = np.float32 if dtype == "bfloat16" else np.dtype(dtype).type
    info = np.finfo(wire)
    low, high = math.log10(float(info.smallest_normal)), math.log10(float(info.max)) - 1
    exponents = rng.uniform(max(low, -30.0), min(high, 30.0), size=(4, numel))
    values = rng.choice([-1.0, 1.0], size=(4, numel)) * 10.0**exponents
    values[1, ::3] = -values[0, ::3]  # x and -x in different uploads
    values[2, ::5], values[3, ::5] = float(info.max) / 2, -float(info.max) / 2
    values[3, 1::7] = float(info.smallest_subnormal)
    values[2, 2::11] = 0.0
    values = values.astype(wire)
    if dtype == "bfloat16":
        values = _bfloat16(values)
    weights = [1, 1797, MAX_WEIGHT, 3]
    return [(values[u], weights[u]) for u in range(4)]


def _result(total: BinnedSum, divisor: float = 1.0) -> np.ndarray:
    out = np.empty(total.numel)
    total.result_into(0, out, divisor)
    return out


def _sum_in_order(uploads: list[Upload], order: list[tuple[int, int, int]]) -> bytes:
    """Add (upload, start, stop) pieces in the given order; return the result's bytes."""
    total = BinnedSum(uploads[0][0].size)
    for u, start, stop in order:
        values, weight = uploads[u]
        total.add(start, values[start:stop], weight)
    return _result(total).tobytes()


def _whole(uploads: list[Upload], order: tuple[int, ...]) -> list[tuple[int, int, int]]:
    return [(u, 0, uploads[u][0].size) for u in order]


def _chunked(uploads: list[Upload], sizes: list[int]) -> list[tuple[int, int, int]]:
    numel = uploads[0][0].size
    return [
        (u, start, min(start + size, numel))
        for u, size in enumerate(sizes)
        for start in range(0, numel, size)
    ]


def _exact(uploads: list[Upload], i: int) -> tuple[Fraction, Fraction]:
    """Return the exact sum and the largest |product| of element ``i``."""
    products = [Fraction(float(values[i])) * weight for values, weight in uploads]
    return sum(products, Fraction(0)), max((abs(p) for p in products), default=Fraction(0))


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_every_upload_order_gives_the_same_bits(dtype: str) -> None:
    uploads = _adversarial(dtype)
    results = {_sum_in_order(uploads, _whole(uploads, p)) for p in itertools.permutations(range(4))}
    assert len(results) == 1


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_interleaved_chunks_give_the_same_bits_as_whole_uploads(dtype: str) -> None:
    uploads = _adversarial(dtype)
    expected = _sum_in_order(uploads, _whole(uploads, (0, 1, 2, 3)))
    rng = np.random.default_rng(11)
    pieces = _chunked(uploads, [7, 13, 96, 5])  # chunk edges differ between uploads
    for _ in range(12):
        order = [pieces[i] for i in rng.permutation(len(pieces))]
        assert _sum_in_order(uploads, order) == expected


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_adversarial_sums_are_close_to_exact(dtype: str) -> None:
    uploads = _adversarial(dtype)
    divisor = sum(weight for _, weight in uploads)  # the mean stays finite, the sum may not
    out = _result(_filled(uploads), float(divisor))
    for i in range(out.size):
        exact, largest = _exact(uploads, i)
        # Bins keep 79 bits below the largest product; float64 products round (2**-53 each),
        # reading and dividing round twice more.
        slack = 4 * largest * Fraction(2) ** (-53 if dtype == "float64" else -80)
        bound = slack / divisor + abs(exact / divisor) * Fraction(2) ** -51
        assert abs(Fraction(float(out[i])) - exact / divisor) <= bound


def _filled(uploads: list[Upload]) -> BinnedSum:
    total = BinnedSum(uploads[0][0].size)
    for values, weight in uploads:
        total.add(0, values, weight)
    return total


def _float_arrays(width: int, numel: int) -> st.SearchStrategy[np.ndarray]:
    dtype = {16: np.float16, 32: np.float32, 64: np.float64}[width]
    element = st.floats(width=width, allow_nan=False, allow_infinity=False)
    return st.lists(element, min_size=numel, max_size=numel).map(lambda v: np.array(v, dtype))


@st.composite
def _uploads(draw: st.DrawFn, width: int) -> list[Upload]:
    numel = draw(st.integers(1, 6))
    count = draw(st.integers(1, 5))
    weights = st.integers(1, MAX_WEIGHT)
    return [(draw(_float_arrays(width, numel)), draw(weights)) for _ in range(count)]


@pytest.mark.parametrize("width", [16, 32, 64])
@settings(derandomize=True, max_examples=150, deadline=None)
@given(data=st.data())
def test_random_sums_are_order_free_and_within_the_bound(width: int, data: st.DataObject) -> None:
    uploads = data.draw(_uploads(width))
    order = data.draw(st.permutations(range(len(uploads))))
    divisor = float(sum(weight for _, weight in uploads))  # the mean of finite values is finite
    forward = _filled(uploads)
    assert _sum_in_order(uploads, _whole(uploads, tuple(order))) == _result(forward).tobytes()
    out = _result(forward, divisor)
    # Each product is cut 2**-80 below the largest, or at half the lowest unit 2**-1040;
    # float64 products also round to 53 bits (float32/16 ones are exact: 24 + 29 <= 53).
    for i in range(out.size):
        exact, largest = _exact(uploads, i)
        mean = exact / Fraction(divisor)
        per_product = max(largest * Fraction(2) ** -80, Fraction(2) ** -1041)
        per_product += largest * Fraction(2) ** -53 if width == 64 else 0
        bound = len(uploads) * per_product / Fraction(divisor)
        bound += abs(mean) * Fraction(2) ** -51 + Fraction(2) ** -1074  # reading, dividing
        assert abs(Fraction(float(out[i])) - mean) <= bound


def test_float32_sums_of_moderate_range_are_correctly_rounded() -> None:
    # The products have 24 + 14 bits, so within 2**41 of the largest they are multiples of
    # the lowest unit (<= 2**-79 of it): the bins are exact and the read is correctly rounded
    # unless within 2**-52 ulp of a midpoint. Spread 2**39.8 (weights 2**3.8, values 2**2,
    # scales 2**34): sums of up to ~78 bits, which need the careful read.
    rng = np.random.default_rng(3)
    numel = 2000
    scales = 2.0 ** (rng.integers(-60, 60, size=numel) + rng.integers(0, 35, size=(5, numel)))
    signs = rng.choice([-1.0, 1.0], size=(5, numel))
    values = (rng.uniform(0.25, 1.0, size=(5, numel)) * signs * scales).astype(np.float32)
    uploads = list(zip(values, (1797, 1000, 911, 3000, 12345), strict=True))
    out = _result(_filled(uploads))
    for i in range(numel):
        exact, _ = _exact(uploads, i)
        nearest = float(exact)  # Fraction -> float rounds correctly
        if float(out[i]) != nearest:
            midpoint = (Fraction(float(out[i])) + Fraction(nearest)) / 2
            assert abs(exact - midpoint) <= Fraction(math.ulp(nearest)) * Fraction(2) ** -52


def test_raising_the_boundary_mid_stream_gives_the_same_bits() -> None:
    # One element per shift distance: 0, 1, 2 and 5 windows above the first value.
    small = np.array([1.0, 1.0, 1.0, 1.0, 3.0e-300], np.float64)
    huge = np.array([3.0, 2.0**45, 2.0**85, 2.0**200, 1.0e300], np.float64)
    middle = np.array([-1.5, 2.0**-30, -(2.0**44), 7.0, -1.0], np.float64)
    uploads = [(small, 5), (middle, 3), (huge, 1)]
    results = {_sum_in_order(uploads, _whole(uploads, p)) for p in itertools.permutations(range(3))}
    assert len(results) == 1
    out = np.frombuffer(results.pop())
    for i in range(out.size):
        exact, largest = _exact(uploads, i)
        bound = 3 * largest * Fraction(2) ** -80 + abs(exact) * Fraction(2) ** -52
        assert abs(Fraction(float(out[i])) - exact) <= bound


def test_raises_of_any_share_of_a_chunk_give_the_same_bits() -> None:
    # Orders where every element raises, a few do, or a quotient overflows (zeros first,
    # then 3e30 at the lowest boundary); two inner steps of 65536 elements.
    rng = np.random.default_rng(5)
    numel = 70_000
    base = rng.standard_normal(numel).astype(np.float32) * np.float32(1e-3)
    spikes = base.copy()
    spikes[rng.integers(0, numel, 40)] = np.float32(3e30)
    spikes[::1000] = np.float32(3e30)  # where holes left B at its lowest: s overflows
    holes = base.copy()
    holes[::1000] = 0.0
    uploads = [(holes, 1797), (base * np.float32(1e20), 3), (spikes, 911), (base, MAX_WEIGHT)]
    results = {_sum_in_order(uploads, _whole(uploads, p)) for p in itertools.permutations(range(4))}
    assert len(results) == 1


def test_extremes_zeros_subnormals_and_negative_zero() -> None:
    values = [
        np.array([1e300, -0.0, 5e-324, 0.0, 1e308, -1e308], np.float64),
        np.array([1e300, -0.0, 5e-324, 0.0, 1e308, 1e308], np.float64),
    ]
    uploads = [(values[0], MAX_WEIGHT), (values[1], MAX_WEIGHT)]
    forward = _sum_in_order(uploads, _whole(uploads, (0, 1)))
    assert _sum_in_order(uploads, _whole(uploads, (1, 0))) == forward
    total = _filled(uploads)
    # The sum leaves float64's range, the mean does not: dividing first keeps it finite.
    mean = _result(total, 2.0 * MAX_WEIGHT)
    assert mean[0] == pytest.approx(1e300, rel=2**-50)
    assert mean[4] == pytest.approx(1e308, rel=2**-50)
    assert mean[[1, 3, 5]].tolist() == [0.0, 0.0, 0.0]
    assert not np.signbit(mean[1])  # -0.0 deposits nothing: the empty sum is +0.0
    assert mean[2] == 0.0  # 5e-324 * w lies below half the lowest unit 2**-1040
    with np.errstate(all="raise"):  # the overflow to inf is the IEEE answer, not a warning
        summed = _result(total)
    assert summed[4] == np.inf


def test_subnormal_and_extreme_float32_float16_values_are_exact() -> None:
    tiny32 = np.finfo(np.float32).smallest_subnormal
    tiny16 = np.finfo(np.float16).smallest_subnormal
    uploads = [
        (np.array([tiny32, tiny32, 0.0, 0.0], np.float32), MAX_WEIGHT),
        (np.array([tiny32, 0.0, 0.0, 3.0e38], np.float32), 1),
        (np.array([0.0, 0.0, 65504.0, tiny16], np.float16), MAX_WEIGHT),
        (np.array([0.0, tiny16, -65504.0, 0.0], np.float16), 3),
    ]
    out = _result(_filled(uploads))
    assert [Fraction(float(o)) for o in out] == [
        Fraction(float(_exact(uploads, i)[0])) for i in range(4)
    ]
    assert out[0] == float(tiny32) * (MAX_WEIGHT + 1)


def test_capacity_is_refused_past_the_bound_and_nothing_is_added() -> None:
    total = BinnedSum(8, max_adds=3)
    ones = np.ones(4, np.float32)
    for _ in range(3):
        total.add(0, ones, 1)
    total.add(4, ones, 1)
    before = _result(total).tobytes()
    with pytest.raises(ValueError, match="already took 3 adds"):
        total.add(2, ones, 1)
    assert _result(total).tobytes() == before
    total.add(4, ones, 1)  # elements 4..7 had one add each, two more are allowed
    total.reset()
    for _ in range(3):
        total.add(0, ones, 1)
    with pytest.raises(ValueError):
        BinnedSum(8, max_adds=MAX_ADDS + 1)


def test_concurrent_adds_on_disjoint_ranges_match_serial() -> None:
    rng = np.random.default_rng(9)
    numel, chunk = 300_000, 8192
    uploads = [
        ((rng.standard_normal(numel) * 10.0 ** rng.integers(-20, 20, numel)).astype(np.float32), w)
        for w in (1797, 3, MAX_WEIGHT)
    ]
    serial = _sum_in_order(uploads, _chunked(uploads, [chunk] * 3))
    total = BinnedSum(numel)
    starts = list(range(0, numel, chunk))

    def work(part: list[int]) -> None:
        for values, weight in uploads:
            for start in part:
                total.add(start, values[start : start + chunk], weight)

    threads = [threading.Thread(target=work, args=(starts[i::2],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _result(total).tobytes() == serial


def test_reset_forgets_and_the_next_adds_match_a_new_sum() -> None:
    uploads = _adversarial("float32")
    total = _filled(uploads)
    total.reset()
    assert not _result(total).any()
    pieces = _chunked(uploads, [10, 33, 7, 96])
    for u, start, stop in pieces[::-1]:
        total.add(start, uploads[u][0][start:stop], uploads[u][1])
    assert _result(total).tobytes() == _sum_in_order(uploads, pieces)


def test_result_into_ranges_float32_and_divisor() -> None:
    uploads = _adversarial("float32")
    total = _filled(uploads)
    full = _result(total, 7.0)
    part = np.empty(50)
    total.result_into(20, part, 7.0)
    assert part.tobytes() == full[20:70].tobytes()
    narrow = np.empty(total.numel, np.float32)
    with np.errstate(over="ignore"):  # the reference cast overflows where the sum does
        expected = full.astype(np.float32)
    total.result_into(0, narrow, 7.0)
    assert narrow.tobytes() == expected.tobytes()
    untouched = BinnedSum(10)
    untouched.add(2, np.ones(3), 1)
    assert _result(untouched).tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]


def test_memory_is_k_bins_and_an_index_per_element() -> None:
    assert BinnedSum(1000).nbytes == 1000 * (BINS * 8 + 2)
    assert (WINDOW_BITS, BINS) == (40, 3)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda s: s.add(0, np.ones(3, np.int32), 1), TypeError),
        (lambda s: s.add(0, np.ones((2, 2)), 1), TypeError),
        (lambda s: s.add(0, np.ones(3), True), TypeError),
        (lambda s: s.add(0, np.ones(3), 1.0), TypeError),
        (lambda s: s.add(0, np.ones(3), 0), ValueError),
        (lambda s: s.add(0, np.ones(3), 1 << 29), ValueError),
        (lambda s: s.add(8, np.ones(3), 1), ValueError),
        (lambda s: s.add(-1, np.ones(3), 1), ValueError),
        (lambda s: s.add(0, np.array([1.0, np.nan]), 1), ValueError),
        (lambda s: s.add(0, np.array([np.inf], np.float32), 1), ValueError),
        (lambda s: s.result_into(0, np.empty(3, np.float16)), TypeError),
        (lambda s: s.result_into(9, np.empty(3)), ValueError),
        (lambda s: s.result_into(0, np.empty(3), 0.0), ValueError),
    ],
)
def test_bad_arguments_are_refused_and_nothing_is_added(call, error) -> None:
    total = BinnedSum(10)
    total.add(0, np.arange(10.0), 2)
    before = _result(total).tobytes()
    with pytest.raises(error):
        call(total)
    assert _result(total).tobytes() == before


def test_a_top_bin_beyond_53_bits_still_reads_correctly_rounded() -> None:
    # 43690 adds of 3 * 2**37 plus 2**38 and 2.25 leave 2**54 + 2 in the top bin and 2**38
    # (0.25) below: the value 2**54 + 2.25 rounds to 2**54 + 4, not to float(2**54 + 2).
    total = BinnedSum(1)
    big = np.array([3.0 * 2.0**37], np.float32)
    for _ in range(43690):
        total.add(0, big, 1)
    total.add(0, np.array([2.0**38], np.float32), 1)
    total.add(0, np.array([2.25], np.float32), 1)
    assert _result(total).tolist() == [2.0**54 + 4]


def test_a_tiny_divisor_does_not_overflow_a_finite_quotient() -> None:
    total = BinnedSum(3)
    total.add(0, np.array([1e-290, 3.0, 1e300]), 1)
    out = np.empty(3)
    with np.errstate(all="raise"):
        total.result_into(0, out, 2.0**-1000)
    assert out.tolist() == [math.ldexp(1e-290, 1000), math.ldexp(3.0, 1000), np.inf]


def test_the_public_names_are_what_all_declares() -> None:
    import fedgrad.server.binned as binned

    assert set(binned.__all__) == {
        "BINS",
        "MAX_ADDS",
        "SCRATCH_ELEMENTS",
        "WINDOW_BITS",
        "BinnedSum",
    }
    assert all(hasattr(binned, name) for name in binned.__all__)


@settings(derandomize=True, max_examples=400, deadline=None)
@given(st.lists(st.integers(-(2**62), 2**62), min_size=BINS, max_size=BINS))
def test_any_bins_read_as_their_exact_value_correctly_rounded(bins: list[int]) -> None:
    # White-box: the read of bins the public API rarely builds (2**14+ adds, cancellations).
    import fedgrad.server.binned as binned

    digits = [np.empty(1, np.int64) for _ in range(BINS)]
    binned._carry([np.array([b], np.int64) for b in bins], digits, np.empty(1, np.int64))
    unit = Fraction(2) ** -WINDOW_BITS
    exact = sum(Fraction(b) * unit**k for k, b in enumerate(bins))
    assert sum(Fraction(int(d[0])) * unit**k for k, d in enumerate(digits)) == exact
    assert all(0 <= int(d[0]) < 2**WINDOW_BITS for d in digits[1:])
    read = float(binned._round_digits(digits, binned._Scratch(), 1)[0])
    nearest = float(exact)
    if read != nearest:
        midpoint = (Fraction(read) + Fraction(nearest)) / 2
        assert abs(exact - midpoint) <= Fraction(math.ulp(nearest)) * Fraction(2) ** -52
