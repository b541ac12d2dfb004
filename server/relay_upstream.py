"""The relay's side of its upstream calls: TLS credentials, refusals, restarted rounds."""

from __future__ import annotations

import grpc

from fedgrad.relay_config import RelayConfig
from fedgrad.tlsfiles import read_ca, read_key_pair
from fedgrad.wire import CURRENT_ROUND_KEY

__all__ = ["Redo", "RpcFailed", "aborted_round", "upstream_credentials"]


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
