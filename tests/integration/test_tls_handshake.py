"""The certificates of fedgrad.certs work for TLS and mutual TLS on the real gRPC stack.

Plain grpcio only (a generic handler, no fedgrad service): the handler answers with
the node id it reads from the verified client certificate.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import cast

import grpc
import pytest

from fedgrad.auth import identity_from_auth_context
from fedgrad.certs import (
    KeyCert,
    cert_to_pem,
    key_to_pem,
    make_ca,
    make_client_cert,
    make_server_cert,
)

METHOD = "/fedgrad.test.Probe/WhoAmI"
TIMEOUT = 10.0
SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


@dataclass(frozen=True)
class Pki:
    ca: KeyCert
    server: KeyCert
    node: KeyCert


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca = make_ca("handshake test CA", days=30, valid_from=_now() - dt.timedelta(days=5))
    return Pki(ca, make_server_cert(ca, ["localhost", "127.0.0.1"]), make_client_cert(ca, "n1"))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
    # grpc-stubs types the sync auth_context as Mapping[str, bytes]; grpcio returns lists of bytes.
    auth_context = cast(Mapping[str, Sequence[bytes]], context.auth_context())
    identity = identity_from_auth_context(auth_context)
    security = b",".join(auth_context.get("transport_security_type", []))
    return security + b"|" + (identity or "").encode()


def _start(credentials: grpc.ServerCredentials) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=SERVER_OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(_who_am_i)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("fedgrad.test.Probe", {"WhoAmI": handler}),)
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port > 0
    server.start()
    return server, port


def _server_credentials(pki: Pki, *, mutual: bool) -> grpc.ServerCredentials:
    pair = [(key_to_pem(pki.server.key), cert_to_pem(pki.server.cert))]
    if not mutual:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(
        pair, root_certificates=cert_to_pem(pki.ca.cert), require_client_auth=True
    )


@pytest.fixture(scope="module")
def mtls_port(pki: Pki) -> Iterator[int]:
    server, port = _start(_server_credentials(pki, mutual=True))
    yield port
    server.stop(None)


@pytest.fixture(scope="module")
def tls_port(pki: Pki) -> Iterator[int]:
    server, port = _start(_server_credentials(pki, mutual=False))
    yield port
    server.stop(None)


def _call(
    port: int,
    credentials: grpc.ChannelCredentials | None,
    options: list[tuple[str, str]] | None = None,
) -> bytes:
    target = f"127.0.0.1:{port}"
    if credentials is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, credentials, options=options)
    with channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        return call(b"", timeout=TIMEOUT)


def _client(ca: KeyCert, node: KeyCert | None) -> grpc.ChannelCredentials:
    if node is None:
        return grpc.ssl_channel_credentials(root_certificates=cert_to_pem(ca.cert))
    return grpc.ssl_channel_credentials(
        root_certificates=cert_to_pem(ca.cert),
        private_key=key_to_pem(node.key),
        certificate_chain=cert_to_pem(node.cert),
    )


def _assert_unavailable(port: int, credentials: grpc.ChannelCredentials | None, **kw) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _call(port, credentials, **kw)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value


def test_mtls_client_with_its_cert_is_identified(pki, mtls_port):
    assert _call(mtls_port, _client(pki.ca, pki.node)) == b"ssl|n1"


def test_mtls_server_name_checked_against_dns_san(pki, mtls_port):
    # The IP target matched the IP SAN above; here the DNS SAN must match the name.
    override = [("grpc.ssl_target_name_override", "localhost")]
    assert _call(mtls_port, _client(pki.ca, pki.node), options=override) == b"ssl|n1"
    wrong = [("grpc.ssl_target_name_override", "evil.example")]
    _assert_unavailable(mtls_port, _client(pki.ca, pki.node), options=wrong)


def test_mtls_each_node_is_its_own_identity(pki, mtls_port):
    other = make_client_cert(pki.ca, "node-2.eu_west")
    assert _call(mtls_port, _client(pki.ca, other)) == b"ssl|node-2.eu_west"


def test_mtls_client_without_cert_fails(pki, mtls_port):
    _assert_unavailable(mtls_port, _client(pki.ca, None))


def test_mtls_client_with_foreign_ca_cert_fails(pki, mtls_port):
    foreign_ca = make_ca("someone else's CA", days=30)
    intruder = make_client_cert(foreign_ca, "n1")  # right name, wrong issuer
    _assert_unavailable(mtls_port, _client(pki.ca, intruder))


def test_mtls_client_with_expired_cert_fails(pki, mtls_port):
    expired = make_client_cert(pki.ca, "n1", days=1, valid_from=_now() - dt.timedelta(days=3))
    _assert_unavailable(mtls_port, _client(pki.ca, expired))


def test_mtls_server_cert_cannot_act_as_client(pki, mtls_port):
    # serverAuth-only EKU: a stolen aggregator key does not make its holder a node.
    _assert_unavailable(mtls_port, _client(pki.ca, pki.server))


def test_plaintext_client_against_tls_server_fails(mtls_port, tls_port):
    _assert_unavailable(mtls_port, None)
    _assert_unavailable(tls_port, None)


def test_client_rejects_server_from_foreign_ca(pki, mtls_port):
    foreign_ca = make_ca("someone else's CA", days=30)
    # The node's own certificate is fine; only its trust in the server is missing.
    _assert_unavailable(mtls_port, _client(foreign_ca, pki.node))


def test_server_only_tls_has_no_identity(pki, tls_port):
    # Without client auth nobody is identified by certificate: tokens must do it.
    assert _call(tls_port, _client(pki.ca, None)) == b"ssl|"


def test_auth_context_keys(pki):
    seen: dict[str, Sequence[bytes]] = {}

    def capture(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.update(cast(Mapping[str, Sequence[bytes]], context.auth_context()))
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=SERVER_OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(capture)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("fedgrad.test.Probe", {"WhoAmI": handler}),)
    )
    port = server.add_secure_port("127.0.0.1:0", _server_credentials(pki, mutual=True))
    server.start()
    try:
        _call(port, _client(pki.ca, pki.node))
    finally:
        server.stop(None)
    # The keys identity_from_auth_context relies on, as grpcio reports them.
    assert seen["transport_security_type"] == [b"ssl"]
    assert seen["x509_common_name"] == [b"n1"]
