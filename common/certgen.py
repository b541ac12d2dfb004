"""Sign the certificates of a federation: a CA, the aggregator's and the clients'.

``make_ca`` makes a self-signed CA that may sign leaf certificates only;
``make_server_cert`` signs the aggregator's (subjectAltName = its hosts, EKU
serverAuth) and ``make_client_cert`` a node's or the operator's (CN = the
identity, EKU clientAuth). Keys are EC P-256 and a leaf never outlives its CA.
``fedgrad.certs`` writes these to files (``fedgrad certs init``) and re-exports them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedgrad.errors import ConfigError
from fedgrad.identity import CERT_DAYS, DEFAULT_HOSTS, OPERATOR_NAME, validate_node_id

__all__ = [
    "KeyCert",
    "NODE_URI_PREFIX",
    "OPERATOR_URI",
    "PrivateKey",
    "check_days",
    "make_ca",
    "make_client_cert",
    "make_server_cert",
    "subject_alt_names",
]

#: Names the server certificate covers when no hosts are given.

#: Prefix of the subjectAltName URI of node certificates.
NODE_URI_PREFIX = "urn:fedgrad:node:"
#: subjectAltName URI of the operator's certificate.
OPERATOR_URI = "urn:fedgrad:operator"

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# Backdate notBefore so a peer whose clock runs a little behind still accepts a fresh cert.
_CLOCK_SKEW = dt.timedelta(minutes=5)
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_SERVER_CN = "fedgrad aggregator"


class KeyCert(NamedTuple):
    """A private key and the certificate for it."""

    key: PrivateKey
    cert: x509.Certificate


def make_ca(
    common_name: str = "fedgrad CA", days: int = 3650, *, valid_from: dt.datetime | None = None
) -> KeyCert:
    """Make a self-signed CA that can sign leaf certificates only.

    Args:
        common_name: the CA's subject CN.
        days: validity in days from ``valid_from``.
        valid_from: start of validity (UTC); now minus a few minutes if None.

    Returns:
        The CA key and certificate.

    Raises:
        ConfigError: ``days`` is not a positive integer.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days, valid_from, None)
    builder = (
        _base_builder(name, name, key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
    )
    return KeyCert(key, builder.sign(key, hashes.SHA256()))


def make_server_cert(
    ca: KeyCert,
    hosts: Sequence[str] | None = None,
    days: int = CERT_DAYS,
    *,
    valid_from: dt.datetime | None = None,
) -> KeyCert:
    """Make the aggregator's certificate, valid for the given host names and IP addresses.

    Args:
        ca: the issuing CA.
        hosts: DNS names and IP addresses clients dial (``DEFAULT_HOSTS`` if None); no ports.
        days: validity in days from ``valid_from``, cut to the CA's own expiry.
        valid_from: start of validity (UTC); now minus a few minutes if None.

    Returns:
        The server key and certificate (subjectAltName = the hosts, EKU serverAuth).

    Raises:
        ConfigError: no hosts, a host that is neither a DNS name nor an IP, or bad ``days``.
    """
    names = subject_alt_names(DEFAULT_HOSTS if hosts is None else hosts)
    san = x509.SubjectAlternativeName(names)
    return _make_leaf(ca, _SERVER_CN, ExtendedKeyUsageOID.SERVER_AUTH, san, days, valid_from)


def make_client_cert(
    ca: KeyCert, node_id: str, days: int = CERT_DAYS, *, valid_from: dt.datetime | None = None
) -> KeyCert:
    """Make a node's client certificate, whose subject CN is the node id, or the operator's.

    For an already expired certificate (tests), pass ``valid_from`` more than ``days`` ago.

    Args:
        ca: the issuing CA.
        node_id: the node's identity (``fedgrad.auth.validate_node_id`` rules), or
            ``fedgrad.auth.OPERATOR_NAME``: status and health, never a node's calls.
        days: validity in days from ``valid_from``, cut to the CA's own expiry.
        valid_from: start of validity (UTC); now minus a few minutes if None.

    Returns:
        The key and certificate (EKU clientAuth, URI SAN ``urn:fedgrad:node:<node_id>``,
        or ``OPERATOR_URI``).

    Raises:
        ConfigError: an invalid node id or ``days``.
    """
    # The CN is the identity fedgrad checks; the URI SAN repeats it because RFC 5280
    # verifiers (e.g. cryptography's client verifier, proxies) insist on a subjectAltName.
    uri = OPERATOR_URI if node_id == OPERATOR_NAME else NODE_URI_PREFIX + validate_node_id(node_id)
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)])
    return _make_leaf(ca, node_id, ExtendedKeyUsageOID.CLIENT_AUTH, san, days, valid_from)


def _make_leaf(
    ca: KeyCert,
    common_name: str,
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName,
    days: int,
    valid_from: dt.datetime | None,
) -> KeyCert:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days, valid_from, ca.cert.not_valid_after_utc)
    builder = (
        _base_builder(subject, ca.cert.subject, key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .add_extension(san, critical=False)
    )
    return KeyCert(key, builder.sign(ca.key, hashes.SHA256()))


def _base_builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def check_days(days: int) -> None:
    """Raise ConfigError unless ``days`` is a whole number of days >= 1."""
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(f"certificate validity must be a positive number of days, got {days!r}")


def _validity(
    days: int, valid_from: dt.datetime | None, cap: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    check_days(days)
    start = dt.datetime.now(dt.UTC) - _CLOCK_SKEW if valid_from is None else valid_from
    if start.tzinfo is None:
        raise ConfigError("valid_from must be timezone-aware (UTC)")
    end = start + dt.timedelta(days=days)
    # A leaf must not outlive its issuer: verifiers reject it once the CA has expired anyway.
    return start, end if cap is None else min(end, cap)


def subject_alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """Return the server certificate's names for ``hosts`` (ConfigError for a bad host, or none)."""
    names: list[x509.GeneralName] = []
    for host in (h.strip() for h in hosts):
        name = _general_name(host)
        if name not in names:
            names.append(name)
    if not names:
        raise ConfigError("the server certificate needs at least one host name or IP address")
    return names


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    # DNS names compare case-insensitively and a trailing dot is the same name (RFC 4343).
    name = host.rstrip(".").lower()
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        raise ConfigError(
            f"host {host[:80]!r} is neither an IP address nor a DNS name (no ports, no schemes)"
        )
    return x509.DNSName(name)
