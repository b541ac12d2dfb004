"""Micro-benchmark: the reproducible ``BinnedSum`` against today's float64 accumulator.

Adds ``--uploads`` uploads of ``--numel`` values chunk by chunk (262144 elements
per chunk, as the aggregator does) with weights like 1797, then reads the sum
into a float32 output, for these schemes (``--schemes``, the first three by default):

- ``binned-f32``: ``fedgrad.server.binned.BinnedSum`` fed float32 values;
- ``float64-f32``: a float64 accumulator fed float32 values (the first upload
  overwrites, later ones ``multiply`` into a scratch buffer and ``add``);
- ``float64-f64``: the same fed float64 values;
- ``binned-f64``: ``BinnedSum`` fed float64 values.

Values are ``N(0, 1) * --scale``; the default 1e-3 times weights ~1500 puts the
products around 2**-1, a binned window boundary, so later uploads raise the
boundary of a sizeable share of elements (the slow path), which is the
realistic case (gradients straddle boundaries); ``--scale 1`` shows the
common path. Each timing is the minimum over ``--repeats`` runs, wall and CPU
(other work on the machine only adds).

Run from the repository root::

    .venv/bin/python -m benchmarks.binned_micro                 # 4 x 50M, ~30 s, ~3 GB peak RSS
    .venv/bin/python -m benchmarks.binned_micro --numel 5000000 --repeats 2
"""

from __future__ import annotations

import argparse
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import psutil

from fedgrad.server.binned import BinnedSum

CHUNK = 262144
WEIGHTS = (1797, 1203, 911, 1531)


class Float64Sum:
    """Today's scheme: a float64 running sum; the first upload overwrites."""

    def __init__(self, numel: int) -> None:
        self.total = np.zeros(numel)
        self.scratch = np.empty(CHUNK)
        self.nbytes = self.total.nbytes
        self.empty = True

    def add(self, first: int, values: np.ndarray, weight: int) -> None:
        target = self.total[first : first + values.size]
        if self.empty:
            np.multiply(values, weight, out=target, dtype=np.float64)
            return
        scaled = self.scratch[: values.size]
        np.multiply(values, weight, out=scaled, dtype=np.float64)
        np.add(target, scaled, out=target)

    def result_into(self, first: int, out: np.ndarray, divisor: float = 1.0) -> None:
        np.divide(self.total[first : first + out.size], divisor, out=out)

    def reset(self) -> None:
        self.empty = True


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _timed(work: Callable[[], None]) -> tuple[float, float]:
    """Return the wall and CPU seconds of ``work()``; CPU time is skewed less by a busy machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def _fastest(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return min(a[0], b[0]), min(a[1], b[1])


@dataclass
class Result:
    """One scheme's fastest (wall, CPU) seconds per upload and for the read, and its memory."""

    name: str
    adds: list[tuple[float, float]]
    read: tuple[float, float]
    held: int
    nbytes: int


def run_scheme(name: str, make: Callable, uploads: list[np.ndarray], repeats: int) -> Result:
    """Time every upload's chunked adds and the float32 read, ``repeats`` times; keep the min."""
    out = np.full(uploads[0].size, 0.0, np.float32)  # written now: its pages are not "held"
    before = _rss()
    acc = make(uploads[0].size)
    result = Result(name, [(math.inf, math.inf)] * len(uploads), (math.inf, math.inf), 0, 0)
    for _ in range(repeats):
        acc.reset()
        for u, values in enumerate(uploads):

            def add(values: np.ndarray = values, weight: int = WEIGHTS[u % len(WEIGHTS)]) -> None:
                for first in range(0, values.size, CHUNK):
                    acc.add(first, values[first : first + CHUNK], weight)

            result.adds[u] = _fastest(result.adds[u], _timed(add))
            if isinstance(acc, Float64Sum):
                acc.empty = False
        read = _timed(lambda: acc.result_into(0, out, float(sum(WEIGHTS))))
        result.read = _fastest(result.read, read)
    # After the first pass every page of the sum is touched (np.zeros maps them lazily).
    result.held, result.nbytes = _rss() - before, acc.nbytes
    return result


def report(result: Result, numel: int) -> None:
    """Print one scheme's seconds per upload and for the read (wall / CPU), ns per element."""
    rows = [(f"upload {u + 1}", add) for u, add in enumerate(result.adds)]
    for label, (wall, cpu) in [*rows, ("read f32", result.read)]:
        print(
            f"{result.name:12s} {label:9s} {wall:7.3f} s wall {cpu:7.3f} s CPU"
            f"  {wall / numel * 1e9:6.2f} / {cpu / numel * 1e9:6.2f} ns/element"
        )
    print(
        f"{result.name:12s} held {result.held / 2**20:.0f} MiB RSS, nbytes {result.nbytes / 2**20:.0f} MiB"
    )


def main() -> None:
    """Parse the flags, build the uploads, time each scheme and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=50_000_000)
    parser.add_argument("--uploads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1e-3)
    parser.add_argument("--schemes", default="binned-f32,float64-f32,float64-f64")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    f32 = [
        (rng.standard_normal(args.numel, np.float32) * np.float32(args.scale))
        for _ in range(args.uploads)
    ]
    schemes = {
        "binned-f32": (BinnedSum, lambda: f32),
        "binned-f64": (BinnedSum, lambda: [u.astype(np.float64) for u in f32]),
        "float64-f32": (Float64Sum, lambda: f32),
        "float64-f64": (Float64Sum, lambda: [u.astype(np.float64) for u in f32]),
    }
    print(
        f"{args.uploads} uploads x {args.numel} elements, chunks of {CHUNK}, min of {args.repeats}"
    )
    for name in args.schemes.split(","):
        make, values = schemes[name]
        report(run_scheme(name, make, values(), args.repeats), args.numel)
    # ru_maxrss is in KiB on Linux.
    print(
        f"peak RSS of the run {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB"
    )


if __name__ == "__main__":
    main()
