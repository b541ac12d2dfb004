"""Security of a real federation: TLS, mutual TLS identity, tokens, secure defaults.

Every test runs real fedgrad aggregators (``ServerThread`` via the ``serve`` fixture,
or ``fedgrad aggregator`` processes) on 127.0.0.1 port 0 and real nodes (``Node`` or
``fedgrad node`` processes), with certificates made in the test by
``fedgrad.certs.init_federation`` or ``fedgrad certs init``. Plain-grpc handshake
cases (no fedgrad service) live in ``test_tls_handshake.py`` and are not repeated.

What "allowed" means here: with mutual TLS alone every certificate signed by the
federation's CA is a node (the CA is the allow-list); with a token file, only the
nodes listed in it (see ``test_mtls_only_admits_every_certificate_of_the_ca``).
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedgrad.auth import bearer_metadata, generate_token, hash_token
from fedgrad.certs import (
    cert_to_pem,
    init_federation,
    key_to_pem,
    load_key_cert,
    make_ca,
    make_client_cert,
)
from fedgrad.client.node import Node, NodeResult
from fedgrad.codec import manifest_from_proto
from fedgrad.config import NodeConfig
from fedgrad.errors import ConfigError, RefusedError
from fedgrad.launch.commands import aggregator_config
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.proto import fedgrad_pb2_grpc as pb_grpc
from fedgrad.task import load_task

TIMEOUT = 20.0
ROUNDS = 3
#: Bound on a whole federation run (threads or processes); never reached when things work.
RUN_TIMEOUT = 90.0
NODES = ("n1", "n2", "n3")
OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


# -- certificates and tokens -----------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    """The files ``init_federation`` wrote for n1, n2 and n3."""

    dir: Path

    @property
    def ca(self) -> str:
        return str(self.dir / "ca.pem")

    @property
    def server(self) -> dict[str, str]:
        """``AggregatorConfig`` fields for TLS with this CA's server certificate."""
        return {"tls_cert": str(self.dir / "server.pem"), "tls_key": str(self.dir / "server.key")}

    @property
    def mtls(self) -> dict[str, str]:
        """``AggregatorConfig`` fields for mutual TLS (client certificates required)."""
        return self.server | {"tls_client_ca": self.ca}

    def cert(self, node: str) -> str:
        return str(self.dir / "nodes" / f"{node}.pem")

    def key(self, node: str) -> str:
        return str(self.dir / "nodes" / f"{node}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("pki") / "certs"
    init_federation(out, NODES)
    return Pki(out)


@dataclass(frozen=True)
class Tokens:
    """A token file listing n1 (plaintext) and n2 (hashed); n3 has a token but no entry."""

    path: Path
    of: dict[str, str]

    def md(self, node: str) -> tuple[tuple[str, str]]:
        return bearer_metadata(self.of[node])


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Tokens:
    of = {node: generate_token() for node in NODES}
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text(f"# test federation\nn1 {of['n1']}\nn2 {hash_token(of['n2'])}\n")
    path.chmod(0o600)
    return Tokens(path, of)


def _write_pair(directory: Path, name: str, pair: Any) -> tuple[str, str]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(cert_to_pem(pair.cert))
    key.write_bytes(key_to_pem(pair.key))
    key.chmod(0o600)
    return str(cert), str(key)


@dataclass(frozen=True)
class Intruders:
    """Client certificates that must not get in: (cert path, key path) each."""

    foreign: tuple[str, str]  # CN n1, signed by another CA
    expired: tuple[str, str]  # CN n1, signed by the federation's CA, expired


@pytest.fixture(scope="module")
def intruders(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Intruders:
    out = tmp_path_factory.mktemp("intruders")
    foreign_ca = make_ca("someone else's CA", days=30)
    ca = load_key_cert(pki.dir / "ca.pem", pki.dir / "ca.key")
    now = dt.datetime.now(dt.UTC)
    expired = make_client_cert(ca, "n1", days=1, valid_from=now - dt.timedelta(days=3))
    return Intruders(
        foreign=_write_pair(out, "foreign-n1", make_client_cert(foreign_ca, "n1")),
        expired=_write_pair(out, "expired-n1", expired),
    )


# -- channels and calls ----------------------------------------------------------------------
def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def tls(ca: str, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    """Channel credentials trusting ``ca``, with a client certificate if one is given."""
    return grpc.ssl_channel_credentials(
        _read(ca), private_key=_read(key), certificate_chain=_read(cert)
    )


@pytest.fixture
def dial() -> Iterator[Callable[..., pb_grpc.AggregatorStub]]:
    """Factory ``dial(address, ca=None, cert=None, key=None)``: a stub on a fresh channel.

    Without ``ca`` the channel is plaintext. Channels close at teardown.
    """
    channels: list[grpc.Channel] = []

    def factory(
        address: str, ca: str | None = None, cert: str | None = None, key: str | None = None
    ) -> pb_grpc.AggregatorStub:
        if ca is None:
            channel = grpc.insecure_channel(address)
        else:
            channel = grpc.secure_channel(address, tls(ca, cert, key))
        channels.append(channel)
        return pb_grpc.AggregatorStub(channel)

    yield factory
    for channel in channels:
        channel.close()


Metadata = Sequence[tuple[str, str]]


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    """Run one RPC; return OK or the status code it failed with."""
    try:
        result = call()
        if isinstance(result, Iterator):
            for _ in result:
                pass
    except grpc.RpcError as exc:
        return exc.code()
    return OK


def join(stub: pb_grpc.AggregatorStub, node: str, md: Metadata = ()) -> pb.JoinReply:
    return stub.Join(pb.JoinRequest(node_id=node, num_samples=8), timeout=TIMEOUT, metadata=md)


def pull(stub: pb_grpc.AggregatorStub, node: str, md: Metadata = ()) -> list[pb.ParameterMessage]:
    request = pb.PullRequest(node_id=node, min_round=0)
    return list(stub.PullParameters(request, timeout=TIMEOUT, metadata=md))


def leave(stub: pb_grpc.AggregatorStub, node: str, md: Metadata = ()) -> pb.LeaveReply:
    return stub.Leave(pb.LeaveRequest(node_id=node), timeout=TIMEOUT, metadata=md)


def status(stub: pb_grpc.AggregatorStub, md: Metadata = ()) -> pb.StatusReply:
    return stub.GetStatus(pb.StatusRequest(), timeout=TIMEOUT, metadata=md)


def push(
    stub: pb_grpc.AggregatorStub,
    node: str,
    reply: pb.JoinReply,
    wire: Any,
    md: Metadata = (),
) -> pb.PushReply:
    """Upload a zero gradient (finite, well-formed) for the reply's round as ``node``."""
    specs = manifest_from_proto(reply.manifest)
    grads = [torch.zeros(s.shape, dtype=s.dtype) for s in specs]
    head = wire.header(reply.round, node, num_samples=8)
    messages = wire.upload(head, wire.chunks(specs, grads, reply.chunk_bytes))
    return stub.PushGradients(iter(messages), timeout=TIMEOUT, metadata=md)


def serving(address: str, ca: str, cert: str, key: str) -> bool:
    """Ask the standard health service over mutual TLS whether the aggregator serves."""
    with grpc.secure_channel(address, tls(ca, cert, key)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT
        )
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_round(served: Any, round_: int, timeout: float = TIMEOUT) -> None:
    """Wait until the aggregator has published ``round_`` (rounds close in the background)."""
    deadline = time.monotonic() + timeout
    while served.call(lambda: served.core.round) < round_:
        assert time.monotonic() < deadline, f"round {round_} not published within {timeout} s"
        time.sleep(0.01)


# -- federations of real nodes ---------------------------------------------------------------
def node_config(address: str, node: str, index: int, count: int, **kw: Any) -> NodeConfig:
    return NodeConfig(
        task="linear",
        aggregator=address,
        node_id=node,
        shard=(index, count),
        give_up_after=kw.pop("give_up_after", 15.0),
        round_wait=TIMEOUT,
        **kw,
    )


def train(configs: Sequence[NodeConfig], timeout: float = RUN_TIMEOUT) -> dict[str, NodeResult]:
    """Run one ``Node`` thread per config until the aggregator finishes; return the results.

    Raises:
        AssertionError: a node failed or did not finish within ``timeout``.
    """
    results: dict[str, NodeResult] = {}
    errors: list[BaseException] = []

    def run(cfg: NodeConfig) -> None:
        try:
            node = Node(load_task("linear", seed=cfg.seed), cfg)
            try:
                results[cfg.node_id] = node.run()
            finally:
                node.close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not [t for t in threads if t.is_alive()], f"nodes still running after {timeout} s"
    assert not errors, errors
    return results


def assert_trained(served: Any, results: dict[str, NodeResult], nodes: Sequence[str]) -> None:
    """Every node uploaded in every round and the aggregator stepped ``ROUNDS`` times."""
    assert sorted(results) == sorted(nodes)
    for result in results.values():
        assert result.final_round == ROUNDS
        assert result.uploads == ROUNDS
    history = served.call(lambda: list(served.core.history))
    assert [r.round for r in history] == list(range(ROUNDS))
    assert all(r.nodes == len(nodes) for r in history)
    # Training did something: the held-out loss of the linear task went down.
    assert history[-1].test_loss < history[0].test_loss


# -- TLS and mutual TLS end to end -----------------------------------------------------------
def test_tls_only_federation_trains_and_refuses_plaintext(serve, dial, pki):
    served = serve("linear", nodes=2, rounds=ROUNDS, **pki.server)
    # A plaintext client never reaches the service: the TLS handshake fails.
    assert code_of(lambda: join(dial(served.address), "n1")) == UNAVAILABLE
    # TLS alone encrypts but does not authenticate: anyone who trusts the CA may join as
    # any node id (this one leaves again, so the quorum does not wait for it).
    anybody = dial(served.address, pki.ca)
    join(anybody, "anybody")
    leave(anybody, "anybody")
    configs = [node_config(served.address, n, i, 2, tls_ca=pki.ca) for i, n in enumerate(NODES[:2])]
    assert_trained(served, train(configs), NODES[:2])


def test_mtls_federation_trains_end_to_end(serve, pki):
    served = serve("linear", nodes=2, rounds=ROUNDS, **pki.mtls)
    configs = [
        node_config(
            served.address, n, i, 2, tls_ca=pki.ca, tls_cert=pki.cert(n), tls_key=pki.key(n)
        )
        for i, n in enumerate(NODES[:2])
    ]
    assert_trained(served, train(configs), NODES[:2])


def test_mtls_identity_is_the_certificate_common_name(serve, dial, pki, wire, caplog):
    served = serve("linear", nodes=2, rounds=ROUNDS, **pki.mtls)
    as_n1 = dial(served.address, pki.ca, pki.cert("n1"), pki.key("n1"))
    as_n2 = dial(served.address, pki.ca, pki.cert("n2"), pki.key("n2"))
    # n1's certificate cannot join as n2, nor as a node nobody enrolled.
    assert code_of(lambda: join(as_n1, "n2")) == PERMISSION_DENIED
    assert code_of(lambda: join(as_n1, "stranger")) == PERMISSION_DENIED
    assert served.call(lambda: sorted(served.core.nodes)) == []
    join(as_n1, "n1")
    reply = join(as_n2, "n2")  # round 0 opens
    # ... nor pull, push or leave as n2 once n2 is a member.
    assert code_of(lambda: pull(as_n1, "n2")) == PERMISSION_DENIED
    assert code_of(lambda: push(as_n1, "n2", reply, wire)) == PERMISSION_DENIED
    assert code_of(lambda: leave(as_n1, "n2")) == PERMISSION_DENIED
    state = served.call(lambda: (served.core.nodes["n2"].state, dict(served.core.reported)))
    assert state == ("active", {}), "a refused call must leave no trace"
    # Each as itself: the round closes with both uploads.
    assert push(as_n1, "n1", reply, wire).round == 0
    assert push(as_n2, "n2", reply, wire).round == 0
    wait_round(served, 1)
    rejected = [r for r in caplog.records if getattr(r, "event", None) == "reject"]
    assert [r.reason for r in rejected] == [PERMISSION_DENIED.name] * 5
    assert {r.node for r in rejected} == {"n2", "stranger"}


def test_mtls_only_admits_every_certificate_of_the_ca(serve, dial, pki):
    # Gap (reported): without a token file there is no allow-list. The federation was
    # made for n1 and n2 (nodes=2), yet n3's certificate from the same CA joins and
    # counts towards the quorum. Removing a node means a new CA, or using --tokens.
    served = serve("linear", nodes=2, rounds=ROUNDS, **pki.mtls)
    as_n3 = dial(served.address, pki.ca, pki.cert("n3"), pki.key("n3"))
    join(as_n3, "n3")
    assert served.call(lambda: sorted(served.core.nodes)) == ["n3"]


def test_stolen_credentials_are_worth_one_node(serve, dial, pki, wire):
    # A thief with copies of n1.pem/n1.key is n1 to the aggregator, and nobody else.
    served = serve("linear", nodes=2, rounds=ROUNDS, **pki.mtls)
    thief = dial(served.address, pki.ca, pki.cert("n1"), pki.key("n1"))
    real_n1 = dial(served.address, pki.ca, pki.cert("n1"), pki.key("n1"))
    n2 = dial(served.address, pki.ca, pki.cert("n2"), pki.key("n2"))
    assert code_of(lambda: join(thief, "n2")) == PERMISSION_DENIED
    join(real_n1, "n1")
    reply = join(n2, "n2")  # round 0 opens
    # fedgrad's node uses the upload id NODE.rROUND.SESSION[:12]: predictable by a thief.
    predictable = f"n1.r0.{reply.session_id[:12]}"

    def upload(stub: pb_grpc.AggregatorStub, node: str, upload_id: str) -> pb.PushReply:
        specs = manifest_from_proto(reply.manifest)
        grads = [torch.full(s.shape, 1.0, dtype=s.dtype) for s in specs]
        head = wire.header(0, node, upload_id=upload_id, num_samples=8)
        messages = wire.upload(head, wire.chunks(specs, grads, reply.chunk_bytes))
        return stub.PushGradients(iter(messages), timeout=TIMEOUT)

    # The thief's upload counts as n1's vote for the round ...
    assert not upload(thief, "n1", predictable).duplicate
    # ... the real n1 is refused a second vote, or told its own upload was a duplicate.
    with pytest.raises(grpc.RpcError) as info:
        upload(real_n1, "n1", "n1.other")
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert upload(real_n1, "n1", predictable).duplicate
    # One stolen credential, one vote: n2's upload still counts and closes the round.
    assert upload(n2, "n2", "n2.r0").round == 0
    wait_round(served, 1)
    assert served.call(lambda: served.core.history[-1].nodes) == 2


# -- tokens ----------------------------------------------------------------------------------
def test_tokens_missing_wrong_right_and_other_nodes(serve, dial, pki, tokens, wire, caplog):
    caplog.set_level(logging.DEBUG)
    served = serve("linear", nodes=2, rounds=ROUNDS, tokens=str(tokens.path), **pki.server)
    stub = dial(served.address, pki.ca)
    n1, n2 = tokens.md("n1"), tokens.md("n2")
    wrong = bearer_metadata(generate_token())
    # Missing, wrong or malformed credentials: UNAUTHENTICATED, on every method.
    for md in [(), wrong, tokens.md("n3"), (("authorization", "Basic bjE6cGFzc3dvcmQ="),)]:
        assert code_of(lambda md=md: join(stub, "n1", md)) == UNAUTHENTICATED
        assert code_of(lambda md=md: pull(stub, "n1", md)) == UNAUTHENTICATED
        assert code_of(lambda md=md: leave(stub, "n1", md)) == UNAUTHENTICATED
        assert code_of(lambda md=md: status(stub, md)) == UNAUTHENTICATED
    # Two authorization headers are ambiguous: refused even if one is right.
    assert code_of(lambda: join(stub, "n1", n1 + wrong)) == UNAUTHENTICATED
    # The right token works (n2's is stored hashed in the file).
    join(stub, "n1", n1)
    reply = join(stub, "n2", n2)
    assert status(stub, n1).round == 0
    # n1's token cannot act as n2 (or as a node without a token).
    for call in (join, pull, leave):
        assert code_of(lambda call=call: call(stub, "n2", n1)) == PERMISSION_DENIED
    assert code_of(lambda: join(stub, "n3", n1)) == PERMISSION_DENIED
    assert code_of(lambda: push(stub, "n2", reply, wire, n1)) == PERMISSION_DENIED
    assert code_of(lambda: push(stub, "n1", reply, wire)) == UNAUTHENTICATED
    assert served.call(lambda: dict(served.core.reported)) == {}
    # The federation still trains with real nodes that hold the right tokens.
    configs = [
        node_config(served.address, n, i, 2, tls_ca=pki.ca, token=tokens.of[n])
        for i, n in enumerate(NODES[:2])
    ]
    assert_trained(served, train(configs), NODES[:2])
    # Every refusal is logged with its reason, and no token is in any log record.
    reasons = {r.reason for r in caplog.records if getattr(r, "event", None) == "reject"}
    assert reasons == {UNAUTHENTICATED.name, PERMISSION_DENIED.name}
    assert_no_token_in_logs(caplog, tokens)


def assert_no_token_in_logs(caplog: pytest.LogCaptureFixture, tokens: Tokens) -> None:
    assert caplog.records, "nothing was logged: the check would be vacuous"
    for record in caplog.records:
        seen = f"{record.getMessage()} {record.__dict__!r}"
        for node, token in tokens.of.items():
            assert token not in seen, f"{node}'s token logged by {record.name}: {record.msg!r}"
    for node, token in tokens.of.items():
        assert token not in caplog.text, f"{node}'s token is in the log"


def test_mtls_with_tokens_needs_both_for_the_same_node(serve, dial, pki, tokens, caplog):
    caplog.set_level(logging.DEBUG)
    served = serve("linear", nodes=2, rounds=ROUNDS, tokens=str(tokens.path), **pki.mtls)
    as_n1 = dial(served.address, pki.ca, pki.cert("n1"), pki.key("n1"))
    as_n3 = dial(served.address, pki.ca, pki.cert("n3"), pki.key("n3"))
    # A certificate alone is not enough once tokens are required.
    assert code_of(lambda: join(as_n1, "n1")) == UNAUTHENTICATED
    # Certificate and token of different nodes: neither may speak for the other.
    assert code_of(lambda: join(as_n1, "n1", tokens.md("n2"))) == PERMISSION_DENIED
    assert code_of(lambda: join(as_n1, "n2", tokens.md("n2"))) == PERMISSION_DENIED
    # A valid certificate for a node that is not in the token file is not allowed.
    assert code_of(lambda: join(as_n3, "n3")) == UNAUTHENTICATED
    assert code_of(lambda: join(as_n3, "n3", tokens.md("n3"))) == UNAUTHENTICATED
    assert code_of(lambda: join(as_n3, "n1", tokens.md("n1"))) == PERMISSION_DENIED
    assert served.call(lambda: sorted(served.core.nodes)) == []
    join(as_n1, "n1", tokens.md("n1"))
    assert served.call(lambda: sorted(served.core.nodes)) == ["n1"]
    assert_no_token_in_logs(caplog, tokens)


# -- failed clients leave the federation running ---------------------------------------------
def test_refused_clients_leave_the_federation_running(serve, dial, pki, tokens, intruders, caplog):
    served = serve("linear", nodes=2, rounds=ROUNDS, tokens=str(tokens.path), **pki.mtls)
    address = served.address
    attempts = {
        "plaintext client": (dial(address), tokens.md("n1"), UNAVAILABLE),
        "server-only TLS client": (dial(address, pki.ca), tokens.md("n1"), UNAVAILABLE),
        "foreign CA certificate": (dial(address, pki.ca, *intruders.foreign), (), UNAVAILABLE),
        "expired certificate": (dial(address, pki.ca, *intruders.expired), (), UNAVAILABLE),
        "valid certificate, node not in the token file": (
            dial(address, pki.ca, pki.cert("n3"), pki.key("n3")),
            tokens.md("n3"),
            UNAUTHENTICATED,
        ),
    }
    for name, (stub, md, expected) in attempts.items():
        assert code_of(lambda stub=stub, md=md: join(stub, "n1", md)) == expected, name
        assert serving(address, pki.ca, pki.cert("n1"), pki.key("n1")), name
    # A real node with the expired certificate gives up with a clear error.
    expired = node_config(
        address,
        "n1",
        0,
        2,
        tls_ca=pki.ca,
        tls_cert=intruders.expired[0],
        tls_key=intruders.expired[1],
        token=tokens.of["n1"],
        give_up_after=1.0,
    )
    with pytest.raises(RefusedError, match="refused this node's certificate"):
        Node(load_task("linear"), expired).run()
    # Nothing joined; the legitimate nodes then train every round.
    assert served.call(lambda: sorted(served.core.nodes)) == []
    configs = [
        node_config(
            address,
            n,
            i,
            2,
            tls_ca=pki.ca,
            tls_cert=pki.cert(n),
            tls_key=pki.key(n),
            token=tokens.of[n],
        )
        for i, n in enumerate(NODES[:2])
    ]
    assert_trained(served, train(configs), NODES[:2])
    # The refusal that reached fedgrad is logged with its reason (handshake failures are
    # logged by gRPC core on stderr only; see test_cli_certs_init_then_mtls_federation).
    rejected = [r for r in caplog.records if getattr(r, "event", None) == "reject"]
    assert [(r.node, r.reason) for r in rejected] == [("n1", UNAUTHENTICATED.name)]


# -- secure by default -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "listen", ["0.0.0.0:50051", "[::]:50051", ":50051", "192.0.2.7:50051", "agg.example.org:1"]
)
def test_plaintext_refused_off_loopback(listen):
    with pytest.raises(ConfigError, match="refusing to serve plaintext"):
        aggregator_config({"task": "linear", "listen": listen})
    # --insecure or TLS lifts the refusal.
    assert aggregator_config({"task": "linear", "listen": listen, "insecure": True})
    assert aggregator_config(
        {"task": "linear", "listen": listen, "tls_cert": "s.pem", "tls_key": "s.key"}
    )


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.0.0.2:50051", "localhost:0", "[::1]:0"])
def test_plaintext_allowed_on_loopback(listen):
    assert aggregator_config({"task": "linear", "listen": listen}).listen == listen


@pytest.mark.parametrize(
    "listen", ["localhost.attacker.example:50051", "127.0.0.1.attacker.example:50051"]
)
def test_plaintext_refused_on_names_that_only_look_like_loopback(listen):
    # Bug (reported): commands.aggregator_config tests host.startswith(("127.", "localhost",
    # ...)), so any DNS name that starts like loopback passes and may resolve anywhere.
    with pytest.raises(ConfigError, match="refusing to serve plaintext"):
        aggregator_config({"task": "linear", "listen": listen})


def test_cli_refuses_plaintext_on_all_interfaces_and_says_how_to_fix(cli, tmp_path):
    port_file = tmp_path / "port"
    argv = [*cli.argv, "aggregator", "--task", "linear", "--listen", "0.0.0.0:0"]
    done = subprocess.run(
        [*argv, "--port-file", str(port_file)],
        env=cli.env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert done.returncode == 2, done.stderr
    assert "refusing to serve plaintext on 0.0.0.0:0" in done.stderr
    for hint in ("fedgrad certs init", "--tls-cert", "--tls-key", "--tls-client-ca", "--insecure"):
        assert hint in done.stderr, hint
    assert "Traceback" not in done.stderr
    assert not port_file.exists(), "nothing may listen"


def test_cli_insecure_flag_serves_plaintext_on_all_interfaces(cli, spawn, tmp_path):
    port_file = tmp_path / "port"
    agg = spawn(
        *cli.argv,
        "aggregator",
        "--task",
        "linear",
        "--listen",
        "0.0.0.0:0",
        "--insecure",
        "--port-file",
        port_file,
        "--no-progress",
    )
    port = cli.wait_port(port_file, agg)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    agg.send_signal(signal.SIGTERM)
    _, err = agg.communicate(timeout=RUN_TIMEOUT)
    assert agg.returncode == 0, err


# -- the CLI end to end: certs init, then a mutual-TLS federation of processes ---------------
def test_cli_certs_init_then_mtls_federation(cli, spawn, tmp_path, intruders):
    certs = tmp_path / "certs"
    made = subprocess.run(
        [*cli.argv, "certs", "init", "--out", str(certs), "--nodes", "n1,n2"],
        env=cli.env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert made.returncode == 0, made.stderr
    files = ["ca.pem", "ca.key", "server.pem", "server.key"]
    files += [f"nodes/{n}.{ext}" for n in ("n1", "n2") for ext in ("pem", "key")]
    for name in files:
        path = certs / name
        assert path.is_file() and name in made.stdout, name
        if name.endswith(".key"):
            assert path.stat().st_mode & 0o077 == 0, f"{name} is readable by others"
    # Tokens as well: n1 from a file, n2 from FEDGRAD_TOKEN; the aggregator stores n2 hashed.
    of = {"n1": generate_token(), "n2": generate_token()}
    token_file = tmp_path / "tokens.txt"
    token_file.write_text(f"n1 {of['n1']}\nn2 {hash_token(of['n2'])}\n")
    n1_token = tmp_path / "n1.token"
    n1_token.write_text(of["n1"] + "\n")
    for path in (token_file, n1_token):
        path.chmod(0o600)
    port_file = tmp_path / "port"
    model = tmp_path / "model.safetensors"
    # gRPC core's own log level at its default: that is where handshake failures show up.
    agg_env = {k: v for k, v in cli.env().items() if k not in ("GRPC_VERBOSITY", "GRPC_TRACE")}
    agg = spawn(
        *cli.argv,
        "aggregator",
        "--task",
        "linear",
        "--listen",
        "127.0.0.1:0",
        "--port-file",
        port_file,
        "--nodes",
        "2",
        "--rounds",
        str(ROUNDS),
        "--tls-cert",
        certs / "server.pem",
        "--tls-key",
        certs / "server.key",
        "--tls-client-ca",
        certs / "ca.pem",
        "--tokens",
        token_file,
        "--save",
        model,
        "--no-progress",
        env=agg_env,
    )
    address = f"127.0.0.1:{cli.wait_port(port_file, agg)}"
    # Refused before the nodes start; none of it stops the federation.
    ca, n1_pair = str(certs / "ca.pem"), (str(certs / "nodes/n1.pem"), str(certs / "nodes/n1.key"))
    probes = [
        (None, (), UNAVAILABLE),
        (intruders.foreign, (), UNAVAILABLE),
        (n1_pair, bearer_metadata(generate_token()), UNAUTHENTICATED),
        (n1_pair, bearer_metadata(of["n2"]), PERMISSION_DENIED),
    ]
    for pair, md, expected in probes:
        with (
            grpc.secure_channel(address, tls(ca, *pair)) if pair else grpc.insecure_channel(address)
        ) as channel:
            stub = pb_grpc.AggregatorStub(channel)
            assert code_of(lambda stub=stub, md=md: join(stub, "n1", md)) == expected
    nodes = {}
    for i, n in enumerate(("n1", "n2")):
        token = ["--token-file", str(n1_token)] if n == "n1" else []
        nodes[n] = spawn(
            *cli.argv,
            "node",
            "--task",
            "linear",
            "--aggregator",
            address,
            "--node-id",
            n,
            "--shard",
            f"{i}/2",
            "--tls-ca",
            ca,
            "--tls-cert",
            certs / f"nodes/{n}.pem",
            "--tls-key",
            certs / f"nodes/{n}.key",
            *token,
            env=cli.env(**({"FEDGRAD_TOKEN": of["n2"]} if n == "n2" else {})),
        )
    outputs = {name: p.communicate(timeout=RUN_TIMEOUT) for name, p in nodes.items()}
    outputs["aggregator"] = agg.communicate(timeout=RUN_TIMEOUT)
    for name, proc in [*nodes.items(), ("aggregator", agg)]:
        assert proc.returncode == 0, f"{name}:\n{outputs[name][1]}"
    agg_err = outputs["aggregator"][1]
    assert f"round {ROUNDS - 1} closed ({ROUNDS} of {ROUNDS})" in agg_err
    assert model.is_file()
    for name in ("n1", "n2"):
        assert f"{ROUNDS} uploads, final round {ROUNDS}" in outputs[name][1]
    # Refusals are logged: by fedgrad (token problems) and by gRPC core (handshakes).
    assert "reason=UNAUTHENTICATED" in agg_err and "reason=PERMISSION_DENIED" in agg_err
    assert "Handshake failed" in agg_err
    # No token in any output of any process.
    for name, (out, err) in outputs.items():
        for node, token in of.items():
            assert token not in out + err, f"{node}'s token appears in the output of {name}"


def test_cli_node_with_wrong_token_fails_cleanly_without_echoing_it(cli, spawn, serve, tmp_path):
    # Bug (reported): the node CLI lets grpc.RpcError escape as a traceback; it should
    # print one line "fedgrad node: ... UNAUTHENTICATED ..." and exit 1, like other errors.
    good, bad = generate_token(), generate_token()
    token_file = tmp_path / "tokens.txt"
    token_file.write_text(f"n1 {good}\n")
    token_file.chmod(0o600)
    served = serve("linear", tokens=str(token_file))
    node = spawn(
        *cli.argv,
        "node",
        "--task",
        "linear",
        "--aggregator",
        served.address,
        "--node-id",
        "n1",
        env=cli.env(FEDGRAD_TOKEN=bad),
    )
    out, err = node.communicate(timeout=RUN_TIMEOUT)
    assert node.returncode == 1, err
    assert "UNAUTHENTICATED" in err
    assert bad not in out + err and good not in out + err
    assert "Traceback" not in err, f"a traceback instead of an error message:\n{err}"


def test_allow_nodes_refuses_valid_credentials_of_other_nodes(serve, dial, pki, tokens, caplog):
    # n1 and n2 both hold valid tokens, but only n1 is on the --allow-nodes list.
    served = serve(
        "linear", nodes=1, rounds=ROUNDS, tokens=str(tokens.path), allow_nodes=("n1",), **pki.server
    )
    stub = dial(served.address, pki.ca)
    assert code_of(lambda: join(stub, "n2", tokens.md("n2"))) == PERMISSION_DENIED
    assert code_of(lambda: status(stub, tokens.md("n2"))) == PERMISSION_DENIED
    assert served.call(lambda: sorted(served.core.nodes)) == []
    assert join(stub, "n1", tokens.md("n1")).round == 0
    assert served.call(lambda: sorted(served.core.nodes)) == ["n1"]
    assert any("allow-nodes" in r.getMessage() for r in caplog.records)


def test_allow_nodes_without_credentials_checks_the_claimed_id(serve, connect):
    served = serve("linear", nodes=1, rounds=ROUNDS, allow_nodes=("a",))
    stub = connect(served)
    with pytest.raises(grpc.RpcError) as info:
        stub.Join(pb.JoinRequest(node_id="b", num_samples=1), timeout=TIMEOUT)
    assert info.value.code() == PERMISSION_DENIED
    assert stub.Join(pb.JoinRequest(node_id="a", num_samples=1), timeout=TIMEOUT).round == 0
