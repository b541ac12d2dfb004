"""Move a node's tensors between its model and the wire: the broadcast in, the upload out.

On a GPU the wire reads and writes pinned host copies of the trainable tensors, moved
in one batch of asynchronous copies per round; a ``--broadcast-dtype`` stream lands in
staging tensors first. Uploads are encoded by the node's codec (with its error
feedback), or split across a sharded aggregator's links. The calls themselves, and
every retry, are ``fedgrad.client.transport``'s; the loop is ``fedgrad.client.node``'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from fedgrad.buffers import load_buffers, pack, unpack
from fedgrad.client.feedback import ErrorFeedback
from fedgrad.client.receive import read_header, receive_chunks
from fedgrad.client.sharded import ShardLinks
from fedgrad.client.transport import Transport
from fedgrad.codec import Layout, TensorSpec, byte_view, dtype_from_proto, iter_chunk_pieces
from fedgrad.codec_base import Codec
from fedgrad.config import NodeConfig
from fedgrad.errors import InvalidArgument, TaskError
from fedgrad.framing import encode_chunk
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.seeding import derive_seed

__all__ = ["TensorExchange", "pinned"]


def pinned(like: torch.Tensor) -> torch.Tensor:
    """A page-locked host tensor shaped like ``like`` (fast, asynchronous device copies)."""
    return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)


class TensorExchange:
    """The node's pull and push: received tensors into the model, gradients onto the wire.

    A base of ``fedgrad.client.node.Node``, which sets every attribute below.
    """

    cfg: NodeConfig
    device: torch.device
    transport: Transport
    links: ShardLinks | None
    params: list[torch.Tensor]
    layout: Layout
    #: The tensors the wire reads and writes: ``params`` on the CPU, pinned copies on a GPU.
    host: list[torch.Tensor]
    grad_host: list[torch.Tensor] | None
    views: list[Any]
    buffers: list[torch.Tensor]
    buffer_specs: list[TensorSpec]
    share_buffers: bool
    codec: Codec
    feedback: ErrorFeedback
    session_id: str
    chunk_bytes: int
    #: ``JoinReply.upload_ready``: send an upload's chunks once the aggregator is ready.
    upload_ready: bool
    _staging: tuple[torch.dtype, Layout, list[torch.Tensor]] | None

    def pull(self, min_round: int) -> pb.ParameterHeader:
        """Load the parameters of the first round >= ``min_round`` into the model."""
        timeout = (
            self.cfg.round_wait + self.layout.total / self.cfg.min_bandwidth + self.cfg.call_timeout
        )
        if self.links is not None:
            header = self.links.pull(min_round, timeout, self.host, self.chunk_bytes)
            return self._loaded(header, [])
        with self.transport.pull(min_round, timeout) as stream:
            header = read_header(stream)
            layout, views, staging = self._receiving(header.dtype)
            receive_chunks(stream, layout, views, self.chunk_bytes, "parameter stream")
        return self._loaded(header, staging)

    def _loaded(
        self, header: pb.ParameterHeader, staging: list[torch.Tensor]
    ) -> pb.ParameterHeader:
        """Move a received broadcast into the model (widened, or host -> device); buffers."""
        if staging:  # a --broadcast-dtype stream: widen into the model only once it is whole
            with torch.no_grad():
                for param, received in zip(self.params, staging, strict=True):
                    param.copy_(received)
        elif self.host is not self.params:  # pinned host copies -> the device, in one batch
            with torch.no_grad():
                for param, host in zip(self.params, self.host, strict=True):
                    param.copy_(host, non_blocking=True)
            torch.cuda.synchronize(self.device)
        if self.share_buffers and header.buffers:
            try:
                values = unpack(self.buffer_specs, header.buffers, "the broadcast")
            except InvalidArgument as e:
                raise TaskError(str(e)) from None
            load_buffers(self.buffers, values)
        return header

    def _receiving(self, dtype: int) -> tuple[Layout, list[Any], list[torch.Tensor]]:
        """Return where a broadcast in wire ``dtype`` lands: the model, or staging tensors."""
        if dtype == pb.DTYPE_UNSPECIFIED:
            return self.layout, self.views, []
        try:
            wire = dtype_from_proto(dtype)
        except InvalidArgument as e:
            raise TaskError(f"the aggregator's broadcast: {e}") from None
        if self._staging is None or self._staging[0] != wire:
            staging = [torch.empty(s.shape, dtype=wire) for s in self.layout.specs]
            self._staging = (wire, Layout(self.layout.specs, wire), staging)
        _, layout, staging = self._staging
        return layout, [byte_view(t) for t in staging], staging

    def push(
        self,
        round_: int,
        gradients: list[torch.Tensor],
        num_samples: int,
        metrics: dict[str, float],
    ) -> pb.PushReply:
        """Encode and stream one upload; recomputing a round sends the same upload again.

        The upload id is the same, and so is the payload: the codec's error feedback and
        memory restart from the state before this round (``fedgrad.client.feedback``).
        """
        generator = torch.Generator().manual_seed(
            derive_seed(self.cfg.seed, f"{self.cfg.node_id}\x00codec", round_)
        )
        if self.grad_host is not None:  # device -> pinned host copies, in one batch
            with torch.no_grad():
                for host, g in zip(self.grad_host, gradients, strict=True):
                    host.copy_(g.detach(), non_blocking=True)
            torch.cuda.synchronize(self.device)
            gradients = self.grad_host
        header = pb.UploadHeader(
            round=round_,
            node_id=self.cfg.node_id,
            upload_id=f"{self.cfg.node_id}.r{round_}.{self.session_id[:12]}",
            num_samples=num_samples,
            metrics=metrics,
            buffers=pack(self.buffers) if self.share_buffers else b"",
        )
        if self.links is not None:  # ShardLinks encodes and sizes each shard's part
            total = self.layout.total
            timeout = self.cfg.call_timeout + total / self.cfg.min_bandwidth
            return self.links.push(header, gradients, self.chunk_bytes, timeout, self.upload_ready)
        views = self.feedback.encode(round_, gradients, generator)
        layout = self.codec.layout
        header.codec, header.payload_bytes = self.codec.name, layout.total

        def messages() -> Iterator[bytes]:
            yield pb.GradientMessage(header=header).SerializeToString()
            for t, o, pieces in iter_chunk_pieces(views, layout, self.chunk_bytes):
                yield encode_chunk(t, o, pieces)
            yield pb.GradientMessage(end=pb.UploadEnd(total_bytes=layout.total)).SerializeToString()

        timeout = self.cfg.call_timeout + layout.total / self.cfg.min_bandwidth
        return self.transport.push(messages(), timeout, self.upload_ready)
