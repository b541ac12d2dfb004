"""TensorBoard tracking: scalars read back from the event files, and its one-line errors.

The event files are read with TensorBoard's own ``EventAccumulator``; each expected value
is the record's value rounded to float32, the precision of a ``simple_value``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import tensorboard
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedgrad.errors import ConfigError
from fedgrad.history import RoundRecord
from fedgrad.server import tracking
from fedgrad.server.tracking import RECORD_TAGS, TensorBoard, open_tensorboard

HINT = "--tensorboard needs the tensorboard package: pip install 'fedgrad[tensorboard]'"

RECORDS = [
    RoundRecord(0, 2.25, 2.0, 0.125, 1.5, 123_456_789, 4, selected=4),
    # No evaluation this round: both test scalars are left out at step 1.
    RoundRecord(1, 1.75, math.nan, math.nan, 1.25, 1_000, 3, selected=4, epsilon=0.3),
    RoundRecord(2, 1.1, 0.9, 0.7, 0.1, 2_048, 2, staleness_mean=0.5, staleness_max=1),
]
EXTRA = [{"federated/f1": 0.5}, {"federated/f1": math.nan}, {"federated/recall": 0.25}]


def read_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Return every scalar tag of the run in ``directory`` -> [(step, value)]."""
    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_scalars(
    records: Sequence[RoundRecord], extras: Sequence[Mapping[str, float]]
) -> dict[str, list[tuple[int, float]]]:
    """Compute, independently of the module, what the run should hold (NaN left out)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record, extra in zip(records, extras, strict=True):
        values = {RECORD_TAGS[f.name]: getattr(record, f.name) for f in fields(record)[1:]}
        for tag, value in {**values, **extra}.items():
            if not math.isnan(value):
                out.setdefault(tag, []).append((record.round, float(np.float32(value))))
    return out


def test_public_names() -> None:
    assert set(tracking.__all__) == {"FLUSH_SECS", "RECORD_TAGS", "TensorBoard", "open_tensorboard"}
    for name in tracking.__all__:
        assert getattr(tracking, name) is not None


def test_every_record_field_but_the_round_has_its_own_tag() -> None:
    names = [f.name for f in fields(RoundRecord)]
    assert names[0] == "round"
    assert list(RECORD_TAGS) == names[1:]
    assert len(set(RECORD_TAGS.values())) == len(RECORD_TAGS)


def test_records_and_extras_are_read_back_with_the_round_as_step(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "first"  # parents are created
    with open_tensorboard(str(run)) as board:
        assert isinstance(board, TensorBoard) and board.directory == run
        for record, extra in zip(RECORDS, EXTRA, strict=True):
            board.write(record, extra)
    scalars = read_scalars(run)
    assert scalars == expected_scalars(RECORDS, EXTRA)
    # Spot checks of the reference itself: NaN gaps, float32 rounding, DP only when spent.
    assert scalars["test/accuracy"] == [(0, 0.125), (2, float(np.float32(0.7)))]
    assert scalars["round/bytes"][0] == (0, 123_456_792.0)
    assert scalars["privacy/epsilon"] == [(1, float(np.float32(0.3)))]
    assert scalars["federated/f1"] == [(0, 0.5)]
    assert scalars["federated/recall"] == [(2, 0.25)]


def test_write_without_extra_writes_the_record_only(tmp_path: Path) -> None:
    board = TensorBoard(tmp_path, flush_secs=0.5)
    board.write(RECORDS[0])
    board.close()
    assert read_scalars(tmp_path) == expected_scalars(RECORDS[:1], [{}])


def test_resumed_run_hides_the_rounds_it_writes_again(tmp_path: Path) -> None:
    with open_tensorboard(tmp_path) as board:
        for record in RECORDS:
            board.write(record)
    # A restart from the checkpoint of round 0 runs rounds 1 and 2 again, differently.
    rerun = [replace(r, train_loss=r.train_loss + 10.0) for r in RECORDS[1:]]
    with open_tensorboard(tmp_path, first_round=1) as board:
        for record in rerun:
            board.write(record)
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert read_scalars(tmp_path) == expected_scalars([RECORDS[0], *rerun], [{}] * 3)


def test_extra_tags_may_not_reuse_record_tags(tmp_path: Path) -> None:
    with open_tensorboard(tmp_path) as board:
        with pytest.raises(ValueError, match=r"reuse record tags: \['test/accuracy'\]"):
            board.write(RECORDS[0], {"test/accuracy": 0.9})


def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    board = open_tensorboard(tmp_path)
    board.close()
    board.close()
    with pytest.raises(ValueError, match="is closed"):
        board.write(RECORDS[0])
    assert read_scalars(tmp_path) == {}


def test_missing_tensorboard_is_a_one_line_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # As if not installed: torch's own import of it fails (torch/utils/tensorboard/__init__.py).
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(ConfigError) as err:
        open_tensorboard(tmp_path / "run")
    assert str(err.value) == HINT
    assert not (tmp_path / "run").exists()


def test_too_old_tensorboard_names_the_extra_and_the_cause(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tensorboard, "__version__", "1.14.0")
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(ConfigError) as err:
        open_tensorboard(tmp_path)
    assert str(err.value) == (
        f"{HINT} (TensorBoard logging requires TensorBoard version 1.15 or above)"
    )


def test_a_folder_that_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    a_file = tmp_path / "history.csv"
    a_file.write_text("round\n")
    with pytest.raises(ConfigError) as err:
        open_tensorboard(a_file / "run")
    assert str(err.value) == f"cannot write TensorBoard events to {a_file / 'run'}: Not a directory"
    with pytest.raises(ConfigError, match="File exists"):
        open_tensorboard(a_file)


def test_an_empty_directory_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="needs a directory"):
        open_tensorboard("")
