"""The ``fedgrad`` command: aggregator, node, demo, status, plot, health, certs.

Run ``fedgrad --help`` or ``fedgrad SUBCOMMAND --help``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fedgrad.config import OPTIMIZERS, REDUCTIONS, parse_hostport
from fedgrad.errors import ConfigError, FedgradError

__all__ = ["build_parser", "main"]

S = argparse.SUPPRESS


def _task_arg(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, val


def _shard(value: str) -> tuple[str, int]:
    index, sep, count = value.partition("/")
    if (
        not sep
        or not count.isdigit()
        or int(count) < 1
        or not (index.isdigit() or index == "ordinal")
    ):
        raise argparse.ArgumentTypeError(f"expected I/N (or ordinal/N), got {value!r}")
    return index, int(count)


def _hostport(value: str) -> str:
    parse_hostport(value)
    return value


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {value}")
    return port


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def _positive(kind: type) -> object:
    def convert(value: str) -> object:
        number = kind(value)
        if number <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
        return number

    convert.__name__ = kind.__name__
    return convert


def _common_task(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        help="built-in task (digits, linear, synthetic) or package.module:attr (default: digits)",
    )
    p.add_argument(
        "--task-arg",
        dest="task_args",
        action="append",
        type=_task_arg,
        metavar="KEY=VALUE",
        help="option for the task, repeatable (e.g. split=non-iid, params=50M)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="training seed; nodes derive theirs from (seed, node id, round) (default 0)",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="log lines as text (default) or one JSON object each",
    )
    p.add_argument(
        "--config",
        default=S,
        metavar="FILE.toml",
        help="TOML file with the same keys as the flags; flags > FEDGRAD_* env > file > defaults",
    )


def _aggregator_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "aggregator",
        argument_default=S,
        help="run the aggregator service",
        description="Own the parameters and the optimizer; reduce node gradients each round.",
    )
    _common_task(p)
    p.add_argument(
        "--listen",
        type=_hostport,
        metavar="HOST:PORT",
        help="address to serve on (default 127.0.0.1:50051; port 0 picks one)",
    )
    p.add_argument(
        "--port-file",
        metavar="PATH",
        help="write the bound port here once serving (useful with port 0)",
    )
    p.add_argument(
        "--nodes", type=_positive(int), help="nodes to wait for before round 1 (default 1)"
    )
    p.add_argument(
        "--rounds", type=_positive(int), help="rounds to train, then save and exit 0 (default 10)"
    )
    p.add_argument(
        "--optimizer", choices=OPTIMIZERS, help="torch.optim optimizer (default: the task's)"
    )
    p.add_argument("--lr", type=_positive(float), help="learning rate (default: the task's)")
    p.add_argument(
        "--reduce",
        choices=REDUCTIONS,
        help="how gradients combine: weighted-mean by samples (default), mean, sum",
    )
    p.add_argument(
        "--save", metavar="PATH.safetensors", help="write the final state_dict here (safetensors)"
    )
    p.add_argument(
        "--history",
        metavar="PATH.csv",
        help="write per-round history here (round, loss, accuracy, seconds, bytes)",
    )
    p.add_argument(
        "--round-timeout",
        type=_positive(float),
        metavar="SEC",
        help="round deadline; after it the round closes with >= --min-nodes uploads (default 300)",
    )
    p.add_argument(
        "--min-nodes",
        type=_positive(int),
        metavar="M",
        help="uploads needed to close a round at the deadline (default 1)",
    )
    p.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="checkpoint every round here and resume from it on restart",
    )
    p.add_argument(
        "--chunk-bytes", type=_positive(int), help="largest chunk payload, bytes (default 1048576)"
    )
    p.add_argument(
        "--max-inflight",
        type=_non_negative,
        help="uploads staged at once (default 0: --staging-mb / model size, 1..64)",
    )
    p.add_argument(
        "--staging-mb",
        type=_positive(int),
        help="memory budget for staged uploads, MiB (default 256: one 200 MB upload at a time)",
    )
    p.add_argument(
        "--accumulate",
        choices=["float64", "float32"],
        help="accumulator dtype: float64 sums are order-independent for float32/16 models;"
        " float32 halves the accumulator's memory, its sums depend on arrival order in the"
        " last bits (default float64)",
    )
    p.add_argument(
        "--idle-timeout",
        type=_positive(float),
        metavar="SEC",
        help="per-chunk idle deadline of an upload (default 30)",
    )
    p.add_argument(
        "--finish-grace",
        type=float,
        metavar="SEC",
        help="after the last round, wait this long for nodes to fetch the final parameters (default 30)",
    )
    p.add_argument(
        "--max-rpcs",
        type=_positive(int),
        help="concurrent calls the server accepts; beyond: RESOURCE_EXHAUSTED (default 2048)",
    )
    p.add_argument(
        "--slot-wait",
        type=_positive(float),
        metavar="SEC",
        help="how long an upload may queue for a staging slot before RESOURCE_EXHAUSTED (default 60)",
    )
    p.add_argument(
        "--allow-nodes",
        metavar="ID,ID,...",
        help="only these node ids may take part (checked against the mTLS/token identity)",
    )
    p.add_argument(
        "--insecure", action="store_true", help="allow plaintext on a non-loopback address"
    )
    p.add_argument("--tls-cert", metavar="PEM", help="server certificate (turns on TLS)")
    p.add_argument("--tls-key", metavar="PEM", help="server private key")
    p.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="CA of node certificates: mutual TLS, client certificates required",
    )
    p.add_argument(
        "--tokens",
        metavar="FILE",
        help="per-node token file ('node_id token' or 'node_id sha256:HEX' per line)",
    )
    p.add_argument(
        "--metrics-port", type=_port, help="serve Prometheus metrics on this port (0 picks one)"
    )
    p.add_argument(
        "--reflection", action="store_true", help="enable gRPC server reflection (grpcurl)"
    )
    p.add_argument(
        "--no-progress",
        dest="no_progress",
        action="store_true",
        help="plain log lines even on a terminal",
    )


def _node_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "node",
        argument_default=S,
        help="run a compute node",
        description="Join the aggregator, train on one shard, push gradients each round.",
    )
    _common_task(p)
    p.add_argument(
        "--aggregator",
        type=_hostport,
        metavar="HOST:PORT",
        help="aggregator address (default 127.0.0.1:50051)",
    )
    p.add_argument(
        "--node-id", help="this node's stable id, 1-128 chars [A-Za-z0-9._-] (default node-0)"
    )
    p.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="train on shard I of N (0-based); ordinal/N takes I from the id's trailing -NUMBER",
    )
    p.add_argument(
        "--tls-ca", metavar="PEM", help="CA that signed the aggregator certificate (turns on TLS)"
    )
    p.add_argument("--tls-cert", metavar="PEM", help="this node's client certificate (mutual TLS)")
    p.add_argument("--tls-key", metavar="PEM", help="this node's client key (mutual TLS)")
    p.add_argument(
        "--token-file", metavar="FILE", help="file holding this node's token (or set FEDGRAD_TOKEN)"
    )
    p.add_argument(
        "--give-up-after",
        type=_positive(float),
        metavar="SEC",
        help="stop retrying an unreachable aggregator after this long (default 120)",
    )
    p.add_argument(
        "--call-timeout",
        type=_positive(float),
        metavar="SEC",
        help="deadline of control calls (default 10); transfers add bytes / 10 MB/s",
    )
    p.add_argument(
        "--threads",
        type=_non_negative,
        help="torch intra-op threads for training (default 0: torch's choice; use 1 when"
        " several nodes share a machine)",
    )
    p.add_argument(
        "--compress",
        choices=("none", "float16", "bfloat16"),
        help="wire dtype of uploads (default none)",
    )


def _tool_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the aggregator and nodes locally as separate processes",
        description="Train the digits task with an aggregator and N node processes on loopback.",
    )
    p.add_argument("--nodes", type=_positive(int), default=4, help="node processes (default 4)")
    p.add_argument("--rounds", type=_positive(int), default=20, help="rounds (default 20)")
    p.add_argument("--task", default="digits", help="task (default digits)")
    p.add_argument(
        "--task-arg",
        dest="task_args",
        action="append",
        type=_task_arg,
        default=[],
        metavar="KEY=VALUE",
        help="option for the task, repeatable",
    )
    p.add_argument(
        "--out",
        default="runs/demo",
        help="output folder for history.csv, curves.png, model.safetensors",
    )
    for name in ("status", "health"):
        q = sub.add_parser(
            name,
            help="print the aggregator's status"
            if name == "status"
            else "exit 0 iff the aggregator's gRPC health service says SERVING",
        )
        q.add_argument("address", metavar="HOST:PORT", help="the aggregator's address")
        q.add_argument("--tls-ca", metavar="PEM", help="CA of the aggregator certificate (TLS)")
        q.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS)")
        q.add_argument("--tls-key", metavar="PEM", help="client key (mutual TLS)")
        q.add_argument(
            "--timeout",
            type=_positive(float),
            default=5.0,
            metavar="SEC",
            help="deadline of the call (default 5)",
        )
        if name == "status":
            q.add_argument("--token-file", metavar="FILE", help="token file (or FEDGRAD_TOKEN)")
            q.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("plot", help="draw loss and accuracy curves from a history CSV")
    p.add_argument("history", metavar="history.csv", help="a history CSV (--history, demo)")
    p.add_argument("--out", default="curves.png", help="PNG to write (default curves.png)")
    p = sub.add_parser("certs", help="create certificates for a mutual-TLS federation")
    certs = p.add_subparsers(dest="certs_command", required=True)
    q = certs.add_parser(
        "init", help="write a CA, a server certificate and one client certificate per node"
    )
    q.add_argument("--out", required=True, metavar="DIR", help="folder to write the files into")
    q.add_argument("--nodes", required=True, help="comma-separated node ids")
    q.add_argument(
        "--hosts",
        default="localhost,127.0.0.1",
        help="server names/IPs (default localhost,127.0.0.1)",
    )
    q.add_argument(
        "--days", type=_positive(int), default=365, help="validity of the certificates (365)"
    )
    q.add_argument("--overwrite", action="store_true", help="replace existing files")


def build_parser() -> argparse.ArgumentParser:
    """Return the ``fedgrad`` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="fedgrad",
        description="Train one PyTorch model across machines: a gRPC aggregator and compute nodes.",
        epilog="Quick start: `fedgrad demo`. Every flag of aggregator/node can also be set as "
        "FEDGRAD_<FLAG> (e.g. FEDGRAD_NODE_ID) or in --config FILE.toml.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _aggregator_parser(sub)
    _node_parser(sub)
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
