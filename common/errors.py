"""Errors of fedgrad and the gRPC status code each one becomes.

Hierarchy::

    FedgradError                      base of everything fedgrad raises on purpose
    ├── ConfigError                   bad flag, config file or task spec (start-up)
    ├── TaskError                     a user task misbehaved (wrong gradient shapes, ...)
    ├── GaveUpError                   a node could not reach the aggregator in time
    ├── RefusedError                  the aggregator refused a node for good (bad credentials, ...)
    └── RpcError                      maps to one gRPC status code (``code`` attribute)
        ├── InvalidArgument           INVALID_ARGUMENT: malformed, wrong shape/dtype,
        │                             non-finite, chunk out of order
        ├── FailedPrecondition        FAILED_PRECONDITION: not joined, round not open
        ├── StaleRound                ABORTED: the round is closed (``current_round``)
        ├── AlreadyExists             ALREADY_EXISTS: a second, different upload
        ├── Unauthenticated           UNAUTHENTICATED: no or bad credentials
        ├── PermissionDenied          PERMISSION_DENIED: identity is another node's
        ├── ResourceExhausted         RESOURCE_EXHAUSTED: too many in flight, too large
        ├── OutOfRange                OUT_OF_RANGE: a round past the last one
        └── Unavailable               UNAVAILABLE: shutting down, try again later

The pure core raises these; ``fedgrad.server.service`` turns an ``RpcError``
into a status code in one place, so the core never imports grpc.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "ConfigError",
    "FailedPrecondition",
    "FedgradError",
    "GaveUpError",
    "InvalidArgument",
    "OutOfRange",
    "PermissionDenied",
    "RefusedError",
    "ResourceExhausted",
    "RpcError",
    "StaleRound",
    "TaskError",
    "Unauthenticated",
    "Unavailable",
]


class FedgradError(Exception):
    """Base class of every error fedgrad raises on purpose."""


class ConfigError(FedgradError):
    """A flag, config file, environment variable or task spec is wrong."""


class TaskError(FedgradError):
    """A user task returned something fedgrad cannot use."""


class GaveUpError(FedgradError):
    """A node retried for its whole budget and could not reach the aggregator."""


class RefusedError(FedgradError):
    """The aggregator refused the node with a code retrying cannot fix."""


class RpcError(FedgradError):
    """An error that the aggregator reports to the caller as a gRPC status code."""

    code = "UNKNOWN"


class InvalidArgument(RpcError):
    code = "INVALID_ARGUMENT"


class FailedPrecondition(RpcError):
    code = "FAILED_PRECONDITION"


class StaleRound(RpcError):
    """The upload or request names a round that is closed."""

    code = "ABORTED"

    def __init__(self, message: str, current_round: int) -> None:
        super().__init__(f"{message} (current_round={current_round})")
        self.current_round = current_round


class AlreadyExists(RpcError):
    code = "ALREADY_EXISTS"


class Unauthenticated(RpcError):
    code = "UNAUTHENTICATED"


class PermissionDenied(RpcError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(RpcError):
    code = "RESOURCE_EXHAUSTED"


class OutOfRange(RpcError):
    code = "OUT_OF_RANGE"


class Unavailable(RpcError):
    code = "UNAVAILABLE"
