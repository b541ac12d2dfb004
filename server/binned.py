"""Order-independent (bitwise reproducible) summation of weighted uploads, without torch.

Guarantee: for a given multiset of adds ``weight * values`` per element, the bins end
the same, so ``result_into`` writes the same bits, whatever the arrival order, however
chunks of different uploads interleave, however disjoint ranges are split between
threads. Binned summation after ReproBLAS (J. Demmel, H. D. Nguyen, "Parallel
Reproducible Summation", IEEE Trans. Computers 64(7), 2015; bebop.cs.berkeley.edu/
reproblas), written from the argument below. Per element:

1. Grid: a top boundary ``B`` (a multiple of ``W = 40``) and ``K = 3`` int64 bins, bin
   ``k`` counting units ``u_k = 2**(B - (k+1)*W)``. Each deposit ``x`` has
   ``|x| < 2**(B-1)`` ("admissible"), i.e. ``|s| < 2**(W-1)`` for ``s = x / u_0``.
2. Canonical digits: bin by bin, digit ``q = round-half-even(s)``, remainder
   ``(s - q)`` to the next window. Above an admissible ``B`` every digit is 0 and the
   remainder stays ``x``, so ``x``'s digit in a window is a function of ``x`` and the
   window only, whichever admissible ``B`` it met; integer sums of digits commute.
3. Exact steps: scaling by a power of two (normal range); rounding by adding
   ``1.5 * 2**(52 - k*W)``, whose binade has ulp ``u_k / u_0`` and whose sum's low bits
   are the digit; the remainder subtraction (a rounding error is representable). An
   underflowing ``s`` (< 2**-1022) has digit 0 in all windows (``|x| < 2**-942 u_2``).
   The remainder below bin ``K-1`` is dropped: a function of ``x`` alone.
4. Raises: ``B`` grows only, to ``top(x)``, the smallest admissible boundary, read off
   the exact exponent of ``x`` (from the product, the quotient or ``frexp``: one
   function). Bins shift down; the windows falling off are those the final ``B``
   never holds. So the final ``B`` is ``max(B_MIN, max top(x))`` and each final bin is
   the sum of the digits of every ``x`` in that window: order independent.
5. Products: ``x = weight * value`` rounded to 53 bits with an unbounded exponent
   (scaled before multiplying, so ``1e300 * (2**29 - 1)`` fits): exact for float32/16
   values (24 + 29 <= 53 bits), rounded once and alike in every order for float64.
6. Reading carries the bins into digits (the lower ones in ``[0, 2**W)``), rounds
   their sum (correctly, unless within 2**-52 ulp of a midpoint), divides, scales by
   ``u_0``: a fixed function of the canonical bins.

Capacity: digits are at most ``2**(W-1)``, so int64 bins take ``MAX_ADDS = 2**23``
deposits (exactly ``2**24 - 1``); adds are counted per element range, the next refused
with ValueError. Precision: at least ``(K-1)*W - 1 = 79`` bits below the largest
``|x|`` per element (float64 has 53): ``n`` deposits err by at most
``n * max(2**-80 * max|x|, 2**-1041)``, as ``B_MIN = -920`` keeps ``u_2 = 2**-1040`` a
float64 and smaller values round at that unit. Zeros (and -0.0) deposit nothing.

Memory: ``K*8 + 2 = 26`` bytes per element (int64 bins, an int16 ``B``) plus
``SCRATCH_ELEMENTS`` elements of buffers per calling thread. ``reset`` only forgets the
per-range counts; the first add to an element after it overwrites instead of adding.
"""

from __future__ import annotations

import bisect
import math
import operator
import threading

import numpy as np

__all__ = ["BINS", "MAX_ADDS", "SCRATCH_ELEMENTS", "WINDOW_BITS", "BinnedSum"]

WINDOW_BITS = 40
BINS = 3
#: Deposits per element before the int64 bins could overflow (2**23 * 2**39 = 2**62).
MAX_ADDS = 1 << 23
#: Elements per inner step: fastest of 2**14..2**18 measured (call overhead vs cache misses).
SCRATCH_ELEMENTS = 1 << 16

