"""Checkpoints on disk: writers of one folder.

The writer tests pin the commit protocol's cleanup: a write never deletes a newer
checkpoint's tensor file (the cause of a rare failure of
``test_interrupted_checkpoint_write_...``).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from fedgrad.history import RoundRecord
from fedgrad.server import checkpoint as ckpt_module
from fedgrad.server.checkpoint import (
    CHECKPOINT_FILE,
    load_checkpoint,
    save_checkpoint,
)

META = {
    "session_id": "abc123",
    "task": "linear",
    "reduce": "weighted-mean",
    "nodes": [
        {"node_id": "node-0", "num_samples": 4, "state": "active", "last_round": 2},
        {"node_id": "node-1", "num_samples": 9, "state": "left", "last_round": -1},
    ],
}


def _model(optimizer: str = "adam", seed: int = 0) -> tuple[dict[str, torch.Tensor], Any]:
    """Two parameters and an optimizer that has taken one step (so it has tensor state)."""
    gen = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.nn.Parameter(torch.randn(3, 2, generator=gen)),
        "b": torch.nn.Parameter(torch.randn(2, generator=gen)),
    }
    values = list(params.values())
    opt = (
        torch.optim.Adam(values, lr=0.01)
        if optimizer == "adam"
        else torch.optim.SGD(values, lr=0.1, momentum=0.9)
    )
    for p in values:
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    return params, opt


def _history(rounds: int) -> list[RoundRecord]:
    return [
        RoundRecord(
            round=r,
            train_loss=0.5 / r,
            test_loss=float("nan"),
            test_accuracy=0.9,
            seconds=0.25,
            bytes=1000 * r,
            nodes=2,
        )  # fmt: skip
        for r in range(1, rounds + 1)
    ]


def _write(directory: Path, round_: int = 3, optimizer: str = "adam") -> dict[str, Any]:
    params, opt = _model(optimizer)
    save_checkpoint(directory, round_, params, opt, META, _history(round_))
    return json.loads((directory / CHECKPOINT_FILE).read_text())


# -- writers ---------------------------------------------------------------------------------
def test_a_write_removes_older_rounds_and_debris_only(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    for r in range(3):
        _write(directory, r)
    (directory / ".state-1.safetensors.tmp").write_bytes(b"half")
    (directory / "state-9.safetensors").write_bytes(b"not ours")
    _write(directory, 3)
    names = sorted(p.name for p in directory.iterdir() if "state" in p.name)
    assert names == ["state-3.safetensors", "state-9.safetensors"]


def test_an_overtaken_write_never_deletes_the_newer_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flake: an aggregator stopped in-process still finishes its round-2 write
    (``ServerThread.stop`` does not wait for ``to_thread`` workers) while a restarted one
    commits round 3 into the same folder. Before, round 2's cleanup then deleted
    ``state-3.safetensors`` ("every tensor file but mine"), and the committed round 3
    was "missing". Here round 3 is written while round 2's write is between its commit
    and its cleanup."""
    directory = tmp_path / "ckpt"
    _write(directory, 1)
    real_fsync = ckpt_module._fsync_dir
    newer: list[threading.Thread] = []

    def fsync_then_let_the_restarted_one_write(path: Path) -> None:
        real_fsync(path)
        committed = json.loads((directory / CHECKPOINT_FILE).read_text())["round"]
        if committed == 2 and not newer:  # round 2's JSON is renamed, its cleanup is next
            newer.append(threading.Thread(target=_write, args=(directory, 3)))
            newer[0].start()
            newer[0].join(timeout=1.0)  # blocks on the folder's lock now; before, it finished

    monkeypatch.setattr(ckpt_module, "_fsync_dir", fsync_then_let_the_restarted_one_write)
    _write(directory, 2)
    newer[0].join(timeout=30)
    assert not newer[0].is_alive()
    loaded = load_checkpoint(directory)
    assert loaded is not None and loaded[0]["round"] == 3
    assert (directory / "state-3.safetensors").exists()


def test_a_reader_never_sees_a_checkpoint_without_its_tensors(tmp_path: Path) -> None:
    """While rounds are committed one after the other, every load finds its tensor file."""
    directory = tmp_path / "ckpt"
    _write(directory, 0)
    params, opt = _model()
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for r in range(1, 40):
                save_checkpoint(directory, r, params, opt, META, [])
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    rounds = []
    while not done.is_set():
        loaded = load_checkpoint(directory)
        assert loaded is not None
        rounds.append(loaded[0]["round"])
    thread.join()
    assert not errors, errors
    assert rounds == sorted(rounds)
