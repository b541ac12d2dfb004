"""LocalCluster: an aggregator and N nodes in one process, over real gRPC on loopback.

For users' integration tests of their own tasks::

    from fedgrad import LocalCluster

    with LocalCluster("linear", nodes=4) as cluster:
        result = cluster.run(rounds=5)
    print(result.history[-1].test_loss, result.params["weight"])
"""

from __future__ import annotations

import asyncio
import copy
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from fedgrad.client.node import Node, NodeResult
from fedgrad.config import AggregatorConfig, NodeConfig
from fedgrad.errors import ConfigError
from fedgrad.history import RoundRecord
from fedgrad.relay_config import RelayConfig
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
        journal: async mode, the uploads each version applied, in order (``replay``).
    """

    params: dict[str, torch.Tensor]
    history: list[RoundRecord]
    nodes: list[NodeResult]
    journal: list[dict[str, Any]] = field(default_factory=list)


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
        attackers: Mapping[str, str] | None = None,
        shards: int = 1,
        relays: int = 0,
        relay_options: Mapping[str, Any] | None = None,
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
            node_options: extra ``NodeConfig`` fields of every node (e.g. ``compress``,
                or ``simulate_attack`` to make all nodes attack).
            attackers: node id -> ``simulate_attack`` spec of the nodes that attack,
                e.g. ``{"node-0": "sign-flip:10"}``; it wins over ``node_options``' for them.
            shards: run a sharded aggregator of this many shards (``--shard I/K``), each
                on its own port; the result's ``params`` are gathered from all of them.
            relays: put this many relays (``fedgrad relay``) between the nodes and the
                aggregator, ``nodes / relays`` nodes each (``nodes`` must be a multiple).
            relay_options: extra ``RelayConfig`` fields of every relay (``forward_dtype``).
            **aggregator_options: extra ``AggregatorConfig`` fields (``reduce``, ``lr``,
                ``start_timeout``, ...).

        Raises:
            ConfigError: a value the configs refuse (the same message as the CLI's).
        """
        if not timeout > 0:
            raise ConfigError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        options = {"finish_grace": 10.0, "progress": False, **aggregator_options}
        # Both configs are built here, so a bad value fails now, not in a node thread.
        if not (isinstance(shards, int) and shards >= 1):
            raise ConfigError(f"shards must be an integer >= 1, got {shards!r}")
        self.cfg = AggregatorConfig(
            task="<local>", listen="127.0.0.1:0", nodes=nodes, seed=seed, **options
        )
        if shards > 1:  # checked now: what a sharded aggregator refuses fails here
            replace(self.cfg, shard=f"0/{shards}", peers=("127.0.0.1:1",) * shards)
        self.shards = shards
        self._followers: list[ServerThread] = []
        if not (isinstance(relays, int) and relays >= 0) or (relays and nodes % relays):
            raise ConfigError(f"relays must be 0 or divide nodes ({nodes}), got {relays!r}")
        self.relays = relays
        self.relay_options = dict(relay_options or {})
        if relays:  # checked now, like the other configs
            RelayConfig(upstream="127.0.0.1:1", **self.relay_options)
        self._relays: list[_RelayThread] = []
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
        self.attackers = _attackers(self.node_cfg, nodes, attackers or {})
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
        for follower in self._followers:
            follower.stop()
        self._followers = []
        for relay in self._relays:
            relay.stop()
        self._relays = []

    def run(self, rounds: int) -> ClusterResult:
        """Train a fresh federation for ``rounds`` rounds and return the result.

        The first error of a node or of the aggregator ends the run at once: the other
        nodes leave, the aggregator stops, and the error is raised with the node's
        exception as its cause.

        Raises:
            RuntimeError: a node (or the aggregator) failed; the message names the node and
                the exception's type and message, ``__cause__`` is the exception itself.
            TimeoutError: training did not finish within ``timeout`` seconds.
        """
        self.close()
        cfg = replace(self.cfg, rounds=rounds)
        if self.relays:  # the aggregator's nodes are the relays (on every shard alike)
            cfg = replace(cfg, nodes=self.relays, min_nodes=min(cfg.min_nodes, self.relays))
        if self.shards > 1:
            peers = tuple(f"127.0.0.1:{_free_port()}" for _ in range(self.shards))
            for i in range(1, self.shards):
                shard = replace(cfg, shard=f"{i}/{self.shards}", peers=peers, listen=peers[i])
                self._followers.append(ServerThread(self._make_task(), shard))
                self._followers[-1].start()
            cfg = replace(cfg, shard=f"0/{self.shards}", peers=peers, listen=peers[0])
        self._server = ServerThread(self._make_task(), cfg)
        port = self._server.start()
        targets = [f"127.0.0.1:{port}"] * self.nodes
        if self.relays:
            per = self.nodes // self.relays
            for r in range(self.relays):
                relay = _RelayThread(
                    self._make_task(),
                    RelayConfig(
                        upstream=f"127.0.0.1:{port}",
                        listen=f"127.0.0.1:{_free_port()}",
                        nodes=per,
                        node_id=f"relay-{r}",
                        **self.relay_options,
                    ),  # fmt: skip
                )
                self._relays.append(relay)
                address = relay.start()
                targets[r * per : (r + 1) * per] = [address] * per
        core = self._server.server.core
        finished = asyncio.run_coroutine_threadsafe(core.wait_finished(), self._server.loop)
        fleet = _Fleet(self._make_task, self._node_configs(targets))
        waited: list[futures.Future[Any]] = [finished, *fleet.outcomes]
        try:
            _, pending = futures.wait(
                waited,
                timeout=self.timeout,
                return_when=futures.FIRST_EXCEPTION,
            )
            failure = fleet.first_failure() or _failure_of("the aggregator", finished)
            if failure is None and pending:
                failure = TimeoutError(
                    f"training did not finish within timeout={self.timeout:g} s: round"
                    f" {core.round} of {rounds} (raise timeout= for longer runs)"
                )
        finally:
            fleet.stop()  # every node leaves; nothing keeps running after an error
            finished.cancel()
        if failure is not None:
            self.close()
            raise failure
        if core.peers is not None:
            state = self._server.call(core.peers.gather(core))
        else:
            state = core.state_dict()
        return ClusterResult(
            params={k: v.clone() for k, v in state.items()},
            history=list(core.history),
            nodes=fleet.results(),
            journal=list(core.journal),
        )

    def replay(self, journal: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Recompute an async run of this cluster from its journal; return its parameters.

        Asynchronous arrival order is timing; the journal records the order the
        aggregator applied the uploads in, so the replay is bitwise the run's
        (``fedgrad.server.replay``).

        Raises:
            ConfigError: the journal is not one of a run of this cluster's configuration.
        """
        from fedgrad.server.replay import replay

        rounds = len(journal)
        return replay(
            replace(self.cfg, rounds=max(rounds, 1)),
            journal,
            self._make_task,
            lambda node_id: (int(node_id.rpartition("-")[2]), self.nodes),
        )

    def _node_configs(self, targets: int | Sequence[str]) -> list[NodeConfig]:
        """Every node's config: ``targets`` is the aggregator's port, or each node's address."""
        if isinstance(targets, int):
            targets = [f"127.0.0.1:{targets}"] * self.nodes
        return [
            replace(
                self.node_cfg,
                aggregator=targets[index],
                node_id=f"node-{index}",
                shard=(index, self.nodes),
                simulate_attack=self.attackers.get(f"node-{index}", self.node_cfg.simulate_attack),
            )
            for index in range(self.nodes)
        ]


def _attackers(base: NodeConfig, nodes: int, attackers: Mapping[str, str]) -> dict[str, str]:
    """Check ``attackers`` (node ids of this cluster, attacks ``NodeConfig`` takes).

    Raises:
        ConfigError: names the node that is not in the cluster or the attack it refuses.
    """
    ids = {f"node-{index}" for index in range(nodes)}
    for node_id, attack in attackers.items():
        if node_id not in ids:
            raise ConfigError(
                f"attackers: no node {node_id!r} in this cluster of {nodes}"
                f" (node-0 ... node-{nodes - 1})"
            )
        try:
            replace(base, simulate_attack=attack)
        except ConfigError as exc:
            raise ConfigError(f"attackers: node {node_id}: {exc}") from None
    return dict(attackers)


class _Fleet:
    """The cluster's nodes, one thread each: their outcomes as futures, and a stop for all."""

    def __init__(self, make_task: Callable[[], Task], configs: list[NodeConfig]) -> None:
        self.outcomes: list[futures.Future[NodeResult]] = [futures.Future() for _ in configs]
        self._nodes: list[Node] = []
        self._failures: list[BaseException] = []  # in the order the nodes failed
        self._lock = threading.Lock()
        self._stopping = False
        self._threads = [
            threading.Thread(
                target=self._run,
                args=(make_task, cfg, outcome),
                name=f"fedgrad-{cfg.node_id}",
                daemon=True,
            )
            for cfg, outcome in zip(configs, self.outcomes, strict=True)
        ]
        for thread in self._threads:
            thread.start()

    def _run(
        self, make_task: Callable[[], Task], cfg: NodeConfig, outcome: futures.Future[NodeResult]
    ) -> None:
        try:
            node = Node(make_task(), cfg)
            with self._lock:
                self._nodes.append(node)
                if self._stopping:  # built while the others were being stopped
                    node.stop("the cluster is stopping")
            try:
                result = node.run()
            finally:
                node.close()
        except BaseException as exc:  # the caller of run() gets it, with the node's id
            error = _chained(cfg.node_id, exc)
            with self._lock:
                self._failures.append(error)
            outcome.set_exception(error)
        else:
            outcome.set_result(result)

    def first_failure(self) -> BaseException | None:
        """Return the error of the first node that failed, if one did."""
        with self._lock:
            return self._failures[0] if self._failures else None

    def results(self) -> list[NodeResult]:
        """Return what each node that finished reported."""
        return [f.result() for f in self.outcomes if f.done() and f.exception() is None]

    def stop(self, grace: float = 10.0) -> None:
        """Make every node leave and return; wait up to ``grace`` seconds for their threads."""
        with self._lock:
            self._stopping = True
            nodes = list(self._nodes)
        for node in nodes:
            node.stop("the cluster is stopping")
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _failure_of(what: str, future: futures.Future[None]) -> BaseException | None:
    """Return ``future``'s error as a RuntimeError naming ``what``, or None."""
    exc = future.exception() if future.done() and not future.cancelled() else None
    return None if exc is None else _chained(what, exc)


def _chained(what: str, exc: BaseException) -> RuntimeError:
    """Return "WHAT failed: TYPE: MESSAGE" with ``exc`` as its cause (the traceback shows it)."""
    error = RuntimeError(f"{what} failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _task_factory(
    task: str | Task | Callable[[], Task], args: dict[str, str], seed: int
) -> Callable[[], Task]:
    if isinstance(task, str):
        return lambda: load_task(task, args, seed=seed)
    if isinstance(task, Task):
        return lambda: copy.deepcopy(task)
    return task


def _free_port() -> int:
    """A port free on 127.0.0.1 now (the shards must know each other's before they start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _RelayThread:
    """A relay (``fedgrad.server.relay``) on its own event loop in a background thread."""

    def __init__(self, task: Task, cfg: RelayConfig) -> None:
        from fedgrad.server.relay_service import RelayServer

        self.cfg, self.server = cfg, RelayServer(task, cfg)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="relay")
        self._run: futures.Future[Any] | None = None

    def start(self) -> str:
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(60)
        self._run = asyncio.run_coroutine_threadsafe(self.server.run(), self.loop)
        return f"127.0.0.1:{port}"

    def stop(self) -> None:
        """Cancel the relay's loop (it closes its channel and server), then the thread."""
        if self._run is not None:
            self._run.cancel()
            try:
                self._run.result(10)
            except BaseException:  # cancelled, or the relay's own failure: stopping anyway
                pass
        if self._thread.is_alive():
            if self.server.server is not None:
                stop = asyncio.run_coroutine_threadsafe(self.server.server.stop(0.5), self.loop)
                try:
                    stop.result(10)
                except Exception:  # stopping anyway
                    pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()
