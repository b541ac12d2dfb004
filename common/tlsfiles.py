"""TLS files given on the command line: read them and check them before gRPC does.

gRPC reports a swapped or mismatched certificate and key as "Failed to bind" on the
aggregator and as an unreachable aggregator on a node; reading and checking the PEM
files first turns each mistake into a one-line ``ConfigError`` that names the flag.
Both the aggregator (``fedgrad.server.security``) and the node (``fedgrad.client``)
use these.
"""

from __future__ import annotations

from pathlib import Path

from fedgrad.errors import ConfigError

__all__ = ["read_ca", "read_key_pair"]


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it: {exc.strerror}") from None


def read_key_pair(cert_path: str, key_path: str) -> tuple[bytes, bytes]:
    """Read ``--tls-cert`` and ``--tls-key`` and check that the key is the certificate's.

    For a swapped or mismatched pair gRPC itself says only "Failed to bind", so the pair
    is checked here first.

    Returns:
        The certificate chain and the key, as PEM bytes for gRPC.

    Raises:
        ConfigError: a file is missing, unreadable or not PEM, the two are swapped, or the
            key does not match the certificate's public key.
    """
    cert, key = _read(cert_path, "--tls-cert"), _read(key_path, "--tls-key")
    if b"PRIVATE KEY-----" in cert and b"CERTIFICATE-----" in key:
        raise ConfigError(
            f"--tls-cert {cert_path} holds a private key and --tls-key {key_path} a"
            " certificate: they are swapped; pass the certificate to --tls-cert and its key"
            " to --tls-key"
        )
    from fedgrad.certs import load_key_cert  # cryptography, as in read_ca

    try:
        load_key_cert(cert_path, key_path)
    except ConfigError as exc:
        raise ConfigError(
            f"--tls-cert {cert_path} / --tls-key {key_path}: {exc} (give a PEM certificate"
            " and the unencrypted key it was made for, e.g. from `fedgrad certs init`)"
        ) from None
    return cert, key


def read_ca(path: str, flag: str) -> bytes:
    """Read a CA file (one or more PEM certificates) given as ``flag``.

    Raises:
        ConfigError: it is missing, unreadable, or holds no PEM certificate.
    """
    from cryptography import x509  # only for TLS: ~8 MB resident a process saves without it

    data = _read(path, flag)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(
            f"{flag} {path}: not a PEM CA certificate (expected -----BEGIN CERTIFICATE-----,"
            " e.g. certs/ca.pem from `fedgrad certs init`)"
        ) from None
    return data
