"""The node's TLS files and failed handshakes: say what to fix instead of retrying.

gRPC reports a failed TLS handshake as UNAVAILABLE, the code of a refused connection,
so a node would retry a wrong CA for its whole ``--give-up-after`` budget. The details
grpcio gives (``tests/integration/test_tls_handshake.py`` drives each case against a
real server and pins them):

- the node does not trust the aggregator's certificate (another CA, expired):
  "Tls handshake failed (TSI_PROTOCOL_FAILURE): ... CERTIFICATE_VERIFY_FAILED: <reason>";
- the address is not a name in the aggregator's certificate:
  "Hostname Verification Check failed";
- TLS against a plaintext aggregator: "... WRONG_VERSION_NUMBER ...";
- the aggregator refuses the node's certificate (none, another CA's, expired), or a
  plaintext node dials a TLS aggregator: only "Socket closed", as for a connection
  dropped while it was set up. ``handshake_problem`` then probes the aggregator once
  with Python's ``ssl`` module to tell these apart from a transient drop.
"""

from __future__ import annotations

import re
import socket
import ssl

from fedgrad.config import NodeConfig, parse_hostport
from fedgrad.tlsfiles import read_ca, read_key_pair

__all__ = ["check_tls_files", "handshake_problem"]

#: What every TLS answer ends with: the three things to check.
CHECK = (
    "check that --tls-ca is the CA of the aggregator's certificate, that the node has"
    " --tls-cert/--tls-key if the aggregator requires client certificates"
    " (--tls-client-ca), and that both sides use TLS or neither"
)
# The client preface and an empty SETTINGS frame (RFC 9113, 3.4): a server that
# accepted the TLS session answers with its own SETTINGS.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_VERIFY = re.compile(r"CERTIFICATE_VERIFY_FAILED: ([^:]+)")
_HANDSHAKE_WORDS = ("handshake", "ssl", "tls", "certificate")


def check_tls_files(cfg: NodeConfig) -> None:
    """Read the node's ``--tls-ca``, ``--tls-cert`` and ``--tls-key`` and check them.

    Raises:
        ConfigError: a file is missing, unreadable or not PEM, the certificate and key
            are swapped, or the key is not the certificate's.
    """
    if cfg.tls_ca:
        read_ca(cfg.tls_ca, "--tls-ca")
    if cfg.tls_cert and cfg.tls_key:
        read_key_pair(cfg.tls_cert, cfg.tls_key)


def handshake_problem(details: str, cfg: NodeConfig) -> str | None:
    """Say what is wrong if an UNAVAILABLE with ``details`` was a failed TLS handshake.

    Args:
        details: the status details gRPC gave.
        cfg: the node's config (address and TLS files; a probe may dial the address).

    Returns:
        One sentence: what failed and what to check; None for a failure that may heal
        (connection refused, the aggregator restarting or shutting down).
    """
    lower = details.lower()
    if "socket closed" in lower or "connection reset" in lower:
        return _probe_problem(cfg)
    if "hostname verification" in lower:
        host = parse_hostport(cfg.aggregator)[0]
        return (
            f"the aggregator's certificate does not name {host!r}: dial it by a name or address"
            " its certificate lists (`fedgrad certs init --hosts`)"
        )
    if "wrong_version_number" in lower:
        return (
            "the aggregator does not use TLS but this node does (--tls-ca): both sides use TLS"
            " or neither; give the aggregator --tls-cert/--tls-key, or drop --tls-ca,"
            " --tls-cert and --tls-key here"
        )
    verify = _VERIFY.search(details)
    if verify:
        return (
            f"this node does not accept the aggregator's certificate ({verify.group(1).strip()}):"
            f" check that --tls-ca {cfg.tls_ca} is the CA that signed the aggregator's"
            " --tls-cert (ca.pem of the same `fedgrad certs init`) and that it is valid now"
        )
    if "connection refused" not in lower and any(w in lower for w in _HANDSHAKE_WORDS):
        return f"{details.strip()}; {CHECK}"
    return None


def _probe_problem(cfg: NodeConfig) -> str | None:
    outcome = _probe(cfg)
    if outcome == "other":
        return None
    if not cfg.tls_ca:  # it completed a TLS handshake: the aggregator speaks TLS
        return (
            "the aggregator uses TLS but this node dials plaintext: pass --tls-ca (the"
            " aggregator's CA, e.g. certs/ca.pem) and, if it requires client certificates,"
            " --tls-cert/--tls-key; both sides use TLS or neither"
        )
    if outcome == "answered":  # it accepts this node: the drop was transient
        return None
    if not cfg.tls_cert:
        return (
            "the aggregator requires a client certificate: pass --tls-cert and --tls-key"
            " (e.g. certs/nodes/NODE.pem and certs/nodes/NODE.key from `fedgrad certs init`)"
        )
    return (
        f"the aggregator refused this node's certificate --tls-cert {cfg.tls_cert}: it must"
        " be signed by the aggregator's --tls-client-ca and be valid now (not expired)"
    )


def _probe(cfg: NodeConfig) -> str:
    """Dial once over TLS 1.3 with this node's certificate; say how the aggregator answered.

    Returns:
        "answered": it completed the handshake and sent HTTP/2 SETTINGS;
        "closed": it completed the handshake, then closed without a word (with TLS 1.3 a
        server checks the client's certificate after the client's side of the handshake
        is done, and gRPC sends no alert);
        "other": anything else (unreachable, not TLS, no answer in time).
    """
    host, port = parse_hostport(cfg.aggregator)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # gRPC checks the aggregator's certificate itself (a failure there has its own
    # details); the probe only learns what the aggregator thinks of this node.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    if cfg.tls_ca and cfg.tls_cert and cfg.tls_key:
        context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    try:
        raw = socket.create_connection((host, port), timeout=min(cfg.call_timeout, 5.0))
    except OSError:
        return "other"
    with raw:
        try:
            tls = context.wrap_socket(raw, server_hostname=host)
        except OSError:  # ssl.SSLError included: it does not speak TLS 1.3
            return "other"
        with tls:
            try:
                tls.sendall(_H2_PREFACE)
                answer = tls.recv(9)
            except TimeoutError:
                return "other"
            except OSError:  # reset, or an SSL EOF: closed on us
                answer = b""
    return "answered" if answer else "closed"
