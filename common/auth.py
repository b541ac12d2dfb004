"""Identify nodes: node id rules, bearer tokens, and the identity in a TLS client certificate.

Pure code: nothing here imports grpc. The server turns a ``None`` identity or a
failed ``TokenStore.verify`` into UNAUTHENTICATED, and an identity that is not
the node a call claims to be into PERMISSION_DENIED (see ``docs/security.md``).

Token file format (aggregator, ``--tokens FILE``)::

    # comments and blank lines are ignored
    n1 mZ0v3pV...43 url-safe characters...      a plaintext token
    n2 sha256:5e884898da2804...64 hex digits     the hash of a token (``hash_token``)

One ``<node_id> <token>`` pair per line, separated by whitespace. Node ids
follow ``validate_node_id``. A plaintext token is 16-1024 printable ASCII
characters without whitespace and must not start with ``sha256:``. Every
node's token must differ from every other node's. Hashes are unsalted SHA-256,
which is safe only because tokens are long and random (``fedgrad token``,
``generate_token``); they keep a leaked token file from handing out credentials.

The name ``operator`` is no node: its token-file line authenticates as ``OPERATOR_IDENTITY``.
Node id rules, the operator's names and TLS identity are ``fedgrad.identity``'s, re-exported.

On the wire a node sends the metadata ``authorization: Bearer <token>``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from fedgrad.errors import ConfigError
from fedgrad.identity import (
    NODE_ID_MAX_LENGTH,
    OPERATOR_IDENTITY,
    OPERATOR_NAME,
    identity_from_auth_context,
    validate_node_id,
)
from fedgrad.wire import ID_PATTERN

__all__ = [
    "AUTH_METADATA_KEY",
    "MAX_TOKEN_LENGTH",
    "MIN_TOKEN_LENGTH",
    "NODE_ID_MAX_LENGTH",
    "OPERATOR_IDENTITY",
    "OPERATOR_NAME",
    "TOKEN_ENV",
    "TokenStore",
    "bearer_metadata",
    "generate_token",
    "hash_token",
    "identity_from_auth_context",
    "load_node_token",
    "load_token_file",
    "parse_bearer",
    "redact",
    "token_file_line",
    "validate_node_id",
]

logger = logging.getLogger(__name__)

#: gRPC metadata key that carries ``Bearer <token>`` (keys are lower case on the wire).
AUTH_METADATA_KEY = "authorization"
#: Environment variable a node reads its token from when no token file is given.
TOKEN_ENV = "FEDGRAD_TOKEN"
MIN_TOKEN_LENGTH = 16
# Far below gRPC's 8 KiB default header list limit, far above any real token.
MAX_TOKEN_LENGTH = 1024
#: The identity shard 0 of a sharded aggregator presents to the other shards (its client
#: certificate's node id, or its token's entry in --tokens).
SHARD_IDENTITY = "shard-0"

# Printable ASCII without space: what a non-binary gRPC metadata value may carry
# after "Bearer ", and nothing that could split a header or a token-file line.
_TOKEN_RE = re.compile(rf"[\x21-\x7e]{{{MIN_TOKEN_LENGTH},{MAX_TOKEN_LENGTH}}}")
_HASH_PREFIX = "sha256:"
_HASH_RE = re.compile(r"sha256:[0-9a-fA-F]{64}")
_REDACTED = "<redacted>"
_NODE_ID_RE = ID_PATTERN  # the wire's rule, as fedgrad.identity applies it
_SENSITIVE_KEYS = frozenset({AUTH_METADATA_KEY, "proxy-authorization", "cookie", "set-cookie"})


def generate_token() -> str:
    """Return a new random token (256 bits, URL-safe base64, 43 characters; ``fedgrad token``).

    Returns:
        The token; hand it to one node and put it (or ``hash_token`` of it) in the token file.
    """
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Hash a token for a token file.

    Args:
        token: a plaintext token.

    Returns:
        ``"sha256:<64 hex digits>"``.

    Raises:
        ConfigError: the token is not a valid token (the message never contains it).
    """
    _check_token(token)
    return _HASH_PREFIX + _digest(token).hex()


