"""Frozen configuration of the aggregator and the node, parsed once at start-up.

Each setting's default and its rule are declared together, on the field. The
command line reads its help defaults from here, and ``__post_init__`` checks
every value, so ``fedgrad aggregator``, ``fedgrad node`` and ``LocalCluster``
refuse exactly the same values with exactly the same ``ConfigError`` message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedgrad.codec import DEFAULT_CHUNK_BYTES
from fedgrad.errors import ConfigError
from fedgrad.optimizers import LR_SCHEDULES, check_optimizer
from fedgrad.parsing import (
    ATTACKS,
    CODEC_FORMS,
    REDUCTIONS,
    ROBUST_REDUCTIONS,
    STALENESS_FORMS,
    parse_attack,
    parse_reduce,
    parse_staleness,
)
from fedgrad.settings import (
    ACCUMULATORS,
    BROADCAST_DTYPES,
    BUFFER_MODES,
    ERROR_FEEDBACK,
    LOG_FORMATS,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    MODES,
    OPTIMIZERS,
    ROUNDINGS,
    _address,
    _at_least_one,
    _attack,
    _check_fields,
    _check_tls_pair,
    _chunk_bytes,
    _codec,
    _count,
    _delay,
    _device,
    _fraction,
    _node_id,
    _node_ids,
    _one_of,
    _optimizer,
    _optional,
    _port,
    _positive,
    _reduce,
    _schedule,
    _seconds,
    _setting,
    _shard,
    _staleness,
    check_setting,
    parse_hostport,
)

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
    #: Where a robust rule spills a round's uploads past --staging-mb, and a shard the
    #: parts it holds past its memory share (None: the temp dir).
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
        leave both waiting until ``idle_timeout``. It keeps ``shard_memory_parts`` of
        them in memory, the others in files under ``spill_dir``.
        """
        fit = self.memory_slots(payload_bytes)
        if self.shard_index[1] > 1 and not self.max_inflight:
            fit = max(fit, min(64, self.nodes))
        return fit

    def memory_slots(self, payload_bytes: int) -> int:
        """Uploads of ``payload_bytes`` held in memory at once: ``max_inflight``, else as
        many as ``staging_mb`` holds, 1..64."""
        if self.max_inflight:
            return self.max_inflight
        return max(1, min(64, self.staging_mb * (1 << 20) // max(1, payload_bytes)))

    def shard_memory_parts(self, whole_bytes: int) -> int:
        """Parts a shard holds in memory at once (the others in files under ``spill_dir``).

        ``max_inflight`` if set; else as many as the shard's 1/K share of ``staging_mb``
        holds, parts being 1/K of the model's ``whole_bytes``: 0 once the model is past
        ``staging_mb``. So a shard's staging is at most 1/K of the budget, as its
        parameters and sums are 1/K of the unsharded aggregator's.
        """
        if self.max_inflight:
            return self.max_inflight
        return min(64, self.staging_mb * (1 << 20) // max(1, whole_bytes))

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
