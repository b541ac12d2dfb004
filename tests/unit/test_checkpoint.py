"""Checkpoints on disk: the round trip, the folder check, and every malformed checkpoint.

``load_checkpoint`` is called on folders crafted in ``tmp_path``; whatever a
checkpoint that parses holds, the only error is a one-line ``ConfigError``
(``docs/failure.md``, "A corrupt checkpoint"). The writer tests pin the commit
protocol's cleanup: a write never deletes a newer checkpoint's tensor file
(the cause of a rare failure of ``test_interrupted_checkpoint_write_...``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedgrad.errors import ConfigError
from fedgrad.history import RoundRecord
from fedgrad.server import checkpoint as ckpt_module
from fedgrad.server.checkpoint import (
    CHECKPOINT_FILE,
    check_checkpoint_dir,
    load_checkpoint,
    save_checkpoint,
)

ADVICE = "use a new --checkpoint-dir"
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


def _refused(directory: Path, *fragments: str, **kwargs: Any) -> str:
    """Load ``directory``; assert a one-line ConfigError naming ``fragments``; return it."""
    with pytest.raises(ConfigError) as info:
        load_checkpoint(directory, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- the round trip --------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_round_trip_restores_parameters_optimizer_and_document(
    tmp_path: Path, optimizer: str
) -> None:
    params, opt = _model(optimizer)
    save_checkpoint(tmp_path / "ckpt", 3, params, opt, META, _history(3))
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded is not None
    doc, got, optim_state = loaded
    assert (doc["round"], doc["session_id"], doc["nodes"]) == (3, "abc123", META["nodes"])
    records = [asdict(RoundRecord(**r)) for r in doc["history"]]
    assert json.dumps(records) == json.dumps([asdict(r) for r in _history(3)])  # NaN too
    for name, p in params.items():
        assert torch.equal(got[name], p.detach())
    # A fresh optimizer of the same kind takes the state and steps exactly like the saved one.
    fresh, fresh_opt = _model(optimizer, seed=1)
    with torch.no_grad():
        for name, p in fresh.items():
            p.copy_(got[name])
    fresh_opt.load_state_dict(optim_state)
    for p, q in zip(params.values(), fresh.values(), strict=True):
        p.grad, q.grad = torch.full_like(p, -1.0), torch.full_like(q, -1.0)
    opt.step()
    fresh_opt.step()
    for p, q in zip(params.values(), fresh.values(), strict=True):
        assert torch.equal(p, q)


def test_no_checkpoint_is_none_and_the_folder_is_created(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "new" / "ckpt") is None
    assert (tmp_path / "new" / "ckpt").is_dir()


def test_save_never_pickles_and_names_its_optimizer(tmp_path: Path) -> None:
    doc = _write(tmp_path / "ckpt")
    assert doc["optimizer"]["class"] == "Adam"
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors")) == [
        "state-3.safetensors"
    ]


# -- the folder ------------------------------------------------------------------------------
def test_checkpoint_dir_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    path.write_text("not a folder")
    with pytest.raises(ConfigError, match="exists and is not a directory") as info:
        check_checkpoint_dir(path)
    assert "\n" not in str(info.value)
    _refused(path, "is not a directory")  # load_checkpoint checks first


def test_checkpoint_dir_below_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a writable directory"):
        check_checkpoint_dir(tmp_path / "file" / "ckpt")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_checkpoint_dir_that_is_not_writable_is_a_config_error() -> None:
    # /proc/self is a directory nobody can create files in, not even root.
    with pytest.raises(ConfigError, match="is not a writable directory"):
        check_checkpoint_dir("/proc/self")


# -- malformed documents ---------------------------------------------------------------------
def _set(*keys: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        obj = doc
        for key in keys[:-1]:
            obj = obj[key]
        obj[keys[-1]] = value

    return apply


def _drop(*keys: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        obj = doc
        for key in keys[:-1]:
            obj = obj[key]
        del obj[keys[-1]]

    return apply


MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "format-true": (_set("format", value=True), "format is true, expected 1"),
    "format-2": (_set("format", value=2), "format is 2"),
    "no-format": (_drop("format"), "format is null"),
    "round-negative": (_set("round", value=-1), "'round' must be an integer >= 0, got -1"),
    "round-string": (_set("round", value="3"), "'round' must be an integer >= 0"),
    "round-float": (_set("round", value=3.0), "'round' must be an integer >= 0"),
    "no-round": (_drop("round"), "has no 'round'"),
    "tensors-number": (_set("tensors", value=5), "'tensors' must be a non-empty string"),
    "sha256-short": (_set("sha256", value="abc"), "'sha256' must be 64 hex digits"),
    "no-session": (_drop("session_id"), "has no 'session_id'"),
    "session-number": (_set("session_id", value=7), "'session_id' must be a non-empty string"),
    "task-list": (_set("task", value=["linear"]), "'task' must be a non-empty string"),
    "no-reduce": (_drop("reduce"), "has no 'reduce'"),
    "nodes-object": (_set("nodes", value={"node-0": 4}), "'nodes' must be a list of objects"),
    "nodes-of-ints": (_set("nodes", value=[1, 2]), "'nodes' must be a list of objects"),
    "node-without-id": (_drop("nodes", 0, "node_id"), "nodes[0] has no 'node_id'"),
    "node-samples-string": (
        _set("nodes", 1, "num_samples", value="9"),
        "nodes[1] 'num_samples' must be an integer >= 0",
    ),
    "node-state-null": (_set("nodes", 0, "state", value=None), "nodes[0] 'state' must be"),
    "node-last-round": (_set("nodes", 0, "last_round", value=-2), "'last_round' must be"),
    "node-twice": (_set("nodes", 1, "node_id", value="node-0"), "'node-0' is listed twice"),
    "history-object": (_set("history", value={}), "'history' must be a list of objects"),
    "history-empty-record": (_set("history", 0, value={}), "history[0] has no"),
    "history-missing-field": (_drop("history", 1, "seconds"), "history[1] has no 'seconds'"),
    "history-extra-field": (_set("history", 0, "extra", value=1), "unknown field 'extra'"),
    "history-loss-string": (
        _set("history", 0, "train_loss", value="0.5"),
        "history[0] 'train_loss' must be a number",
    ),
    "history-bytes-float": (_set("history", 2, "bytes", value=1.5), "'bytes' must be an integer"),
    "history-round-negative": (
        _set("history", 0, "round", value=-1),
        "history[0] 'round' must be an integer >= 0",
    ),
    "no-optimizer": (_drop("optimizer"), "has no 'optimizer'"),
    "optimizer-list": (_set("optimizer", value=[]), "'optimizer' must be an object"),
    "no-param-groups": (_drop("optimizer", "param_groups"), "has no 'param_groups'"),
    "param-groups-empty": (_set("optimizer", "param_groups", value=[]), "is empty"),
    "group-params-string": (
        _set("optimizer", "param_groups", 0, "params", value="0,1"),
        "'params' must be a list of integers",
    ),
    "group-params-repeated": (
        _set("optimizer", "param_groups", 0, "params", value=[0, 0]),
        "are not 0..1",
    ),
    "group-params-gap": (
        _set("optimizer", "param_groups", 0, "params", value=[0, 2]),
        "are not 0..1",
    ),
    "group-lr-string": (
        _set("optimizer", "param_groups", 0, "lr", value="fast"),
        "'lr' must be a number",
    ),
    "group-value-object": (
        _set("optimizer", "param_groups", 0, "betas", value={"a": 1}),
        "'betas' must be a number, string or list",
    ),
    "no-scalars": (_drop("optimizer", "scalars"), "has no 'scalars'"),
    "scalars-list": (_set("optimizer", "scalars", value=[]), "'scalars' must be an object"),
    "scalars-unknown-param": (
        _set("optimizer", "scalars", value={"7": {"step": 1}}),
        "for parameter '7', which it lacks",
    ),
    "scalars-not-an-index": (
        _set("optimizer", "scalars", value={"²": {"step": 1}}),
        "which it lacks",
    ),
    "scalars-entry-list": (
        _set("optimizer", "scalars", value={"0": [1]}),
        "must map names to numbers",
    ),
    "tensors-of-another-round": (
        _set("tensors", value="state-2.safetensors"),
        "are missing or do not match",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_document_is_a_one_line_config_error(tmp_path: Path, case: str) -> None:
    directory = tmp_path / "ckpt"
    doc = _write(directory)
    mutate, fragment = MALFORMED[case]
    mutate(doc)
    (directory / CHECKPOINT_FILE).write_text(json.dumps(doc))
    _refused(directory, fragment, ADVICE)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[1, 2]", "holds [1, 2], not a JSON object"),
        ('{"format": 1}', "has no 'round'"),
        ('"checkpoint"', "not a JSON object"),
        ("null", "not a JSON object"),
        ('{"format": 1, "round": 3, "tens', "is unreadable"),
        ("", "is unreadable"),
        ("[" * 100_000, "is unreadable"),  # deeper than the parser's recursion limit
    ],
    ids=["list", "format-only", "string", "null", "truncated", "empty", "deep"],
)
def test_json_of_the_wrong_shape_is_a_one_line_config_error(
    tmp_path: Path, text: str, fragment: str
) -> None:
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / CHECKPOINT_FILE).write_text(text)
    _refused(directory, fragment, ADVICE)


def test_bytes_that_are_not_utf8_are_a_config_error(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / CHECKPOINT_FILE).write_bytes(b"\x80\x04\x95 not json")
    _refused(directory, "is unreadable", ADVICE)


# -- the tensor file -------------------------------------------------------------------------
def _rewrite_tensors(directory: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change the tensor file's contents and keep the JSON's SHA-256 consistent with it."""
    doc = json.loads((directory / CHECKPOINT_FILE).read_text())
    tensor_file = directory / doc["tensors"]
    tensors = load_file(str(tensor_file))
    change(tensors)
    save_file(tensors, str(tensor_file))
    doc["sha256"] = hashlib.sha256(tensor_file.read_bytes()).hexdigest()
    (directory / CHECKPOINT_FILE).write_text(json.dumps(doc))


