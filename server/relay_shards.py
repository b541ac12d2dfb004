"""A relay in front of a sharded aggregator: one model to its nodes, K parts upstream.

Shard 0's JoinReply carries the shard map. Each round the relay pulls every shard's
pieces into one set of whole-model tensors (its nodes see an unsharded aggregator and
need no shard map), and pushes every shard its pieces of the round's presummed sum, each
stream to its own shard, concurrently, with one upload id: the shards count it all or
nothing (``fedgrad.server.sharding``), as they count a node's parts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
import torch

from fedgrad.codec import Layout, TensorSpec
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.server.relay_upstream import push_upload
from fedgrad.server.sharding import pull_pieces
from fedgrad.shards import Piece, piece_specs, piece_views

__all__ = ["ShardedUpstream"]

T = TypeVar("T")


async def _all(coroutines: Sequence[Coroutine[Any, Any, T]], cancel: bool) -> list[T]:
    """Await every coroutine and raise the first failure, cancelling the others if ``cancel``.

    Pulls cancel (``asyncio.gather`` would leave the other shards' streams open until
    their next round after shard 0 ABORTED one); pushes do not: every part should reach
    its shard, so that shard 0 asks the others (and notices one restarted) even when a
    part to another shard failed.
    """
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.wait(
            tasks, return_when=asyncio.FIRST_EXCEPTION if cancel else asyncio.ALL_COMPLETED
        )
    finally:
        for task in tasks:
            task.cancel()  # nothing for those done
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error
    return [task.result() for task in tasks]


class ShardedUpstream:
    """The relay's channels to shards 1..K-1 (shard 0's is the relay's own) and the map."""

    def __init__(
        self,
        shard_map: pb.ShardMap,
        specs: Sequence[TensorSpec],
        open_channel: Any,
    ) -> None:
        self.map_id = shard_map.map_id
        self.specs = list(specs)
        self.pieces = [
            [Piece(p.tensor, p.first, p.count) for p in s.pieces] for s in shard_map.shards
        ]
        self.addresses = [s.address for s in shard_map.shards]
        self._others: list[grpc.aio.Channel] = [open_channel(a) for a in self.addresses[1:]]

    @property
    def count(self) -> int:
        return len(self.pieces)

    def _channel(self, first: grpc.aio.Channel, i: int) -> grpc.aio.Channel:
        return first if i == 0 else self._others[i - 1]

    async def pull(
        self, first: grpc.aio.Channel, min_round: int, node_id: str, timeout: float,
        chunk_bytes: int, metadata: Any,
    ) -> tuple[pb.ParameterHeader, list[torch.Tensor]]:  # fmt: skip
        """Pull every shard's pieces of one round into fresh whole tensors; shard 0's header.

        A shard may publish the next round while another is read: then all are read
        again at the newest round.
        """
        while True:
            full = [torch.empty(s.shape, dtype=s.dtype) for s in self.specs]
            headers = await _all([
                pull_pieces(self._channel(first, i), piece_views(full, self.pieces[i]),
                            piece_specs(self.specs, self.pieces[i]), min_round, chunk_bytes,
                            metadata, node_id, timeout)
                for i in range(self.count)
            ], cancel=True)  # fmt: skip
            rounds = {h.round for h in headers}
            if len(rounds) == 1:
                return headers[0], full
            min_round = max(rounds)

    async def push(
        self, first: grpc.aio.Channel, header: pb.UploadHeader, total: np.ndarray,
        dtype: torch.dtype, chunk_bytes: int, timeout: float, metadata: Any, wait_ready: bool,
    ) -> list[pb.PushReply]:  # fmt: skip
        """Push every shard its pieces of ``total`` (the flat sum, manifest order).

        ``wait_ready``: as ``push_upload``'s, on every shard.
        """
        starts = np.cumsum([0] + [s.numel for s in self.specs])

        async def one(i: int) -> pb.PushReply:
            specs = piece_specs(self.specs, self.pieces[i])
            wire = Layout(specs, dtype)
            views = [
                total[starts[p.tensor] + p.first : starts[p.tensor] + p.first + p.count].view(
                    np.uint8
                )
                for p in self.pieces[i]
            ]
            h = pb.UploadHeader()
            h.CopyFrom(header)
            h.shard, h.shard_map, h.payload_bytes = i, self.map_id, wire.total
            return await push_upload(
                self._channel(first, i), h, views, wire, chunk_bytes,
                timeout + wire.total / 1e6, metadata, wait_ready,
            )  # fmt: skip

        return await _all([one(i) for i in range(self.count)], cancel=False)

    async def aclose(self) -> None:
        for channel in self._others:
            await channel.close()
