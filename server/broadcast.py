"""The parameter broadcast: serialized once per round, the same bytes to every node.

With ``--broadcast-dtype`` the chunks carry the parameters rounded to that dtype (the
header says which); the optimizer's master copy is never rounded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedgrad.codec import Layout, byte_view, dtype_to_proto, iter_chunk_pieces
from fedgrad.framing import encode_chunk
from fedgrad.proto import fedgrad_pb2 as pb

__all__ = ["Snapshot", "make_snapshot"]


@dataclass(frozen=True)
class Snapshot:
    """The serialized ``ParameterMessage``s of one published round."""

    round: int
    finished: bool
    messages: tuple[bytes, ...]

    @property
    def wire_bytes(self) -> int:
        return sum(len(m) for m in self.messages)


def make_snapshot(
    params: Sequence[torch.Tensor],
    layout: Layout,
    chunk_bytes: int,
    round_: int,
    finished: bool,
    session_id: str,
    broadcast_dtype: str | None = None,
    total_rounds: int = 0,
    config: Mapping[str, str] | None = None,
    buffers: bytes = b"",
) -> Snapshot:
    """Serialize the header and every chunk of ``params`` once (cast to that dtype if set)."""
    dtype = getattr(torch, broadcast_dtype) if broadcast_dtype else None
    if dtype is not None:
        layout = Layout(layout.specs, dtype)
    header = pb.ParameterMessage(
        header=pb.ParameterHeader(
            round=round_,
            total_bytes=layout.total,
            finished=finished,
            session_id=session_id,
            dtype=dtype_to_proto(dtype) if dtype is not None else pb.DTYPE_UNSPECIFIED,  # type: ignore[arg-type]
            total_rounds=total_rounds,
            config=dict(config or {}),
            buffers=buffers,
        )
    ).SerializeToString()
    # A no-op for CPU parameters in their own dtype; a device's are copied to the host.
    cast = [p.detach().to(device="cpu", dtype=dtype or p.dtype) for p in params]
    views = [byte_view(p) for p in cast]
    chunks = [
        encode_chunk(t, o, pieces) for t, o, pieces in iter_chunk_pieces(views, layout, chunk_bytes)
    ]
    return Snapshot(round_, finished, (header, *chunks))