def test_missing_tensor_file_is_a_config_error(tmp_path: Path) -> None:
    _write(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "state-3.safetensors").unlink()
    _refused(tmp_path / "ckpt", "are missing or do not match their SHA-256", ADVICE)


def test_tensor_file_that_is_a_folder_is_a_config_error(tmp_path: Path) -> None:
    _write(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "state-3.safetensors").unlink()
    (tmp_path / "ckpt" / "state-3.safetensors").mkdir()
    _refused(tmp_path / "ckpt", "are missing or do not match")


def test_changed_tensor_file_is_a_config_error(tmp_path: Path) -> None:
    _write(tmp_path / "ckpt")
    tensor_file = tmp_path / "ckpt" / "state-3.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 1
    tensor_file.write_bytes(bytes(data))
    _refused(tmp_path / "ckpt", "do not match their SHA-256")


def test_tensor_file_that_is_not_safetensors_is_a_config_error(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    doc = _write(directory)
    content = b"PK\x03\x04 a zip, not safetensors"
    (directory / "state-3.safetensors").write_bytes(content)
    doc["sha256"] = hashlib.sha256(content).hexdigest()
    (directory / CHECKPOINT_FILE).write_text(json.dumps(doc))
    _refused(directory, "state-3.safetensors is not a safetensors file", ADVICE)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda t: t.update({"other/x": torch.zeros(1)}), "holds 'other/x'"),
        (lambda t: t.update({"optim/7/exp_avg": torch.zeros(1)}), "holds 'optim/7/exp_avg'"),
        (lambda t: t.update({"optim/0": torch.zeros(1)}), "holds 'optim/0'"),
        (lambda t: t.update({"param/": torch.zeros(1)}), "holds 'param/'"),
        (lambda t: t.pop("param/b"), "holds 1 parameters, its optimizer 2"),
    ],
    ids=["unknown-kind", "unknown-index", "no-name", "empty-name", "parameter-missing"],
)
def test_tensor_file_that_does_not_fit_the_document_is_a_config_error(
    tmp_path: Path, change: Callable[[dict[str, torch.Tensor]], Any], fragment: str
) -> None:
    _write(tmp_path / "ckpt")
    _rewrite_tensors(tmp_path / "ckpt", change)
    _refused(tmp_path / "ckpt", fragment, ADVICE)


