"""A sharded aggregator's parts: the pieces as a model, the settings shards compare,
and shard 0's calls to the other shards.

Shard I of K holds only its pieces (``fedgrad.shards``) and their optimizer state: a
``PieceTask`` makes them a model of their own, so ``ServerModel`` steps them as it
steps a whole model. Shard 0 (the coordinator) keeps the round engine; before it counts
an upload it asks every other shard whether it holds that upload's complete part
(``Hold``), then tells them to add it (``Commit``); a round closes on every shard with
exactly the uploads shard 0 counted (``Close``), the others first, so that a node's pull
from shard 0 completes only once every shard has published the round.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import torch
from torch import nn

from fedgrad.auth import SHARD_IDENTITY, bearer_metadata
from fedgrad.codec import ChunkCursor, Layout, TensorSpec, byte_view, specs_of, write_chunk
from fedgrad.config import AggregatorConfig
from fedgrad.errors import ConfigError, FailedPrecondition, Unavailable
from fedgrad.framing import decode_chunk
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.shards import Piece, ShardPlan, piece_specs, piece_views, plan_shards
from fedgrad.task import Task, trainable_parameters
from fedgrad.wire import SERVICE_NAME, channel_credentials

__all__ = [
    "PEER_SERVICE", "PeerClients", "PieceTask", "ShardSetup", "check_spill", "pull_pieces",
    "shard_settings",
]  # fmt: skip

log = logging.getLogger("fedgrad.shards")
PEER_SERVICE = "fedgrad.v1.ShardPeer"
#: Seconds a Sync, Commit or Hold call may take beyond its own wait.
PEER_CALL = 30.0

#: Settings every shard must share (AggregatorConfig fields).
_SHARED = (
    "task", "task_args", "model", "seed", "nodes", "rounds", "optimizer", "optimizer_args",
    "lr", "lr_schedule", "reduce", "accumulate", "chunk_bytes", "mode", "min_nodes",
    "max_samples_per_node", "peers",
)  # fmt: skip


def shard_settings(cfg: AggregatorConfig) -> dict[str, str]:
    """The settings that must agree across shards, as text."""
    return {name: repr(getattr(cfg, name)) for name in _SHARED}


class _Pieces(nn.Module):
    def __init__(self, values: Sequence[torch.Tensor]) -> None:
        super().__init__()
        for i, v in enumerate(values):
            self.register_parameter(f"p{i}", nn.Parameter(v))


class PieceTask(Task):
    """The task's model restricted to one shard's pieces (same initial values)."""

    def __init__(self, task: Task, pieces: Sequence[Piece]) -> None:
        self.inner, self.pieces = task, list(pieces)
        self.optimizer, self.lr = task.optimizer, task.lr

    def model(self) -> nn.Module:
        # The whole model is built once, with the RNG state the caller seeded, so every
        # shard's pieces start as the unsharded model's elements; then it is let go, a
        # tensor as soon as its last piece is taken: the peak is the model, not model
        # plus pieces. A piece that is a whole tensor is that tensor, not a copy.
        full: list[torch.Tensor | None] = [
            p.detach() for _, p in trainable_parameters(self.inner.model())
        ]
        last = {p.tensor: i for i, p in enumerate(self.pieces)}
        full = [t if i in last else None for i, t in enumerate(full)]
        values = []
        for i, p in enumerate(self.pieces):
            tensor = full[p.tensor]
            assert tensor is not None
            flat = tensor.reshape(-1)
            whole = p.first == 0 and p.count == flat.numel()
            values.append(flat if whole else flat[p.first : p.first + p.count].clone())
            if last[p.tensor] == i:
                full[p.tensor] = None
            del tensor, flat
        return _Pieces(values)

    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        return None  # shard 0 evaluates the whole model (``fedgrad.server.coordination._evaluate_shards``)

    @property
    def evaluates(self) -> bool:
        """True if the task's own ``evaluate`` does something (it overrides Task's)."""
        return type(self.inner).evaluate is not Task.evaluate

    def round_config(self, round_: int, total_rounds: int) -> Mapping[str, str]:
        return self.inner.round_config(round_, total_rounds)


def check_spill(cfg: AggregatorConfig, index: int, part_bytes: int, whole_bytes: int) -> None:
    """Refuse to start a shard whose held parts past its memory share cannot go to files.

    A shard holds up to ``staging_slots`` parts, ``shard_memory_parts`` of them in memory;
    the others need a writable ``--spill-dir`` (made if missing) with room for them.

    Raises:
        ConfigError: the folder cannot be made or written, or has too little free space.
    """
    slots = cfg.staging_slots(part_bytes)
    spilled = max(0, slots - cfg.shard_memory_parts(whole_bytes)) * part_bytes
    if not spilled:
        return
    where = Path(cfg.spill_dir or tempfile.gettempdir())
    try:
        where.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=where).close()
        free = shutil.disk_usage(where).free
    except OSError as exc:
        raise ConfigError(
            f"--spill-dir {where}: {exc.strerror or exc}; shard {index} keeps the parts it holds"
            " past its memory share there: give it a writable folder"
        ) from None
    if spilled > free:
        raise ConfigError(
            f"shard {index} may hold {slots} parts of {part_bytes / 1e6:.0f} MB, up to"
            f" {spilled / 1e6:.0f} MB of them in files, more than the {free / 1e6:.0f} MB"
            f" free in {where}: point --spill-dir at a bigger disk or raise --staging-mb"
        )


class ShardSetup:
    """This process's place among the shards: the plan, its index, its pieces' task."""

    def __init__(self, task: Task, cfg: AggregatorConfig) -> None:
        self.index, self.count = cfg.shard_index
        torch.manual_seed(cfg.seed)
        model = task.model()
        named = trainable_parameters(model)
        self.full_specs: list[TensorSpec] = specs_of(named)
        if any(True for _ in model.buffers()) and cfg.buffers == "shared":
            raise ConfigError(
                "a sharded aggregator does not aggregate buffers yet: run with --buffers local"
            )
        del model, named
        self.plan: ShardPlan = plan_shards(self.full_specs, cfg.peers)
        self.pieces = self.plan.pieces[self.index]
        self.task = PieceTask(task, self.pieces)
        #: The whole model's payload bytes (a shard's memory share is counted in these).
        self.whole_bytes = Layout(self.full_specs).total
        check_spill(cfg, self.index, Layout(piece_specs(self.full_specs, self.pieces)).total,
                    self.whole_bytes)  # fmt: skip

    def shard_map(self) -> pb.ShardMap:
        return pb.ShardMap(
            shards=[
                pb.Shard(
                    address=address,
                    pieces=[pb.Piece(tensor=p.tensor, first=p.first, count=p.count) for p in ps],
                )
                for address, ps in zip(self.plan.addresses, self.plan.pieces, strict=True)
            ],
            map_id=self.plan.map_id,
        )


def _call_error(shard: int, address: str, exc: grpc.RpcError) -> Exception:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(f"shard {shard} ({address}) refuses: {details}")
    return Unavailable(f"shard {shard} unreachable ({address}): {details}")


class PeerClients:
    """Shard 0's channels to shards 1..K-1 and the four calls it makes."""

    def __init__(self, setup: ShardSetup, cfg: AggregatorConfig) -> None:
        self.setup, self.cfg = setup, cfg
        self.settings = shard_settings(cfg)
        self.credentials = (
            channel_credentials(cfg.peer_ca, cfg.peer_cert, cfg.peer_key) if cfg.peer_ca else None
        )
        token = Path(cfg.peer_token).read_text().strip() if cfg.peer_token else ""
        self.metadata = bearer_metadata(token) if token else ()
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[dict[str, Any]] = []
        #: Why rounds cannot go on ("shard 2 unreachable ..."), "" while every shard answers.
        self.blocked = ""

    def _open(self) -> None:
        """Open the channels on the serving loop (grpc.aio binds them to the running loop)."""
        credentials = self.credentials
        for address in self.setup.plan.addresses[1:]:
            channel = (
                grpc.aio.secure_channel(address, credentials)
                if credentials is not None
                else grpc.aio.insecure_channel(address)
            )
            self._channels.append(channel)
            self._stubs.append(
                {
                    name: channel.unary_unary(
                        f"/{PEER_SERVICE}/{name}",
                        request_serializer=req.SerializeToString,
                        response_deserializer=rep.FromString,
                    )
                    for name, req, rep in (
                        ("Sync", pb.ShardSyncRequest, pb.ShardSyncReply),
                        ("Hold", pb.ShardHoldRequest, pb.ShardHoldReply),
                        ("Commit", pb.ShardCommitRequest, pb.ShardCommitReply),
                        ("Close", pb.ShardCloseRequest, pb.ShardCloseReply),
                    )
                }
            )

    async def _each(self, name: str, make: Any, timeout: float) -> list[Any]:
        if not self._channels:
            self._open()

        async def one(i: int) -> Any:
            shard, address = i + 1, self.setup.plan.addresses[i + 1]
            try:
                return await self._stubs[i][name](
                    make(shard), timeout=timeout, metadata=self.metadata
                )
            except grpc.RpcError as exc:
                raise _call_error(shard, address, exc) from None

        try:
            replies = await asyncio.gather(*(one(i) for i in range(len(self._stubs))))
        except (Unavailable, FailedPrecondition) as exc:
            self.blocked = str(exc)
            raise
        self.blocked = ""
        return list(replies)

    async def sync(self, round_: int, session_id: str) -> None:
        """Check every shard's settings and round (raises FailedPrecondition, Unavailable)."""
        replies = await self._each(
            "Sync",
            lambda shard: pb.ShardSyncRequest(
                shard=shard,
                shards=self.setup.count,
                settings=self.settings,
                round=round_,
                session_id=session_id,
            ),
            PEER_CALL,
        )
        for i, reply in enumerate(replies):
            if reply.round != round_:
                raise FailedPrecondition(
                    f"shard {i + 1} has published round {reply.round}, shard 0 round {round_}:"
                    " restart every shard with the same --checkpoint-dir history"
                )

    async def wait_synced(self, round_: int, session_id: str, patience: float) -> None:
        """``sync`` until every shard answers (for up to ``patience`` seconds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        said = False
        while True:
            try:
                await self.sync(round_, session_id)
                return
            except Unavailable as exc:
                if loop.time() > deadline:
                    raise
                if not said:
                    log.info("waiting for the other shards: %s", exc, extra={"event": "shards"})
                    said = True
                await asyncio.sleep(0.5)

    async def hold(
        self, node_id: str, round_: int, upload_id: str, wait: float, presummed: bool = False
    ) -> str:
        """Return "" if every shard holds the upload's complete part, else why not."""
        replies = await self._each(
            "Hold",
            lambda shard: pb.ShardHoldRequest(
                node_id=node_id,
                round=round_,
                upload_id=upload_id,
                wait_s=wait,
                presummed=presummed,
            ),
            wait + PEER_CALL,
        )
        for i, reply in enumerate(replies):
            if not reply.held:
                return f"shard {i + 1}: {reply.reason}"
        return ""

    async def commit(
        self, node_id: str, round_: int, upload_id: str, weight: int, presummed: bool = False
    ) -> None:
        await self._each(
            "Commit",
            lambda shard: pb.ShardCommitRequest(
                node_id=node_id,
                round=round_,
                upload_id=upload_id,
                weight=weight,
                presummed=presummed,
            ),
            PEER_CALL,
        )

    async def close(
        self, round_: int, uploads: Mapping[str, str], finished: bool, timeout: float
    ) -> None:
        await self._each(
            "Close",
            lambda shard: pb.ShardCloseRequest(
                round=round_,
                uploads=dict(uploads),
                finished=finished,
                gather=bool(self.cfg.save) or self.setup.task.evaluates,
            ),
            timeout,
        )

    async def gather(
        self,
        core: Any,
        into: Sequence[torch.Tensor] | None = None,
        round_: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Pull every shard's pieces of ``round_`` (default: the final ones) into the model.

        Writes into ``into`` (the whole model's tensors, manifest order) or new tensors;
        returns them by name (the state_dict ``--save`` writes).
        """
        specs = self.setup.full_specs
        full = (
            list(into) if into is not None else [torch.zeros(s.shape, dtype=s.dtype) for s in specs]
        )
        with torch.no_grad():
            for view, own in zip(
                piece_views(full, self.setup.pieces), core.model.params, strict=True
            ):
                view.copy_(own.detach().reshape(-1))
        if not self._channels:
            self._open()
        wanted = self.cfg.rounds if round_ is None else round_
        for i, channel in enumerate(self._channels):
            pieces = self.setup.plan.pieces[i + 1]
            await pull_pieces(channel, piece_views(full, pieces), piece_specs(specs, pieces),
                              wanted, self.cfg.chunk_bytes, self.metadata)  # fmt: skip
        names = [s.name for s in specs]
        return dict(zip(names, full, strict=True))

    async def aclose(self) -> None:
        for channel in self._channels:
            await channel.close()


async def pull_pieces(
    channel: grpc.aio.Channel,
    views: Sequence[torch.Tensor],
    specs: Sequence[TensorSpec],
    min_round: int,
    chunk_bytes: int,
    metadata: Any = (),
    node_id: str = SHARD_IDENTITY,
    timeout: float = PEER_CALL * 4,
) -> pb.ParameterHeader:
    """Stream one shard's parameters (its pieces) into ``views``; return its header.

    Raises:
        Unavailable: the stream is malformed or ends early.
    """
    layout = Layout(specs)
    targets = [byte_view(v) for v in views]
    cursor = ChunkCursor(layout, chunk_bytes)
    call = channel.unary_stream(
        f"/{SERVICE_NAME}/PullParameters",
        request_serializer=pb.PullRequest.SerializeToString,
        response_deserializer=None,
    )
    request = pb.PullRequest(node_id=node_id, min_round=min_round)
    stream = call(request, timeout=timeout, metadata=metadata)
    header: pb.ParameterHeader | None = None
    async for raw in stream:
        if header is None:
            first = pb.ParameterMessage.FromString(raw)
            if first.WhichOneof("kind") != "header":
                raise Unavailable("a shard sent a chunk before its ParameterHeader")
            header = first.header
            continue
        view = decode_chunk(raw)
        if view is None:
            raise Unavailable("a shard sent a malformed chunk")
        start = cursor.advance(view.tensor, view.offset, view.data_len)
        write_chunk(targets, layout, start, view.raw, view.data_start, view.data_len)
    if header is None or not cursor.complete:
        raise Unavailable(f"a shard's parameters ended after {cursor.position} bytes")
    return header
