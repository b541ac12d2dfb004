from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT64: _ClassVar[DType]

class Reduction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCTION_UNSPECIFIED: _ClassVar[Reduction]
    WEIGHTED_MEAN: _ClassVar[Reduction]
    MEAN: _ClassVar[Reduction]
    SUM: _ClassVar[Reduction]
    MEDIAN: _ClassVar[Reduction]
    TRIMMED_MEAN: _ClassVar[Reduction]
    KRUM: _ClassVar[Reduction]
    MULTI_KRUM: _ClassVar[Reduction]
    GEOMETRIC_MEDIAN: _ClassVar[Reduction]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
INT64: DType
REDUCTION_UNSPECIFIED: Reduction
WEIGHTED_MEAN: Reduction
MEAN: Reduction
SUM: Reduction
MEDIAN: Reduction
TRIMMED_MEAN: Reduction
KRUM: Reduction
MULTI_KRUM: Reduction
GEOMETRIC_MEDIAN: Reduction

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("tensor", "offset", "data")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    tensor: int
    offset: int
    data: bytes
    def __init__(self, tensor: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("node_id", "num_samples", "manifest", "seed", "task", "buffers")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    num_samples: int
    manifest: Manifest
    seed: int
    task: str
    buffers: Manifest
    def __init__(self, node_id: _Optional[str] = ..., num_samples: _Optional[int] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., seed: _Optional[int] = ..., task: _Optional[str] = ..., buffers: _Optional[_Union[Manifest, _Mapping]] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("manifest", "reduction", "chunk_bytes", "round", "total_rounds", "session_id", "finished", "round_open", "seed", "contract_version", "reduce_rule", "buffers", "buffers_local", "shard_map", "upload_ready")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ROUND_OPEN_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REDUCE_RULE_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_LOCAL_FIELD_NUMBER: _ClassVar[int]
    SHARD_MAP_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_READY_FIELD_NUMBER: _ClassVar[int]
    manifest: Manifest
    reduction: Reduction
    chunk_bytes: int
    round: int
    total_rounds: int
    session_id: str
    finished: bool
    round_open: bool
    seed: int
    contract_version: int
    reduce_rule: str
    buffers: Manifest
    buffers_local: bool
    shard_map: ShardMap
    upload_ready: bool
    def __init__(self, manifest: _Optional[_Union[Manifest, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., chunk_bytes: _Optional[int] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., session_id: _Optional[str] = ..., finished: bool = ..., round_open: bool = ..., seed: _Optional[int] = ..., contract_version: _Optional[int] = ..., reduce_rule: _Optional[str] = ..., buffers: _Optional[_Union[Manifest, _Mapping]] = ..., buffers_local: bool = ..., shard_map: _Optional[_Union[ShardMap, _Mapping]] = ..., upload_ready: bool = ...) -> None: ...

class Piece(_message.Message):
    __slots__ = ("tensor", "first", "count")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    tensor: int
    first: int
    count: int
    def __init__(self, tensor: _Optional[int] = ..., first: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class Shard(_message.Message):
    __slots__ = ("address", "pieces")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    address: str
    pieces: _containers.RepeatedCompositeFieldContainer[Piece]
    def __init__(self, address: _Optional[str] = ..., pieces: _Optional[_Iterable[_Union[Piece, _Mapping]]] = ...) -> None: ...

class ShardMap(_message.Message):
    __slots__ = ("shards", "map_id")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    MAP_ID_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[Shard]
    map_id: str
    def __init__(self, shards: _Optional[_Iterable[_Union[Shard, _Mapping]]] = ..., map_id: _Optional[str] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("node_id", "min_round")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_ROUND_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    min_round: int
    def __init__(self, node_id: _Optional[str] = ..., min_round: _Optional[int] = ...) -> None: ...

class ParameterHeader(_message.Message):
    __slots__ = ("round", "total_bytes", "finished", "session_id", "dtype", "total_rounds", "config", "buffers")
    class ConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    round: int
    total_bytes: int
    finished: bool
    session_id: str
    dtype: DType
    total_rounds: int
    config: _containers.ScalarMap[str, str]
    buffers: bytes
    def __init__(self, round: _Optional[int] = ..., total_bytes: _Optional[int] = ..., finished: bool = ..., session_id: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., total_rounds: _Optional[int] = ..., config: _Optional[_Mapping[str, str]] = ..., buffers: _Optional[bytes] = ...) -> None: ...

class ParameterMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ParameterHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ParameterHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("round", "node_id", "upload_id", "num_samples", "metrics", "wire_dtype", "codec", "payload_bytes", "buffers", "shard", "shard_map", "presummed")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SHARD_MAP_FIELD_NUMBER: _ClassVar[int]
    PRESUMMED_FIELD_NUMBER: _ClassVar[int]
    round: int
    node_id: str
    upload_id: str
    num_samples: int
    metrics: _containers.ScalarMap[str, float]
    wire_dtype: DType
    codec: str
    payload_bytes: int
    buffers: bytes
    shard: int
    shard_map: str
    presummed: bool
    def __init__(self, round: _Optional[int] = ..., node_id: _Optional[str] = ..., upload_id: _Optional[str] = ..., num_samples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., wire_dtype: _Optional[_Union[DType, str]] = ..., codec: _Optional[str] = ..., payload_bytes: _Optional[int] = ..., buffers: _Optional[bytes] = ..., shard: _Optional[int] = ..., shard_map: _Optional[str] = ..., presummed: bool = ...) -> None: ...

class UploadEnd(_message.Message):
    __slots__ = ("total_bytes",)
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    def __init__(self, total_bytes: _Optional[int] = ...) -> None: ...

class GradientMessage(_message.Message):
    __slots__ = ("header", "chunk", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: Chunk
    end: UploadEnd
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., end: _Optional[_Union[UploadEnd, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("duplicate", "round")
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    round: int
    def __init__(self, duplicate: bool = ..., round: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "num_samples", "state", "last_norm", "last_stats", "last_round", "seconds_since_seen")
    class LastStatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_NORM_FIELD_NUMBER: _ClassVar[int]
    LAST_STATS_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_SEEN_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    num_samples: int
    state: str
    last_norm: float
    last_stats: _containers.ScalarMap[str, float]
    last_round: int
    seconds_since_seen: float
    def __init__(self, node_id: _Optional[str] = ..., num_samples: _Optional[int] = ..., state: _Optional[str] = ..., last_norm: _Optional[float] = ..., last_stats: _Optional[_Mapping[str, float]] = ..., last_round: _Optional[int] = ..., seconds_since_seen: _Optional[float] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("round", "total_rounds", "finished", "nodes", "reported", "last_metrics", "bytes_received", "bytes_sent", "session_id", "phase", "mode", "selected")
    class LastMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    LAST_METRICS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    round: int
    total_rounds: int
    finished: bool
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    reported: int
    last_metrics: _containers.ScalarMap[str, float]
    bytes_received: int
    bytes_sent: int
    session_id: str
    phase: str
    mode: str
    selected: int
    def __init__(self, round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., finished: bool = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., reported: _Optional[int] = ..., last_metrics: _Optional[_Mapping[str, float]] = ..., bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., session_id: _Optional[str] = ..., phase: _Optional[str] = ..., mode: _Optional[str] = ..., selected: _Optional[int] = ...) -> None: ...

class ShardSyncRequest(_message.Message):
    __slots__ = ("shard", "shards", "settings", "round", "session_id")
    class SettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    shard: int
    shards: int
    settings: _containers.ScalarMap[str, str]
    round: int
    session_id: str
    def __init__(self, shard: _Optional[int] = ..., shards: _Optional[int] = ..., settings: _Optional[_Mapping[str, str]] = ..., round: _Optional[int] = ..., session_id: _Optional[str] = ...) -> None: ...

class ShardSyncReply(_message.Message):
    __slots__ = ("round", "incarnation")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    round: int
    incarnation: str
    def __init__(self, round: _Optional[int] = ..., incarnation: _Optional[str] = ...) -> None: ...

class ShardHoldRequest(_message.Message):
    __slots__ = ("node_id", "round", "upload_id", "wait_s", "presummed")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    PRESUMMED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    round: int
    upload_id: str
    wait_s: float
    presummed: bool
    def __init__(self, node_id: _Optional[str] = ..., round: _Optional[int] = ..., upload_id: _Optional[str] = ..., wait_s: _Optional[float] = ..., presummed: bool = ...) -> None: ...

class ShardHoldReply(_message.Message):
    __slots__ = ("held", "reason")
    HELD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    held: bool
    reason: str
    def __init__(self, held: bool = ..., reason: _Optional[str] = ...) -> None: ...

class ShardCommitRequest(_message.Message):
    __slots__ = ("node_id", "round", "upload_id", "weight", "presummed")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PRESUMMED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    round: int
    upload_id: str
    weight: int
    presummed: bool
    def __init__(self, node_id: _Optional[str] = ..., round: _Optional[int] = ..., upload_id: _Optional[str] = ..., weight: _Optional[int] = ..., presummed: bool = ...) -> None: ...

class ShardCommitReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardCloseRequest(_message.Message):
    __slots__ = ("round", "uploads", "finished", "gather")
    class UploadsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    UPLOADS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    GATHER_FIELD_NUMBER: _ClassVar[int]
    round: int
    uploads: _containers.ScalarMap[str, str]
    finished: bool
    gather: bool
    def __init__(self, round: _Optional[int] = ..., uploads: _Optional[_Mapping[str, str]] = ..., finished: bool = ..., gather: bool = ...) -> None: ...

class ShardCloseReply(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...
