"""Many logical nodes in one process: ``fedgrad node --count M``.

Each logical node is a whole ``Node``, with its own channel, identity, seed stream,
shard and credentials, on its own thread, so the aggregator cannot tell the fleet from
M machines. A node's thread spends nearly all its time waiting in a gRPC call; what the
nodes share is the CPU: at most ``workers`` of them run ``Task.compute_update`` at once
(one semaphore), and they are built one at a time (``Node`` seeds torch's global
generator before it builds the model), which also spaces their Joins by a build's
time: 1,000 digits nodes on 2 cores all joined within 12 s of the start, no Join failed.

A node that fails leaves, as a lone node would, and the others go on; ``Fleet.run``
raises the first failure once every node has returned, with the node's id in its
message. ``Fleet.stop`` makes every node leave, from any thread or a signal handler.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from fedgrad.auth import TokenStore
from fedgrad.client.node import Node, NodeResult
from fedgrad.client.transport import lengthen_grpc_waits
from fedgrad.config import NodeConfig
from fedgrad.errors import ConfigError
from fedgrad.task import Task

__all__ = ["DEFAULT_PREFIX", "NODE_PLACEHOLDER", "Fleet", "fleet_configs", "read_fleet_tokens"]

log = logging.getLogger("fedgrad.node")

#: The node ids' prefix when ``--count`` comes without ``--node-id``: node-0, node-1, ...
DEFAULT_PREFIX = "node"
#: Stands for each node's id in ``--tls-cert`` and ``--tls-key`` paths.
NODE_PLACEHOLDER = "{node}"


def fleet_configs(
    base: NodeConfig,
    prefix: str,
    count: int,
    first: int = 0,
    shards: int | None = None,
    tokens: Mapping[str, str] | None = None,
) -> list[NodeConfig]:
    """Return the configs of nodes ``PREFIX-FIRST`` ... ``PREFIX-(FIRST+COUNT-1)``.

    Node ``PREFIX-i`` trains shard ``i/shards`` (``shards`` defaults to ``count``), takes
    ``tokens[PREFIX-i]`` as its token, and ``{node}`` in ``base``'s TLS file paths
    becomes its id. Everything else is ``base``'s.

    Args:
        base: the settings every node shares.
        prefix: the node ids' prefix.
        count: how many nodes (>= 1).
        first: the first node's number.
        shards: N of the shards ``i/N``; None: ``count`` (then ``first`` must be 0).
        tokens: node id -> token, with an entry for every node; None: ``base.token``.

    Raises:
        ConfigError: a node id, shard or path that does not work, or a missing token.
    """
    ids = [f"{prefix}-{i}" for i in range(first, first + count)]
    if shards is None and first:
        raise ConfigError(
            "--first needs --shard ordinal/N, N the nodes of all processes together"
            f" (alone, --count {count} splits the data into {count} shards)"
        )
    for flag, path in (("--tls-cert", base.tls_cert), ("--tls-key", base.tls_key)):
        if path and count > 1 and NODE_PLACEHOLDER not in path:
            raise ConfigError(
                f"{flag} {path}: with --count, put {NODE_PLACEHOLDER} in the path for each"
                f" node's id (e.g. certs/nodes/{NODE_PLACEHOLDER}.pem), or every node would"
                " show one certificate"
            )
    missing = [n for n in ids if tokens is not None and n not in tokens]
    if missing:
        raise ConfigError(
            f"--token-file has no token for node {missing[0]!r} ({len(missing)} of {count}"
            " missing; one 'NODE_ID TOKEN' line per node)"
        )
    configs = []
    for number, node_id in zip(range(first, first + count), ids, strict=True):
        try:
            configs.append(
                replace(
                    base,
                    node_id=node_id,
                    shard=(number, count if shards is None else shards),
                    token=tokens[node_id] if tokens is not None else base.token,
                    tls_cert=_for_node(base.tls_cert, node_id),
                    tls_key=_for_node(base.tls_key, node_id),
                )
            )
        except ConfigError as exc:
            raise ConfigError(f"node {node_id}: {exc}") from None
    return configs


def _for_node(path: str | None, node_id: str) -> str | None:
    return path.replace(NODE_PLACEHOLDER, node_id) if path else path


def read_fleet_tokens(path: str | Path) -> dict[str, str]:
    """Read the tokens of a fleet: one ``NODE_ID TOKEN`` line per node.

    The aggregator's ``--tokens`` format (``fedgrad.auth``) with plaintext tokens only:
    a ``sha256:`` line cannot be sent. Blank lines and ``#`` comments are skipped.

    Raises:
        ConfigError: unreadable, a malformed line (by number, never echoing it), a bad
            node id or token, or one token for two nodes.
    """
    where = f"--token-file {path}"
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read the file: {type(exc).__name__}") from None
    tokens: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2 or fields[1].startswith("sha256:"):
            raise ConfigError(
                f"{where}:{number}: with --count, each line is 'NODE_ID TOKEN' (a plaintext"
                " token: a node sends it)"
            )
        if fields[0] in tokens:
            raise ConfigError(f"{where}:{number}: a second line for node {fields[0]!r}")
        tokens[fields[0]] = fields[1]
    TokenStore(tokens)  # the aggregator's rules: node ids, token syntax, no shared token
    return tokens


class Fleet:
    """Run ``Node``s for ``configs``, one thread each, at most ``workers`` computing at once.

    Args:
        make_task: builds one node's task (called once per node, on its thread).
        configs: one per node (``fleet_configs``).
        workers: how many nodes may compute at once.
    """

    def __init__(
        self, make_task: Callable[[], Task], configs: Sequence[NodeConfig], workers: int
    ) -> None:
        self.make_task, self.configs = make_task, list(configs)
        self.compute = threading.BoundedSemaphore(workers)
        self._building = threading.Lock()
        self._nodes: list[Node | None] = [None] * len(self.configs)
        self._results: list[NodeResult | None] = [None] * len(self.configs)
        self._failures: list[tuple[str, BaseException]] = []  # in the order they happened
        self._stopped = threading.Event()
        self._stops = itertools.count()  # numbers the stop() calls, as Transport.stop does
        self._reason = ""

    def run(self) -> list[NodeResult]:
        """Start every node, wait for all of them; return what each did.

        Returns:
            Each node's result, in ``configs`` order, also after ``stop()``.

        Raises:
            Exception: the first node failure (same type, the node's id in its message).
        """
        if len(self.configs) > 1:
            lengthen_grpc_waits()  # the main thread only joins; calls wait on node threads
        threads = []
        for index, cfg in enumerate(self.configs):
            if self._stopped.is_set():
                break
            thread = threading.Thread(
                target=self._run, args=(index,), name=f"fedgrad-{cfg.node_id}", daemon=True
            )
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
        if self._failures:
            raise _naming(*self._failures[0])
        return [r for r in self._results if r is not None]

    def stop(self, reason: str = "stop requested") -> None:
        """Make every node leave and ``run()`` return; idempotent, safe from signal handlers.

        Only the first call acts, taking no lock before it knows it is the first (see
        ``Transport.stop``). A node built after this stops before it joins.
        """
        if next(self._stops):
            return
        self._reason = reason
        self._stopped.set()
        for node in list(self._nodes):  # a node published later re-checks in _run
            if node is not None:
                node.stop(reason)

    def _run(self, index: int) -> None:
        cfg = self.configs[index]
        try:
            with self._building:
                node = Node(self.make_task(), cfg, compute=self.compute)
            # Publish, then re-check: stop() either sees this node or we see its event.
            self._nodes[index] = node
            if self._stopped.is_set():
                node.stop(self._reason)
            try:
                self._results[index] = node.run()
            finally:
                node.close()
        except BaseException as exc:
            self._failures.append((cfg.node_id, exc))
            log.error(
                "failed: %s: %s",
                type(exc).__name__,
                exc,
                extra={"node": cfg.node_id, "event": "failed"},
            )


def _naming(node_id: str, exc: BaseException) -> BaseException:
    """Return ``exc`` with ``node_id`` in its message, of its own type (its own exit code)."""
    if repr(node_id) in str(exc):
        return exc
    try:
        named = type(exc)(f"node {node_id}: {exc}")
    except TypeError:  # an exception type that takes other arguments: keep it as it is
        exc.add_note(f"in node {node_id}")
        return exc
    named.__cause__ = exc
    return named
