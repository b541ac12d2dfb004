"""The ``fedgrad`` command: aggregator, node, demo, status, health, plot, certs, token.

Run ``fedgrad --help`` or ``fedgrad SUBCOMMAND --help``.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Sequence

from fedgrad.auth import OPERATOR_NAME
from fedgrad.certs import DEFAULT_HOSTS, init_federation
from fedgrad.config import (
    ACCUMULATORS,
    BROADCAST_DTYPES,
    BUFFER_MODES,
    ERROR_FEEDBACK,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    ROUNDINGS,
    AggregatorConfig,
    NodeConfig,
)
from fedgrad.errors import ConfigError, FedgradError
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
    task_arg,
)
from fedgrad.launch.round_flags import (
    add_defence_flags,
    add_privacy_flags,
    add_round_flags,
    add_sampling_flags,
)
from fedgrad.wire import ID_RULE

__all__ = ["build_parser", "main"]

A, N = AggregatorConfig, NodeConfig
S = argparse.SUPPRESS
Subparsers = argparse._SubParsersAction
Add = Callable[..., None]


def _aggregator_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "aggregator",
        argument_default=S,
        help="run the aggregator service",
        description="Own the parameters and the optimizer; reduce node gradients each round.",
    )
    add_task_flags(p, A)
    add_run_flags(p, A)
    add = settings_of(p, A)
    add(
        "model",
        "for own-loop nodes (fedgrad.connect): build only this model, a package.module:factory"
        " callable, instead of a task (no data, no central evaluation; --task is then unused)",
        metavar="MODULE:FACTORY",
    )
    add("listen", "address to serve on (default {default}; port 0 picks one)", metavar="HOST:PORT")
    p.add_argument(
        "--port-file",
        metavar="PATH",
        help="write the bound port here once serving (useful with port 0)",
    )
    add("nodes", "nodes to wait for before the first round, round 0 (default {default})", type=int)
    add("rounds", "rounds to train, then save and exit 0 (default {default})", type=int)
    add(
        "optimizer",
        "torch.optim optimizer by lower-case name, e.g. sgd, adam, adamw, rmsprop; momentum is"
        " SGD with momentum 0.9 (default: the task's)",
        metavar="NAME",
    )
    add(
        "optimizer_args",
        "an argument of the optimizer, repeatable: numbers, true/false, or a,b for a tuple"
        " (e.g. weight_decay=0.01, betas=0.9,0.99)",
        flag="--optimizer-arg",
        action="append",
        type=task_arg,
        metavar="KEY=VALUE",
    )
    add("lr", "learning rate (default: the task's)", type=float)
    add(
        "evaluate_every",
        "every E rounds the nodes evaluate the round's parameters on their own held-out data"
        " (a task's holdout); the sample-weighted mean goes into the history, status, metrics"
        " and TensorBoard beside the central evaluation (default {default}: never)",
        type=int,
        metavar="E",
    )
    add(
        "round_config",
        "a setting sent to the nodes with every round's parameters, repeatable; the built-in"
        " training honours local_lr and local_steps (a task's round_config can vary them by"
        " round)",
        flag="--round-config",
        action="append",
        type=task_arg,
        metavar="KEY=VALUE",
    )
    add(
        "lr_schedule",
        "learning-rate schedule stepped once per round (torch.optim.lr_scheduler): cosine,"
        " step:EVERY,GAMMA, warmup:ROUNDS or warmup:ROUNDS+cosine (default: constant)",
        metavar="SCHEDULE",
    )
    add(
        "clip_grad_norm",
        "clip the reduced gradient's global L2 norm to C before the step, as"
        " torch.nn.utils.clip_grad_norm_ (default: no clipping)",
        type=float,
        metavar="C",
    )
    add_defence_flags(add)
    add("save", "write the final state_dict here (safetensors)", metavar="PATH.safetensors")
    add(
        "history",
        "write per-round history here (round, loss, accuracy, seconds, bytes)",
        metavar="PATH.csv",
    )
    add_round_flags(add)
    add_sampling_flags(add)
    add_privacy_flags(add)
    _limit_flags(add)
    _shard_flags(add)
    _access_flags(add)
    add("metrics_port", "serve Prometheus metrics on this port (0 picks one)", type=int)
    add(
        "tensorboard",
        "write every round's metrics (central and federated) to DIR for TensorBoard; needs"
        " pip install 'fedgrad[tensorboard]'",
        metavar="DIR",
    )
    add("reflection", "enable gRPC server reflection (grpcurl)", action="store_true")
    p.add_argument(
        "--no-progress",
        dest="no_progress",
        action="store_true",
        help="plain log lines even on a terminal",
    )


def _limit_flags(add: Add) -> None:
    add(
        "chunk_bytes",
        f"largest chunk payload, {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES} bytes (default {{default}})",
        type=int,
    )
    add(
        "max_inflight",
        "uploads staged at once (default {default}: as many as --staging-mb holds, 1..64; a"
        " shard at least --nodes)",
        type=int,
    )
    add(
        "staging_mb",
        "memory budget for staged uploads, MiB (default {default}: uploads of a model over"
        " 64 MiB are staged one at a time)",
        type=int,
    )
    add(
        "upload_window_mb",
        "MiB gRPC reads ahead on each upload stream, so uploads queued for a staging slot"
        " hold at most this much each; 0: gRPC's adaptive window, for links with a large"
        " bandwidth-delay product (default {default})",
        type=int,
    )
    add(
        "accumulate",
        "sum kernel: reproducible is bitwise the same for every arrival order (any dtype);"
        " float64 sums exact float32/16 products in float64; float32 halves the memory and"
        " depends on arrival order in the last bits; auto is reproducible for float64 models,"
        " float64 otherwise (default {default}; docs/architecture.md)",
        metavar=choices(ACCUMULATORS),
    )
    add(
        "device",
        "where the parameters and the optimizer's step live: cpu, cuda, cuda:N or auto; the"
        " reduce stays in host memory (default {default})",
        metavar="auto|cpu|cuda[:N]",
    )
    add(
        "buffers",
        "model buffers (BatchNorm statistics): shared (averaged each round and broadcast) or"
        " local (each node keeps its own, FedBN) (default {default})",
        metavar=choices(BUFFER_MODES),
    )
    add(
        "broadcast_dtype",
        "send the parameters to the nodes in this dtype (the aggregator keeps its master copy"
        " in the model's dtype; nodes train on the rounded parameters) (default: the model's)",
        metavar=choices(BROADCAST_DTYPES),
    )
    add(
        "idle_timeout",
        "per-chunk idle deadline of an upload (default {default})",
        type=float,
        metavar="SEC",
    )
    add(
        "max_rpcs",
        "concurrent calls the server accepts; beyond: RESOURCE_EXHAUSTED (default {default})",
        type=int,
    )
    add(
        "slot_wait",
        "how long an upload may queue for a staging slot before RESOURCE_EXHAUSTED"
        " (default {default})",
        type=float,
        metavar="SEC",
    )


def _shard_flags(add: Add) -> None:
    add(
        "shard",
        "run as shard I of a K-shard aggregator (README, 'Sharded aggregator'); shard 0"
        " coordinates and is the address nodes are given; ordinal/K takes I from the host"
        " name's -NUMBER (a StatefulSet pod) (default: unsharded)",
        metavar="I/K",
    )
    add(
        "peers",
        "every shard's address, in shard order, this one's included (with --shard)",
        metavar="HOST:PORT,...",
    )
    add(
        "peer_ca",
        "with --shard and --tls-cert: the CA of the shards' server certificates",
        metavar="PEM",
    )
    add(
        "peer_cert",
        "with --shard and mutual TLS: shard 0's client certificate (node id shard-0)",
        metavar="PEM",
    )
    add("peer_key", "the key of --peer-cert", metavar="PEM")
    add(
        "peer_token",
        "with --shard and --tokens: a file holding shard 0's token (listed as shard-0)",
        metavar="FILE",
    )


def _access_flags(add: Add) -> None:
    """Who may connect: plaintext policy, server TLS, client CA, tokens, allow-list."""
    add(
        "allow_nodes",
        "only these node ids may take part (checked against the mTLS/token identity)",
        metavar="ID,ID,...",
    )
    add("insecure", "allow plaintext on a non-loopback address", action="store_true")
    add("tls_cert", "server certificate (turns on TLS)", metavar="PEM")
    add("tls_key", "server private key", metavar="PEM")
    add(
        "tls_client_ca",
        "CA of node certificates: mutual TLS, client certificates required",
        metavar="PEM",
    )
    add(
        "tokens",
        "per-node token file ('node_id token' or 'node_id sha256:HEX' per line)",
        metavar="FILE",
    )


def _node_parser(sub: Subparsers) -> None:
    from fedgrad.client.fleet import DEFAULT_PREFIX, NODE_PLACEHOLDER
    from fedgrad.launch.flags import delay, nonnegative, positive
    from fedgrad.server.reducers import MAX_EXACT_WEIGHT

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
        default=inspect.signature(init_federation).parameters["days"].default,
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
    _aggregator_parser(sub)
    _node_parser(sub)
    _demo_parser(sub)
    _relay_parser(sub)
    _tool_parsers(sub)
    return parser


def _relay_parser(sub: Subparsers) -> None:
    from fedgrad.relay_config import RelayConfig as R

    p = sub.add_parser(
        "relay",
        help="a relay: an aggregator to its nodes, one node to its upstream",
        description="Serve M nodes as an aggregator and forward their sum upstream as one"
        " upload per round (README, 'Relays').",
    )
    p.add_argument("--task", default="digits", help="the task (default digits)")
    p.add_argument(
        "--task-arg", dest="task_args", action="append", default=[], type=task_arg,
        metavar="KEY=VALUE", help="a task option (repeatable)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="the task's data seed (default 0)")
    p.add_argument("--upstream", required=True, metavar="HOST:PORT", help="the aggregator")
    p.add_argument("--listen", default=R.listen, metavar="HOST:PORT",
                   help=f"where the nodes connect (default {R.listen})")  # fmt: skip
    p.add_argument("--nodes", type=int, default=R.nodes, help=f"nodes (default {R.nodes})")
    p.add_argument("--min-nodes", type=int, default=R.min_nodes,
                   help="uploads a round needs after its deadline (default: all)")  # fmt: skip
    p.add_argument("--node-id", default=R.node_id,
                   help=f"the relay's node id upstream (default {R.node_id})")  # fmt: skip
    p.add_argument("--round-timeout", type=float, default=R.round_timeout, metavar="SEC",
                   help=f"round deadline at the relay (default {R.round_timeout:g})")  # fmt: skip
    p.add_argument("--give-up-after", type=float, default=R.give_up_after, metavar="SEC",
                   help=f"upstream unreachable this long: exit 1 (default {R.give_up_after:g})")  # fmt: skip
    p.add_argument("--insecure", action="store_true",
                   help="serve plaintext on a non-loopback address")  # fmt: skip
    p.add_argument("--forward-dtype", choices=("float64", "float32"), default=R.forward_dtype,
                   help="dtype of the sum sent upstream: float64 is exact, float32 half the"
                   f" bytes (rounded once more) (default {R.forward_dtype})")  # fmt: skip
    tls = p.add_argument_group("TLS towards the nodes (as the aggregator's flags)")
    tls.add_argument("--tls-cert", metavar="PEM", help="the relay's server certificate")
    tls.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    tls.add_argument("--tls-client-ca", metavar="PEM",
                     help="require node certificates signed by this CA (mutual TLS; the"
                     " certificate names the node)")  # fmt: skip
    tls.add_argument("--tokens", metavar="FILE",
                     help="node tokens file (`fedgrad tokens`): a call must carry its node's")  # fmt: skip
    up = p.add_argument_group("TLS towards the upstream (as a node's flags)")
    up.add_argument("--upstream-ca", metavar="PEM",
                    help="CA that signed the upstream's certificate (turns on TLS)")  # fmt: skip
    up.add_argument("--upstream-cert", metavar="PEM",
                    help="the relay's client certificate, for the upstream's mutual TLS (its"
                    " name is --node-id)")  # fmt: skip
    up.add_argument("--upstream-key", metavar="PEM", help="private key of --upstream-cert")
    up.add_argument("--upstream-token-file", metavar="FILE",
                    help="file holding the relay's token for the upstream's --tokens")  # fmt: skip


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