# -- the optimizer of the run ----------------------------------------------------------------
def test_matching_optimizer_loads(tmp_path: Path) -> None:
    _write(tmp_path / "ckpt", optimizer="adam")
    _, opt = _model("adam", seed=2)
    loaded = load_checkpoint(tmp_path / "ckpt", optimizer=opt)
    assert loaded is not None
    opt.load_state_dict(loaded[2])


def test_another_optimizer_is_a_config_error(tmp_path: Path) -> None:
    # Without the check torch accepts Adam's groups into SGD, whose next step then fails
    # with KeyError 'momentum'.
    _write(tmp_path / "ckpt", optimizer="adam")
    _, opt = _model("momentum")
    _refused(tmp_path / "ckpt", "holds Adam optimizer state, this run uses SGD", optimizer=opt)


def test_other_parameter_groups_are_a_config_error(tmp_path: Path) -> None:
    _write(tmp_path / "ckpt")
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.Adam([{"params": [params[0]]}, {"params": [params[1]]}])
    _refused(tmp_path / "ckpt", "different number of parameter groups", optimizer=opt)


def test_optimizer_state_of_another_shape_is_a_config_error(tmp_path: Path) -> None:
    _write(tmp_path / "ckpt")
    params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.Adam(params)
    _refused(
        tmp_path / "ckpt", "of shape [3, 2], not floating point of shape [2, 3]", optimizer=opt
    )