_W, _K = WINDOW_BITS, BINS
_MASK = (1 << _W) - 1
# A quotient x / u_0 is admissible while its magnitude stays below 2**(W-1).
_LIMIT = float(1 << (_W - 1))
# The smallest multiple of W whose lowest unit 2**(B - K*W) is still >= 2**-1074.
_B_MIN = -((1074 - _K * _W) // _W) * _W
_MAGIC = [1.5 * 2.0 ** (52 - k * _W) for k in range(_K)]
_MAGIC_BITS = [int(np.float64(m).view(np.int64)) for m in _MAGIC]
_OVERFLOWED = np.iinfo(np.int16).max
_WIDENED = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16))


def _window_top(needed: np.ndarray, floor: int = _B_MIN) -> np.ndarray:
    """Return the smallest multiple of W that is >= ``needed``, at least ``floor``."""
    return np.maximum(-(-needed // _W) * _W, floor)


def _exponent_table(offset: int, floor: int) -> np.ndarray:
    """Map a float64's biased exponent E to ``_window_top(E + offset, floor)``; inf flagged."""
    table = _window_top(np.arange(2048) + offset, floor).astype(np.int16)
    table[2047] = _OVERFLOWED
    return table


# A float64 x with biased exponent E has |x| < 2**(E - 1022): admissible from B = E - 1021.
_TOP_BY_EXPONENT = _exponent_table(-1021, _B_MIN)
# A quotient s = x / u_0 with exponent E needs B raised by E - 1061 rounded up to a
# multiple of W (no rise while |s| < 2**39); it is the same function of x as above.
_RISE_BY_EXPONENT = _exponent_table(-1021 - _W, 0)


def _needed_tops(
    values: np.ndarray, weight: int, product: np.ndarray, exponents: np.ndarray, out: np.ndarray
) -> None:
    """Write the smallest admissible boundary of each ``weight * value`` into ``out``."""
    # Overflow here is the expected inf of a float64 value times a weight; it is redone below.
    with np.errstate(over="ignore"):
        np.multiply(values, weight, out=product, dtype=np.float64)
    np.right_shift(product.view(np.int64), 52, out=exponents)
    np.bitwise_and(exponents, 0x7FF, out=exponents)
    np.take(_TOP_BY_EXPONENT, exponents, out=out, mode="clip")
    if out.max() == _OVERFLOWED:
        # |x| in [2**(e-1), 2**e) with e = ev + ep: the same function as the table's, unbounded.
        where = np.flatnonzero(out == _OVERFLOWED)
        mantissa, ev = np.frexp(values[where].astype(np.float64))
        _, ep = np.frexp(np.abs(mantissa) * weight)
        out[where] = _window_top(ev.astype(np.int64) + ep + 1)


def _quotients(
    values: np.ndarray, weight: int, top: np.ndarray, e: np.ndarray, s: np.ndarray
) -> None:
    """Write ``s = weight * values / u_0``, scaling first so that no product overflows."""
    np.subtract(_W, top, out=e)
    # Overflow is an inadmissible quotient (inf), caught by the caller's range check.
    with np.errstate(over="ignore"):
        np.ldexp(values, e, out=s, dtype=np.float64)
        np.multiply(s, weight, out=s)


def _shift_bins(bins: list[np.ndarray], diff: np.ndarray, scratch: _Scratch) -> None:
    """Move each element's bins down by ``diff / W`` positions, zeros entering at the top."""
    n = diff.size
    mask, spare = scratch.ints[0, :n], scratch.ints[1, :n]
    # One window per pass (a rise is nearly always one window), each move an all-ones-mask
    # blend: masked copyto measured ~10x slower, and a chunk with one rise usually has many.
    for step in range(1, min(int(diff.max()) // _W, _K) + 1):
        np.greater_equal(diff, step * _W, out=scratch.hit[:n])
        np.subtract(0, scratch.hit[:n], out=mask, dtype=np.int64)
        for k in range(_K - 1, 0, -1):
            np.bitwise_xor(bins[k], bins[k - 1], out=spare)
            np.bitwise_and(spare, mask, out=spare)
            np.bitwise_xor(bins[k], spare, out=bins[k])
        np.bitwise_and(bins[0], mask, out=spare)
        np.bitwise_xor(bins[0], spare, out=bins[0])


def _rise(
    values: np.ndarray,
    weight: int,
    s: np.ndarray,
    top: np.ndarray,
    bins: list[np.ndarray],
    scratch: _Scratch,
) -> None:
    """Raise each ``top`` to its value's boundary where ``s`` is inadmissible; redo ``s``."""
    n = values.size
    diff, exponents = scratch.diff[:n], scratch.ints[0, :n]
    np.right_shift(s.view(np.int64), 52, out=exponents)
    np.bitwise_and(exponents, 0x7FF, out=exponents)
    np.take(_RISE_BY_EXPONENT, exponents, out=diff, mode="clip")
    if diff.max() == _OVERFLOWED:
        where = np.flatnonzero(diff == _OVERFLOWED)
        need = np.empty(where.size, np.int16)
        _needed_tops(values[where], weight, np.empty(where.size), np.empty_like(where), need)
        diff[where] = need - top[where]
    np.add(top, diff, out=top)
    _shift_bins(bins, diff, scratch)
    _quotients(values, weight, top, scratch.e[:n], s)


class _Scratch:
    """One thread's buffers for an inner step."""

    def __init__(self) -> None:
        n = SCRATCH_ELEMENTS
        self.s, self.t, self.r = (np.empty(n) for _ in range(3))
        self.ints = np.empty((5, n), np.int64)
        self.e = np.empty(n, np.int32)
        self.diff = np.empty(n, np.int16)
        self.hit = np.empty(n, np.bool_)


def _carry(bins: list[np.ndarray], digits: list[np.ndarray], carry: np.ndarray) -> None:
    """Write the bins' value as ``digits``: the lower ones in [0, 2**W), the top one signed."""
    np.right_shift(bins[-1], _W, out=carry)
    np.bitwise_and(bins[-1], _MASK, out=digits[-1])
    for k in range(_K - 2, -1, -1):
        np.add(bins[k], carry, out=digits[k])
        if k:
            np.right_shift(digits[k], _W, out=carry)
            np.bitwise_and(digits[k], _MASK, out=digits[k])


def _round_digits(digits: list[np.ndarray], scratch: _Scratch, n: int) -> np.ndarray:
    """Return d0 + d1 * 2**-W + d2 * 2**-2W rounded to float64 (in units of u_0).

    Correctly rounded unless the exact value lies within 2**-52 ulp of a midpoint: the
    one inner rounding, of (lo + d2 * 2**-2W), errs by at most 2**-53 * ulp(hi), and
    only when |hi| >= 2**13 (below, d0 + d1 * 2**-W fits 53 bits and lo is 0).
    """
    d0, d1, d2 = digits
    hi, low, mid, rest = scratch.s[:n], scratch.t[:n], scratch.r[:n], scratch.ints[4, :n]
    np.copyto(hi, d0, casting="unsafe")
    np.multiply(d1, 2.0**-_W, out=mid)
    if not -(2**53) < d0.min() <= d0.max() < 2**53:
        # Beyond 53 bits (2**14 adds or more), d0's rounding error is a small exact integer.
        np.copyto(rest, hi, casting="unsafe")
        np.subtract(d0, rest, out=rest)
        np.add(mid, rest, out=mid)
    # Fast2Sum (|hi| >= |mid| unless hi == 0): hi + mid == low + lo exactly, lo -> mid.
    np.add(hi, mid, out=low)
    np.subtract(low, hi, out=hi)
    np.subtract(mid, hi, out=mid)
    np.multiply(d2, 2.0 ** (-2 * _W), out=hi)
    np.add(mid, hi, out=mid)
    np.add(low, mid, out=low)
    return low


class _Coverage:
    """Count the adds over each element since the last reset, as runs of equal count."""

    def __init__(self, numel: int, limit: int) -> None:
        self._numel, self._limit = numel, limit
        # Adds on disjoint ranges from several threads may share a run boundary.
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget all adds."""
        with self._lock:
            self._cuts, self._counts = [0, self._numel], [0]

    def claim(self, start: int, stop: int) -> list[tuple[int, int, bool]]:
        """Count one add over [start, stop); return its runs as (start, stop, fresh).

        Raises:
            ValueError: an element already took ``limit`` adds.
        """
        with self._lock:
            i, j = self._split(start), self._split(stop)
            if max(self._counts[i:j]) >= self._limit:
                raise ValueError(
                    f"element range [{start}, {stop}) already took {self._limit} adds;"
                    " reset before adding more (the int64 bins could overflow)"
                )
            runs = [(self._cuts[k], self._cuts[k + 1], self._counts[k] == 0) for k in range(i, j)]
            for k in range(i, j):
                self._counts[k] += 1
        return runs

    def runs(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """Return the runs of [start, stop) as (start, stop, adds)."""
        with self._lock:
            k = bisect.bisect_right(self._cuts, start) - 1
            runs = []
            while self._cuts[k] < stop:
                lo, hi = max(self._cuts[k], start), min(self._cuts[k + 1], stop)
                runs.append((lo, hi, self._counts[k]))
                k += 1
        return runs

    def _split(self, at: int) -> int:
        k = bisect.bisect_left(self._cuts, at)
        if self._cuts[k] != at:
            self._cuts.insert(k, at)
            self._counts.insert(k, self._counts[k - 1])
        return k


class BinnedSum:
    """Order-independent sum of weighted float values per element (K=3 bins of W=40 bits).

    ``add`` may run from several threads at once on disjoint element ranges;
    ``result_into`` and ``reset`` must not overlap an ``add``.
    """

    def __init__(self, numel: int, *, max_adds: int = MAX_ADDS) -> None:
        """Allocate a zero sum over ``numel`` elements.

        Args:
            numel: number of elements.
            max_adds: deposits per element before ``add`` refuses (tests lower it).

        Raises:
            ValueError: ``numel`` is negative or ``max_adds`` is outside [1, MAX_ADDS].
        """
        if numel < 0 or not 1 <= max_adds <= MAX_ADDS:
            raise ValueError(f"need numel >= 0 and 1 <= max_adds <= {MAX_ADDS}")
        self.numel = numel
        self._bins = np.zeros((_K, numel), np.int64)
        self._top = np.full(numel, _B_MIN, np.int16)
        self._coverage = _Coverage(numel, max_adds)
        self._local = threading.local()

    @property
    def nbytes(self) -> int:
        """Bytes held by the bins and boundaries (per-thread scratch not included)."""
        return self._bins.nbytes + self._top.nbytes

    def reset(self) -> None:
        """Make every sum zero again; elements are overwritten when next added to."""
        self._coverage.reset()

    def add(self, first: int, values: np.ndarray, weight: int) -> None:
        """Add ``weight * values`` to elements [first, first + len(values)).

        Args:
            first: index of the first element.
            values: 1-D float64, float32 or float16 finite values.
            weight: integer in [1, 2**29).

        Raises:
            TypeError: ``values`` is not a 1-D float64/32/16 array or ``weight`` not an int.
            ValueError: the range is outside the sum, a value is not finite, the weight is
                out of range, or an element already took ``max_adds`` adds; nothing is added.
        """
        if isinstance(weight, bool) or values.ndim != 1 or values.dtype not in _WIDENED:
            raise TypeError("values must be 1-D float64/float32/float16 and weight an int")
        weight = operator.index(weight)
        stop = first + values.size
        if not (0 <= first <= stop <= self.numel and 1 <= weight < 1 << 29):
            raise ValueError(f"need 0 <= [{first}, {stop}) <= {self.numel}, 1 <= weight < 2**29")
        if values.size == 0:
            return
        if not (np.isfinite(values.min()) and np.isfinite(values.max())):
            raise ValueError(f"non-finite value in elements [{first}, {stop})")
        scratch = self._scratch()
        for lo, hi, fresh in self._coverage.claim(first, stop):
            for i in range(lo, hi, SCRATCH_ELEMENTS):
                j = min(i + SCRATCH_ELEMENTS, hi)
                self._deposit(i, values[i - first : j - first], weight, fresh, scratch)

    def _deposit(
        self, lo: int, values: np.ndarray, weight: int, fresh: bool, scratch: _Scratch
    ) -> None:
        n = values.size
        top, s, t, r = self._top[lo : lo + n], scratch.s[:n], scratch.t[:n], scratch.r[:n]
        if fresh:
            _needed_tops(values, weight, t, r.view(np.int64), top)
        _quotients(values, weight, top, scratch.e[:n], s)
        if not fresh and not (s.max() < _LIMIT and s.min() > -_LIMIT):
            self._raise_tops(lo, values, weight, scratch)
        for k in range(_K):
            np.add(s, _MAGIC[k], out=t)
            if k < _K - 1:
                np.subtract(t, _MAGIC[k], out=r)
                np.subtract(s, r, out=s)
            digits = t.view(np.int64)
            np.subtract(digits, _MAGIC_BITS[k], out=digits)
            bins = self._bins[k, lo : lo + n]
            if fresh:
                np.copyto(bins, digits)
            else:
                np.add(bins, digits, out=bins)

    def _raise_tops(self, lo: int, values: np.ndarray, weight: int, scratch: _Scratch) -> None:
        """Raise B where the quotients ``scratch.s`` are inadmissible, and redo those."""
        n = values.size
        s, top, hit = scratch.s[:n], self._top[lo : lo + n], scratch.hit[:n]
        bins = [self._bins[k, lo : lo + n] for k in range(_K)]
        np.greater_equal(np.abs(s, out=scratch.t[:n]), _LIMIT, out=hit)
        rising = np.flatnonzero(hit)
        if 8 * rising.size >= n:
            _rise(values, weight, s, top, bins, scratch)
            return
        # A few rises (few values near a window boundary): gather them, rise, scatter back.
        wholes: list[np.ndarray] = [s, top, *bins]
        parts = [whole[rising] for whole in wholes]
        _rise(values[rising], weight, parts[0], parts[1], parts[2:], scratch)
        for whole, part in zip(wholes, parts, strict=True):
            whole[rising] = part

    def result_into(self, first: int, out: np.ndarray, divisor: float = 1.0) -> None:
        """Write the sums of elements [first, first + len(out)) divided by ``divisor``.

        Args:
            first: index of the first element.
            out: 1-D float64 or float32 array; a float32 result is the float64 one rounded.
            divisor: finite, non-zero; applied before the final power-of-two scaling, so a
                sum beyond float64 (huge values times large weights) still divides back.
                The float64 result is ``sum / divisor`` rounded twice (sum, quotient).

        Raises:
            TypeError: ``out`` is not a 1-D float64/float32 array.
            ValueError: the range is outside the sum or the divisor is zero or not finite.
        """
        if out.ndim != 1 or out.dtype not in _WIDENED[:2]:
            raise TypeError("out must be a 1-D float64 or float32 array")
        stop = first + out.size
        if not (0 <= first <= stop <= self.numel and np.isfinite(divisor) and divisor != 0):
            raise ValueError(f"need 0 <= [{first}, {stop}) <= {self.numel}, finite divisor != 0")
        if out.size == 0:
            return
        scratch = self._scratch()
        for lo, hi, adds in self._coverage.runs(first, stop):
            if adds == 0:
                out[lo - first : hi - first] = 0.0
                continue
            for i in range(lo, hi, SCRATCH_ELEMENTS):
                j = min(i + SCRATCH_ELEMENTS, hi)
                self._read(i, out[i - first : j - first], float(divisor), scratch)

    def _read(self, lo: int, out: np.ndarray, divisor: float, scratch: _Scratch) -> None:
        n = out.size
        digits = list(scratch.ints[:_K, :n])
        _carry([self._bins[k, lo : lo + n] for k in range(_K)], digits, scratch.ints[3, :n])
        value = _round_digits(digits, scratch, n)
        # Divide by the divisor's mantissa, scale by its exponent with u_0: neither a sum
        # beyond float64 nor a tiny divisor overflows before the result itself would.
        mantissa, exponent = math.frexp(divisor)
        np.divide(value, mantissa, out=value)
        e = scratch.e[:n]
        np.subtract(self._top[lo : lo + n], _W + exponent, out=e)
        # Past the output's range the IEEE answer (inf, or a rounded subnormal) is the result.
        with np.errstate(over="ignore", under="ignore"):
            np.ldexp(value, e, out=out)

    def _scratch(self) -> _Scratch:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = _Scratch()
        return scratch
