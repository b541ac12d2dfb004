"""Experiment tracking: each closed round's record as TensorBoard scalars.

One ``SummaryWriter`` per run writes the ``RoundRecord`` of every round (``RECORD_TAGS``
names the tag of each field) and any extra per-round metrics, with the round as the
global step. Writes are queued and a background thread flushes them every
``flush_secs`` seconds and at ``close()``, so a round costs a few queue puts, never a
disk flush per scalar (``tensorboard.summary.writer.event_file_writer``).

The ``tensorboard`` package is an optional extra (``pip install 'fedgrad[tensorboard]'``);
it is imported only when a writer is opened.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING

from fedgrad.errors import ConfigError
from fedgrad.history import RoundRecord

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["FLUSH_SECS", "RECORD_TAGS", "TensorBoard", "open_tensorboard"]

#: The tag of each ``RoundRecord`` field (all but ``round``, which is the step).
RECORD_TAGS: Mapping[str, str] = MappingProxyType(
    {
        "train_loss": "train/loss",
        "test_loss": "test/loss",
        "test_accuracy": "test/accuracy",
        "seconds": "round/seconds",
        "bytes": "round/bytes",
        "nodes": "round/nodes",
        "selected": "round/selected",
        "staleness_mean": "staleness/mean",
        "staleness_max": "staleness/max",
        "epsilon": "privacy/epsilon",
        "federated_loss": "federated/loss",
        "federated_accuracy": "federated/accuracy",
        "federated_samples": "federated/samples",
    }
)

#: Seconds between background flushes: TensorBoard itself reloads every 30 s by default.
FLUSH_SECS = 10.0

_NO_EXTRA: Mapping[str, float] = MappingProxyType({})


class TensorBoard:
    """Write each round's record and extra metrics as scalars into one TensorBoard run.

    Scalars are stored as TensorBoard's ``simple_value``, a float32: integers above
    2**24 (``round/bytes`` of rounds over 16 MiB) are rounded to 7 significant digits.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        first_round: int | None = None,
        flush_secs: float = FLUSH_SECS,
    ) -> None:
        """Open a new event file in ``directory``, creating the folder if needed.

        Args:
            directory: the run's folder (``tensorboard --logdir`` it or its parent).
            first_round: the round a resumed run starts at: events of this round and
                later ones that an earlier run of the folder wrote are hidden, so rounds
                re-run after a restart are not drawn twice (``purge_step``).
            flush_secs: seconds between background flushes to disk.

        Raises:
            ConfigError: the tensorboard package is missing, or the folder cannot be
                created or written.
        """
        if not str(directory):
            raise ConfigError("--tensorboard needs a directory")
        writer_class = _summary_writer_class()
        path = Path(directory)
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._writer: SummaryWriter | None = writer_class(
                str(path), purge_step=first_round, flush_secs=flush_secs
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot write TensorBoard events to {path}: {exc.strerror or exc}"
            ) from None
        self.directory = path

    def write(self, record: RoundRecord, extra: Mapping[str, float] = _NO_EXTRA) -> None:
        """Queue the round's scalars: every field of ``record`` and every ``extra`` entry.

        NaN values (no evaluation, no DP, no reported loss) are left out, so a curve has
        gaps instead of NaN points.

        Args:
            record: the closed round; ``record.round`` is the step of every scalar.
            extra: more metrics of the round, tag -> value (e.g. "federated/accuracy").

        Raises:
            ValueError: an ``extra`` tag is one of ``RECORD_TAGS``' tags, or the writer
                is closed.
        """
        if self._writer is None:
            raise ValueError(f"the TensorBoard writer of {self.directory} is closed")
        clash = set(extra) & set(RECORD_TAGS.values())
        if clash:
            raise ValueError(f"extra metrics reuse record tags: {sorted(clash)}")
        scalars = {tag: getattr(record, name) for name, tag in RECORD_TAGS.items()}
        scalars.update(extra)
        for tag, value in scalars.items():
            if not math.isnan(value):
                self._writer.add_scalar(tag, value, global_step=record.round)

    def close(self) -> None:
        """Flush the queued scalars to disk and close the event file (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoard:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_tensorboard(directory: str | Path, *, first_round: int | None = None) -> TensorBoard:
    """Open the aggregator's TensorBoard run in ``directory`` (``--tensorboard DIR``).

    Args:
        directory: the run's folder, created if needed.
        first_round: the first round of a resumed run (see ``TensorBoard``); None for a
            fresh run.

    Returns:
        The open writer; close it when the run ends.

    Raises:
        ConfigError: the tensorboard package is missing, or the folder cannot be
            created or written.
    """
    return TensorBoard(directory, first_round=first_round)


def _summary_writer_class() -> type[SummaryWriter]:
    """Import torch's ``SummaryWriter``, which needs the separate tensorboard package."""
    hint = "--tensorboard needs the tensorboard package: pip install 'fedgrad[tensorboard]'"
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        absent = (
            isinstance(exc, ModuleNotFoundError)
            and (exc.name or "").partition(".")[0] == "tensorboard"
        )
        # Any other failure keeps its cause: torch refuses a tensorboard older than 1.15
        # with a plain ImportError (torch/utils/tensorboard/__init__.py).
        raise ConfigError(hint if absent else f"{hint} ({exc})") from None
    return SummaryWriter
