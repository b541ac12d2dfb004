"""Robust reducers: rules that need every upload of a round at once.

The weighted mean follows any single node: scale an update by 100, flip its
sign or claim a billion samples, and the model goes where that node wants. The
rules here bound what a minority of nodes can do (``docs/security.md`` says what
each does and does not stop):

* ``median``: the coordinate-wise median (Yin et al. 2018).
* ``trimmed-mean:BETA``: per coordinate, drop the ``floor(BETA n)`` largest and
  smallest values and average the rest.
* ``krum:F``: the upload whose ``n - F - 2`` nearest neighbours are closest
  (Blanchard et al. 2017); ``multi-krum:F,M`` averages the ``M`` best by that score.
* ``geometric-median``: the smoothed Weiszfeld iteration of RFA (Pillutla et al.
  2019): the point minimising the sum of Euclidean distances to the uploads.

They weigh every upload equally (a claimed sample count is what an attacker
inflates) and hold the round's decoded uploads: in memory up to ``--staging-mb``,
past that in files under ``--spill-dir`` (memory-mapped, deleted at the round's
end). Every rule works on column blocks of all rows at once, so its memory beyond
the rows is a few blocks plus, for the geometric median, two float64 model copies.
Rows are ordered by node id before a rule runs: ties and float sums do not depend
on arrival order.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fedgrad.codec import Layout
from fedgrad.config import AggregatorConfig, parse_reduce
from fedgrad.errors import ConfigError, InvalidArgument
from fedgrad.server.reducers import vector_norm
from fedgrad.server.staging import StagedUpload

__all__ = ["ROBUST_RULES", "RobustReducer", "expected_uploads", "check_fits"]

#: The rules of this module, by ``--reduce`` name (without parameters).
ROBUST_RULES = ("median", "trimmed-mean", "krum", "multi-krum", "geometric-median")
#: Columns per block: a block of 50 rows of float64 is 25 MiB.
BLOCK = 1 << 16
#: Weiszfeld iterations of the geometric median, its smoothing and its tolerance.
WEISZFELD_ITERATIONS = 10
WEISZFELD_NU = 1e-8
WEISZFELD_TOLERANCE = 1e-7


def expected_uploads(cfg: AggregatorConfig) -> int:
    """Return the uploads a round of ``cfg`` applies at most, as planned at start-up."""
    if cfg.mode == "async":
        return cfg.buffer_size
    if cfg.sampled:
        return math.ceil(cfg.sample_size(cfg.nodes) * cfg.overcommit - 1e-9)
    return cfg.nodes


def _row_dtype(layout: Layout) -> type:
    return np.float64 if any(s.dtype.itemsize == 8 for s in layout.specs) else np.float32


def check_fits(cfg: AggregatorConfig, layout: Layout) -> None:
    """Refuse a robust rule whose round cannot be held, or cannot run, at start-up.

    Raises:
        ConfigError: says what to change (memory, spill space, or node counts).
    """
    rule, params = parse_reduce(cfg.reduce)
    if rule not in ROBUST_RULES:
        return
    n = expected_uploads(cfg)
    if rule in ("krum", "multi-krum"):
        f = int(params[0])
        if n < 2 * f + 3:
            raise ConfigError(
                f"--reduce {cfg.reduce} needs at least 2F+3 = {2 * f + 3} uploads per round"
                f" (Blanchard et al.), this configuration applies {n}: raise --nodes or"
                " --sample, or lower F"
            )
        if rule == "multi-krum" and int(params[1]) > n - f:
            raise ConfigError(
                f"--reduce {cfg.reduce}: M = {int(params[1])} must be <= n - F = {n - f}"
            )
    row = layout.numel * np.dtype(_row_dtype(layout)).itemsize
    budget = cfg.staging_mb << 20
    spilled = max(0, n * row - budget)
    if not spilled:
        return
    where = cfg.spill_dir or tempfile.gettempdir()
    try:
        free = shutil.disk_usage(where).free
    except OSError as exc:
        raise ConfigError(f"--spill-dir {where}: {exc.strerror or exc}") from None
    if spilled > free:
        raise ConfigError(
            f"--reduce {cfg.reduce} holds every upload of a round: {n} x {row / 1e6:.0f} MB"
            f" = {n * row / 1e6:.0f} MB, more than --staging-mb {cfg.staging_mb} plus the"
            f" {free / 1e6:.0f} MB free in {where}: raise --staging-mb, point --spill-dir at"
            " a bigger disk, or apply fewer uploads per round"
        )


class RobustReducer:
    """A robust rule over a round's uploads, held as decoded rows (see the module docstring)."""

    streaming = False

    def __init__(
        self,
        name: str,
        layout: Layout,
        budget_bytes: int,
        spill_dir: str | None = None,
        clip: float | None = None,
    ) -> None:
        self.name, self.layout = name, layout
        self.rule, self.params = parse_reduce(name)
        if self.rule not in ROBUST_RULES:
            raise ValueError(f"{name!r} is not a robust rule")
        self.dtype = _row_dtype(layout)
        self.row_bytes = layout.numel * np.dtype(self.dtype).itemsize
        self.budget, self.spill_dir, self.clip = budget_bytes, spill_dir, clip
        self.first_elements = layout.first_elements
        self.rows: list[np.ndarray] = []
        self.keys: list[str] = []
        self.norms: list[float] = []
        self._files: list[tempfile._TemporaryFileWrapper[bytes]] = []
        self._result: np.ndarray | None = None
        #: The last applied round's per-node statistics (node id -> name -> value).
        self.stats: dict[str, dict[str, float]] = {}
        self.count = 0
        self.total_weight = 0

    # -- the reducer interface ------------------------------------------------------------
    def weight(self, num_samples: int) -> int:
        return 1  # every upload counts alike: a claimed sample count buys nothing

    def add(self, upload: StagedUpload, weight: int, scale: float = 1.0, key: str = "") -> float:
        """Decode a complete upload into a row; return its L2 norm before clipping."""
        upload.complete()
        if not 0 < scale <= 1:
            raise InvalidArgument(f"staleness scale {scale} is outside (0, 1]")
        row = self._new_row()
        sparse = upload.codec.sparse
        if sparse:
            row.fill(0)
        for where, values in upload.codec.decode(upload.chunks):
            if sparse:
                row[where] = values
            else:
                row[where : where + values.size] = values
        norm = vector_norm(row)  # overflow-safe, like the streaming rules' norm
        factor = scale
        if self.clip is not None and norm > self.clip:
            factor *= self.clip / norm
        if factor != 1:
            row *= factor
        self.rows.append(row)
        self.keys.append(key or f"upload-{len(self.keys)}")
        self.norms.append(norm)
        self.count += 1
        self.total_weight += weight
        self._result = None
        return norm

    def result_into(self, outputs: Sequence[torch.Tensor], indices: Sequence[int]) -> None:
        if self._result is None:
            self._result = self._reduce()
        for i, out in zip(indices, outputs, strict=True):
            first = self.first_elements[i]
            flat = torch.from_numpy(self._result[first : first + out.numel()])
            out.view(-1).copy_(flat)

    def reset(self) -> None:
        self.rows, self.keys, self.norms = [], [], []
        for fh in self._files:
            fh.close()
        self._files = []
        self._result = None
        self.count = 0
        self.total_weight = 0

    def close(self) -> None:
        self.reset()

    # -- rows ------------------------------------------------------------------------------
    def _new_row(self) -> np.ndarray:
        if (len(self.rows) + 1) * self.row_bytes <= self.budget or not self.row_bytes:
            return np.empty(self.layout.numel, dtype=self.dtype)
        fh = tempfile.NamedTemporaryFile(dir=self.spill_dir, prefix="fedgrad-spill-")
        self._files.append(fh)
        os.ftruncate(fh.fileno(), self.row_bytes)
        return np.memmap(fh, dtype=self.dtype, mode="r+", shape=(self.layout.numel,))

    def _ordered(self) -> tuple[list[str], list[np.ndarray]]:
        order = sorted(range(len(self.keys)), key=lambda i: self.keys[i])
        return [self.keys[i] for i in order], [self.rows[i] for i in order]

    def _blocks(self, rows: Sequence[np.ndarray]) -> Iterator[tuple[int, int, np.ndarray]]:
        numel = self.layout.numel
        for a in range(0, numel, BLOCK):
            b = min(numel, a + BLOCK)
            yield a, b, np.stack([r[a:b] for r in rows]).astype(np.float64, copy=False)

    # -- the rules ---------------------------------------------------------------------------
    def _reduce(self) -> np.ndarray:
        keys, rows = self._ordered()
        out = np.zeros(self.layout.numel, dtype=np.float64)
        self.stats = {k: {"norm": self.norms[self.keys.index(k)]} for k in keys}
        if not rows:
            return out
        if self.rule == "median":
            for a, b, x in self._blocks(rows):
                out[a:b] = np.median(x, axis=0)
        elif self.rule == "trimmed-mean":
            self._trimmed_mean(keys, rows, out)
        elif self.rule in ("krum", "multi-krum"):
            self._krum(keys, rows, out)
        else:
            self._geometric_median(keys, rows, out)
        return out

    def _trimmed_mean(self, keys: list[str], rows: list[np.ndarray], out: np.ndarray) -> None:
        n = len(rows)
        k = min(int(math.floor(self.params[0] * n)), (n - 1) // 2)
        trimmed = np.zeros(n, dtype=np.int64)
        for a, b, x in self._blocks(rows):
            order = np.argsort(x, axis=0, kind="stable")
            kept = np.take_along_axis(x, order[k : n - k], axis=0)
            out[a:b] = kept.mean(axis=0)
            if k:
                dropped = np.concatenate([order[:k], order[n - k :]]).ravel()
                trimmed += np.bincount(dropped, minlength=n)
        for i, key in enumerate(keys):
            self.stats[key]["trimmed_fraction"] = float(trimmed[i]) / max(1, out.size)

    def _krum(self, keys: list[str], rows: list[np.ndarray], out: np.ndarray) -> None:
        n, f = len(rows), int(self.params[0])
        m = int(self.params[1]) if self.rule == "multi-krum" else 1
        distances = np.zeros((n, n), dtype=np.float64)
        for _a, _b, x in self._blocks(rows):
            square = np.einsum("ij,ij->i", x, x)
            distances += square[:, None] + square[None, :] - 2.0 * (x @ x.T)
        np.maximum(distances, 0.0, out=distances)
        neighbours = max(1, n - f - 2)
        scores = []
        for i in range(n):
            others = np.sort(np.delete(distances[i], i))
            scores.append(float(others[:neighbours].sum()))
        chosen = sorted(np.argsort(np.array(scores), kind="stable")[: min(m, n)].tolist())
        for a, b, x in self._blocks(rows):
            out[a:b] = x[chosen].mean(axis=0)
        for i, key in enumerate(keys):
            self.stats[key]["krum_score"] = scores[i]
            self.stats[key]["selected"] = 1.0 if i in chosen else 0.0

    def _geometric_median(self, keys: list[str], rows: list[np.ndarray], out: np.ndarray) -> None:
        n = len(rows)
        for a, b, x in self._blocks(rows):
            out[a:b] = x.mean(axis=0)
        beta = np.full(n, 1.0 / n)
        for _ in range(WEISZFELD_ITERATIONS):
            distance = np.zeros(n, dtype=np.float64)
            for a, b, x in self._blocks(rows):
                distance += ((x - out[a:b]) ** 2).sum(axis=1)
            beta = 1.0 / np.maximum(WEISZFELD_NU, np.sqrt(distance))
            beta /= beta.sum()
            moved = 0.0
            for a, b, x in self._blocks(rows):
                new = beta @ x
                moved += float(((new - out[a:b]) ** 2).sum())
                out[a:b] = new
            if math.sqrt(moved) <= WEISZFELD_TOLERANCE * max(1.0, float(np.linalg.norm(out))):
                break
        for i, key in enumerate(keys):
            self.stats[key]["weight"] = float(beta[i])
