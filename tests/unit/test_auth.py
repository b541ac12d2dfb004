"""Unit tests of fedgrad.auth: node ids, token files, bearer metadata, TLS identity."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import fedgrad.auth as auth
from fedgrad.auth import (
    OPERATOR_IDENTITY,
    OPERATOR_NAME,
    TOKEN_ENV,
    TokenStore,
    bearer_metadata,
    generate_token,
    hash_token,
    identity_from_auth_context,
    load_node_token,
    load_token_file,
    parse_bearer,
    redact,
    token_file_line,
    validate_node_id,
)
from fedgrad.errors import ConfigError

TOKEN_A = "tok-A-0123456789abcdef"
TOKEN_B = "tok-B-0123456789abcdef"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def test_public_api_is_declared():
    assert sorted(auth.__all__) == auth.__all__
    for name in auth.__all__:
        assert hasattr(auth, name), name


@pytest.mark.parametrize("node_id", ["n1", "a", "node-7.eu_west", "A" * 128, "..", "-x"])
def test_validate_node_id_accepts(node_id):
    assert validate_node_id(node_id) == node_id


@pytest.mark.parametrize(
    "node_id", ["", "A" * 129, "n 1", "a/b", "nöde", "n1\n", "n1\x00", "a:b", 7, None]
)
def test_validate_node_id_rejects(node_id):
    with pytest.raises(ConfigError, match="invalid node id"):
        validate_node_id(node_id)


def test_the_operator_name_is_no_node_id():
    with pytest.raises(ConfigError, match="invalid node id 'operator': reserved for the operator"):
        validate_node_id(OPERATOR_NAME)
    # The operator's identity can never be a node id: every call naming a node is refused.
    with pytest.raises(ConfigError):
        validate_node_id(OPERATOR_IDENTITY)
    assert not auth._NODE_ID_RE.fullmatch(OPERATOR_IDENTITY)


def test_the_operator_token_identifies_the_operator_not_a_node():
    store = TokenStore({"n1": TOKEN_A, OPERATOR_NAME: hash_token(TOKEN_B)})
    assert store.identify(TOKEN_B) == OPERATOR_IDENTITY
    assert store.identify(TOKEN_A) == "n1"
    assert store.node_ids == {"n1"}
    assert not store.verify(OPERATOR_NAME, TOKEN_B)  # the operator is no node
    assert store.verify("n1", TOKEN_A)


def test_token_file_line_is_a_hashed_entry(tmp_path):
    line = token_file_line("n1", TOKEN_A)
    assert line == f"n1 {hash_token(TOKEN_A)}" and TOKEN_A not in line
    assert token_file_line(OPERATOR_NAME, TOKEN_B).startswith("operator sha256:")
    path = write(tmp_path / "tokens.txt", line + "\n" + token_file_line(OPERATOR_NAME, TOKEN_B))
    assert load_token_file(path).identify(TOKEN_B) == OPERATOR_IDENTITY
    with pytest.raises(ConfigError, match="invalid node id"):
        token_file_line("bad id", TOKEN_A)
    with pytest.raises(ConfigError) as info:
        token_file_line("n1", "short")
    assert "short" not in str(info.value) and "fedgrad token" in str(info.value)


def test_validate_node_id_message_is_bounded():
    with pytest.raises(ConfigError) as info:
        validate_node_id("x" * 10_000 + "!")
    assert len(str(info.value)) < 200


def test_generate_token_is_random_and_valid():
    tokens = {generate_token() for _ in range(50)}
    assert len(tokens) == 50
    for token in tokens:
        assert len(token) == 43
        assert parse_bearer(f"Bearer {token}") == token


def test_hash_token_format_and_rejects_bad_tokens():
    hashed = hash_token(TOKEN_A)
    assert hashed.startswith("sha256:") and len(hashed) == 7 + 64
    assert hashed == hash_token(TOKEN_A) != hash_token(TOKEN_B)
    for bad in ["short", "has space in the middle", "sha256:" + "0" * 64, "x" * 1025]:
        with pytest.raises(ConfigError) as info:
            hash_token(bad)
        assert bad not in str(info.value)


def test_verify_correct_wrong_unknown():
    store = TokenStore({"n1": TOKEN_A, "n2": hash_token(TOKEN_B)})
    assert store.verify("n1", TOKEN_A)
    assert store.verify("n2", TOKEN_B)
    assert not store.verify("n1", TOKEN_B)  # another node's token
    assert not store.verify("n2", hash_token(TOKEN_B))  # the hash is not the token
    assert not store.verify("n1", "")
    assert not store.verify("ghost", TOKEN_A)
    assert not store.verify("n1", "\ud800 lone surrogate")


def test_verify_takes_the_same_path_for_unknown_ids(monkeypatch):
    calls = []

    def spy(a, b):
        calls.append((len(a), len(b)))
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    store = TokenStore({"n1": TOKEN_A})
    assert store.verify("n1", TOKEN_A)
    assert not store.verify("n1", "wrong-token-000000")
    assert not store.verify("ghost", TOKEN_A)
    # One fixed-length digest comparison whatever the id or token.
    assert calls == [(32, 32)] * 3


def test_identify_compares_every_entry(monkeypatch):
    store = TokenStore({f"n{i}": f"{TOKEN_A}-{i}" for i in range(5)})
    calls = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert store.identify(f"{TOKEN_A}-0") == "n0"  # first entry: no early exit
    assert len(calls) == 5
    assert store.identify(f"{TOKEN_A}-4") == "n4"
    assert store.identify("nobody-has-this-token") is None
    assert store.identify("") is None
    assert len(calls) == 20


def test_store_never_shows_secrets():
    store = TokenStore({"n1": TOKEN_A, "n2": hash_token(TOKEN_B)})
    for text in (repr(store), str(store), f"{store}", repr([store])):
        assert TOKEN_A not in text and TOKEN_B not in text
        assert hash_token(TOKEN_B)[7:] not in text and "sha256" not in text
    assert repr(store) == "TokenStore(2 nodes)"
    assert not hasattr(store, "__dict__")


def test_store_container_behaviour():
    store = TokenStore({"n2": TOKEN_B, "n1": TOKEN_A})
    assert len(store) == 2 and "n1" in store and "n3" not in store
    assert store.node_ids == frozenset({"n1", "n2"})
    assert list(store) == ["n1", "n2"]


def test_store_rejects_shared_token_and_bad_entries():
    with pytest.raises(ConfigError, match="share one token"):
        TokenStore({"n1": TOKEN_A, "n2": hash_token(TOKEN_A)})
    with pytest.raises(ConfigError, match="invalid node id"):
        TokenStore({"bad id": TOKEN_A})
    with pytest.raises(ConfigError) as info:
        TokenStore({"n1": "short"})
    assert "short" not in str(info.value)


def test_load_token_file_good(tmp_path):
    path = write(
        tmp_path / "tokens.txt",
        "\ufeff# fedgrad tokens\r\n\r\n"
        f"n1 {TOKEN_A}\r\n"
        f"   n2\t{hash_token(TOKEN_B).upper().replace('SHA256:', 'sha256:')}  \n"
        "  # indented comment\n",
    )
    store = load_token_file(path)
    assert store.node_ids == {"n1", "n2"}
    assert store.verify("n1", TOKEN_A) and store.verify("n2", TOKEN_B)
    assert store.identify(TOKEN_B) == "n2"


@pytest.mark.parametrize(
    ("body", "line", "fragment"),
    [
        (f"n1 {TOKEN_A}\n{TOKEN_B}\n", 2, "found 1 fields"),
        (f"n1 {TOKEN_A} # trailing comment\n", 1, "found 5 fields"),
        (f"#\nn1 {TOKEN_A} extra{TOKEN_B}\n", 2, "found 3 fields"),
        (f"\n\nbad/id {TOKEN_B}\n", 3, "invalid node id"),
        ("n1 short-secret\n", 1, "printable ASCII"),
        (f"n1 {TOKEN_A}\nn2 sha256:abc{TOKEN_B}\n", 2, "64 hex digits"),
        (f"n1 {TOKEN_A}\nn1 {TOKEN_B}\n", 2, "duplicate node id (first on line 1)"),
        (f"n1 {TOKEN_B}\nn2 {hash_token(TOKEN_B)}\n", 2, "same token as line 1"),
    ],
)
def test_load_token_file_malformed(tmp_path, body, line, fragment):
    path = write(tmp_path / "tokens.txt", body)
    with pytest.raises(ConfigError) as info:
        load_token_file(path)
    message = str(info.value)
    assert f"{path}:{line}:" in message
    assert fragment in message
    for secret in (TOKEN_A, TOKEN_B, "short-secret", hash_token(TOKEN_B)[7:]):
        assert secret not in message


def test_load_token_file_empty_or_missing(tmp_path):
    with pytest.raises(ConfigError, match="no tokens"):
        load_token_file(write(tmp_path / "empty.txt", "# nothing yet\n\n"))
    with pytest.raises(ConfigError, match="--tokens .*does not exist.*fedgrad token"):
        load_token_file(tmp_path / "missing.txt")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"n1 \xff\xfe" + TOKEN_A.encode())
    with pytest.raises(ConfigError, match="cannot read"):
        load_token_file(binary)


def test_load_token_file_warns_when_others_can_read(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fedgrad.auth")
    load_token_file(write(tmp_path / "private.txt", f"n1 {TOKEN_A}\n", 0o600))
    assert not caplog.records
    load_token_file(write(tmp_path / "shared.txt", f"n1 {TOKEN_A}\n", 0o644))
    assert "chmod 600" in caplog.text
    assert TOKEN_A not in caplog.text


def test_load_node_token_file_env_and_none(tmp_path):
    path = write(tmp_path / "n1.token", f"\n  {TOKEN_A}\n")
    assert load_node_token(path, environ={}) == TOKEN_A
    assert load_node_token(path, environ={TOKEN_ENV: TOKEN_B}) == TOKEN_A  # file wins
    assert load_node_token(None, environ={TOKEN_ENV: f" {TOKEN_B}\n"}) == TOKEN_B
    assert load_node_token(None, environ={TOKEN_ENV: ""}) is None
    assert load_node_token(None, environ={}) is None


def test_load_node_token_rejects_without_echo(tmp_path):
    path = write(tmp_path / "n1.token", f"n1 {TOKEN_A}\n")
    with pytest.raises(ConfigError) as info:
        load_node_token(path, environ={})
    assert TOKEN_A not in str(info.value)
    assert f"--token-file {path}" in str(info.value) and "`fedgrad token`" in str(info.value)
    with pytest.raises(ConfigError, match="--token-file .*does not exist.*fedgrad token"):
        load_node_token(tmp_path / "missing.token", environ={})
    with pytest.raises(ConfigError) as info:
        load_node_token(None, environ={TOKEN_ENV: "tiny"})
    assert TOKEN_ENV in str(info.value) and "tiny" not in str(info.value)


def test_load_node_token_reads_os_environ(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN_A)
    assert load_node_token() == TOKEN_A
    monkeypatch.delenv(TOKEN_ENV)
    assert load_node_token() is None


def test_bearer_round_trip():
    metadata = bearer_metadata(TOKEN_A)
    assert metadata == (("authorization", f"Bearer {TOKEN_A}"),)
    assert parse_bearer(metadata[0][1]) == TOKEN_A


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"bearer {TOKEN_A}", TOKEN_A),
        (f"  BEARER   {TOKEN_A} ", TOKEN_A),
        (f"Bearer {TOKEN_A}".encode(), TOKEN_A),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        (f"Basic {TOKEN_A}", None),
        (f"Bearer {TOKEN_A} {TOKEN_B}", None),
        (f"Bearer{TOKEN_A}", None),
        ("Bearer short", None),
        (b"Bearer \xff\xfe" + TOKEN_A.encode(), None),
        (42, None),
    ],
)
def test_parse_bearer(value, expected):
    assert parse_bearer(value) == expected


@pytest.mark.parametrize("token", ["short", f"{TOKEN_A}\r\nx-evil: 1", f"{TOKEN_A} x", ""])
def test_bearer_metadata_rejects_bad_tokens(token):
    with pytest.raises(ConfigError) as info:
        bearer_metadata(token)
    assert token not in str(info.value) or not token


def test_redact_hides_credentials_only():
    metadata = [
        ("authorization", f"Bearer {TOKEN_A}"),
        ("Authorization", f"Bearer {TOKEN_B}".encode()),
        ("cookie", "session=1"),
        ("x-node", "n1"),
        ("user-agent", "grpc-python"),
    ]
    shown = redact(metadata)
    assert TOKEN_A not in repr(shown) and TOKEN_B not in repr(shown)
    assert shown[:3] == [
        ("authorization", "<redacted>"),
        ("Authorization", "<redacted>"),
        ("cookie", "<redacted>"),
    ]
    assert shown[3:] == metadata[3:]
    assert redact(None) == []
    assert redact(()) == []


def ssl_context(**extra: list[bytes]) -> dict[str, list[bytes]]:
    base = {
        "transport_security_type": [b"ssl"],
        "security_level": [b"TSI_PRIVACY_AND_INTEGRITY"],
        "x509_common_name": [b"n1"],
        "x509_subject": [b"CN=n1"],
    }
    base.update(extra)
    return base


def test_identity_from_auth_context():
    assert identity_from_auth_context(ssl_context()) == "n1"
    assert identity_from_auth_context({}) is None
    assert identity_from_auth_context(ssl_context(transport_security_type=[b"insecure"])) is None
    assert identity_from_auth_context(ssl_context(x509_common_name=[])) is None
    assert identity_from_auth_context(ssl_context(x509_common_name=[b"n1", b"n2"])) is None
    assert identity_from_auth_context(ssl_context(x509_common_name=[b"fedgrad CA"])) is None
    assert identity_from_auth_context(ssl_context(x509_common_name=["n1"])) is None  # type: ignore[list-item]
    assert identity_from_auth_context(ssl_context(x509_common_name=[b"n\xc3\xb6de"])) is None
    operator = ssl_context(x509_common_name=[b"operator"])
    assert identity_from_auth_context(operator) == OPERATOR_IDENTITY
    no_cn = ssl_context()
    del no_cn["x509_common_name"]
    assert identity_from_auth_context(no_cn) is None


def test_environment_is_untouched_by_loading():
    before = dict(os.environ)
    load_node_token(None, environ={TOKEN_ENV: TOKEN_A})
    assert dict(os.environ) == before
