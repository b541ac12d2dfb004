"""Make the certificates of a federation: one CA, one server certificate, one per node.

``init_federation(out, nodes=["n1", "n2"], hosts=["agg.example.org"])`` writes::

    out/ca.pem            CA certificate: aggregator --tls-client-ca, every node --tls-ca
    out/ca.key            CA key (0600): keep it offline; only needed to add nodes
    out/server.pem        aggregator certificate (--tls-cert); SANs = the hosts
    out/server.key        aggregator key (0600, --tls-key)
    out/operator.pem      operator certificate for ``fedgrad status`` and ``fedgrad health``
    out/operator.key      (--tls-cert/--tls-key); CN operator: may read the status, is no node
    out/nodes/<id>.pem    node certificate (--tls-cert); subject CN = the node id,
                          subjectAltName URI urn:fedgrad:node:<id>
    out/nodes/<id>.key    node key (0600, --tls-key)

Keys are EC P-256 (fast to make and to handshake with, supported by every TLS
stack gRPC uses). A node's identity is the common name of its certificate; the
operator's (``fedgrad.auth.OPERATOR_NAME``) is never a node's. Server
certificates carry only serverAuth and client certificates only clientAuth, so
neither can stand in for the other. ``fedgrad.certgen`` makes the keys and
certificates; this module writes and reads them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fedgrad.certgen import (
    NODE_URI_PREFIX,
    OPERATOR_URI,
    KeyCert,
    PrivateKey,
    check_days,
    make_ca,
    make_client_cert,
    make_server_cert,
    subject_alt_names,
)
from fedgrad.errors import ConfigError
from fedgrad.identity import CERT_DAYS, DEFAULT_HOSTS, OPERATOR_NAME, validate_node_id

__all__ = [
    "DEFAULT_HOSTS",
    "KeyCert",
    "NODE_URI_PREFIX",
    "OPERATOR_URI",
    "PrivateKey",
    "add_nodes",
    "cert_to_pem",
    "init_federation",
    "key_to_pem",
    "load_key_cert",
    "make_ca",
    "make_client_cert",
    "make_server_cert",
]


def cert_to_pem(cert: x509.Certificate) -> bytes:
    """Encode a certificate as PEM, as gRPC's ``ssl_*_credentials`` take it."""
    return cert.public_bytes(serialization.Encoding.PEM)


def _cert_from_pem(data: bytes) -> x509.Certificate:
    """Decode one PEM certificate; ConfigError if it is not one."""
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate: {exc}") from None


def key_to_pem(key: PrivateKey) -> bytes:
    """Encode a private key as unencrypted PKCS#8 PEM (gRPC cannot read encrypted keys)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_from_pem(data: bytes) -> PrivateKey:
    """Decode an unencrypted EC or RSA PEM private key; ConfigError otherwise."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # The exception text names the problem, never key material.
        raise ConfigError(f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"unsupported key type {type(key).__name__}: use EC or RSA")
    return key


