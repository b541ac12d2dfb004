"""Replay an asynchronous run from its journal, to bitwise the same parameters.

Asynchronous arrival order is timing; the aggregator records it instead
(``Aggregator.journal``, also in every checkpoint): for each version, the uploads
it applied in the order it added them, each with the node, the version the
node computed on, its reduction weight and its staleness. Node-side compute is
a function of (parameters, node's data, seed, node id, version), so recomputing
each upload on the parameters of the version it names and adding them in the
journal's order through the same reducer and optimizer reproduces the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedgrad.codec import byte_view
from fedgrad.codecs import CastCodec
from fedgrad.config import AggregatorConfig
from fedgrad.errors import ConfigError
from fedgrad.seeding import round_generator
from fedgrad.server.model import ServerModel
from fedgrad.server.policy import make_policy
from fedgrad.server.reducers import accumulate_for, make_reducer
from fedgrad.server.staging import StagedUpload
from fedgrad.task import Task, trainable_parameters

__all__ = ["replay"]


def replay(
    cfg: AggregatorConfig,
    journal: Sequence[Mapping[str, Any]],
    make_task: Callable[[], Task],
    shard_of: Callable[[str], tuple[int, int]],
) -> dict[str, torch.Tensor]:
    """Recompute an async run from ``journal``; return the final parameters by name.

    Args:
        cfg: the aggregator's config of the run (seed, optimizer, lr, reduce, staleness).
        journal: ``Aggregator.journal`` (or a checkpoint's ``journal``), versions in order.
        make_task: builds the run's task (one for the aggregator, one per node).
        shard_of: the shard ``(index, count)`` each node id trained on.

    Raises:
        ConfigError: the journal skips a version or names a version it cannot have seen.
    """
    task = make_task()
    model = ServerModel(task, cfg)
    reducer = make_reducer(
        cfg.reduce,
        model.layout,
        accumulate_for(cfg.accumulate, model.layout),
        1,
        clip=cfg.clip_update_norm,
        max_samples=cfg.max_samples_per_node,
        budget_bytes=cfg.staging_mb << 20,
        spill_dir=cfg.spill_dir,
    )
    policy = make_policy(cfg)
    codec = CastCodec(model.layout.specs)
    versions = {0: [p.detach().clone() for p in model.params]}
    nodes: dict[str, tuple[Task, Any, list[torch.nn.Parameter], torch.nn.Module]] = {}
    for expected, entry in enumerate(journal):
        version = int(entry["version"])
        if version != expected:
            raise ConfigError(f"journal entry {expected} is version {version}: versions skipped")
        for upload in entry["uploads"]:
            node_id, base = str(upload["node"]), int(upload["computed_on"])
            if base not in versions:
                raise ConfigError(f"{node_id} computed on version {base}, not kept at {version}")
            if node_id not in nodes:
                node_task = make_task()
                module = node_task.model()
                params = [p for _, p in trainable_parameters(module)]
                nodes[node_id] = (node_task, node_task.shard(*shard_of(node_id)), params, module)
            node_task, data, params, module = nodes[node_id]
            with torch.no_grad():
                for p, saved in zip(params, versions[base], strict=True):
                    p.copy_(saved)
            generator = round_generator(cfg.seed, node_id, base)
            update = node_task.compute_update(module, data, generator)
            staged = StagedUpload(codec, cfg.chunk_bytes)
            for i, g in enumerate(update.gradients):
                raw = byte_view(g.detach().contiguous()).tobytes()
                for offset in range(0, len(raw), cfg.chunk_bytes):
                    staged.add(i, offset, raw[offset : offset + cfg.chunk_bytes])
            scale = policy.scale(int(upload["staleness"]))
            reducer.add(staged, int(upload["weight"]), scale, node_id)
        model.step(reducer)
        reducer.reset()
        versions[version + 1] = [p.detach().clone() for p in model.params]
        versions.pop(version + 1 - cfg.max_staleness - 1, None)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
