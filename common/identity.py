"""Name nodes: the node id rule, the operator, and the identity in a TLS client certificate.

Pure code: nothing here imports grpc. ``fedgrad.auth`` re-exports every name here
beside the bearer tokens that authenticate the same identities; the server turns a
``None`` identity into UNAUTHENTICATED, and an identity that is not the node a call
claims to be into PERMISSION_DENIED (see ``docs/security.md``).

Node ids follow ``validate_node_id``, the wire's rule (``fedgrad.wire``), in flags,
token files, certificate common names and on the wire. The name ``operator`` is no
node: the operator's certificate (``operator.pem``) and token-file line use it, and
authenticate as ``OPERATOR_IDENTITY`` (status, never a node).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fedgrad.errors import ConfigError
from fedgrad.wire import ID_MAX_LENGTH, ID_PATTERN

#: Names the server certificate of ``fedgrad certs init`` is for, unless told otherwise.
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
#: Validity in days of the server and node certificates ``fedgrad certs init`` writes.
CERT_DAYS = 365

__all__ = [
    "CERT_DAYS",
    "DEFAULT_HOSTS",
    "NODE_ID_MAX_LENGTH",
    "OPERATOR_IDENTITY",
    "OPERATOR_NAME",
    "identity_from_auth_context",
    "validate_node_id",
]

NODE_ID_MAX_LENGTH = ID_MAX_LENGTH
#: Common name of the operator's certificate and name of its token-file line; no node id.
OPERATOR_NAME = "operator"
#: Who the operator's credentials authenticate as. It breaks the node id rule on purpose:
#: it never equals the node id a Join, PullParameters, PushGradients or Leave names, so the
#: aggregator's "credentials belong to X, not to node Y" check refuses each of them
#: (PERMISSION_DENIED), while GetStatus, which names no node, is served.
OPERATOR_IDENTITY = "operator (status only)"
_NODE_ID_RE = ID_PATTERN  # the wire's rule, defined once (fedgrad.wire)


def validate_node_id(node_id: str) -> str:
    """Check that a node id is 1-128 characters of ``A-Za-z0-9._-`` and return it.

    The same rule holds for flags, token files, certificate common names and the wire.

    Args:
        node_id: the candidate id.

    Returns:
        ``node_id`` unchanged.

    Raises:
        ConfigError: the id is not a string, breaks the rule, or is ``OPERATOR_NAME``.
    """
    if node_id == OPERATOR_NAME:
        raise ConfigError(
            f"invalid node id {node_id!r}: reserved for the operator's certificate and token"
        )
    if isinstance(node_id, str) and _NODE_ID_RE.fullmatch(node_id):
        return node_id
    # Ids come from the wire too: show a bounded prefix, never a megabyte of input.
    shown = repr(node_id[:40]) if isinstance(node_id, str) else type(node_id).__name__
    raise ConfigError(
        f"invalid node id {shown}: use 1-{NODE_ID_MAX_LENGTH} characters of A-Za-z0-9._-"
    )


def identity_from_auth_context(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """Return the node id in a verified TLS client certificate, from ``context.auth_context()``.

    Only meaningful when the server requires client certificates
    (``require_client_auth=True``): then gRPC has verified the chain before any handler runs.

    Args:
        auth_context: gRPC's auth context, e.g. ``{"transport_security_type": [b"ssl"],
            "x509_common_name": [b"n1"], ...}``.

    Returns:
        The certificate's common name if the transport is TLS and there is exactly one
        common name that is a valid node id; ``OPERATOR_IDENTITY`` for the common name
        ``OPERATOR_NAME``; otherwise None.
    """
    if list(auth_context.get("transport_security_type", ())) != [b"ssl"]:
        return None
    names = list(auth_context.get("x509_common_name", ()))
    if len(names) != 1 or not isinstance(names[0], bytes):
        return None
    try:
        name = names[0].decode("ascii")
    except UnicodeDecodeError:
        return None
    if name == OPERATOR_NAME:
        return OPERATOR_IDENTITY
    return name if _NODE_ID_RE.fullmatch(name) else None
