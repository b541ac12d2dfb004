"""Facts of the wire contract that both sides use, each defined once.

The service and method names come from the generated descriptors, so a renamed
rpc in the ``.proto`` cannot leave a hand-typed path behind. The message limit
and the identifier rule are the ones ``docs/protocol.md`` documents.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

from fedgrad.errors import InvalidArgument
from fedgrad.proto import fedgrad_pb2 as pb

__all__ = [
    "CONTRACT_VERSION",
    "CURRENT_ROUND_KEY",
    "UPLOAD_READY",
    "ID_MAX_LENGTH",
    "ID_PATTERN",
    "ID_RULE",
    "MAX_MESSAGE_BYTES",
    "METHODS",
    "SERVICE_NAME",
    "channel_credentials",
    "check_id",
    "method_path",
    "open_channel",
    "task_identity",
]

#: gRPC's default receive limit, set explicitly on both sides: oversized input is refused
#: before our code runs (DESIGN.md, "Defaults"). Chunks stay below it with room to spare.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

_SERVICE = pb.DESCRIPTOR.services_by_name["Aggregator"]
#: Full name of the aggregator service, ``fedgrad.v1.Aggregator``.
SERVICE_NAME: str = _SERVICE.full_name
#: The rpc names of the service, in ``.proto`` order.
METHODS: tuple[str, ...] = tuple(m.name for m in _SERVICE.methods)

#: The contract version of ``protos/fedgrad/proto/fedgrad.proto`` (JoinReply.contract_version).
CONTRACT_VERSION = 2

#: Trailing-metadata key of an ABORTED reply: the aggregator's current round (decimal).
CURRENT_ROUND_KEY = "fedgrad-current-round"

#: Initial metadata of a PushGradients call, sent once the aggregator has accepted the
#: UploadHeader and the upload has a staging slot or is next in line for one: the node may
#: send its chunks now. Nodes that wait for it hold no chunk in the aggregator's buffers
#: while they queue behind the next one (docs/protocol.md, step 4). Any response headers
#: mean the same; the value is for logs.
UPLOAD_READY: tuple[tuple[str, str], ...] = (("fedgrad-upload", "ready"),)

#: Node ids and upload ids: what the ``.proto`` documents for ``node_id`` and ``upload_id``
#: (flags, token files and certificate names follow it too, ``fedgrad.auth``).
ID_MAX_LENGTH = 128
ID_RULE = f"1-{ID_MAX_LENGTH} characters of [A-Za-z0-9._-]"
ID_PATTERN = re.compile(rf"[A-Za-z0-9._-]{{1,{ID_MAX_LENGTH}}}")


def method_path(name: str) -> str:
    """Return the gRPC path of rpc ``name`` (``/fedgrad.v1.Aggregator/NAME``)."""
    if name not in METHODS:
        raise KeyError(f"no rpc {name!r} in {SERVICE_NAME} ({', '.join(METHODS)})")
    return f"/{SERVICE_NAME}/{name}"


def check_id(kind: str, value: str) -> str:
    """Return ``value`` if it follows ``ID_RULE``.

    Raises:
        InvalidArgument: it does not; the message names ``kind`` and the rule.
    """
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(f"{kind} {value!r} must be {ID_RULE}")
    return value


def task_identity(spec: str, args: Iterable[tuple[str, str]] = ()) -> str:
    """Return the canonical text of a task and its options (``JoinRequest.task``).

    The spec, then "?" and ``key=value`` pairs sorted by key joined by "&" if there
    are options: ``digits?classes_per_node=2&model=cnn``.
    """
    pairs = "&".join(f"{k}={v}" for k, v in sorted(args))
    return f"{spec}?{pairs}" if pairs else spec


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def channel_credentials(
    ca: str | None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials:
    """Return TLS channel credentials from PEM files (a client pair for mutual TLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
    )


def open_channel(
    target: str,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    """Open a channel to ``target``: TLS when ``ca`` is given, plaintext otherwise.

    The message limits are always ``MAX_MESSAGE_BYTES``; ``options`` add to them.
    """
    merged = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        *(options or []),
    ]
    if ca:
        return grpc.secure_channel(target, channel_credentials(ca, cert, key), options=merged)
    return grpc.insecure_channel(target, options=merged)
