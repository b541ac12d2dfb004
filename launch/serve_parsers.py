"""The parsers of the commands that serve nodes: ``fedgrad aggregator`` and ``fedgrad relay``.

Every aggregator flag is a setting of ``AggregatorConfig`` (its default and its rule
live there); the groups of how rounds run are in ``fedgrad.launch.round_flags``.
``fedgrad.launch.cli`` adds these parsers to the ``fedgrad`` command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from fedgrad.config import (
    ACCUMULATORS,
    BROADCAST_DTYPES,
    BUFFER_MODES,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    AggregatorConfig,
)
from fedgrad.launch.flags import add_run_flags, add_task_flags, choices, settings_of, task_arg
from fedgrad.launch.round_flags import (
    add_defence_flags,
    add_privacy_flags,
    add_round_flags,
    add_sampling_flags,
)

__all__ = ["Subparsers", "add_aggregator_parser", "add_relay_parser"]

A = AggregatorConfig
#: What ``ArgumentParser.add_subparsers`` returns: the ``fedgrad`` command's subcommands.
Subparsers = argparse._SubParsersAction
#: ``settings_of(parser, AggregatorConfig)``: ``add(name, help, **kwargs)``.
Add = Callable[..., None]


def add_aggregator_parser(sub: Subparsers) -> None:
    """Add ``fedgrad aggregator``: own the parameters and the optimizer, reduce each round."""
    p = sub.add_parser(
        "aggregator",
        argument_default=argparse.SUPPRESS,
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
    _training_flags(add)
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
    _observe_flags(add)
    p.add_argument(
        "--no-progress",
        dest="no_progress",
        action="store_true",
        help="plain log lines even on a terminal",
    )


def _training_flags(add: Add) -> None:
    """The optimizer, its schedule and what the nodes are told to do each round."""
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


def _observe_flags(add: Add) -> None:
    """Where the aggregator's rounds can be watched: Prometheus, TensorBoard, reflection."""
    add("metrics_port", "serve Prometheus metrics on this port (0 picks one)", type=int)
    add(
        "tensorboard",
        "write every round's metrics (central and federated) to DIR for TensorBoard; needs"
        " pip install 'fedgrad[tensorboard]'",
        metavar="DIR",
    )
    add("reflection", "enable gRPC server reflection (grpcurl)", action="store_true")


def _limit_flags(add: Add) -> None:
    """Limits of uploads, staging and calls (the state flags keep their --help place among them)."""
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
        " 64 MiB are staged one at a time; a shard holds its 1/K share in memory, the other"
        " parts in files under --spill-dir)",
        type=int,
    )
    add(
        "upload_window_mb",
        "MiB gRPC reads ahead on each upload stream, so uploads queued for a staging slot"
        " hold at most this much each; 0: gRPC's adaptive window, for links with a large"
        " bandwidth-delay product (default {default})",
        type=int,
    )
    _state_flags(add)
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


def _state_flags(add: Add) -> None:
    """How the aggregator holds its state: sum kernel, step device, buffers, broadcast dtype."""
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


def _shard_flags(add: Add) -> None:
    """This shard of a sharded aggregator, its peers, and how shard 0 reaches them."""
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


def add_relay_parser(sub: Subparsers) -> None:
    """Add ``fedgrad relay``: an aggregator to its nodes, one node to its upstream."""
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
