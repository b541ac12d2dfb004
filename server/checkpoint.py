"""Atomic checkpoints of the aggregator: safetensors for tensors, JSON for the rest.

Commit protocol, under an exclusive ``flock`` on ``DIR/.checkpoint.lock`` so that
two writers of one folder never interleave: write ``state-<round>.safetensors``
(temp file, fsync, rename, fsync the folder), then ``checkpoint.json`` (temp
file, fsync, rename, fsync the folder). The JSON names the tensor file and its
SHA-256, so a crash at any moment leaves the previous checkpoint loadable: the
JSON rename is the commit point. After it, only files of *older* rounds are
deleted: a write that has been overtaken (an aggregator stopped in-process whose
write thread is still finishing while a restarted one already committed the next
round) must never delete the newer checkpoint's tensor file. Loading takes the
lock shared and never unpickles anything.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedgrad.errors import ConfigError
from fedgrad.history import RoundRecord

__all__ = ["CHECKPOINT_FILE", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FILE = "checkpoint.json"
FORMAT = 1
LOCK_FILE = ".checkpoint.lock"
_STATE = re.compile(r"\.?state-(\d+)\.safetensors(\.tmp)?")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _locked(directory: Path, exclusive: bool) -> Iterator[None]:
    # flock, not a lock file's existence: the kernel drops it when its holder dies.
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with tmp.open("rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    # The rename must be on disk before the next step depends on it (for the tensor
    # file: before the JSON that names it can be renamed).
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _remove_older(directory: Path, round_: int) -> None:
    """Delete tensor files and temp debris of rounds before ``round_``, nothing else."""
    for path in directory.iterdir():
        match = _STATE.fullmatch(path.name)
        if match and int(match.group(1)) < round_:
            path.unlink(missing_ok=True)


def save_checkpoint(
    directory: str | Path,
    round_: int,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    history: list[RoundRecord],
) -> Path:
    """Write a checkpoint of ``round_`` atomically; return the JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors = {f"param/{k}": v.detach().contiguous() for k, v in params.items()} | opt_tensors
    tensor_file = directory / f"state-{round_}.safetensors"
    with _locked(directory, exclusive=True):
        _write_atomic(tensor_file, lambda tmp: save_file(tensors, str(tmp)))
        doc = {
            "format": FORMAT,
            "round": round_,
            "tensors": tensor_file.name,
            "sha256": _sha256(tensor_file),
            "optimizer": opt_meta,
            "history": [asdict(r) for r in history],
            **meta,
        }
        target = directory / CHECKPOINT_FILE
        text = json.dumps(doc, indent=1, allow_nan=True)
        _write_atomic(target, lambda tmp: tmp.write_text(text))
        _remove_older(directory, round_)
    return target


def load_checkpoint(
    directory: str | Path,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]] | None:
    """Load the last committed checkpoint, or return None if there is none.

    Returns:
        (document, parameters by name, optimizer state_dict).

    Raises:
        ConfigError: the checkpoint is corrupt or of another format.
    """
    directory = Path(directory)
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        return None
    with _locked(directory, exclusive=False):
        return _load(directory, path)


def _load(
    directory: Path, path: Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint {path} is unreadable: {exc}") from None
    if doc.get("format") != FORMAT:
        raise ConfigError(f"checkpoint {path} has format {doc.get('format')!r}, expected {FORMAT}")
    tensor_file = directory / Path(doc["tensors"]).name
    if not tensor_file.exists() or _sha256(tensor_file) != doc["sha256"]:
        raise ConfigError(
            f"checkpoint tensors {tensor_file} are missing or do not match their SHA-256"
        )
    try:
        tensors = load_file(str(tensor_file))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ConfigError(f"checkpoint tensors {tensor_file} are corrupt: {exc}") from None
    params = {k.removeprefix("param/"): v for k, v in tensors.items() if k.startswith("param/")}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, scalars in doc["optimizer"]["scalars"].items():
        state.setdefault(int(index), {}).update(scalars)
    return doc, params, {"state": state, "param_groups": doc["optimizer"]["param_groups"]}
