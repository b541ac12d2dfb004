"""The ``fedgrad`` command: aggregator, node, demo, status, health, plot, certs, token.

Run ``fedgrad --help`` or ``fedgrad SUBCOMMAND --help``. The parsers of
``fedgrad aggregator`` and ``fedgrad relay`` are in ``fedgrad.launch.serve_parsers``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fedgrad.auth import OPERATOR_NAME
from fedgrad.config import ERROR_FEEDBACK, ROUNDINGS, AggregatorConfig, NodeConfig
from fedgrad.errors import ConfigError, FedgradError
from fedgrad.identity import CERT_DAYS, DEFAULT_HOSTS
from fedgrad.launch import demo
from fedgrad.launch.flags import (
    add_call_flags,
    add_client_tls,
    add_run_flags,
    add_task_flags,
    add_token_file,
    choices,
    settings_of,
    shard,
    shown,
)
from fedgrad.launch.serve_parsers import Subparsers, add_aggregator_parser, add_relay_parser
from fedgrad.wire import ID_RULE

__all__ = ["build_parser", "main"]

A, N = AggregatorConfig, NodeConfig
S = argparse.SUPPRESS
#: ``settings_of(parser, NodeConfig)``: ``add(name, help, **kwargs)``.
Add = Callable[..., None]


def _node_parser(sub: Subparsers) -> None:
    """Add ``fedgrad node``: join the aggregator, train on one shard, push gradients."""
    p = sub.add_parser(
        "node",
        argument_default=S,
        help="run a compute node",
        description="Join the aggregator, train on one shard, push gradients each round.",
    )
    add_task_flags(p, N)
    add_run_flags(p, N)
    add = settings_of(p, N)
    add("aggregator", "aggregator address (default {default})", metavar="HOST:PORT")
    add("node_id", f"this node's stable id, {ID_RULE} (default {{default}})")
    index, count = N.shard
    add(
        "shard",
        f"train on shard I of N, 0-based (default {index}/{count}); ordinal/N takes I from"
        " the id's trailing -NUMBER",
        type=shard,
        metavar="I/N",
    )
    add_client_tls(p)
    add_token_file(p)
    add(
        "give_up_after",
        "stop retrying an unreachable aggregator after this long (default {default})",
        type=float,
        metavar="SEC",
    )
    add(
        "call_timeout",
        "deadline of control calls (default {default}); transfers add bytes /"
        f" {N.min_bandwidth / 1e6:g} MB/s",
        type=float,
        metavar="SEC",
    )
    add(
        "threads",
        "torch intra-op threads for training (default {default}: torch's choice; use 1 when"
        " several nodes share a machine)",
        type=int,
    )
    _update_flags(p, add)
    _simulation_flags(add)
    _fleet_flags(p)


def _update_flags(p: argparse.ArgumentParser, add: Add) -> None:
    """How a node computes and sends its update: codec, residual, device, state kept."""
    p.add_argument(
        "--compress",
        metavar="CODEC",
        help="upload codec (README, 'Compressed updates'): none, float16, bfloat16, int8[:BLOCK]"
        " (a float32 scale per BLOCK values, default 256), topk:FRACTION[,DTYPE] (the largest"
        " FRACTION of each tensor, with error feedback), powersgd:RANK[,DTYPE] (rank-RANK"
        " factors of each matrix, with error feedback) (default none)",
    )
    add(
        "error_feedback",
        "keep what a lossy codec did not send and add it to the next round's update"
        " (default {default}: on for topk and powersgd)",
        metavar=choices(ERROR_FEEDBACK),
    )
    add(
        "rounding",
        "how int8 rounds: to nearest, or stochastically, seeded from (seed, node id, round)"
        " (default {default})",
        metavar=choices(ROUNDINGS),
    )
    add(
        "device",
        "where the model and its training live: cpu, cuda, cuda:N, or auto (CUDA if torch sees"
        " it); the wire goes through pinned host memory (default {default})",
        metavar="auto|cpu|cuda[:N]",
    )
    add(
        "state_dir",
        "directory where the node keeps its error-feedback residual and PowerSGD factors"
        " across restarts (default: in memory, a restart starts afresh)",
        metavar="DIR",
    )


def _simulation_flags(add: Add) -> None:
    """Knobs that make a node a straggler or an attacker, for simulations."""
    from fedgrad.launch.flags import delay
    from fedgrad.server.reducers import MAX_EXACT_WEIGHT

    low, high = map(shown, N.simulate_delay)
    add(
        "simulate_delay",
        "simulation knob for stragglers: after computing, wait SEC, or a time drawn each round"
        " uniformly from MIN..MAX and seeded from (seed, node id, round); results stay bitwise"
        f" the same (default {low if low == high else f'{low}:{high}'})",
        type=delay,
        metavar="SEC|MIN:MAX",
    )
    add(
        "simulate_attack",
        "simulation knob for evaluating defences, seeded (README, 'Simulated attacks'):"
        " sign-flip:S uploads -S x the honest update; scale:S uploads S x it (model"
        " replacement); noise:S adds Gaussian noise of std S per element, drawn from"
        " (seed, node id, round) apart from the training's stream; samples:N claims N"
        " samples at Join and in uploads, gradients honest (the aggregator refuses"
        f" N >= {MAX_EXACT_WEIGHT:,} at Join: that is its defence working); with --count"
        " every node attacks (default: honest)",
        metavar="sign-flip:S|scale:S|noise:S|samples:N",
    )


def _fleet_flags(p: argparse.ArgumentParser) -> None:
    """Run several nodes in one process (``--count``)."""
    from fedgrad.client.fleet import DEFAULT_PREFIX, NODE_PLACEHOLDER
    from fedgrad.launch.flags import nonnegative, positive

    p.add_argument(
        "--count",
        type=positive(int),
        metavar="M",
        help="run M nodes in this process, --node-id PREFIX gives PREFIX-F ... PREFIX-(F+M-1),"
        " each with its own channel, seed and shard i/M (or i/N with --shard ordinal/N);"
        " --token-file then holds one 'NODE_ID TOKEN' line per node, and"
        f" {NODE_PLACEHOLDER} in --tls-cert/--tls-key paths is each node's id"
        f" (default prefix {DEFAULT_PREFIX})",
    )
    p.add_argument(
        "--first",
        type=nonnegative(int),
        metavar="F",
        help="with --count: the first node's number (default 0; needs --shard ordinal/N)",
    )
    p.add_argument(
        "--workers",
        type=positive(int),
        metavar="W",
        help="with --count: nodes computing at once (default: the CPU count); --threads"
        " defaults to 1 with --count",
    )


def _demo_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "demo",
        help="run the aggregator and nodes locally as separate processes",
        description="Train a task with an aggregator and N node processes on loopback.",
    )
    p.add_argument(
        "--nodes", type=int, default=demo.NODES, help="node processes (default %(default)s)"
    )
    p.add_argument("--rounds", type=int, default=demo.ROUNDS, help="rounds (default %(default)s)")
    add_task_flags(p, A)
    p.set_defaults(task=A.task, task_args=[])
    p.add_argument(
        "--out",
        default=demo.OUT,
        help="output folder for history.csv, curves.png, model.safetensors (default %(default)s)",
    )


def _tool_parsers(sub: Subparsers) -> None:
    q = sub.add_parser("status", help="print the aggregator's status")
    add_call_flags(q)
    add_token_file(q, "the operator's (or a node's)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q = sub.add_parser(
        "health", help="exit 0 iff the aggregator's gRPC health service says SERVING"
    )
    add_call_flags(q)
    p = sub.add_parser("plot", help="draw loss and accuracy curves from a history CSV")
    p.add_argument("history", metavar="history.csv", help="a history CSV (--history, demo)")
    p.add_argument("--out", default="curves.png", help="PNG to write (default %(default)s)")
    _certs_parser(sub)
    _token_parser(sub)


def _certs_parser(sub: Subparsers) -> None:
    p = sub.add_parser("certs", help="create certificates for a mutual-TLS federation")
    certs = p.add_subparsers(dest="certs_command", required=True)
    q = certs.add_parser(
        "init",
        help="write a CA, a server certificate, one client certificate per node and the"
        f" operator's ({OPERATOR_NAME}.pem: fedgrad status and health, never a node)",
    )
    q.add_argument("--out", required=True, metavar="DIR", help="folder to write the files into")
    q.add_argument("--nodes", required=True, help="comma-separated node ids")
    q.add_argument(
        "--hosts",
        default=",".join(DEFAULT_HOSTS),
        help="server names/IPs (default %(default)s)",
    )
    q.add_argument(
        "--days",
        type=int,
        default=CERT_DAYS,
        help="validity of the certificates in days (default %(default)s)",
    )
    q.add_argument("--overwrite", action="store_true", help="replace existing files")


def _token_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "token",
        help="print a new random token for --token-file (and its line for --tokens)",
        description="Make a token (256 random bits, URL-safe base64). Its owner passes it with"
        " --token-file or FEDGRAD_TOKEN; the aggregator's --tokens FILE has one line per owner:"
        " 'NAME TOKEN', or 'NAME sha256:HEX' (--sha256) so that the file holds no token.",
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        help="write the token to FILE (created 0600) instead of printing it",
    )
    p.add_argument(
        "--sha256",
        metavar="NAME",
        help=f"also print the --tokens line 'NAME sha256:HEX' (a node id, or {OPERATOR_NAME}:"
        " status only, never a node)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def build_parser() -> argparse.ArgumentParser:
    """Return the ``fedgrad`` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="fedgrad",
        description="Train one PyTorch model across machines: a gRPC aggregator and compute nodes.",
        epilog="Quick start: `fedgrad demo`. Every flag of aggregator/node can also be set as "
        "FEDGRAD_<FLAG> (e.g. FEDGRAD_NODE_ID) or in --config FILE.toml.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_aggregator_parser(sub)
    _node_parser(sub)
    _demo_parser(sub)
    add_relay_parser(sub)
    _tool_parsers(sub)
    return parser


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """Return the parser of subcommand ``name``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fedgrad command line; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from fedgrad.launch import commands

    try:
        return commands.dispatch(args, lambda name: subparser(parser, name))
    except ConfigError as exc:
        print(f"fedgrad {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FedgradError as exc:
        print(f"fedgrad {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
