"""What a checkpoint document must hold: checked field by field before anything loads.

``fedgrad.server.checkpoint`` reads the files; this module says whether what it read
is a checkpoint a resume can use, so that a document that parses but is malformed
is a one-line ``ConfigError`` (see docs/failure.md), never a ``KeyError`` later.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, fields
from typing import Any

import torch

from fedgrad.history import RoundRecord
from fedgrad.optimizers import eager_step

__all__ = ["Malformed", "check_document", "check_optimizer_fits", "split_tensors"]

FORMAT = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
_INDEX = re.compile(r"[0-9]+")
#: RoundRecord fields stored as JSON integers; the others are numbers (NaN allowed).
_INT_FIELDS = {f.name for f in fields(RoundRecord) if f.type in ("int", int)}
_FIELDS = {f.name for f in fields(RoundRecord)}
#: Columns added later have defaults: older checkpoints lack them.
_OPTIONAL = {f.name for f in fields(RoundRecord) if f.default is not MISSING}


class Malformed(Exception):
    """What is wrong with a checkpoint, for the one-line ConfigError."""


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, allow_nan=True)
    except TypeError:  # a tensor, in the optimizer checks
        text = f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def _get(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise Malformed(f"{where}has no {key!r}")
    return obj[key]


def _int(obj: dict[str, Any], key: str, where: str, minimum: int) -> int:
    value = _get(obj, key, where)
    if type(value) is not int or value < minimum:  # bool is not an int here
        raise Malformed(f"{where}{key!r} must be an integer >= {minimum}, got {_show(value)}")
    return value


def _text(obj: dict[str, Any], key: str, where: str) -> str:
    value = _get(obj, key, where)
    if not isinstance(value, str) or not value:
        raise Malformed(f"{where}{key!r} must be a non-empty string, got {_show(value)}")
    return value


def _objects(obj: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    value = _get(obj, key, where)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise Malformed(f"{where}{key!r} must be a list of objects, got {_show(value)}")
    return value


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def check_document(doc: Any) -> set[int]:
    """Check every field a resume reads; return the optimizer's parameter indices."""
    if not isinstance(doc, dict):
        raise Malformed(f"it holds {_show(doc)}, not a JSON object")
    if type(doc.get("format")) is not int or doc["format"] != FORMAT:
        raise Malformed(f"its format is {_show(doc.get('format'))}, expected {FORMAT}")
    _int(doc, "round", "", 0)
    _text(doc, "tensors", "")
    if not isinstance(_get(doc, "sha256", ""), str) or not _SHA256.fullmatch(doc["sha256"]):
        raise Malformed(f"'sha256' must be 64 hex digits, got {_show(doc['sha256'])}")
    for key in ("session_id", "task", "reduce"):
        _text(doc, key, "")
    seen: set[str] = set()
    for i, node in enumerate(_objects(doc, "nodes", "")):
        where = f"nodes[{i}] "
        node_id = _text(node, "node_id", where)
        if node_id in seen:
            raise Malformed(f"node {node_id!r} is listed twice in 'nodes'")
        seen.add(node_id)
        _int(node, "num_samples", where, 0)
        _text(node, "state", where)
        _int(node, "last_round", where, -1)
        if "last_upload" in node:
            _text(node, "last_upload", where)
    for i, record in enumerate(_objects(doc, "history", "")):
        _check_record(record, f"history[{i}] ")
    if "journal" in doc:
        for i, entry in enumerate(_objects(doc, "journal", "")):
            where = f"journal[{i}] "
            _int(entry, "version", where, 0)
            selected = entry.get("selected", [])
            if not isinstance(selected, list) or not all(isinstance(n, str) for n in selected):
                raise Malformed(f"{where}'selected' must be a list of node ids")
            for j, upload in enumerate(_objects(entry, "uploads", where)):
                _text(upload, "node", f"{where}uploads[{j}] ")
                _int(upload, "computed_on", f"{where}uploads[{j}] ", 0)
                _int(upload, "weight", f"{where}uploads[{j}] ", 1)
                _int(upload, "staleness", f"{where}uploads[{j}] ", 0)
    return _check_optimizer(_get(doc, "optimizer", ""))


def _check_record(record: dict[str, Any], where: str) -> None:
    unknown = sorted(set(record) - _FIELDS)
    if unknown:
        raise Malformed(f"{where}has unknown field {unknown[0]!r}")
    for name in sorted(_FIELDS):
        if name in _OPTIONAL and name not in record:
            continue
        value = _get(record, name, where)
        if name in _INT_FIELDS:
            _int(record, name, where, 0)
        elif type(value) not in (int, float):
            raise Malformed(f"{where}{name!r} must be a number, got {_show(value)}")


