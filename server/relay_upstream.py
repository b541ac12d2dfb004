"""The relay's side of its upstream calls: TLS credentials, refusals, restarted rounds,
and the stream of one upload."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import numpy as np

from fedgrad.codec import Layout, iter_chunk_pieces
from fedgrad.framing import encode_chunk
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.relay_config import RelayConfig
from fedgrad.tlsfiles import read_ca, read_key_pair
from fedgrad.wire import CURRENT_ROUND_KEY, SERVICE_NAME

__all__ = ["Redo", "RpcFailed", "aborted_round", "push_upload", "upstream_credentials"]


class RpcFailed(Exception):
    """The upstream refused the relay or stayed unreachable (the relay exits 1)."""


class Redo(Exception):
    """A pull was ABORTED: the upstream restarted round ``round`` (``CURRENT_ROUND_KEY``)."""

    def __init__(self, round_: int) -> None:
        super().__init__(f"round {round_} restarted upstream")
        self.round = round_


def aborted_round(exc: grpc.aio.AioRpcError) -> int | None:
    """The round an ABORTED call names in its trailing metadata, else None."""
    if exc.code() != grpc.StatusCode.ABORTED:
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == CURRENT_ROUND_KEY and str(value).isdigit():
            return int(value)
    return None


def upstream_credentials(cfg: RelayConfig) -> grpc.ChannelCredentials | None:
    """The relay's TLS credentials towards its upstream (None: plaintext).

    Raises:
        ConfigError: a file is missing, not PEM, or the key is not the certificate's.
    """
    if not cfg.upstream_ca:
        return None
    ca = read_ca(cfg.upstream_ca, "--upstream-ca")
    cert = key = None
    if cfg.upstream_cert and cfg.upstream_key:
        cert, key = read_key_pair(cfg.upstream_cert, cfg.upstream_key)
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


async def push_upload(
    channel: grpc.aio.Channel,
    header: pb.UploadHeader,
    views: Sequence[np.ndarray],
    wire: Layout,
    chunk_bytes: int,
    timeout: float,
    metadata: Any,
    wait_ready: bool,
) -> pb.PushReply:
    """Stream one upload: the header, the chunks of ``views`` (bytes in ``wire``'s layout),
    the UploadEnd.

    ``wait_ready`` (the upstream's ``JoinReply.upload_ready``): the chunks wait for the
    upstream's response headers, sent once the upload is next in line for a staging slot.
    """
    push = channel.stream_unary(
        f"/{SERVICE_NAME}/PushGradients",
        request_serializer=None,
        response_deserializer=pb.PushReply.FromString,
    )
    call: Any = None

    async def messages() -> AsyncIterator[bytes]:
        yield pb.GradientMessage(header=header).SerializeToString()
        if wait_ready:  # the call is assigned before its requests are first read
            await call.initial_metadata()  # or the call ended
            if call.done():
                return
        for t, o, pieces in iter_chunk_pieces(views, wire, chunk_bytes):
            yield encode_chunk(t, o, pieces)
        yield pb.GradientMessage(end=pb.UploadEnd(total_bytes=wire.total)).SerializeToString()

    call = push(messages(), timeout=timeout, metadata=metadata)
    reply: pb.PushReply = await call
    return reply