def token_file_line(name: str, token: str) -> str:
    """Return the token-file line of ``name`` that stores only the hash of ``token``.

    Args:
        name: a node id, or ``OPERATOR_NAME`` for the operator's token.
        token: the plaintext token (it stays with its owner).

    Returns:
        ``"<name> sha256:<64 hex digits>"``.

    Raises:
        ConfigError: a bad name or token (the message never contains the token).
    """
    return f"{_check_entry_name(name)} {hash_token(token)}"


class TokenStore:
    """The token (as a SHA-256 digest) of each node; never holds or shows a plaintext token."""

    __slots__ = ("_decoy", "_digests")

    def __init__(self, entries: Mapping[str, str]) -> None:
        """Build a store from node ids to tokens or ``sha256:<hex>`` hashes.

        Args:
            entries: node id (or ``OPERATOR_NAME``) -> plaintext token or ``hash_token`` output.

        Raises:
            ConfigError: a bad node id, a bad token or hash, or two nodes with one token.
        """
        digests: dict[str, bytes] = {}
        owners: dict[bytes, str] = {}
        for node_id, value in entries.items():
            _check_entry_name(node_id)
            try:
                digest = _entry_digest(value)
            except ValueError as exc:
                raise ConfigError(f"token of node {node_id!r}: {exc}") from None
            if digest in owners:
                raise ConfigError(f"nodes {owners[digest]!r} and {node_id!r} share one token")
            owners[digest] = node_id
            digests[node_id] = digest
        self._digests = digests
        # Unknown node ids are compared against this, so they take the same path as known ones.
        self._decoy = _digest(secrets.token_urlsafe(32))

    def verify(self, node_id: str, token: str) -> bool:
        """Check in constant time that ``token`` is the token of ``node_id``.

        Args:
            node_id: the node the caller claims to be (from the wire; may be anything).
            token: the token it presented (from the wire; may be anything).

        Returns:
            True only if ``node_id`` is a known node (never the operator) and the token matches.
        """
        expected = None if node_id == OPERATOR_NAME else self._digests.get(node_id)
        ok = hmac.compare_digest(self._decoy if expected is None else expected, _digest(token))
        return ok and expected is not None

    def identify(self, token: str) -> str | None:
        """Find the node a token belongs to, comparing against every entry without early exit.

        Args:
            token: the token a caller presented (from the wire; may be anything).

        Returns:
            The node id, ``OPERATOR_IDENTITY`` for the operator's token, or None if no entry
            has this token.
        """
        digest = _digest(token)
        found = None
        for node_id, expected in self._digests.items():
            if hmac.compare_digest(expected, digest):
                found = node_id
        return OPERATOR_IDENTITY if found == OPERATOR_NAME else found

    @property
    def node_ids(self) -> frozenset[str]:
        """Return the node ids that have a token (the operator is no node)."""
        return frozenset(self._digests) - {OPERATOR_NAME}

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._digests

    def __len__(self) -> int:
        return len(self._digests)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._digests))

    def __repr__(self) -> str:
        return f"TokenStore({len(self._digests)} nodes)"


