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
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedgrad.errors import ConfigError
from fedgrad.history import RoundRecord

__all__ = ["CHECKPOINT_FILE", "check_checkpoint_dir", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FILE = "checkpoint.json"
FORMAT = 1
LOCK_FILE = ".checkpoint.lock"
_STATE = re.compile(r"\.?state-(\d+)\.safetensors(\.tmp)?")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_INDEX = re.compile(r"[0-9]+")
#: RoundRecord fields stored as JSON integers; the others are numbers (NaN allowed).
_INT_FIELDS = {f.name for f in fields(RoundRecord) if f.type in ("int", int)}
_FIELDS = {f.name for f in fields(RoundRecord)}


class _Malformed(Exception):
    """What is wrong with a checkpoint, for the one-line ConfigError."""


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
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors = {f"param/{k}": v.detach().contiguous() for k, v in params.items()} | opt_tensors
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
            indices = _check_document(doc)
        except _Malformed as exc:
            raise _error(path, str(exc)) from None
        tensors = _load_tensors(directory, path, doc)
    try:
        params, state = _split_tensors(tensors, indices)
        for index, scalars in doc["optimizer"]["scalars"].items():
            state.setdefault(int(index), {}).update(scalars)
        optim_state = {"state": state, "param_groups": doc["optimizer"]["param_groups"]}
    except _Malformed as exc:
        raise _error(path, str(exc)) from None
    if optimizer is not None:
        try:
            _check_optimizer_fits(doc["optimizer"], optim_state, optimizer)
        except _Malformed as exc:
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


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, allow_nan=True)
    except TypeError:  # a tensor, in the optimizer checks
        text = f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def _get(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise _Malformed(f"{where}has no {key!r}")
    return obj[key]


def _int(obj: dict[str, Any], key: str, where: str, minimum: int) -> int:
    value = _get(obj, key, where)
    if type(value) is not int or value < minimum:  # bool is not an int here
        raise _Malformed(f"{where}{key!r} must be an integer >= {minimum}, got {_show(value)}")
    return value


def _text(obj: dict[str, Any], key: str, where: str) -> str:
    value = _get(obj, key, where)
    if not isinstance(value, str) or not value:
        raise _Malformed(f"{where}{key!r} must be a non-empty string, got {_show(value)}")
    return value


def _objects(obj: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    value = _get(obj, key, where)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _Malformed(f"{where}{key!r} must be a list of objects, got {_show(value)}")
    return value


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _check_document(doc: Any) -> set[int]:
    """Check every field a resume reads; return the optimizer's parameter indices."""
    if not isinstance(doc, dict):
        raise _Malformed(f"it holds {_show(doc)}, not a JSON object")
    if type(doc.get("format")) is not int or doc["format"] != FORMAT:
        raise _Malformed(f"its format is {_show(doc.get('format'))}, expected {FORMAT}")
    _int(doc, "round", "", 0)
    _text(doc, "tensors", "")
    if not isinstance(_get(doc, "sha256", ""), str) or not _SHA256.fullmatch(doc["sha256"]):
        raise _Malformed(f"'sha256' must be 64 hex digits, got {_show(doc['sha256'])}")
    for key in ("session_id", "task", "reduce"):
        _text(doc, key, "")
    seen: set[str] = set()
    for i, node in enumerate(_objects(doc, "nodes", "")):
        where = f"nodes[{i}] "
        node_id = _text(node, "node_id", where)
        if node_id in seen:
            raise _Malformed(f"node {node_id!r} is listed twice in 'nodes'")
        seen.add(node_id)
        _int(node, "num_samples", where, 0)
        _text(node, "state", where)
        _int(node, "last_round", where, -1)
    for i, record in enumerate(_objects(doc, "history", "")):
        _check_record(record, f"history[{i}] ")
    return _check_optimizer(_get(doc, "optimizer", ""))


def _check_record(record: dict[str, Any], where: str) -> None:
    unknown = sorted(set(record) - _FIELDS)
    if unknown:
        raise _Malformed(f"{where}has unknown field {unknown[0]!r}")
    for name in sorted(_FIELDS):
        value = _get(record, name, where)
        if name in _INT_FIELDS:
            _int(record, name, where, 0)
        elif type(value) not in (int, float):
            raise _Malformed(f"{where}{name!r} must be a number, got {_show(value)}")


def _check_optimizer(opt: Any) -> set[int]:
    if not isinstance(opt, dict):
        raise _Malformed(f"'optimizer' must be an object, got {_show(opt)}")
    if "class" in opt:
        _text(opt, "class", "optimizer ")
    indices: list[int] = []
    groups = _objects(opt, "param_groups", "optimizer ")
    if not groups:
        raise _Malformed("optimizer 'param_groups' is empty")
    for i, group in enumerate(groups):
        where = f"optimizer param_groups[{i}] "
        params = _get(group, "params", where)
        if not isinstance(params, list) or not all(type(p) is int for p in params):
            raise _Malformed(f"{where}'params' must be a list of integers, got {_show(params)}")
        indices += params
        for key, value in group.items():
            if key == "params":
                continue
            if key == "lr" and type(value) not in (int, float):
                raise _Malformed(f"{where}'lr' must be a number, got {_show(value)}")
            if not _is_scalar(value) and not (
                isinstance(value, list) and all(_is_scalar(v) for v in value)
            ):
                raise _Malformed(
                    f"{where}{key!r} must be a number, string or list, got {_show(value)}"
                )
    if sorted(indices) != list(range(len(indices))):
        # torch numbers the parameters of a state_dict 0..N-1 across its groups.
        raise _Malformed(f"optimizer parameters {_show(indices)} are not 0..{len(indices) - 1}")
    scalars = _get(opt, "scalars", "optimizer ")
    if not isinstance(scalars, dict):
        raise _Malformed(f"optimizer 'scalars' must be an object, got {_show(scalars)}")
    for index, entry in scalars.items():
        if not _INDEX.fullmatch(index) or int(index) >= len(indices):
            raise _Malformed(f"optimizer scalars are for parameter {index!r}, which it lacks")
        if not isinstance(entry, dict) or not all(_is_scalar(v) for v in entry.values()):
            raise _Malformed(f"optimizer scalars[{index!r}] must map names to numbers")
    return set(indices)


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


def _split_tensors(
    tensors: dict[str, torch.Tensor], indices: set[int]
) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, Any]]]:
    params: dict[str, torch.Tensor] = {}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition("/")
        index, _, name = rest.partition("/")
        if kind == "param" and rest:
            params[rest] = value
        elif kind == "optim" and _INDEX.fullmatch(index) and int(index) in indices and name:
            state.setdefault(int(index), {})[name] = value
        else:
            raise _Malformed(
                f"its tensor file holds {key!r}, neither a parameter nor optimizer state"
            )
    if len(params) != len(indices):
        raise _Malformed(
            f"its tensor file holds {len(params)} parameters, its optimizer {len(indices)}"
        )
    return params, state


