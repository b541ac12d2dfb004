"""What the operator's ``fedgrad`` tools do: status, health, certs and token.

``fedgrad.launch.commands.dispatch`` runs them once their arguments are parsed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc

from fedgrad.auth import OPERATOR_NAME, TOKEN_ENV, bearer_metadata, load_node_token
from fedgrad.errors import ConfigError
from fedgrad.wire import open_channel

__all__ = ["certs_init", "check_health", "make_token", "show_status"]


def _channel(args: argparse.Namespace) -> grpc.Channel:
    return open_channel(args.address, args.tls_ca, args.tls_cert, args.tls_key)


def show_status(args: argparse.Namespace) -> int:
    """Print round, nodes, throughput and last metrics of a running aggregator."""
    from google.protobuf.json_format import MessageToDict

    from fedgrad.proto import fedgrad_pb2 as pb
    from fedgrad.proto import fedgrad_pb2_grpc as pb_grpc

    token = load_node_token(args.token_file)
    metadata = bearer_metadata(token) if token else ()
    with _channel(args) as channel:
        try:
            reply = pb_grpc.AggregatorStub(channel).GetStatus(
                pb.StatusRequest(), timeout=args.timeout, metadata=metadata
            )
        except grpc.RpcError as exc:
            return _call_failed("fedgrad status", exc, args, has_token=token is not None)
    if args.json:
        doc = MessageToDict(
            reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        print(json.dumps(doc, indent=2))
        return 0
    print(
        f"round {reply.round}/{reply.total_rounds}  phase {reply.phase}  mode {reply.mode or 'sync'}"
        f"  selected {reply.selected}  uploads this round {reply.reported}"
        f"  finished {reply.finished}"
    )
    print(
        f"bytes received {reply.bytes_received / 1e6:.1f} MB  sent {reply.bytes_sent / 1e6:.1f} MB"
    )
    for name, value in sorted(reply.last_metrics.items()):
        print(f"  {name:<14} {value:.4f}")
    print(
        f"{'node':<24} {'state':<10} {'samples':>8} {'last round':>10} {'seen (s ago)':>12}"
        f" {'last norm':>10}  robust rule"
    )
    for n in reply.nodes:
        stats = " ".join(f"{k}={v:.4g}" for k, v in sorted(n.last_stats.items()))
        print(
            # last_round on the wire counts rounds; show the 0-based round, as everywhere.
            f"{n.node_id:<24} {n.state:<10} {n.num_samples:>8}"
            f" {n.last_round - 1 if n.last_round else '-':>10} {n.seconds_since_seen:>12.1f}"
            f" {n.last_norm:>10.4g}  {stats}"
        )
    return 0


def check_health(args: argparse.Namespace) -> int:
    """Exit 0 iff the standard health service reports SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(args) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            return _call_failed("unhealthy", exc, args, has_token=True)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _call_failed(prefix: str, exc: grpc.RpcError, args: argparse.Namespace, has_token: bool) -> int:
    """Print why a status or health call failed, and what to pass; return exit code 1."""
    code = exc.code()
    print(f"{prefix}: {code.name}: {exc.details()}", file=sys.stderr)
    if code == grpc.StatusCode.UNAVAILABLE and not args.tls_cert:
        # What a TLS or mutual-TLS aggregator looks like to a plaintext or certificate-less
        # caller: the handshake fails and gRPC reports only "Socket closed" or similar.
        print(
            f"  is an aggregator serving at {args.address}? A TLS aggregator needs --tls-ca;"
            " one with --tls-client-ca also --tls-cert and --tls-key: the operator's"
            f" {OPERATOR_NAME}.pem and {OPERATOR_NAME}.key from `fedgrad certs init`",
            file=sys.stderr,
        )
    elif code == grpc.StatusCode.UNAUTHENTICATED and not has_token:
        print(
            f"  this aggregator wants a token: pass --token-file FILE or set {TOKEN_ENV}; make"
            f" the operator's with `fedgrad token --out {OPERATOR_NAME}.token --sha256"
            f" {OPERATOR_NAME}` and add the line it prints to the aggregator's --tokens file",
            file=sys.stderr,
        )
    return 1


def certs_init(args: argparse.Namespace) -> int:
    """Write a CA, a server certificate, the operator's and one client certificate per node."""
    from fedgrad.certs import init_federation

    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    paths = init_federation(Path(args.out), nodes, hosts, days=args.days, overwrite=args.overwrite)
    for name, path in sorted(paths.items()):
        print(f"{name:<16} {path}")
    return 0


def make_token(args: argparse.Namespace) -> int:
    """Print a new token (or write it to ``--out``); with ``--sha256 NAME``, its --tokens line."""
    from fedgrad.auth import generate_token, token_file_line

    token = generate_token()
    line = token_file_line(args.sha256, token) if args.sha256 else None  # name checked first
    if args.out:
        _write_secret(Path(args.out), token + "\n", args.overwrite)
    else:
        print(token)
    if line:
        print(line)
    return 0


def _write_secret(path: Path, text: str, overwrite: bool) -> None:
    """Write ``text`` to a file only its owner can read (0600 whatever the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; pass --overwrite to replace it") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file (--overwrite) keeps its mode otherwise
        f.write(text)