def test_partial_optimizer_state_is_a_config_error(tmp_path: Path) -> None:
    # torch loads it; Adam's next step would fail with KeyError 'exp_avg'.
    _write(tmp_path / "ckpt")
    _rewrite_tensors(tmp_path / "ckpt", lambda t: t.pop("optim/0/exp_avg"))
    _, opt = _model("adam")
    _refused(
        tmp_path / "ckpt", "parameter 0 has ['exp_avg_sq', 'step'], the step needs", optimizer=opt
    )


def test_optimizer_state_of_another_dtype_is_a_config_error(tmp_path: Path) -> None:
    _write(tmp_path / "ckpt")
    _rewrite_tensors(tmp_path / "ckpt", lambda t: t.update({"optim/1/exp_avg": torch.ones(2) > 0}))
    _, opt = _model("adam")
    _refused(tmp_path / "ckpt", "'exp_avg' of parameter 1 is a torch.bool tensor", optimizer=opt)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("betas", [None, None], "'betas' is [null, null], not like this run's [0.9, 0.999]"),
        ("amsgrad", True, "the step needs ['exp_avg', 'exp_avg_sq', 'max_exp_avg_sq', 'step']"),
        ("weight_decay", 10**30, "torch refuses its optimizer settings (int too big"),
    ],
    ids=["betas-of-none", "amsgrad-without-its-state", "weight-decay-beyond-int64"],
)
def test_optimizer_settings_the_step_cannot_use_are_a_config_error(
    tmp_path: Path, key: str, value: Any, fragment: str
) -> None:
    directory = tmp_path / "ckpt"
    doc = _write(directory)
    doc["optimizer"]["param_groups"][0][key] = value
    (directory / CHECKPOINT_FILE).write_text(json.dumps(doc))
    _, opt = _model("adam")
    _refused(directory, fragment, optimizer=opt)


# -- any mutation: a ConfigError or a checkpoint a resume can use ----------------------------
def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    children = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    for key, value in children:
        found += _paths(value, (*prefix, key))
    return found


REPLACEMENTS = [None, True, -1, 0, 7, 2.5, float("nan"), "", "x", [], [1], {}, {"a": 1}]


def test_random_mutations_are_config_errors_or_usable(tmp_path: Path) -> None:
    """Drop or replace any one JSON value, 400 times: no other exception, ever."""
    directory = tmp_path / "ckpt"
    original = _write(directory)
    paths = _paths(original)
    rng = random.Random(20240603)
    outcomes = {"refused": 0, "loaded": 0}
    for _ in range(400):
        doc = copy.deepcopy(original)
        path = rng.choice(paths)
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if rng.random() < 0.3:
            del parent[path[-1]]
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(REPLACEMENTS))
        (directory / CHECKPOINT_FILE).write_text(json.dumps(doc))
        _, opt = _model("adam", seed=3)
        try:
            loaded = load_checkpoint(directory, optimizer=opt)
        except ConfigError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
            continue
        assert loaded is not None
        got, _, optim_state = loaded
        # What a resume does with it (fedgrad.server.resume) and the next step must work.
        _ = [RoundRecord(**r) for r in got["history"]], int(got["round"]), got["session_id"]
        _ = [(n["node_id"], int(n["num_samples"]), int(n["last_round"])) for n in got["nodes"]]
        opt.load_state_dict(optim_state)
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p)
        opt.step()
        outcomes["loaded"] += 1
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 10, outcomes


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
