"""Frozen configuration of the aggregator and the node, parsed once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from fedgrad.codec import DEFAULT_CHUNK_BYTES
from fedgrad.errors import ConfigError

__all__ = [
    "MAX_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "REDUCTIONS",
    "AggregatorConfig",
    "NodeConfig",
    "OPTIMIZERS",
    "parse_hostport",
]

REDUCTIONS = ("weighted-mean", "mean", "sum")
#: Largest chunk payload: below gRPC's 4 MiB message limit with room for the framing.
MAX_CHUNK_BYTES = 4 * 1024 * 1024 - 64 * 1024
MIN_CHUNK_BYTES = 8
OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclass(frozen=True)
class AggregatorConfig:
    """Everything ``fedgrad aggregator`` takes; see ``fedgrad aggregator --help``."""

    task: str = "digits"
    task_args: tuple[tuple[str, str], ...] = ()
    listen: str = "127.0.0.1:50051"
    nodes: int = 1
    rounds: int = 10
    seed: int = 0
    optimizer: str | None = None
    lr: float | None = None
    reduce: str = "weighted-mean"
    save: str | None = None
    history: str | None = None
    insecure: bool = False
    round_timeout: float = 300.0
    min_nodes: int = 1
    checkpoint_dir: str | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    staging_mb: int = 256
    max_inflight: int = 0
    accumulate: str = "float64"
    max_rpcs: int = 2048
    slot_wait: float = 60.0
    allow_nodes: tuple[str, ...] = ()
    finish_grace: float = 30.0
    idle_timeout: float = 30.0
    shutdown_grace: float = 10.0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tokens: str | None = None
    metrics_port: int | None = None
    log_format: str = "text"
    reflection: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not MIN_CHUNK_BYTES <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ConfigError(
                f"chunk_bytes {self.chunk_bytes} must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]"
                " (one element at least; below gRPC's 4 MiB message limit)"
            )
        if self.nodes < 1 or self.rounds < 1 or self.min_nodes < 1:
            raise ConfigError("nodes, rounds and min_nodes must be >= 1")
        if self.max_inflight < 0 or self.finish_grace < 0 or self.max_rpcs < 1:
            raise ConfigError("max_inflight and finish_grace must be >= 0, max_rpcs >= 1")
        if self.accumulate not in ("float64", "float32"):
            raise ConfigError(f"accumulate {self.accumulate!r} must be float64 or float32")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port {self.metrics_port} is not a port (0..65535)")


@dataclass(frozen=True)
class NodeConfig:
    """Everything ``fedgrad node`` takes; see ``fedgrad node --help``."""

    task: str = "digits"
    task_args: tuple[tuple[str, str], ...] = ()
    aggregator: str = "127.0.0.1:50051"
    node_id: str = "node-0"
    shard: tuple[int, int] = (0, 1)
    seed: int = 0
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None
    give_up_after: float = 120.0
    call_timeout: float = 10.0
    round_wait: float = 600.0
    min_bandwidth: float = 10e6
    wire_dtype: str | None = None
    threads: int = 0
    log_format: str = "text"


def parse_hostport(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too) into host and port.

    Raises:
        ValueError: no port, or the port is not 0-65535.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)
