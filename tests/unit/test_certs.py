"""Unit tests of fedgrad.certs: what the certificates contain and how they are written."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

import fedgrad.certs as certs
from fedgrad.auth import OPERATOR_NAME
from fedgrad.certs import (
    NODE_URI_PREFIX,
    OPERATOR_URI,
    KeyCert,
    add_nodes,
    cert_to_pem,
    init_federation,
    key_to_pem,
    load_key_cert,
    make_ca,
    make_client_cert,
    make_server_cert,
)
from fedgrad.errors import ConfigError


def now() -> dt.datetime:
    # Read the clock when asked, never at import: a slow suite reaches this module
    # minutes after collection, later than certificates made "now" start being valid.
    return dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def ca() -> KeyCert:
    return make_ca("test CA", days=30)


@pytest.fixture
def open_umask() -> Iterator[None]:
    # Permissions must not depend on the caller's umask: test with the most permissive one.
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def common_name(cert: x509.Certificate) -> str:
    (attr,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attr.value)


def ext(cert: x509.Certificate, kind: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


def verify_server(ca_cert: x509.Certificate, cert: x509.Certificate, name: x509.GeneralName):
    builder = PolicyBuilder().store(Store([ca_cert])).time(now())
    verifier = builder.build_server_verifier(name)  # type: ignore[arg-type]
    return verifier.verify(cert, [])


def verify_client(
    ca_cert: x509.Certificate, cert: x509.Certificate, when: dt.datetime | None = None
):
    return (
        PolicyBuilder()
        .store(Store([ca_cert]))
        .time(when or now())
        .build_client_verifier()
        .verify(cert, [])
    )


def test_public_api_is_declared():
    assert sorted(certs.__all__) == certs.__all__
    for name in certs.__all__:
        assert hasattr(certs, name), name


def test_ca(ca):
    assert common_name(ca.cert) == "test CA"
    assert ca.cert.issuer == ca.cert.subject
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey) and ca.key.curve.name == "secp256r1"
    basic = ext(ca.cert, x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ext(ca.cert, x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    lifetime = ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc
    assert lifetime == dt.timedelta(days=30)
    assert ca.cert.not_valid_before_utc < now()


def test_server_cert_default_hosts(ca):
    server = make_server_cert(ca)
    san = ext(server.cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = ext(server.cert, x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not ext(server.cert, x509.BasicConstraints).value.ca
    server.cert.verify_directly_issued_by(ca.cert)
    verify_server(ca.cert, server.cert, x509.DNSName("localhost"))
    verify_server(ca.cert, server.cert, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    with pytest.raises(VerificationError):
        verify_server(ca.cert, server.cert, x509.DNSName("evil.example"))


def test_server_cert_custom_hosts(ca):
    hosts = ["Agg.Example.org", " 10.0.0.7 ", "[::1]", "2001:db8::1", "agg.example.org", "a-b."]
    san = ext(make_server_cert(ca, hosts).cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["agg.example.org", "a-b"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("2001:db8::1"),
    ]


@pytest.mark.parametrize(
    "hosts",
    [[], [""], ["agg:50051"], ["https://agg"], ["-agg"], ["a..b"], ["x" * 64], ["ag g"], ["ä.de"]],
)
def test_server_cert_rejects_bad_hosts(ca, hosts):
    with pytest.raises(ConfigError):
        make_server_cert(ca, hosts)


def test_client_cert(ca):
    node = make_client_cert(ca, "node-7.eu_west", days=10)
    assert common_name(node.cert) == "node-7.eu_west"
    eku = ext(node.cert, x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = ext(node.cert, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    san = ext(node.cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:fedgrad:node:node-7.eu_west"
    ]
    assert NODE_URI_PREFIX == "urn:fedgrad:node:"
    verify_client(ca.cert, node.cert)


def test_client_and_server_certs_cannot_swap_roles(ca):
    server = make_server_cert(ca)
    node = make_client_cert(ca, "n1")
    with pytest.raises(VerificationError, match="EKU"):
        verify_client(ca.cert, server.cert)
    with pytest.raises(VerificationError):
        verify_server(ca.cert, node.cert, x509.DNSName("localhost"))


def test_operator_cert_is_a_client_cert_no_node_can_have(ca, tmp_path):
    operator = make_client_cert(ca, OPERATOR_NAME, days=10)
    assert common_name(operator.cert) == "operator"
    assert list(ext(operator.cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    san = ext(operator.cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [OPERATOR_URI]
    verify_client(ca.cert, operator.cert)
    with pytest.raises(VerificationError):
        verify_server(ca.cert, operator.cert, x509.DNSName("localhost"))
    # No node may take the name: certs init and add_nodes refuse it as a node id.
    with pytest.raises(ConfigError, match="reserved for the operator"):
        init_federation(tmp_path / "certs", ["n1", OPERATOR_NAME])
    assert not (tmp_path / "certs").exists()


@pytest.mark.parametrize("node_id", ["", "bad id", "a/b", "x" * 129])
def test_client_cert_rejects_bad_node_id(ca, node_id):
    with pytest.raises(ConfigError, match="invalid node id"):
        make_client_cert(ca, node_id)


def test_expired_cert():
    ca = make_ca(days=30, valid_from=now() - dt.timedelta(days=10))
    expired = make_client_cert(ca, "n1", days=1, valid_from=now() - dt.timedelta(days=3))
    assert expired.cert.not_valid_after_utc < now()
    with pytest.raises(VerificationError, match="not valid at validation time"):
        verify_client(ca.cert, expired.cert)
    # The same certificate was fine while it lasted.
    verify_client(ca.cert, expired.cert, when=now() - dt.timedelta(days=2, hours=12))


def test_leaf_never_outlives_its_ca(ca):
    node = make_client_cert(ca, "n1", days=10_000)
    assert node.cert.not_valid_after_utc == ca.cert.not_valid_after_utc


@pytest.mark.parametrize("days", [0, -1, 1.5, True, "3"])
def test_days_must_be_positive_int(ca, days):
    with pytest.raises(ConfigError, match="positive number of days"):
        make_client_cert(ca, "n1", days=days)


def test_naive_valid_from_is_refused():
    with pytest.raises(ConfigError, match="timezone-aware"):
        make_ca(valid_from=dt.datetime(2020, 1, 1))


def test_pem_round_trip(tmp_path, ca):
    pem = key_to_pem(ca.key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    (tmp_path / "ca.pem").write_bytes(cert_to_pem(ca.cert))
    (tmp_path / "ca.key").write_bytes(pem)
    loaded = load_key_cert(tmp_path / "ca.pem", tmp_path / "ca.key")
    assert loaded.cert == ca.cert and key_to_pem(loaded.key) == pem


def test_load_key_cert_decoding_errors(tmp_path, ca):
    good_cert, good_key = tmp_path / "ca.pem", tmp_path / "ca.key"
    good_cert.write_bytes(cert_to_pem(ca.cert))
    good_key.write_bytes(key_to_pem(ca.key))
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        load_key_cert(garbage, good_key)
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        load_key_cert(good_cert, garbage)
    other = tmp_path / "ed25519.key"
    key = ed25519.Ed25519PrivateKey.generate()
    other.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    with pytest.raises(ConfigError, match="unsupported key type"):
        load_key_cert(good_cert, other)
    with pytest.raises(ConfigError, match="cannot read"):
        load_key_cert(tmp_path / "missing.pem", good_key)


def test_key_files_are_0600_whatever_the_umask(tmp_path, open_umask):
    paths = init(tmp_path, nodes=["n1"])
    paths["ca.key"].chmod(0o644)  # someone loosened it; overwriting must tighten it again
    paths = init(tmp_path, nodes=["n1"], overwrite=True)
    assert mode(paths["ca.key"]) == 0o600 and mode(paths["ca.pem"]) == 0o644
    leftovers = [p for p in (tmp_path / "certs").rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers


def init(tmp_path: Path, **kwargs) -> dict[str, Path]:
    kwargs.setdefault("nodes", ["n1", "n2", "n3"])
    return init_federation(tmp_path / "certs", **kwargs)


def test_init_federation_layout(tmp_path, open_umask):
    paths = init(tmp_path, hosts=["localhost", "127.0.0.1", "agg.internal"], days=30)
    out = tmp_path / "certs"
    expected = ["ca.pem", "ca.key", "server.pem", "server.key", "operator.pem", "operator.key"]
    expected += [f"nodes/n{i}.{e}" for i in (1, 2, 3) for e in ("pem", "key")]
    assert sorted(paths) == sorted(expected)
    for rel, path in paths.items():
        assert path == out / rel and path.is_file()
        assert mode(path) == (0o600 if rel.endswith(".key") else 0o644), rel
    assert mode(out) == 0o700 and mode(out / "nodes") == 0o700
    assert sorted(p.name for p in out.iterdir()) == sorted(["nodes", *expected[:6]])


def test_init_federation_contents(tmp_path):
    paths = init(tmp_path, hosts=["agg.internal", "10.1.2.3"])
    ca = load_key_cert(paths["ca.pem"], paths["ca.key"])
    server = load_key_cert(paths["server.pem"], paths["server.key"])
    san = ext(server.cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["agg.internal"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    verify_server(ca.cert, server.cert, x509.DNSName("agg.internal"))
    for node_id in ("n1", "n2", "n3"):
        node = load_key_cert(paths[f"nodes/{node_id}.pem"], paths[f"nodes/{node_id}.key"])
        assert common_name(node.cert) == node_id
        verify_client(ca.cert, node.cert)
    operator = load_key_cert(paths["operator.pem"], paths["operator.key"])
    assert common_name(operator.cert) == OPERATOR_NAME
    verify_client(ca.cert, operator.cert)
    assert ca.cert.not_valid_after_utc - now() > dt.timedelta(days=3000)


def test_init_federation_refuses_to_overwrite(tmp_path):
    paths = init(tmp_path)
    before = {rel: p.read_bytes() for rel, p in paths.items()}
    with pytest.raises(ConfigError, match="already holds ca.pem.*overwrite=True"):
        init(tmp_path)
    # Even one existing node file blocks everything, before anything is written.
    for path in paths.values():
        if path.name != "n2.key":
            path.unlink()
    with pytest.raises(ConfigError, match="nodes/n2.key"):
        init(tmp_path)
    assert sorted(p.name for p in (tmp_path / "certs").rglob("*") if p.is_file()) == ["n2.key"]
    assert (tmp_path / "certs/nodes/n2.key").read_bytes() == before["nodes/n2.key"]


def test_init_federation_overwrite_replaces_everything(tmp_path):
    first = {rel: p.read_bytes() for rel, p in init(tmp_path).items()}
    second = init(tmp_path, overwrite=True)
    assert all(second[rel].read_bytes() != data for rel, data in first.items())
    assert mode(second["ca.key"]) == 0o600


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nodes": ["n1", "n1"]}, "duplicate node ids: n1"),
        ({"nodes": ["n1", "bad id"]}, "invalid node id"),
        ({"nodes": "n1,n2"}, "list of node ids"),
        ({"hosts": ["agg:443"]}, "neither an IP address nor a DNS name"),
        ({"hosts": []}, "at least one host"),
        ({"days": 0}, "positive number of days"),
    ],
)
def test_init_federation_rejects_bad_input_and_writes_nothing(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        init(tmp_path, **kwargs)
    assert not (tmp_path / "certs").exists()


def test_add_nodes_uses_the_existing_ca(tmp_path):
    paths = init(tmp_path, nodes=["n1"])
    old_n1 = paths["nodes/n1.pem"].read_bytes()
    out = tmp_path / "certs"
    added = add_nodes(out, ["n4"], days=5)
    assert sorted(added) == ["nodes/n4.key", "nodes/n4.pem"]
    ca = load_key_cert(paths["ca.pem"], paths["ca.key"])
    node = load_key_cert(added["nodes/n4.pem"], added["nodes/n4.key"])
    verify_client(ca.cert, node.cert)
    with pytest.raises(ConfigError, match="already holds nodes/n1.pem"):
        add_nodes(out, ["n1"])
    reissued = add_nodes(out, ["n1"], overwrite=True)
    assert reissued["nodes/n1.pem"].read_bytes() != old_n1


def test_add_nodes_needs_the_ca(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        add_nodes(tmp_path, ["n1"])


def test_load_key_cert_rejects_mismatched_pair(tmp_path):
    paths = init(tmp_path, nodes=["n1"])
    with pytest.raises(ConfigError, match="is not the key of"):
        load_key_cert(paths["server.pem"], paths["nodes/n1.key"])
