"""Who may call the aggregator: TLS server credentials, mTLS identity and tokens.

A node's identity is its client certificate's common name (mutual TLS) and/or
the node its bearer token belongs to. A call that names a node id must come
from that node: anything else is PERMISSION_DENIED; no or bad credentials are
UNAUTHENTICATED. Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import logging

import grpc

from fedgrad.auth import (
    OPERATOR_IDENTITY,
    SHARD_IDENTITY,
    TokenStore,
    identity_from_auth_context,
    load_token_file,
    parse_bearer,
)
from fedgrad.config import AggregatorConfig
from fedgrad.errors import ConfigError, PermissionDenied, Unauthenticated
from fedgrad.settings import is_loopback, parse_hostport
from fedgrad.tlsfiles import read_ca, read_key_pair

__all__ = [
    "Authorizer",
    "check_listen_policy",
    "is_loopback",
    "server_credentials",
]

log = logging.getLogger("fedgrad.security")


def check_listen_policy(cfg: AggregatorConfig, warn: bool = True) -> None:
    """Refuse plaintext off loopback unless ``insecure``; warn when TLS authenticates nobody.

    Raises:
        ConfigError: plaintext on a non-loopback address without ``--insecure``.
    """
    host = parse_hostport(cfg.listen)[0]
    if is_loopback(host):
        return
    if not cfg.tls_cert and not cfg.insecure:
        raise ConfigError(
            f"refusing to serve plaintext on {cfg.listen}: anyone on the network could join or read"
            " the model. Turn TLS on (`fedgrad certs init --out certs --nodes n1,n2 --hosts HOST`,"
            " then --tls-cert certs/server.pem --tls-key certs/server.key --tls-client-ca certs/ca.pem)"
            " or pass --insecure on a trusted network"
        )
    if warn and not cfg.tls_client_ca and not cfg.tokens:
        log.warning(
            "serving on %s with no client authentication: any caller can join; add"
            " --tls-client-ca (mutual TLS) or --tokens",
            cfg.listen,
        )


def server_credentials(cfg: AggregatorConfig) -> grpc.ServerCredentials | None:
    """Return TLS credentials (client certificates required with a client CA), or None.

    Raises:
        ConfigError: a file is missing, unreadable or not PEM, the certificate and key are
            swapped, or the key is not the certificate's.
    """
    return tls_server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)


def tls_server_credentials(
    cert_path: str | None, key_path: str | None, client_ca_path: str | None
) -> grpc.ServerCredentials | None:
    """``server_credentials`` from the three files' paths (the relay's as the aggregator's)."""
    if not cert_path:
        return None
    assert key_path
    cert, key = read_key_pair(cert_path, key_path)
    client_ca = read_ca(client_ca_path, "--tls-client-ca") if client_ca_path else None
    # Without require_client_auth the client certificate would be silently optional.
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class Authorizer:
    """Check the caller's credentials against the node id a call names."""

    def __init__(
        self, tokens: TokenStore | None, mutual_tls: bool, allowed: frozenset[str] = frozenset()
    ) -> None:
        self.tokens, self.mutual_tls, self.allowed = tokens, mutual_tls, allowed

    @classmethod
    def from_config(cls, cfg: AggregatorConfig) -> Authorizer:
        """Build the policy of ``--tokens``, ``--tls-client-ca`` and ``--allow-nodes``."""
        tokens = load_token_file(cfg.tokens) if cfg.tokens else None
        return cls(tokens, bool(cfg.tls_client_ca), frozenset(cfg.allow_nodes))

    def identify(self, context: grpc.aio.ServicerContext) -> str | None:
        """Return the caller's authenticated identity (None when auth is off).

        Raises:
            Unauthenticated: credentials are missing or wrong.
            PermissionDenied: the certificate and the token name different nodes.
        """
        cert_id = token_id = None
        if self.mutual_tls:
            cert_id = identity_from_auth_context(context.auth_context())  # type: ignore[arg-type]
            if cert_id is None:
                raise Unauthenticated("no valid client certificate identity")
        if self.tokens is not None:
            values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
            token = parse_bearer(values[0]) if len(values) == 1 else None
            if token is None:
                raise Unauthenticated(
                    "missing token: send metadata 'authorization: Bearer <token>'"
                )
            token_id = self.tokens.identify(token)
            if token_id is None:
                raise Unauthenticated("invalid token")
        if cert_id and token_id and cert_id != token_id:
            raise PermissionDenied(
                f"certificate is for {cert_id!r} but the token is {token_id!r}'s"
            )
        who = cert_id or token_id
        # The operator reads status; it is never a node, so the node allow-list is not
        # its gate (``check`` refuses it every node call).
        if (
            who is not None
            and self.allowed
            and who not in self.allowed
            and who not in (OPERATOR_IDENTITY, SHARD_IDENTITY)
        ):
            raise PermissionDenied(f"node {who!r} is not in the aggregator's --allow-nodes list")
        return who

    def check_peer(self, context: grpc.aio.ServicerContext) -> None:
        """Raise unless the caller is shard 0 (``SHARD_IDENTITY``), or auth is off."""
        who = self.identify(context)
        if who is not None and who != SHARD_IDENTITY:
            raise PermissionDenied(
                f"only shard 0 (identity {SHARD_IDENTITY!r}) may call the shards; these"
                f" credentials are {who!r}'s"
            )

    def check(self, context: grpc.aio.ServicerContext, node_id: str) -> None:
        """Raise unless the caller may act as ``node_id``."""
        who = self.identify(context)
        if who is None and self.allowed and node_id not in self.allowed:
            raise PermissionDenied(
                f"node {node_id!r} is not in the aggregator's --allow-nodes list"
            )
        if who == OPERATOR_IDENTITY:
            raise PermissionDenied(
                f"operator credentials read status only; they may not act as node {node_id!r}"
            )
        if who is not None and who != node_id:
            raise PermissionDenied(
                f"credentials belong to {who!r}; they may not act as node {node_id!r}"
            )
