"""The certificates of fedgrad.certs work for TLS and mutual TLS on the real gRPC stack.

Plain grpcio servers (generic handlers, no fedgrad service): a probe method answers
with the node id it reads from the verified client certificate, and a Join stands in
for the aggregator's, so a node's ``Transport`` can be pointed at each server to show
that every failed handshake is one error saying what to check, not 120 s of retries.
"""

from __future__ import annotations

import datetime as dt
import threading
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
from fedgrad.client.transport import Transport
from fedgrad.config import NodeConfig
from fedgrad.errors import GaveUpError, RefusedError
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.wire import SERVICE_NAME

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


def _join_reply(request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
    return pb.JoinReply(session_id="probe")


def _start(credentials: grpc.ServerCredentials | None, port: int = 0) -> tuple[grpc.Server, int]:
    """Serve the probe and a Join on 127.0.0.1:``port``, TLS unless ``credentials`` is None."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=SERVER_OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(_who_am_i)
    join = grpc.unary_unary_rpc_method_handler(
        _join_reply, pb.JoinRequest.FromString, pb.JoinReply.SerializeToString
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler("fedgrad.test.Probe", {"WhoAmI": handler}),
            grpc.method_handlers_generic_handler(SERVICE_NAME, {"Join": join}),
        )
    )
    address = f"127.0.0.1:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    assert bound > 0
    server.start()
    return server, bound


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


@pytest.fixture(scope="module")
def plain_port() -> Iterator[int]:
    server, port = _start(None)
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


# -- what grpcio says about each failed handshake (fedgrad.client.tls reads these) ----------
def _details(port: int, credentials: grpc.ChannelCredentials | None) -> str:
    with pytest.raises(grpc.RpcError) as info:
        _call(port, credentials)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    return info.value.details() or ""


def test_grpc_details_of_failed_handshakes(pki, mtls_port, plain_port, closed_port):
    """Pin the words each case gives; if a grpcio upgrade changes them, the node's hints go."""
    foreign = make_ca("someone else's CA", days=30)
    intruder = make_client_cert(foreign, "n1")
    # The node refuses the server: the details say why.
    assert "CERTIFICATE_VERIFY_FAILED" in _details(mtls_port, _client(foreign, pki.node))
    assert "WRONG_VERSION_NUMBER" in _details(plain_port, _client(pki.ca, pki.node))
    # The server refuses the node: all the node sees is a closed socket.
    assert "Socket closed" in _details(mtls_port, _client(pki.ca, None))
    assert "Socket closed" in _details(mtls_port, _client(pki.ca, intruder))
    assert "Socket closed" in _details(mtls_port, None)
    # Nothing listens: the one failure that heals when the aggregator comes (back).
    assert "Connection refused" in _details(closed_port, _client(pki.ca, pki.node))


# -- a node says that the handshake failed and what to check, at once, without retrying -------
@dataclass(frozen=True)
class Files:
    """The PEM files of ``pki`` and of intruders, as paths for ``--tls-*``."""

    ca: str
    cert: str
    key: str
    foreign_ca: str
    foreign_cert: str
    foreign_key: str
    expired_cert: str
    expired_key: str


@pytest.fixture(scope="module")
def files(pki, tmp_path_factory) -> Files:
    out = tmp_path_factory.mktemp("pem")
    foreign = make_ca("someone else's CA", days=30)
    intruder = make_client_cert(foreign, "n1")
    expired = make_client_cert(pki.ca, "n1", days=1, valid_from=_now() - dt.timedelta(days=3))

    def write(name: str, data: bytes) -> str:
        (out / name).write_bytes(data)
        return str(out / name)

    return Files(
        write("ca.pem", cert_to_pem(pki.ca.cert)),
        write("n1.pem", cert_to_pem(pki.node.cert)),
        write("n1.key", key_to_pem(pki.node.key)),
        write("foreign-ca.pem", cert_to_pem(foreign.cert)),
        write("intruder.pem", cert_to_pem(intruder.cert)),
        write("intruder.key", key_to_pem(intruder.key)),
        write("expired.pem", cert_to_pem(expired.cert)),
        write("expired.key", key_to_pem(expired.key)),
    )


def _join(address: str, **tls: str) -> pb.JoinReply:
    """Join through a node's ``Transport`` with a budget far longer than any test waits."""
    cfg = NodeConfig(task="linear", aggregator=address, node_id="n1", give_up_after=60.0, **tls)
    transport = Transport(cfg)
    try:
        return transport.join(pb.JoinRequest(node_id="n1", num_samples=1))
    finally:
        transport.close()


def _refused(address: str, **tls: str) -> str:
    # A GaveUpError here (after 60 s) would mean the failure was retried as transient.
    with pytest.raises(RefusedError) as info:
        _join(address, **tls)
    message = str(info.value)
    assert message.startswith(f"TLS handshake with the aggregator at {address} failed: ")
    return message


def test_node_with_another_ca_says_check_tls_ca(files, mtls_port):
    message = _refused(
        f"127.0.0.1:{mtls_port}", tls_ca=files.foreign_ca, tls_cert=files.cert, tls_key=files.key
    )
    assert "does not accept the aggregator's certificate" in message
    assert f"--tls-ca {files.foreign_ca}" in message


def test_node_without_client_cert_says_pass_tls_cert_and_key(files, mtls_port):
    message = _refused(f"127.0.0.1:{mtls_port}", tls_ca=files.ca)
    assert "requires a client certificate" in message
    assert "--tls-cert" in message and "--tls-key" in message


@pytest.mark.parametrize("which", ["foreign", "expired"])
def test_node_with_a_refused_cert_says_which_and_why(files, mtls_port, which):
    cert, key = (
        (files.foreign_cert, files.foreign_key)
        if which == "foreign"
        else (files.expired_cert, files.expired_key)
    )
    message = _refused(f"127.0.0.1:{mtls_port}", tls_ca=files.ca, tls_cert=cert, tls_key=key)
    assert f"refused this node's certificate --tls-cert {cert}" in message
    assert "--tls-client-ca" in message


@pytest.mark.parametrize("server", ["mutual", "server-only"])
def test_plaintext_node_against_tls_says_pass_tls_ca(mtls_port, tls_port, server):
    port = mtls_port if server == "mutual" else tls_port
    message = _refused(f"127.0.0.1:{port}")
    assert "uses TLS but this node dials plaintext" in message
    assert "--tls-ca" in message and "both sides use TLS or neither" in message


def test_tls_node_against_plaintext_says_both_sides_or_neither(files, plain_port):
    message = _refused(
        f"127.0.0.1:{plain_port}", tls_ca=files.ca, tls_cert=files.cert, tls_key=files.key
    )
    assert "does not use TLS" in message and "both sides use TLS or neither" in message


def test_address_missing_from_the_server_cert_says_so(pki, files):
    only_a_name = make_server_cert(pki.ca, ["aggregator.example"])
    pair = [(key_to_pem(only_a_name.key), cert_to_pem(only_a_name.cert))]
    server, port = _start(grpc.ssl_server_credentials(pair))
    try:
        message = _refused(f"127.0.0.1:{port}", tls_ca=files.ca)
    finally:
        server.stop(None)
    assert "does not name '127.0.0.1'" in message


def test_the_right_files_join(files, mtls_port):
    assert _join(f"127.0.0.1:{mtls_port}", tls_ca=files.ca, tls_cert=files.cert, tls_key=files.key)


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_nothing_listening_is_still_retried_until_the_budget(files, closed_port, tls):
    options = {"tls_ca": files.ca, "tls_cert": files.cert, "tls_key": files.key} if tls else {}
    cfg = NodeConfig(aggregator=f"127.0.0.1:{closed_port}", give_up_after=0.5, **options)
    transport = Transport(cfg)
    try:
        with pytest.raises(GaveUpError, match="UNAVAILABLE"):
            transport.join(pb.JoinRequest(node_id="n1", num_samples=1))
        assert transport.backoff.attempt >= 1
    finally:
        transport.close()


def test_an_aggregator_that_comes_back_is_joined(pki, files, cli):
    """The transient case: nothing listens, then a TLS aggregator starts on that port."""
    port = cli.closed_port()
    cfg = NodeConfig(
        aggregator=f"127.0.0.1:{port}",
        give_up_after=60.0,
        tls_ca=files.ca,
        tls_cert=files.cert,
        tls_key=files.key,
    )
    transport = Transport(cfg)
    started: list[grpc.Server] = []
    timer = threading.Timer(
        1.0, lambda: started.append(_start(_server_credentials(pki, mutual=True), port)[0])
    )
    timer.start()
    try:
        assert transport.join(pb.JoinRequest(node_id="n1", num_samples=1)).session_id == "probe"
        assert transport.backoff.fresh
    finally:
        timer.join()
        transport.close()
        for server in started:
            server.stop(None)
