"""What each ``fedgrad`` subcommand does, once its arguments are parsed."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from fedgrad.auth import TOKEN_ENV, load_node_token
from fedgrad.config import AggregatorConfig, NodeConfig
from fedgrad.errors import ConfigError
from fedgrad.history import RoundRecord
from fedgrad.launch.operator_commands import certs_init, check_health, make_token, show_status
from fedgrad.launch.options import Resolved, build_config, resolve
from fedgrad.launch.tuning import (
    eager_optimizers,
    freeze_startup_objects,
    limit_malloc_arenas,
    pin_mmap_threshold,
)
from fedgrad.logs import setup_logging
from fedgrad.server.security import check_listen_policy
from fedgrad.task import load_model_task, load_task

__all__ = ["dispatch"]

log = logging.getLogger("fedgrad.cli")
T = TypeVar("T")


def dispatch(args: argparse.Namespace, subparser: Callable[[str], argparse.ArgumentParser]) -> int:
    """Run the subcommand named in ``args``; return its exit code."""
    if args.command == "aggregator":
        return run_aggregator(resolve(subparser("aggregator"), args, "aggregator"))
    if args.command == "node":
        return run_node(resolve(subparser("node"), args, "node"))
    if args.command == "demo":
        from fedgrad.launch.demo import run_demo

        return run_demo(args.nodes, args.rounds, args.task, dict(args.task_args), Path(args.out))
    if args.command == "relay":
        return run_relay(args)
    if args.command == "status":
        return show_status(args)
    if args.command == "health":
        return check_health(args)
    if args.command == "plot":
        from fedgrad.history import plot_history, read_history

        plot_history(read_history(args.history), args.out)
        print(f"wrote {args.out}")
        return 0
    if args.command == "certs":
        return certs_init(args)
    if args.command == "token":
        return make_token(args)
    raise ConfigError(f"unknown command {args.command!r}")


# -- aggregator ----------------------------------------------------------------------
def _origin(values: Mapping[str, Any]) -> dict[str, str]:
    """Where each value came from (``resolve``'s origins; none for a plain mapping)."""
    return dict(values.origin) if isinstance(values, Resolved) else {}


def _shard_of_this_host(shard: str | None) -> str | None:
    """``--shard ordinal/K``: I from the host name's -NUMBER (a StatefulSet pod's name)."""
    if shard is None or not shard.startswith("ordinal/"):
        return shard
    host = os.environ.get("HOSTNAME") or socket.gethostname()
    match = re.search(r"-(\d+)$", host)
    if not match:
        raise ConfigError(f"--shard {shard} needs a host name ending in -NUMBER, got {host!r}")
    return f"{int(match.group(1))}/{shard.partition('/')[2]}"


def aggregator_config(values: Mapping[str, Any]) -> AggregatorConfig:
    """Build and check the aggregator's config from resolved option values.

    Raises:
        ConfigError: a value ``AggregatorConfig`` refuses, or plaintext off loopback.
    """
    origin, settings = _origin(values), dict(values)
    settings["task_args"] = tuple(settings.get("task_args", ()))
    settings["progress"] = not settings.pop("no_progress", False)
    allow = settings.get("allow_nodes", "")
    settings["allow_nodes"] = tuple(n for n in allow.split(",") if n)
    peers = settings.get("peers") or ""
    settings["peers"] = tuple(p.strip() for p in peers.split(",") if p.strip())
    settings["shard"] = _shard_of_this_host(settings.get("shard") or None)
    cfg = build_config(AggregatorConfig, settings, origin)
    check_listen_policy(cfg, warn=False)  # refuse early; the server warns once it logs
    return cfg


def run_aggregator(values: dict[str, Any]) -> int:
    """Serve until training is over (exit 0) or SIGTERM/SIGINT (graceful, exit 0)."""
    eager_optimizers()  # before the config check builds an optimizer
    port_file = values.pop("port_file", None)
    cfg = aggregator_config(values)
    setup_logging(cfg.log_format, progress=cfg.progress)
    limit_malloc_arenas()
    pin_mmap_threshold()
    task = (
        load_model_task(cfg.model)
        if cfg.model
        else load_task(cfg.task, dict(cfg.task_args), seed=cfg.seed)
    )
    return asyncio.run(_serve(task, cfg, port_file))


async def _serve(task: Any, cfg: AggregatorConfig, port_file: str | None) -> int:
    from fedgrad.server.app import AggregatorServer

    server = AggregatorServer(task, cfg)
    port = await server.start()
    freeze_startup_objects()
    if port_file:
        Path(port_file).write_text(f"{port}\n")
    if server.core is not None:  # shard 0 or an unsharded aggregator: it closes rounds
        server.core.on_round.append(
            lambda r: _log_round(
                r, server.core.engine.total_rounds, server.core.counters.phase_seconds, cfg
            )
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    progress = None
    if cfg.progress and sys.stderr.isatty() and server.core is not None:
        from fedgrad.launch.progress import run_progress

        progress = asyncio.ensure_future(run_progress(server.core))
    done = asyncio.ensure_future(server.wait_finished())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({done, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if progress is not None:
        progress.cancel()
        sys.stderr.write("\n")
    if not done.done():
        done.cancel()
        log.info("signal received: shutting down gracefully", extra={"event": "shutdown"})
        await server.shutdown()
    else:
        stopped.cancel()
        await server.stop(grace=1.0)
        failure = done.exception()
        if failure is not None:  # e.g. the shards refuse to form a federation
            raise failure
    where = server.core or server.follower
    log.info("aggregator finished at round %d", where.round, extra={"event": "exit"})  # type: ignore[union-attr]
    return 0


def run_relay(args: argparse.Namespace) -> int:
    """Relay until the upstream's training is over (exit 0); 1 if the upstream refuses it."""
    from fedgrad.relay_config import RelayConfig
    from fedgrad.server.relay import RpcFailed
    from fedgrad.server.relay_service import RelayServer

    cfg = RelayConfig(
        upstream=args.upstream, listen=args.listen, nodes=args.nodes, min_nodes=args.min_nodes,
        node_id=args.node_id, round_timeout=args.round_timeout,
        give_up_after=args.give_up_after, insecure=args.insecure,
        forward_dtype=args.forward_dtype, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, tokens=args.tokens, upstream_ca=args.upstream_ca,
        upstream_cert=args.upstream_cert, upstream_key=args.upstream_key,
        upstream_token_file=args.upstream_token_file,
    )  # fmt: skip
    setup_logging("text", progress=False)
    task = load_task(args.task, dict(args.task_args), seed=args.seed)

    async def serve() -> int:
        server = RelayServer(task, cfg)
        await server.start()
        try:
            await server.run()
        except RpcFailed as exc:
            print(f"fedgrad relay: {exc}", file=sys.stderr)
            return 1
        return 0

    return asyncio.run(serve())


def _log_round(r: RoundRecord, total: int, phases: dict[str, float], cfg: AggregatorConfig) -> None:
    # Only the metrics that exist: a regression task has no accuracy, a task without an
    # evaluation no test metrics.
    metrics = ", ".join(
        f"{name} {value:.4f}"
        for name, value in (
            ("train loss", r.train_loss),
            ("test loss", r.test_loss),
            ("test accuracy", r.test_accuracy),
        )
        if not math.isnan(value)
    )
    # Who took part: "3 of 5 selected" (sampled), "4 uploads, staleness ..." (async).
    if cfg.sampled:
        taking_part = f"{r.nodes} of {r.selected} selected"
    elif cfg.mode == "async":
        taking_part = (
            f"{r.nodes} uploads, staleness mean {r.staleness_mean:.1f} max {r.staleness_max}"
        )
    else:
        taking_part = f"{r.nodes} uploads"
    if not math.isnan(r.epsilon):
        taking_part += f", epsilon {r.epsilon:.3f}"
    log.info(
        "round %d closed (%d of %d): %s, %s, %.2f s, %.1f MB (%s)",
        r.round,
        r.round + 1,
        total,
        metrics or "no metrics",
        taking_part,
        r.seconds,
        r.bytes / 1e6,
        " ".join(f"{k} {v:.3f}s" for k, v in phases.items()),
        extra={"round": r.round, "event": "round"},
    )


# -- node ------------------------------------------------------------------------------
def node_config(values: Mapping[str, Any]) -> NodeConfig:
    """Build and check the node's config from resolved option values.

    Raises:
        ConfigError: a value ``NodeConfig`` refuses, or an unreadable token.
    """
    origin, settings = _origin(values), dict(values)
    settings["task_args"] = tuple(settings.get("task_args", ()))
    node_id = settings.get("node_id", NodeConfig.node_id)
    index, count = settings.get("shard", NodeConfig.shard)
    if index == "ordinal":
        match = re.search(r"-(\d+)$", node_id)
        if not match:
            raise ConfigError(
                f"--shard ordinal/N needs a node id ending in -NUMBER, got {node_id!r}"
            )
        index = match.group(1)
    settings["shard"] = (int(index), count)
    settings["token"] = load_node_token(settings.pop("token_file", None))
    if settings.get("compress") == "none":  # the flag's own word for no codec
        settings["compress"] = "identity"
    return build_config(NodeConfig, settings, origin)


def run_node(values: dict[str, Any]) -> int:
    """Train until the aggregator finishes (exit 0); SIGTERM or SIGINT leaves cleanly (exit 0).

    With ``--count M``, run M nodes in this process (``run_fleet``).
    """
    if "count" in values:
        return run_fleet(values)
    for name in ("first", "workers"):
        if name in values:
            raise ConfigError(f"--{name} goes with --count M (M nodes in this process)")
    from fedgrad.client.node import Node

    cfg = node_config(values)
    setup_logging(cfg.log_format)
    node = Node(load_task(cfg.task, dict(cfg.task_args), seed=cfg.seed), cfg)
    try:
        result = _stoppable(node.run, node.stop)
    finally:
        node.close()
    log.info(
        "done: %d uploads, final round %d",
        result.uploads,
        result.final_round,
        extra={"node": cfg.node_id, "event": "exit"},
    )
    return 0


def fleet_node_configs(values: dict[str, Any]) -> tuple[list[NodeConfig], int]:
    """Build the configs of ``--count`` nodes and the number of workers from option values.

    Raises:
        ConfigError: a bad value, ``--shard I/N`` (one shard for M nodes), one
            ``FEDGRAD_TOKEN`` for M nodes, or a TLS file of a node that does not work.
    """
    from fedgrad.client.fleet import DEFAULT_PREFIX, fleet_configs, read_fleet_tokens
    from fedgrad.client.tls import check_tls_files

    count, first = values.pop("count"), values.pop("first", 0)
    workers = values.pop("workers", os.cpu_count() or 1)
    prefix = values.pop("node_id", DEFAULT_PREFIX)
    index, shards = values.pop("shard", ("ordinal", None))
    if index != "ordinal":
        raise ConfigError(
            f"--shard {index}/{shards} is one shard: with --count, use --shard ordinal/{shards}"
            f" (node {prefix}-i trains shard i/{shards})"
        )
    token_file = values.pop("token_file", None)
    values.setdefault("threads", 1)  # M nodes share the cores; --threads still wins
    base = node_config(values)
    if token_file is None and base.token:
        raise ConfigError(
            f"with --count, {TOKEN_ENV} would be every node's token: pass --token-file FILE"
            " with one 'NODE_ID TOKEN' line per node"
        )
    tokens = read_fleet_tokens(token_file) if token_file else None
    configs = fleet_configs(base, prefix, count, first, shards, tokens)
    for cfg in configs:
        check_tls_files(cfg)  # every node's files before any node starts
    return configs, workers


def run_fleet(values: dict[str, Any]) -> int:
    """Run ``--count`` nodes in this process until all finish (exit 0) or SIGTERM/SIGINT.

    Returns:
        0; the first node failure is raised (its type and message, naming the node).
    """
    from fedgrad.client.fleet import Fleet

    configs, workers = fleet_node_configs(values)
    cfg = configs[0]
    setup_logging(cfg.log_format)
    fleet = Fleet(lambda: load_task(cfg.task, dict(cfg.task_args), seed=cfg.seed), configs, workers)
    results = _stoppable(fleet.run, fleet.stop)
    log.info(
        "done: %d nodes, %d uploads, final round %d",
        len(results),
        sum(r.uploads for r in results),
        max((r.final_round for r in results), default=0),
        extra={"event": "exit"},
    )
    return 0


def _stoppable(run: Callable[[], T], stop: Callable[[str], None]) -> T:
    """Return ``run()``, run off the main thread; SIGTERM and SIGINT call ``stop(SIGNAME)``."""

    def request_stop(signum: int, frame: Any) -> None:
        stop(signal.Signals(signum).name)  # logged as "SIGTERM: leaving the federation"

    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, request_stop) for sig in handled}
    try:
        freeze_startup_objects()
        return _off_the_main_thread(run)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler or signal.SIG_DFL)  # None: set outside Python


def _off_the_main_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a worker thread while this one waits; return its result or raise its error.

    Python runs signal handlers on the main thread between two bytecodes, so a handler
    that interrupted the node itself could land inside a lock that ``Node.stop`` takes,
    or inside gRPC's own code. Here it interrupts a wait that holds none of the node's.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="node") as pool:
        running = pool.submit(fn)
        while not running.done():
            # Short waits, as gRPC's own (grpc/grpc#19464): when the kernel gives the signal
            # to another thread, its Python handler runs only once this thread runs bytecode.
            # https://docs.python.org/3/library/signal.html#signals-and-threads
            futures.wait([running], timeout=0.1)
        return running.result()
