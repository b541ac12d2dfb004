"""The configuration of ``fedgrad relay`` (``fedgrad.server.relay``), checked at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from fedgrad.errors import ConfigError
from fedgrad.settings import is_loopback, parse_hostport
from fedgrad.wire import check_id

__all__ = ["RelayConfig"]


@dataclass(frozen=True)
class RelayConfig:
    """What ``fedgrad relay`` takes; see ``fedgrad relay --help``."""

    upstream: str
    listen: str = "127.0.0.1:50052"
    nodes: int = 2
    #: Uploads a round needs once its deadline passed (0: every one of ``nodes``).
    min_nodes: int = 0
    node_id: str = "relay-0"
    round_timeout: float = 300.0
    idle_timeout: float = 30.0
    call_timeout: float = 60.0
    #: Seconds the upstream may stay unreachable before the relay gives up (exit 1).
    give_up_after: float = 600.0
    finish_grace: float = 30.0
    insecure: bool = False
    #: The dtype of the forwarded sum: float64 (exact, 2x a float32 upload) or float32
    #: (the sum rounded once more: half the bytes).
    forward_dtype: str = "float64"
    #: TLS towards the relay's nodes, as the aggregator's ``--tls-cert``, ``--tls-key``,
    #: ``--tls-client-ca`` (mutual TLS: node identity from the certificate) and
    #: ``--tokens`` (node identity from a bearer token).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tokens: str | None = None
    #: TLS towards the upstream, as a node's ``--tls-ca``, ``--tls-cert``, ``--tls-key``
    #: and ``--token-file``: the CA of the upstream's certificate, this relay's client
    #: pair (its identity is ``node_id``) and a file holding its token.
    upstream_ca: str | None = None
    upstream_cert: str | None = None
    upstream_key: str | None = None
    upstream_token_file: str | None = None

    def __post_init__(self) -> None:
        for name in ("upstream", "listen"):
            try:
                parse_hostport(getattr(self, name))
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{name} must be HOST:PORT, got {getattr(self, name)!r}"
                ) from None
        if self.nodes < 1 or not 0 <= self.min_nodes <= self.nodes:
            raise ConfigError("nodes must be >= 1 and min_nodes in [0, nodes]")
        check_id("node_id", self.node_id)
        if self.forward_dtype not in ("float64", "float32"):
            raise ConfigError(
                f"forward_dtype must be float64 or float32, got {self.forward_dtype!r}"
            )
        _needs(self.tls_key, self.tls_cert, "--tls-key", "--tls-cert")
        _needs(self.tls_cert, self.tls_key, "--tls-cert", "--tls-key")
        _needs(self.tls_client_ca, self.tls_cert, "--tls-client-ca", "--tls-cert")
        _needs(self.upstream_cert, self.upstream_key, "--upstream-cert", "--upstream-key")
        _needs(self.upstream_key, self.upstream_cert, "--upstream-key", "--upstream-cert")
        _needs(self.upstream_cert, self.upstream_ca, "--upstream-cert", "--upstream-ca")
        host = parse_hostport(self.listen)[0]
        if not self.insecure and not self.tls_cert and not is_loopback(host):
            raise ConfigError(
                f"refusing to serve plaintext on {self.listen}: anyone on the network could"
                " join or read the model. Give the relay a certificate (--tls-cert, --tls-key,"
                " and --tls-client-ca for its nodes' certificates) or pass --insecure on a"
                " trusted network"
            )


def _needs(given: str | None, other: str | None, flag: str, needed: str) -> None:
    if given and not other:
        raise ConfigError(f"{flag} needs {needed}")
