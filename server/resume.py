"""Checkpoint and resume: what of the engine, the model and the history goes to disk.

``fedgrad.server.checkpoint`` writes and reads the files atomically; this
module decides their contents: the round, the model's parameters and
optimizer state, the node registry and the history, under the task and
reduction they belong to.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fedgrad.config import AggregatorConfig
from fedgrad.errors import ConfigError
from fedgrad.history import RoundRecord
from fedgrad.server.checkpoint import load_checkpoint, save_checkpoint
from fedgrad.server.engine import NodeRecord, NodeState
from fedgrad.server.model import ServerModel

__all__ = ["Resumed", "read_checkpoint", "write_checkpoint"]


@dataclass(frozen=True)
class Resumed:
    """The state a checkpoint restores besides the model."""

    round: int
    session_id: str
    nodes: tuple[NodeRecord, ...]
    history: list[RoundRecord]
    journal: list[dict[str, Any]]


def write_checkpoint(
    cfg: AggregatorConfig,
    round_: int,
    model: ServerModel,
    nodes: Iterable[NodeRecord],
    session_id: str,
    history: Sequence[RoundRecord],
    journal: Sequence[dict[str, Any]] = (),
) -> None:
    """Write the state of ``round_`` to ``cfg.checkpoint_dir`` (atomically).

    ``journal``: async and sampled rounds, the uploads each round applied, in order.
    """
    assert cfg.checkpoint_dir
    meta: dict[str, Any] = {
        "session_id": session_id,
        "task": cfg.task,
        "reduce": cfg.reduce,
        "mode": cfg.mode,
        "nodes": [
            {
                "node_id": r.node_id,
                "num_samples": r.num_samples,
                "state": r.state.value,
                "last_round": r.last_round,
                **({"last_upload": r.last_upload} if r.last_upload else {}),
            }
            for r in nodes
        ],
    }
    if cfg.mode == "async" or cfg.sampled:
        meta["journal"] = list(journal)
    if model.schedule is not None:
        meta["schedule"] = {"spec": cfg.lr_schedule, "state": model.schedule.state_dict()}
    save_checkpoint(
        cfg.checkpoint_dir,
        round_,
        model.named_params(),
        model.optimizer,
        meta,
        list(history),
        model.named_buffers(),
    )


def read_checkpoint(cfg: AggregatorConfig, model: ServerModel) -> Resumed | None:
    """Load the checkpoint in ``cfg.checkpoint_dir`` into ``model``; None if there is none.

    Raises:
        ConfigError: the checkpoint belongs to another task or reduction, or does not fit.
    """
    assert cfg.checkpoint_dir
    loaded = load_checkpoint(cfg.checkpoint_dir, optimizer=model.optimizer)
    if loaded is None:
        return None
    doc, params, optim_state = loaded
    if doc.get("task") != cfg.task or doc.get("reduce") != cfg.reduce:
        raise ConfigError(
            f"checkpoint in {cfg.checkpoint_dir} is for task {doc.get('task')!r} with"
            f" reduce {doc.get('reduce')!r}; use a new --checkpoint-dir for another run"
        )
    if doc.get("mode", "sync") != cfg.mode:
        raise ConfigError(
            f"checkpoint in {cfg.checkpoint_dir} is of --mode {doc.get('mode', 'sync')}, this"
            f" aggregator runs --mode {cfg.mode}; use a new --checkpoint-dir for another run"
        )
    model.load(params, optim_state)
    _load_schedule(cfg, model, doc.get("schedule"))
    nodes = tuple(
        NodeRecord(
            n["node_id"],
            int(n["num_samples"]),
            NodeState.LEFT if n["state"] == "left" else NodeState.ACTIVE,
            int(n["last_round"]),
            str(n.get("last_upload", "")),
        )
        for n in doc["nodes"]
    )
    history = [RoundRecord(**r) for r in doc["history"]]
    journal = list(doc.get("journal", []))
    return Resumed(int(doc["round"]), str(doc["session_id"]), nodes, history, journal)


def _shape(value: Any) -> Any:
    """The structure of a scheduler's state: keys and kinds of values, not the numbers."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_shape(v) for v in value]
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    return "number" if isinstance(value, int | float) else type(value).__name__


def _load_schedule(cfg: AggregatorConfig, model: ServerModel, saved: Any) -> None:
    """Restore the lr scheduler's state, after checking it is this schedule's, number by number.

    Raises:
        ConfigError: the checkpoint was written with another (or no) ``--lr-schedule``, or
            its scheduler state does not have the fields this schedule's has.
    """
    if model.schedule is None:
        if saved is not None:
            raise ConfigError(
                f"checkpoint in {cfg.checkpoint_dir} was written with --lr-schedule"
                f" {saved.get('spec')!r} and this aggregator has none; pass the same schedule"
            )
        return
    spec = saved.get("spec") if isinstance(saved, dict) else None
    if spec != cfg.lr_schedule:
        raise ConfigError(
            f"checkpoint in {cfg.checkpoint_dir} was written with --lr-schedule {spec!r},"
            f" this aggregator has {cfg.lr_schedule!r}; pass the same schedule"
        )
    state = saved.get("state")
    if _shape(state) != _shape(model.schedule.state_dict()):
        raise ConfigError(
            f"checkpoint in {cfg.checkpoint_dir} holds a malformed --lr-schedule state;"
            " use a new --checkpoint-dir"
        )
    model.schedule.load_state_dict(state)