def _write_pem(path: Path, data: bytes, mode: int) -> Path:
    """Write PEM data atomically; keys are 0600 from the moment they exist."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Created with the final mode (never world-readable, whatever the umask), then renamed in.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_key_cert(cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> KeyCert:
    """Read a certificate and its key, e.g. the CA to sign more node certificates.

    Args:
        cert_path: PEM certificate.
        key_path: unencrypted PEM private key.

    Returns:
        The key and certificate.

    Raises:
        ConfigError: a file is missing or unreadable, or the key does not match the cert.
    """
    try:
        cert = _cert_from_pem(Path(cert_path).read_bytes())
        key = _key_from_pem(Path(key_path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise ConfigError(f"{key_path} is not the key of {cert_path}")
    return KeyCert(key, cert)


def init_federation(
    out_dir: str | os.PathLike[str],
    nodes: Sequence[str],
    hosts: Sequence[str] | None = None,
    days: int = CERT_DAYS,
    *,
    ca_days: int = 3650,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Create a CA, the aggregator's certificate, the operator's and one per node.

    Args:
        out_dir: folder to write (layout in the module docstring); created 0700 if missing.
        nodes: node ids, one client certificate each.
        hosts: names and IPs of the aggregator (``DEFAULT_HOSTS`` if None).
        days: validity of the server and node certificates.
        ca_days: validity of the CA; longer, so nodes can be added later.
        overwrite: replace existing files instead of refusing.

    Returns:
        Path relative to ``out_dir`` (``"ca.pem"``, ``"nodes/n1.key"``, ...) -> path written.

    Raises:
        ConfigError: a bad node id or host, duplicate node ids, or a file that exists while
            ``overwrite`` is False (checked before anything is written).
    """
    out = Path(out_dir)
    node_ids = _check_nodes(nodes)
    names = [f"{stem}.{ext}" for stem in ("ca", "server", "operator") for ext in ("pem", "key")]
    names += _node_files(node_ids)
    _refuse_existing(out, names, overwrite)
    server_hosts = DEFAULT_HOSTS if hosts is None else hosts
    # Fail on any bad argument before the first file is written.
    subject_alt_names(server_hosts)
    check_days(days)
    check_days(ca_days)
    ca = make_ca(days=ca_days)
    written = _write_pair(out, "ca", ca)
    written |= _write_pair(out, "server", make_server_cert(ca, server_hosts, days))
    written |= _write_pair(out, "operator", make_client_cert(ca, OPERATOR_NAME, days))
    written |= _write_nodes(out, ca, node_ids, days)
    return written


def add_nodes(
    out_dir: str | os.PathLike[str],
    nodes: Sequence[str],
    days: int = CERT_DAYS,
    *,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Sign certificates for more nodes with the CA that ``init_federation`` wrote.

    Args:
        out_dir: the folder holding ``ca.pem`` and ``ca.key``.
        nodes: the new node ids.
        days: validity of the new certificates.
        overwrite: replace existing node files (re-issue) instead of refusing.

    Returns:
        Path relative to ``out_dir`` -> path written.

    Raises:
        ConfigError: the CA cannot be read, a bad or duplicate node id, or an existing file.
    """
    out = Path(out_dir)
    node_ids = _check_nodes(nodes)
    _refuse_existing(out, _node_files(node_ids), overwrite)
    check_days(days)
    ca = load_key_cert(out / "ca.pem", out / "ca.key")
    return _write_nodes(out, ca, node_ids, days)


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_nodes(nodes: Sequence[str]) -> list[str]:
    if isinstance(nodes, str):
        raise ConfigError("nodes must be a list of node ids, not one string")
    node_ids = [validate_node_id(n) for n in nodes]
    dupes = sorted({n for n in node_ids if node_ids.count(n) > 1})
    if dupes:
        raise ConfigError(f"duplicate node ids: {', '.join(dupes)}")
    return node_ids


def _node_files(node_ids: Iterable[str]) -> list[str]:
    return [f"nodes/{n}.{ext}" for n in node_ids for ext in ("pem", "key")]


def _refuse_existing(out: Path, names: Iterable[str], overwrite: bool) -> None:
    existing = [name for name in names if (out / name).exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise ConfigError(
            f"{out} already holds {shown}; pass overwrite=True (--overwrite) to replace them"
        )


def _write_pair(out: Path, stem: str, pair: KeyCert) -> dict[str, Path]:
    (out / stem).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = {
        f"{stem}.pem": (cert_to_pem(pair.cert), 0o644),
        f"{stem}.key": (key_to_pem(pair.key), 0o600),
    }
    return {rel: _write_pem(out / rel, data, mode) for rel, (data, mode) in files.items()}


def _write_nodes(out: Path, ca: KeyCert, node_ids: Iterable[str], days: int) -> dict[str, Path]:
    written: dict[str, Path] = {}
    for node_id in node_ids:
        pair = make_client_cert(ca, node_id, days)
        written |= _write_pair(out, f"nodes/{node_id}", pair)
    return written