def _kind(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_kind(v) for v in value)
    if isinstance(value, bool) or value is None:
        return repr(value) if value is None else "bool"
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def _entry_keys(cls: Any, group: dict[str, Any], like: torch.Tensor) -> dict[str, Any]:
    """Step a two-element optimizer with ``group``'s settings; describe its state.

    Returns:
        For each state entry: None (not a tensor), "param" (a floating-point tensor
        shaped like its parameter) or the shape of a floating-point tensor (Adam's step).
    """
    p = torch.zeros(2, dtype=like.dtype, device=like.device, requires_grad=True)
    probe = cls([{**{k: v for k, v in group.items() if k != "params"}, "params": [p]}])
    p.grad = torch.ones_like(p)
    probe.step()
    probe.step()  # the second one reads the state the first one made
    return {
        k: None if not isinstance(v, torch.Tensor) else "param" if v.shape == p.shape else v.shape
        for k, v in probe.state[p].items()
    }


def _check_optimizer_fits(
    saved: dict[str, Any], state: dict[str, Any], optimizer: torch.optim.Optimizer
) -> None:
    cls: Any = type(optimizer)  # its subclasses take (params, **settings)
    if saved.get("class", cls.__name__) != cls.__name__:
        raise _Malformed(f"it holds {saved['class']} optimizer state, this run uses {cls.__name__}")
    # A twin over meta tensors (no memory) takes the state the way the real one will,
    # with torch's own checks; its groups then hold the saved settings, which must be of
    # this run's kinds, and a small optimizer stepped with them shows which entries the
    # step reads per parameter (Adam with amsgrad also needs max_exp_avg_sq).
    meta = [
        {**g, "params": [torch.empty_like(p, device="meta") for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    twin = cls(meta)
    try:
        twin.load_state_dict(state)
    except Exception as exc:  # torch raises ValueError, KeyError, TypeError, RuntimeError
        raise _Malformed(f"torch refuses its optimizer state ({exc})") from None
    for i, (mine, theirs) in enumerate(zip(optimizer.param_groups, twin.param_groups, strict=True)):
        for key, value in mine.items():
            if key != "params" and _kind(theirs.get(key, ...)) != _kind(value):
                got = _show(theirs[key]) if key in theirs else "missing"
                raise _Malformed(
                    f"optimizer param_groups[{i}] {key!r} is {got}, not like this run's"
                    f" {_show(value)}"
                )
    try:
        entries = [
            _entry_keys(cls, theirs, (mine["params"] or [torch.zeros(0)])[0])
            for mine, theirs in zip(optimizer.param_groups, twin.param_groups, strict=True)
        ]
    except Exception as exc:  # whatever the step raises on these settings
        raise _Malformed(f"torch refuses its optimizer settings ({exc})") from None
    params = [(i, p) for i, g in enumerate(optimizer.param_groups) for p in g["params"]]
    for index, (group, p) in enumerate(params):
        _check_entry(state["state"].get(index, {}), entries[group], index, tuple(p.shape))


def _check_entry(entry: dict[str, Any], keys: dict[str, Any], index: int, shape: Any) -> None:
    # torch starts an empty entry afresh; a partial one fails in the step.
    if entry and set(entry) != set(keys):
        raise _Malformed(
            f"optimizer state of parameter {index} has {sorted(entry)}, the step needs"
            f" {sorted(keys)}"
        )
    for key, value in entry.items():
        want = shape if keys[key] == "param" else keys[key]
        is_tensor = isinstance(value, torch.Tensor)
        if is_tensor != (want is not None) or (
            is_tensor and (tuple(value.shape) != tuple(want) or not value.is_floating_point())
        ):
            got = (
                f"a {value.dtype} tensor of shape {list(value.shape)}"
                if is_tensor
                else _show(value)
            )
            need = "not a tensor" if want is None else f"floating point of shape {list(want)}"
            raise _Malformed(f"optimizer state {key!r} of parameter {index} is {got}, not {need}")
