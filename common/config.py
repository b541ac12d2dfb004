"""Frozen configuration of the aggregator and the node, parsed once at start-up.

Each setting's default and its rule are declared together, on the field. The
command line reads its help defaults from here, and ``__post_init__`` checks
every value, so ``fedgrad aggregator``, ``fedgrad node`` and ``LocalCluster``
refuse exactly the same values with exactly the same ``ConfigError`` message.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from fedgrad.codec import DEFAULT_CHUNK_BYTES
from fedgrad.errors import ConfigError, InvalidArgument
from fedgrad.optimizers import (
    LR_SCHEDULES,
    OPTIMIZER_NAMES,
    check_optimizer,
    check_schedule,
    optimizer_class,
)
from fedgrad.parsing import (
    ATTACKS,
    CODEC_FORMS,
    REDUCTIONS,
    ROBUST_REDUCTIONS,
    STALENESS_FORMS,
    parse_attack,
    parse_codec,
    parse_reduce,
    parse_staleness,
)
from fedgrad.wire import MAX_MESSAGE_BYTES, check_id

__all__ = [
    "ACCUMULATORS",
    "ATTACKS",
    "BROADCAST_DTYPES",
    "BUFFER_MODES",
    "CODEC_FORMS",
    "ERROR_FEEDBACK",
    "MODES",
    "LOG_FORMATS",
    "MAX_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "REDUCTIONS",
    "ROBUST_REDUCTIONS",
    "STALENESS_FORMS",
    "ROUNDINGS",
    "AggregatorConfig",
    "NodeConfig",
    "check_setting",
    "parse_attack",
    "parse_hostport",
    "parse_reduce",
    "parse_staleness",
]

#: ``--optimizer``: any element-wise torch.optim optimizer, lower case (fedgrad.optimizers).
OPTIMIZERS = OPTIMIZER_NAMES
#: Accumulator dtypes: float64 sums of float32/16 uploads do not depend on arrival order.
ACCUMULATORS = ("auto", "float64", "float32", "reproducible")
LOG_FORMATS = ("text", "json")
#: How rounds run: sync (every selected node, or a quorum at the deadline) or async (FedBuff).
MODES = ("sync", "async")
#: How buffers are kept: averaged and broadcast (shared), or on each node (local, FedBN).
BUFFER_MODES = ("shared", "local")
#: Dtypes the parameter broadcast may be sent in (None: the model's own dtypes).
BROADCAST_DTYPES = ("float16", "bfloat16", "float32")
#: Error feedback on the node: auto is on for topk and powersgd, off for the rest.
ERROR_FEEDBACK = ("auto", "on", "off")
#: How int8 rounds on the node.
ROUNDINGS = ("nearest", "stochastic")
#: Largest chunk payload: below gRPC's message limit with room for the framing.
MAX_CHUNK_BYTES = MAX_MESSAGE_BYTES - 64 * 1024
#: Smallest chunk payload: one float64 element.
MIN_CHUNK_BYTES = 8

T = TypeVar("T")
#: A rule: ``check(name, value)`` raises ConfigError saying what to fix, else returns.
Check = Callable[[str, Any], None]


def _setting(default: T, check: Check | None = None) -> T:
    """Declare a field with its default and the rule its values must follow."""
    return field(default=default, metadata={"check": check} if check else {})


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(low: int) -> Check:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")

    return check


def _seconds(*, zero: bool = False) -> Check:
    def check(name: str, value: Any) -> None:
        # `not value > 0` also refuses NaN; infinity is a valid "never".
        if not _number(value) or math.isnan(value) or (value < 0 if zero else not value > 0):
            bound = ">= 0" if zero else "> 0"
            raise ConfigError(f"{name} must be a number of seconds {bound}, got {value!r}")

    return check


def _positive(name: str, value: Any) -> None:
    if not _number(value) or not value > 0 or math.isinf(value):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def _one_of(choices: Sequence[str]) -> Check:
    def check(name: str, value: Any) -> None:
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")

    return check


def _optional(rule: Check) -> Check:
    def check(name: str, value: Any) -> None:
        if value is not None:
            rule(name, value)

    return check


def _port(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ConfigError(f"{name} must be a port in 0..65535 (0 picks one), got {value!r}")


def _address(name: str, value: Any) -> None:
    try:
        parse_hostport(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name} must be HOST:PORT, e.g. 127.0.0.1:50051 ([v6]:PORT for IPv6, port"
            f" 0..65535), got {value!r}"
        ) from None


def _node_id(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    try:
        check_id(name, value)
    except InvalidArgument as exc:
        raise ConfigError(str(exc)) from None


def _node_ids(name: str, value: Any) -> None:
    if isinstance(value, str) or not isinstance(value, tuple | list | frozenset | set):
        raise ConfigError(f"{name} must be a sequence of node ids, got {value!r}")
    for node_id in value:
        _node_id(f"{name}: node id", node_id)


def _chunk_bytes(name: str, value: Any) -> None:
    # A multiple of 8, the largest itemsize: a full chunk then ends on an element boundary
    # of every dtype, so no node has to cut chunks shorter than chunk_bytes.
    if (
        not isinstance(value, int)
        or not MIN_CHUNK_BYTES <= value <= MAX_CHUNK_BYTES
        or value % MIN_CHUNK_BYTES
    ):
        raise ConfigError(
            f"{name} must be a multiple of {MIN_CHUNK_BYTES} in [{MIN_CHUNK_BYTES},"
            f" {MAX_CHUNK_BYTES}] (whole elements of every dtype; below gRPC's"
            f" {MAX_MESSAGE_BYTES >> 20} MiB message limit), got {value!r}"
        )


def _shard(name: str, value: Any) -> None:
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ConfigError(f"{name} must be (index, count), got {value!r}")
    index, count = value
    if not isinstance(count, int) or count < 1:
        raise ConfigError(f"{name} {index}/{count}: N must be an integer >= 1 (shard I of N)")
    if not isinstance(index, int) or not 0 <= index < count:
        raise ConfigError(f"{name} {index}/{count}: index must be in [0, {count}) (0-based)")


def _fraction(name: str, value: Any) -> None:
    if not _number(value) or not 0 < value <= 1:
        raise ConfigError(f"{name} must be a fraction in (0, 1], got {value!r}")


def _at_least_one(name: str, value: Any) -> None:
    if not _number(value) or math.isnan(value) or math.isinf(value) or value < 1:
        raise ConfigError(f"{name} must be a finite number >= 1, got {value!r}")


def _reduce(name: str, value: Any) -> None:
    parse_reduce(value)


def _staleness(name: str, value: Any) -> None:
    parse_staleness(value)


def _optimizer(name: str, value: Any) -> None:
    try:
        optimizer_class(str(value))
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


def _schedule(name: str, value: Any) -> None:
    try:
        check_schedule(str(value))
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


def _device(name: str, value: Any) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ConfigError(f"{name} must be auto, cpu, cuda or cuda:N, got {value!r}")


def _codec(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a codec ({', '.join(CODEC_FORMS)}), got {value!r}")
    try:
        parse_codec(value)
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


def _attack(name: str, value: Any) -> None:
    parse_attack(value)


def _delay(name: str, value: Any) -> None:
    if (
        not isinstance(value, tuple | list)
        or len(value) != 2
        or not all(_number(v) and math.isfinite(v) and v >= 0 for v in value)
        or value[0] > value[1]
    ):
        raise ConfigError(
            f"{name} must be SEC or MIN:MAX seconds with 0 <= MIN <= MAX, got {value!r}"
        )


def _check_fields(config: object) -> None:
    for f in fields(config):  # type: ignore[arg-type]
        rule = f.metadata.get("check")
        if rule is not None:
            rule(f.name, getattr(config, f.name))


def _check_tls_pair(cert: str | None, key: str | None) -> None:
    if bool(cert) != bool(key):
        raise ConfigError("tls_cert and tls_key go together: give both or neither")


def check_setting(config: type, name: str, value: Any) -> None:
    """Check one value against the rule of setting ``name`` of ``config``.

    Cross-setting rules (``min_nodes <= nodes``, TLS pairs) are checked when the
    config is built; this lets a caller say where one bad value came from.

    Raises:
        ConfigError: ``value`` breaks the rule, or ``config`` has no such setting.
    """
    for f in fields(config):
        if f.name == name:
            rule = f.metadata.get("check")
            if rule is not None:
                rule(name, value)
            return
    raise ConfigError(f"{config.__name__} has no setting {name!r}")


@dataclass(frozen=True)
class AggregatorConfig:
    """Everything ``fedgrad aggregator`` takes; see ``fedgrad aggregator --help``.

    Raises:
        ConfigError: a value breaks its rule; the message names the setting and the fix.
    """

    task: str = "digits"
    task_args: tuple[tuple[str, str], ...] = ()
    #: Own-loop nodes: the aggregator builds only this model (``package.module:factory``).
    model: str | None = None
    listen: str = _setting("127.0.0.1:50051", _address)
    nodes: int = _setting(1, _count(1))
    rounds: int = _setting(10, _count(1))
    seed: int = _setting(0, _count(0))  # sent as uint64 (JoinRequest.seed)
    optimizer: str | None = _setting(None, _optional(_optimizer))
    #: Constructor arguments of the optimizer, as text (``("betas", "0.9,0.99")``).
    optimizer_args: tuple[tuple[str, str], ...] = ()
    lr: float | None = _setting(None, _optional(_positive))
    lr_schedule: str | None = _setting(None, _optional(_schedule))
    #: Ask the nodes to evaluate the global model on their held-out data every E rounds.
    evaluate_every: int = _setting(0, _count(0))
    #: Settings sent to the nodes with every round's parameters (``RoundContext.config``).
    round_config: tuple[tuple[str, str], ...] = ()
    #: Clip the reduced gradient's global L2 norm to this (torch's clip_grad_norm_).
    clip_grad_norm: float | None = _setting(None, _optional(_positive))
    reduce: str = _setting("weighted-mean", _reduce)
    save: str | None = None
    history: str | None = None
    insecure: bool = False
    round_timeout: float = _setting(300.0, _seconds())
    #: None: wait up to ``round_timeout`` for ``nodes`` before the first round.
    start_timeout: float | None = _setting(None, _optional(_seconds()))
    min_nodes: int = _setting(1, _count(1))
    checkpoint_dir: str | None = None
    chunk_bytes: int = _setting(DEFAULT_CHUNK_BYTES, _chunk_bytes)
    staging_mb: int = _setting(128, _count(1))
    #: 0: as many as ``staging_mb`` holds uploads of the model's size, 1..64.
    max_inflight: int = _setting(0, _count(0))
    #: Bytes (MiB) gRPC reads ahead of the aggregator on each upload stream (the HTTP/2
    #: stream window); 0: gRPC's adaptive window (BDP probing), unbounded per stream.
    upload_window_mb: int = _setting(4, _count(0))
    accumulate: str = _setting("auto", _one_of(ACCUMULATORS))
    #: Where the parameters and the optimizer's step live (the reduce stays on the CPU).
    device: str = _setting("cpu", _device)
    #: Buffers (BatchNorm statistics): averaged each round and broadcast, or kept by each node.
    buffers: str = _setting("shared", _one_of(BUFFER_MODES))
    #: The parameter broadcast's dtype (None: the model's); the master copy keeps its own.
    broadcast_dtype: str | None = _setting(None, _optional(_one_of(BROADCAST_DTYPES)))
    max_rpcs: int = _setting(2048, _count(1))
    slot_wait: float = _setting(60.0, _seconds())
    allow_nodes: tuple[str, ...] = _setting((), _node_ids)
    finish_grace: float = _setting(30.0, _seconds(zero=True))
    idle_timeout: float = _setting(30.0, _seconds())
    shutdown_grace: float = _setting(10.0, _seconds(zero=True))
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tokens: str | None = None
    metrics_port: int | None = _setting(None, _optional(_port))
    #: Write every round's metrics here for TensorBoard (the ``tensorboard`` extra).
    tensorboard: str | None = None
    log_format: str = _setting("text", _one_of(LOG_FORMATS))
    reflection: bool = False
    progress: bool = True
    mode: str = _setting("sync", _one_of(MODES))
    #: 0 (and no sample_fraction): every active node takes part in every round.
    sample: int = _setting(0, _count(0))
    sample_fraction: float | None = _setting(None, _optional(_fraction))
    #: Joined nodes needed before the first round is sampled (0: the sample size).
    min_available: int = _setting(0, _count(0))
    overcommit: float = _setting(1.0, _at_least_one)
    #: Async: uploads per version (0: half of ``nodes``, rounded up).
    buffer: int = _setting(0, _count(0))
    max_staleness: int = _setting(10, _count(0))
    staleness: str = _setting("polynomial:0.5", _staleness)
    #: Every upload is scaled to L2 norm at most this before any reducer (None: no bound).
    clip_update_norm: float | None = _setting(None, _optional(_positive))
    #: Largest sample count a node's weight may claim (0: no cap).
    max_samples_per_node: int = _setting(0, _count(0))
    #: Where a robust rule spills a round's uploads past --staging-mb (None: the temp dir).
    spill_dir: str | None = None
    #: Central DP (DP-FedAvg): Gaussian noise of std z x dp_clip on the sum of clipped uploads.
    dp_noise_multiplier: float | None = _setting(None, _optional(_positive))
    dp_clip: float | None = _setting(None, _optional(_positive))
    dp_delta: float = _setting(1e-5, _fraction)
    #: Stop training once another round would spend more than this epsilon.
    dp_target_epsilon: float | None = _setting(None, _optional(_positive))
    #: Tests only: draw the DP noise from this seed instead of the OS's CSPRNG (not private).
    dp_test_seed: int | None = _setting(None, _optional(_count(0)))
    #: A sharded aggregator: this process is shard ``I/K`` (``fedgrad.shards``); None unsharded.
    shard: str | None = None
    #: Every shard's HOST:PORT, in shard order (this one's included), for ``shard``.
    peers: tuple[str, ...] = ()
    #: Shard 0's calls to the other shards: the CA of their server certificates (TLS),
    #: its client certificate and key, identity "shard-0" (mutual TLS), its token (tokens).
    peer_ca: str | None = None
    peer_cert: str | None = None
    peer_key: str | None = None
    peer_token: str | None = None

    def __post_init__(self) -> None:
        _check_fields(self)
        self._check_rounds()
        self._check_privacy()
        self._check_shards()
        if self.optimizer is not None:
            try:
                check_optimizer(self.optimizer, self.optimizer_args)
            except ConfigError as e:
                raise ConfigError(f"optimizer_args: {e}") from None
        if self.min_nodes > self.nodes:
            raise ConfigError(
                f"min_nodes must be <= nodes (a round could never close), got min_nodes"
                f" {self.min_nodes} and nodes {self.nodes}"
            )
        _check_tls_pair(self.tls_cert, self.tls_key)
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")

    def _check_privacy(self) -> None:
        dp = self.dp_noise_multiplier is not None
        if not dp:
            if self.dp_clip is not None or self.dp_target_epsilon is not None:
                raise ConfigError("dp_clip and dp_target_epsilon need dp_noise_multiplier")
            if self.dp_test_seed is not None:
                raise ConfigError("dp_test_seed needs dp_noise_multiplier")
            return
        if self.dp_clip is None:
            raise ConfigError(
                "dp_noise_multiplier needs dp_clip: the noise is z x dp_clip, the bound on"
                " each upload's L2 norm"
            )
        if self.reduce != "mean":
            raise ConfigError(
                f"differential privacy (DP-FedAvg) needs reduce mean: every clipped upload"
                f" weighs 1, so one node changes the sum by at most dp_clip; got reduce"
                f" {self.reduce}"
            )
        if self.clip_update_norm is not None:
            raise ConfigError("give dp_clip alone: with DP it is the bound on every upload")
        if self.mode == "async":
            raise ConfigError(
                "differential privacy is for sync rounds (the accountant counts rounds)"
            )

    def _check_shards(self) -> None:
        if not self.shard:
            if self.peers:
                raise ConfigError("peers needs shard I/K (the index of this shard among them)")
            if any((self.peer_ca, self.peer_cert, self.peer_key, self.peer_token)):
                raise ConfigError("peer_ca, peer_cert, peer_key and peer_token need shard I/K")
            return
        from fedgrad.shards import parse_shard

        _, k = parse_shard(self.shard)
        if len(self.peers) != k:
            raise ConfigError(
                f"shard {self.shard} needs peers: the {k} shards' HOST:PORT in shard order,"
                f" got {len(self.peers)}"
            )
        for peer in self.peers:
            _address("peers", peer)
        if k > 1:
            unsupported = [
                (self.mode == "async", "mode async"),
                (self.sampled, "sampled rounds"),
                (self.reduce not in ("weighted-mean", "mean", "sum"), f"reduce {self.reduce}"),
                (self.clip_grad_norm is not None, "clip_grad_norm (a global norm)"),
                (self.clip_update_norm is not None, "clip_update_norm (a global norm)"),
                (self.private, "differential privacy"),
                (self.broadcast_dtype is not None, "broadcast_dtype"),
                (self.device != "cpu", "device"),
            ]
            named = [what for bad, what in unsupported if bad]
            if named:
                raise ConfigError(
                    f"a sharded aggregator (shard {self.shard}) does not support {named[0]} yet"
                    " (README, 'Sharded aggregator')"
                )
            needs = [
                (self.tls_cert is not None and not self.peer_ca, "peer_ca (the CA of the"
                 " shards' server certificates: shard 0 calls them over TLS)"),
                (bool(self.tls_client_ca) and not (self.peer_cert and self.peer_key),
                 "peer_cert and peer_key (shard 0's client certificate, identity shard-0)"),
                (self.tokens is not None and not self.peer_token,
                 "peer_token (a file with shard 0's token, listed as shard-0 in --tokens)"),
            ]  # fmt: skip
            missing = [what for bad, what in needs if bad]
            if missing:
                raise ConfigError(f"shard {self.shard} needs {missing[0]}")

    def staging_slots(self, payload_bytes: int) -> int:
        """Uploads of ``payload_bytes`` staged at once: ``max_inflight``, else 1..64.

        As many as ``staging_mb`` holds; a shard stages every node's part of a round
        (up to 64) at least: shard 0 counts an upload only once every shard holds its
        part, and a shard whose few slots held other nodes' parts than shard 0's would
        leave both waiting until ``idle_timeout``.
        """
        if self.max_inflight:
            return self.max_inflight
        fit = max(1, min(64, self.staging_mb * (1 << 20) // max(1, payload_bytes)))
        if self.shard_index[1] > 1:
            fit = max(fit, min(64, self.nodes))
        return fit

    @property
    def shard_index(self) -> tuple[int, int]:
        """(I, K) of ``shard``; (0, 1) unsharded."""
        if not self.shard:
            return 0, 1
        from fedgrad.shards import parse_shard

        return parse_shard(self.shard)

    @property
    def private(self) -> bool:
        """True if central differential privacy is on."""
        return self.dp_noise_multiplier is not None

    def _check_rounds(self) -> None:
        sampled = self.sample > 0 or self.sample_fraction is not None
        if self.sample and self.sample_fraction is not None:
            raise ConfigError("give sample (K nodes) or sample_fraction (C), not both")
        if self.overcommit > 1 and not sampled:
            raise ConfigError(
                "overcommit needs sample or sample_fraction: it over-selects a sample"
            )
        if self.mode == "async" and sampled:
            raise ConfigError(
                "mode async takes every node that uploads (the buffer is its sample):"
                " drop sample/sample_fraction"
            )
        if self.mode != "async" and self.buffer:
            raise ConfigError("buffer is the number of uploads per version of mode async")
        if self.min_available and not sampled:
            raise ConfigError("min_available needs sample or sample_fraction (use nodes otherwise)")
        if self.sample and self.min_available and self.min_available < self.sample:
            raise ConfigError(
                f"min_available must be >= sample, got min_available {self.min_available}"
                f" and sample {self.sample}"
            )

    @property
    def sampled(self) -> bool:
        """True if each round selects a sample of the active nodes."""
        return self.sample > 0 or self.sample_fraction is not None

    def sample_size(self, available: int) -> int:
        """Return K: the nodes a round waits for, of ``available`` active nodes (>= 1)."""
        if self.sample:
            k = self.sample
        elif self.sample_fraction is not None:
            k = math.ceil(self.sample_fraction * available - 1e-9)
        else:
            k = available
        return max(1, min(k, available))

    @property
    def buffer_size(self) -> int:
        """Async: uploads per version (``buffer``, or half of ``nodes`` rounded up)."""
        return self.buffer or (self.nodes + 1) // 2


@dataclass(frozen=True)
class NodeConfig:
    """Everything ``fedgrad node`` takes; see ``fedgrad node --help``.

    Raises:
        ConfigError: a value breaks its rule; the message names the setting and the fix.
    """

    task: str = "digits"
    task_args: tuple[tuple[str, str], ...] = ()
    aggregator: str = _setting("127.0.0.1:50051", _address)
    node_id: str = _setting("node-0", _node_id)
    shard: tuple[int, int] = _setting((0, 1), _shard)
    seed: int = _setting(0, _count(0))  # sent as uint64 (JoinRequest.seed)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None
    give_up_after: float = _setting(120.0, _seconds())
    call_timeout: float = _setting(10.0, _seconds())
    round_wait: float = _setting(600.0, _seconds())
    #: Bytes per second a transfer's deadline assumes, on top of ``call_timeout``.
    min_bandwidth: float = _setting(10e6, _positive)
    #: The upload codec (``fedgrad.codecs``): a cast, int8, topk or powersgd.
    compress: str = _setting("identity", _codec)
    error_feedback: str = _setting("auto", _one_of(ERROR_FEEDBACK))
    rounding: str = _setting("nearest", _one_of(ROUNDINGS))
    #: Where the node keeps state across restarts (error feedback); None: in memory.
    state_dir: str | None = None
    #: Where the model and its computation live (auto: CUDA if torch sees it).
    device: str = _setting("cpu", _device)
    #: 0: torch's own choice.
    threads: int = _setting(0, _count(0))
    log_format: str = _setting("text", _one_of(LOG_FORMATS))
    #: Simulation: seconds added to each local computation, drawn per round in [min, max].
    simulate_delay: tuple[float, float] = _setting((0.0, 0.0), _delay)
    #: Simulation: behave maliciously in a documented, seeded way (None: honest).
    simulate_attack: str | None = _setting(None, _optional(_attack))

    def __post_init__(self) -> None:
        _check_fields(self)
        _check_tls_pair(self.tls_cert, self.tls_key)
        if self.tls_cert and not self.tls_ca:
            # Without a CA the node dials plaintext and would drop the certificate silently.
            raise ConfigError("tls_cert and tls_key (mutual TLS) need tls_ca to turn TLS on")


def is_loopback(host: str) -> bool:
    """Return True only for "localhost" and loopback IP addresses (not look-alike names)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_hostport(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too) into host and port.

    Raises:
        ValueError: no port, or the port is not 0-65535.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)