def _check_optimizer(opt: Any) -> set[int]:
    if not isinstance(opt, dict):
        raise Malformed(f"'optimizer' must be an object, got {_show(opt)}")
    if "class" in opt:
        _text(opt, "class", "optimizer ")
    indices: list[int] = []
    groups = _objects(opt, "param_groups", "optimizer ")
    if not groups:
        raise Malformed("optimizer 'param_groups' is empty")
    for i, group in enumerate(groups):
        where = f"optimizer param_groups[{i}] "
        params = _get(group, "params", where)
        if not isinstance(params, list) or not all(type(p) is int for p in params):
            raise Malformed(f"{where}'params' must be a list of integers, got {_show(params)}")
        indices += params
        for key, value in group.items():
            if key == "params":
                continue
            if key == "lr" and type(value) not in (int, float):
                raise Malformed(f"{where}'lr' must be a number, got {_show(value)}")
            if not _is_scalar(value) and not (
                isinstance(value, list) and all(_is_scalar(v) for v in value)
            ):
                raise Malformed(
                    f"{where}{key!r} must be a number, string or list, got {_show(value)}"
                )
    if sorted(indices) != list(range(len(indices))):
        # torch numbers the parameters of a state_dict 0..N-1 across its groups.
        raise Malformed(f"optimizer parameters {_show(indices)} are not 0..{len(indices) - 1}")
    scalars = _get(opt, "scalars", "optimizer ")
    if not isinstance(scalars, dict):
        raise Malformed(f"optimizer 'scalars' must be an object, got {_show(scalars)}")
    for index, entry in scalars.items():
        if not _INDEX.fullmatch(index) or int(index) >= len(indices):
            raise Malformed(f"optimizer scalars are for parameter {index!r}, which it lacks")
        if not isinstance(entry, dict) or not all(_is_scalar(v) for v in entry.values()):
            raise Malformed(f"optimizer scalars[{index!r}] must map names to numbers")
    return set(indices)


def split_tensors(
    tensors: dict[str, torch.Tensor], indices: set[int]
) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, Any]]]:
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition("/")
        index, _, name = rest.partition("/")
        if kind == "param" and rest:
            params[rest] = value
        elif kind == "buffer" and rest:
            buffers[key] = value
        elif kind == "optim" and _INDEX.fullmatch(index) and int(index) in indices and name:
            state.setdefault(int(index), {})[name] = value
        else:
            raise Malformed(
                f"its tensor file holds {key!r}, neither a parameter nor optimizer state"
            )
    if len(params) != len(indices):
        raise Malformed(
            f"its tensor file holds {len(params)} parameters, its optimizer {len(indices)}"
        )
    return params | buffers, state


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
    eager_step(probe)
    eager_step(probe)  # the second one reads the state the first one made
    return {
        k: None if not isinstance(v, torch.Tensor) else "param" if v.shape == p.shape else v.shape
        for k, v in probe.state[p].items()
    }


def check_optimizer_fits(
    saved: dict[str, Any], state: dict[str, Any], optimizer: torch.optim.Optimizer
) -> None:
    cls: Any = type(optimizer)  # its subclasses take (params, **settings)
    if saved.get("class", cls.__name__) != cls.__name__:
        raise Malformed(f"it holds {saved['class']} optimizer state, this run uses {cls.__name__}")
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
        raise Malformed(f"torch refuses its optimizer state ({exc})") from None
    for i, (mine, theirs) in enumerate(zip(optimizer.param_groups, twin.param_groups, strict=True)):
        for key, value in mine.items():
            if key != "params" and _kind(theirs.get(key, ...)) != _kind(value):
                got = _show(theirs[key]) if key in theirs else "missing"
                raise Malformed(
                    f"optimizer param_groups[{i}] {key!r} is {got}, not like this run's"
                    f" {_show(value)}"
                )
    try:
        entries = [
            _entry_keys(cls, theirs, (mine["params"] or [torch.zeros(0)])[0])
            for mine, theirs in zip(optimizer.param_groups, twin.param_groups, strict=True)
        ]
    except Exception as exc:  # whatever the step raises on these settings
        raise Malformed(f"torch refuses its optimizer settings ({exc})") from None
    params = [(i, p) for i, g in enumerate(optimizer.param_groups) for p in g["params"]]
    for index, (group, p) in enumerate(params):
        _check_entry(state["state"].get(index, {}), entries[group], index, tuple(p.shape))


def _check_entry(entry: dict[str, Any], keys: dict[str, Any], index: int, shape: Any) -> None:
    # torch starts an empty entry afresh; a partial one fails in the step.
    if entry and set(entry) != set(keys):
        raise Malformed(
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
            raise Malformed(f"optimizer state {key!r} of parameter {index} is {got}, not {need}")
