"""LocalCluster: an aggregator and N nodes in one process, over real gRPC on loopback.

For users' integration tests of their own tasks::

    from fedgrad import LocalCluster

    with LocalCluster("linear", nodes=4) as cluster:
        result = cluster.run(rounds=5)
    print(result.history[-1].test_loss, result.params["weight"])
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedgrad.client.node import Node, NodeResult
from fedgrad.config import AggregatorConfig, NodeConfig
from fedgrad.errors import ConfigError
from fedgrad.history import RoundRecord
from fedgrad.server.app import ServerThread
from fedgrad.task import Task, load_task

__all__ = ["ClusterResult", "LocalCluster"]


@dataclass(frozen=True)
class ClusterResult:
    """The outcome of ``LocalCluster.run``.

    Attributes:
        params: the final model state dict (parameters and buffers).
        history: one record per round.
        nodes: what each node reported.
    """

    params: dict[str, torch.Tensor]
    history: list[RoundRecord]
    nodes: list[NodeResult]


class LocalCluster:
    """Run an aggregator and ``nodes`` compute nodes in this process on ephemeral ports."""

    def __init__(
        self,
        task: str | Task | Callable[[], Task],
        nodes: int = 4,
        task_args: Mapping[str, str] | None = None,
        seed: int = 0,
        timeout: float = 600.0,
        node_options: Mapping[str, Any] | None = None,
        **aggregator_options: Any,
    ) -> None:
        """Configure the cluster.

        Args:
            task: a built-in name, "package.module:attr", a Task, or a factory of Tasks.
                Each node gets its own task object.
            nodes: number of compute nodes (node ids "node-0" ...), shards i/nodes.
            task_args: options passed to the task (like ``--task-arg``).
            seed: the training seed of aggregator and nodes.
            timeout: seconds ``run`` may take before it fails.
            node_options: extra ``NodeConfig`` fields (e.g. ``wire_dtype``).
            **aggregator_options: extra ``AggregatorConfig`` fields (``reduce``, ``lr``,
                ``start_timeout``, ...).

        Raises:
            ConfigError: a value the configs refuse (the same message as the CLI's).
        """
        if not timeout > 0:
            raise ConfigError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        options = {"finish_grace": 10.0, "progress": False, **aggregator_options}
        # Both configs are built here, so a bad value fails now, not in a node thread.
        self.cfg = AggregatorConfig(
            task="<local>", listen="127.0.0.1:0", nodes=nodes, seed=seed, **options
        )
        self.node_cfg = NodeConfig(
            **{
                "task": "<local>",
                "shard": (0, nodes),
                "seed": seed,
                "give_up_after": 30.0,
                **dict(node_options or {}),
            }
        )
        self._make_task = _task_factory(task, dict(task_args or {}), seed)
        self.nodes, self.seed, self.timeout = nodes, seed, timeout
        self._server: ServerThread | None = None

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the aggregator if it is running."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def run(self, rounds: int) -> ClusterResult:
        """Train a fresh federation for ``rounds`` rounds and return the result.

        Raises:
            TimeoutError: training did not finish within ``timeout`` seconds.
            Exception: the first error raised by a node.
        """
        self.close()
        self._server = ServerThread(self._make_task(), replace(self.cfg, rounds=rounds))
        port = self._server.start()
        results: list[NodeResult | None] = [None] * self.nodes
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=self._node, args=(i, port, results, errors), daemon=True)
            for i in range(self.nodes)
        ]
        for t in threads:
            t.start()
        self._server.call(self._server.server.core.wait_finished(), timeout=self.timeout)
        for t in threads:
            t.join(self.timeout)
        if errors:
            raise errors[0]
        core = self._server.server.core
        return ClusterResult(
            params={k: v.clone() for k, v in core.state_dict().items()},
            history=list(core.history),
            nodes=[r for r in results if r is not None],
        )

    def _node(self, index: int, port: int, results: list[Any], errors: list[BaseException]) -> None:
        cfg = replace(
            self.node_cfg,
            aggregator=f"127.0.0.1:{port}",
            node_id=f"node-{index}",
            shard=(index, self.nodes),
        )
        try:
            node = Node(self._make_task(), cfg)
            try:
                results[index] = node.run()
            finally:
                node.close()
        except BaseException as exc:  # reported to the caller of run()
            errors.append(exc)


def _task_factory(
    task: str | Task | Callable[[], Task], args: dict[str, str], seed: int
) -> Callable[[], Task]:
    if isinstance(task, str):
        return lambda: load_task(task, args, seed=seed)
    if isinstance(task, Task):
        return lambda: copy.deepcopy(task)
    return task
