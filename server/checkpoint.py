"""Atomic checkpoints of the aggregator: safetensors for tensors, JSON for the rest.

Commit protocol, under an exclusive ``flock`` on ``DIR/.checkpoint.lock`` so that
two writers of one folder never interleave: write ``state-<round>.safetensors``
(temp file, fsync, rename, fsync the folder), then ``checkpoint.json`` (temp
file, fsync, rename, fsync the folder). The JSON names the tensor file and its
SHA-256, so a crash at any moment leaves the previous checkpoint loadable: the
JSON rename is the commit point. After it, only files of *older* rounds are
deleted: a write that has been overtaken (an aggregator stopped in-process whose
write thread is still finishing while a restarted one already committed the next
round) must never delete the newer checkpoint's tensor file.

Loading checks the whole document and the tensor file against it, so any
checkpoint that parses but is malformed is a one-line ``ConfigError``, never a
``KeyError`` or ``TypeError`` further on. Loading never unpickles anything: the
optimizer's tensors come from safetensors, its other state from JSON.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedgrad.errors import ConfigError
from fedgrad.history import RoundRecord
from fedgrad.server.checkpoint_check import (
    FORMAT,
    Malformed,
    check_document,
    check_optimizer_fits,
    split_tensors,
)

__all__ = ["CHECKPOINT_FILE", "check_checkpoint_dir", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FILE = "checkpoint.json"
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


def check_checkpoint_dir(directory: str | Path) -> Path:
    """Make sure ``directory`` is a folder the aggregator can write checkpoints into.

    Creates it if needed. ``load_checkpoint`` calls this first, so an aggregator
    that loads at start-up fails there, before serving.

    Returns:
        The folder as a Path.

    Raises:
        ConfigError: the path is a file, cannot be created or is not writable.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(
            f"--checkpoint-dir {directory} exists and is not a directory;"
            " give a directory (it is created if missing)"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"--checkpoint-dir {directory} is not a writable directory:"
            f" {exc.strerror or exc}; use another --checkpoint-dir"
        ) from None
    return directory


def save_checkpoint(
    directory: str | Path,
    round_: int,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    history: list[RoundRecord],
    buffers: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint of ``round_`` atomically; return the JSON path.

    Args:
        directory: the checkpoint folder (created if missing).
        round_: the round the checkpoint resumes at.
        params: the parameters by name.
        optimizer: its ``state_dict`` is saved (tensors in safetensors, the rest in JSON).
        meta: more JSON fields (``session_id``, ``task``, ``reduce``, ``nodes``);
            they cannot replace the fields written here.
        history: the closed rounds.
        buffers: the model's buffers by name (BatchNorm statistics), saved as ``buffer/NAME``
            and returned by ``load_checkpoint`` among the parameters under that key.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors = {f"param/{k}": v.detach().cpu().contiguous() for k, v in params.items()}
    tensors |= {k: v.cpu() for k, v in opt_tensors.items()}
    tensors |= {f"buffer/{k}": v.detach().cpu().contiguous() for k, v in (buffers or {}).items()}
    tensor_file = directory / f"state-{round_}.safetensors"
    with _locked(directory, exclusive=True):
        _write_atomic(tensor_file, lambda tmp: save_file(tensors, str(tmp)))
        doc = {
            **meta,
            "format": FORMAT,
            "round": round_,
            "tensors": tensor_file.name,
            "sha256": _sha256(tensor_file),
            "optimizer": {"class": type(optimizer).__name__, **opt_meta},
            "history": [asdict(r) for r in history],
        }
        target = directory / CHECKPOINT_FILE
        text = json.dumps(doc, indent=1, allow_nan=True)
        _write_atomic(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        _remove_older(directory, round_)
    return target


def load_checkpoint(
    directory: str | Path,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]] | None:
    """Load the last committed checkpoint, or return None if there is none.

    Checks the folder first (``check_checkpoint_dir``), then every field of the
    JSON that a resume uses and the tensor file against it (see docs/failure.md).

    Args:
        directory: the checkpoint folder.
        optimizer: if given, the optimizer the state will be loaded into: its class
            and parameter groups must match the saved ones, so that neither
            ``load_state_dict`` nor the next step fails on them.

    Returns:
        (document, parameters by name, optimizer state_dict).

    Raises:
        ConfigError: the folder is unusable, or the checkpoint is corrupt, malformed,
            of another format or (with ``optimizer``) of another optimizer.
    """
    directory = check_checkpoint_dir(directory)
    path = directory / CHECKPOINT_FILE
    with _locked(directory, exclusive=False):
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise _error(path, f"it is unreadable ({exc})") from None
        try:
            indices = check_document(doc)
        except Malformed as exc:
            raise _error(path, str(exc)) from None
        tensors = _load_tensors(directory, path, doc)
    try:
        params, state = split_tensors(tensors, indices)
        for index, scalars in doc["optimizer"]["scalars"].items():
            state.setdefault(int(index), {}).update(scalars)
        optim_state = {"state": state, "param_groups": doc["optimizer"]["param_groups"]}
    except Malformed as exc:
        raise _error(path, str(exc)) from None
    if optimizer is not None:
        try:
            check_optimizer_fits(doc["optimizer"], optim_state, optimizer)
        except Malformed as exc:
            raise ConfigError(
                f"checkpoint {path} does not fit this run: {exc}; resume with the same"
                " --optimizer and task, or use a new --checkpoint-dir"
            ) from None
    return doc, params, optim_state


def _advice(path: Path) -> str:
    return f"use a new --checkpoint-dir, or delete {path} to start the run over"


def _error(path: Path, what: str) -> ConfigError:
    text = " ".join(what.split())  # one line, whatever a parser put into its message
    return ConfigError(f"checkpoint {path} is corrupt: {text}; {_advice(path)}")


def _load_tensors(directory: Path, path: Path, doc: dict[str, Any]) -> dict[str, torch.Tensor]:
    expected = f"state-{doc['round']}.safetensors"
    if doc["tensors"] != expected:
        # Only the file of its own round, in this folder: never a path elsewhere.
        raise ConfigError(
            f"checkpoint tensors {doc['tensors']!r} are missing or do not match: {path} is"
            f" of round {doc['round']}, so it must name {expected}; {_advice(path)}"
        )
    tensor_file = directory / expected
    try:
        matches = tensor_file.is_file() and _sha256(tensor_file) == doc["sha256"]
    except OSError:
        matches = False
    if not matches:
        raise ConfigError(
            f"checkpoint tensors {tensor_file} are missing or do not match their SHA-256"
            f" in {path}; {_advice(path)}"
        )
    try:
        return load_file(str(tensor_file))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise _error(path, f"{tensor_file.name} is not a safetensors file ({exc})") from None
