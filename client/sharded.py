"""A node's side of a sharded aggregator: one stream per shard, all at once.

Shard 0's JoinReply carries the shard map (``fedgrad.shards``). Each round the node
pulls every shard's pieces into its parameters and pushes every shard its pieces of the
update, each stream to its own shard, concurrently. Shard 0 replies once the upload
counts on every shard; a failed part is a failed upload (the node's usual recovery
re-sends every part, with the same upload id).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from fedgrad.client.receive import read_header, receive_chunks
from fedgrad.client.transport import Transport
from fedgrad.codec import Layout, TensorSpec, byte_view, iter_chunk_pieces
from fedgrad.codecs import codec_for
from fedgrad.config import NodeConfig
from fedgrad.errors import TaskError
from fedgrad.framing import encode_chunk
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.shards import Piece, piece_specs, piece_views

__all__ = ["ShardLinks"]


class ShardLinks:
    """The node's transports to shards 1..K-1 and every shard's pieces."""

    def __init__(
        self, cfg: NodeConfig, shard_map: pb.ShardMap, specs: Sequence[TensorSpec], first: Transport
    ) -> None:
        if cfg.compress not in ("", "identity", "float32", "float16", "bfloat16", "float64"):
            raise TaskError(
                f"--compress {cfg.compress} with a sharded aggregator is not supported yet:"
                " use identity, float16 or bfloat16"
            )
        self.map_id = shard_map.map_id
        self.pieces: list[list[Piece]] = [
            [Piece(p.tensor, p.first, p.count) for p in s.pieces] for s in shard_map.shards
        ]
        self.specs = [piece_specs(specs, ps) for ps in self.pieces]
        self.transports = [first] + [
            Transport(dataclasses.replace(cfg, aggregator=s.address)) for s in shard_map.shards[1:]
        ]
        self.codecs = [codec_for(cfg.compress, s) for s in self.specs]
        self._pool = ThreadPoolExecutor(len(self.transports), thread_name_prefix="shard")

    @property
    def count(self) -> int:
        return len(self.transports)

    def _all(self, call: Callable[[int], Any]) -> list[Any]:
        futures = [self._pool.submit(call, i) for i in range(self.count)]
        errors, results = [], []
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        return results

    def pull(
        self, min_round: int, timeout: float, targets: Sequence[torch.Tensor], chunk_bytes: int
    ) -> pb.ParameterHeader:
        """Stream every shard's pieces into ``targets``; return shard 0's header."""

        def one(i: int) -> pb.ParameterHeader:
            layout = Layout(self.specs[i])
            views = [byte_view(v) for v in piece_views(targets, self.pieces[i])]
            with self.transports[i].pull(min_round, timeout) as stream:
                header = read_header(stream, f"shard {i}")
                receive_chunks(stream, layout, views, chunk_bytes, f"shard {i}'s parameters")
            return header

        headers = self._all(one)
        rounds = {h.round for h in headers}
        if len(rounds) != 1:
            # A shard published the next round while another was read: read them again.
            return self.pull(max(rounds), timeout, targets, chunk_bytes)
        return headers[0]

    def push(
        self,
        header: pb.UploadHeader,
        gradients: Sequence[torch.Tensor],
        chunk_bytes: int,
        timeout: float,
        wait_ready: bool = False,
    ) -> pb.PushReply:
        """Push every shard its pieces of ``gradients``; return shard 0's reply.

        ``wait_ready``: as ``Transport.push``'s, on every shard.
        """
        flat = [g.detach().cpu().contiguous() for g in gradients]

        def one(i: int) -> pb.PushReply:
            views = self.codecs[i].encode(piece_views(flat, self.pieces[i]), None)
            layout = self.codecs[i].layout
            h = pb.UploadHeader()
            h.CopyFrom(header)
            h.shard, h.shard_map = i, self.map_id
            h.codec, h.payload_bytes = self.codecs[i].name, layout.total
            if i:
                h.ClearField("buffers")

            def messages() -> Iterator[bytes]:
                yield pb.GradientMessage(header=h).SerializeToString()
                for t, o, pieces in iter_chunk_pieces(views, layout, chunk_bytes):
                    yield encode_chunk(t, o, pieces)
                yield pb.GradientMessage(
                    end=pb.UploadEnd(total_bytes=layout.total)
                ).SerializeToString()

            return self.transports[i].push(messages(), timeout, wait_ready)

        return self._all(one)[0]

    def stop(self, reason: str) -> None:
        for t in self.transports[1:]:
            t.stop(reason)

    def close(self) -> None:
        for t in self.transports[1:]:
            t.close()
        self._pool.shutdown(wait=False)