def load_token_file(path: str | os.PathLike[str]) -> TokenStore:
    """Read a token file (format in the module docstring).

    Args:
        path: the file (``--tokens``); a warning is logged if other users can read it.

    Returns:
        The store of every node's token digest.

    Raises:
        ConfigError: unreadable file, a malformed line (by number; never echoing the
            line), a duplicate node id or token, or no entries at all.
    """
    path = Path(path)
    text = _read_secret_file(path, "--tokens")
    entries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    owners: dict[bytes, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        fields = line.split()
        if len(fields) != 2:
            raise ConfigError(
                f"{where}: expected '<node_id> <token>' or '<node_id> sha256:<hex>',"
                f" found {len(fields)} fields"
            )
        node_id, value = fields
        # Messages below never quote the line: a swapped or mistyped entry may hold a token.
        if not _NODE_ID_RE.fullmatch(node_id):
            raise ConfigError(f"{where}: invalid node id (1-{NODE_ID_MAX_LENGTH} of A-Za-z0-9._-)")
        if node_id in first_line:
            raise ConfigError(f"{where}: duplicate node id (first on line {first_line[node_id]})")
        try:
            digest = _entry_digest(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if digest in owners:
            raise ConfigError(f"{where}: same token as line {owners[digest]}")
        first_line[node_id], owners[digest] = number, number
        entries[node_id] = value
    if not entries:
        raise ConfigError(f"--tokens {path}: no tokens (expected '<node_id> <token>' lines)")
    return TokenStore(entries)


def load_node_token(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """Read a node's own token from a file, else from ``$FEDGRAD_TOKEN``.

    Args:
        path: a file holding just the token (surrounding whitespace ignored); wins over the
            environment.
        environ: the environment to read; ``os.environ`` if None.

    Returns:
        The token, or None if there is no file and the variable is unset or empty.

    Raises:
        ConfigError: the file is unreadable or does not hold exactly one valid token.
    """
    if path is not None:
        source = f"--token-file {path}"
        token = _read_secret_file(Path(path), "--token-file").strip()
    else:
        token, source = (os.environ if environ is None else environ).get(TOKEN_ENV, ""), TOKEN_ENV
        token = token.strip()
        if not token:
            return None
    try:
        _check_token(token)
    except ConfigError:
        raise ConfigError(f"{source}: {_token_rule()}") from None
    return token


def bearer_metadata(token: str) -> tuple[tuple[str, str]]:
    """Build the call metadata that carries a token.

    Args:
        token: the node's plaintext token.

    Returns:
        ``(("authorization", "Bearer <token>"),)``, ready for gRPC's ``metadata=``.

    Raises:
        ConfigError: the token is not a valid token (the message never contains it).
    """
    _check_token(token)
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),)


def parse_bearer(value: str | bytes | None) -> str | None:
    """Extract the token from an ``authorization`` metadata value.

    Args:
        value: the metadata value, e.g. ``"Bearer abc..."``; the scheme is case-insensitive
            (RFC 7235 section 2.1).

    Returns:
        The token, or None if the value is missing or not a well-formed bearer credential.
    """
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not _TOKEN_RE.fullmatch(token):
        return None
    return token


def redact(
    metadata: Iterable[tuple[str, str | bytes]] | None,
) -> list[tuple[str, str | bytes]]:
    """Copy call metadata for logging with credential values replaced by ``<redacted>``.

    Args:
        metadata: (key, value) pairs as gRPC hands them over, or None.

    Returns:
        The pairs, with ``authorization``, ``proxy-authorization`` and cookie values hidden.
    """
    return [
        (key, _REDACTED if key.lower() in _SENSITIVE_KEYS else value)
        for key, value in (metadata or ())
    ]


def _digest(token: str) -> bytes:
    # surrogatepass: wire input must never make hashing raise, whatever it holds.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _token_rule() -> str:
    return (
        f"a token is {MIN_TOKEN_LENGTH}-{MAX_TOKEN_LENGTH} printable ASCII characters"
        " without whitespace (make one with `fedgrad token`)"
    )


def _check_entry_name(name: str) -> str:
    """Return ``name`` if it may own a token: a node id or the operator."""
    return name if name == OPERATOR_NAME else validate_node_id(name)


def _check_token(token: str) -> None:
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        raise ConfigError(f"invalid token: {_token_rule()}")
    if token.startswith(_HASH_PREFIX):
        raise ConfigError(f"invalid token: a plaintext token must not start with {_HASH_PREFIX}")


def _entry_digest(value: str) -> bytes:
    """Turn a token or ``sha256:<hex>`` into a digest; the ValueError never echoes it."""
    if isinstance(value, str) and value.startswith(_HASH_PREFIX):
        if not _HASH_RE.fullmatch(value):
            raise ValueError(f"a hashed token is {_HASH_PREFIX} followed by 64 hex digits")
        return bytes.fromhex(value[len(_HASH_PREFIX) :])
    try:
        _check_token(value)
    except ConfigError:
        raise ValueError(_token_rule()) from None
    return _digest(value)


def _read_secret_file(path: Path, flag: str) -> str:
    """Read a token file given as ``flag``; errors name the flag and how to make a token."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(
            f"{flag} {path}: the file does not exist (`fedgrad token --out FILE` makes a token)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag} {path}: cannot read the file: {type(exc).__name__}") from None
    if mode & 0o007:
        logger.warning("token file %s is readable by other users; run: chmod 600 %s", path, path)
    return text
