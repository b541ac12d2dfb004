"""The first hour: each start-up mistake is one line on stderr saying what to fix.

Real ``fedgrad aggregator`` / ``fedgrad node`` processes with real certificate files
(``fedgrad.certs.init_federation``), a port really taken by a listening socket, and real
aggregators on 127.0.0.1 port 0. A mistake in the configuration is a ``ConfigError``
at start-up: exit code 2, one line, no traceback. A failed TLS handshake is a refusal:
exit code 1 at once, one line saying what to check, instead of retries for
``--give-up-after`` seconds.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedgrad.certs import init_federation

LOCAL = "127.0.0.1"
#: How long one process may take (torch's import on a busy 2-core machine); far below the
#: --give-up-after of the TLS cases, which must stop long before their budget runs out.
RUN_TIMEOUT = 180.0
GIVE_UP_AFTER = "600"
#: How long all the start-up cases together may take; they run at once.
ALL_CASES_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    init_federation(out, ["n1"], [LOCAL, "localhost"])
    (out / "a-folder").mkdir()  # a path that exists but cannot be read as a file, even by root
    (out / "junk.pem").write_text("not a certificate\n")
    return out


def _aggregator(*extra: str) -> list[str]:
    return ["aggregator", "--task", "linear", "--listen", f"{LOCAL}:0", "--no-progress", *extra]


def _node(*extra: str) -> list[str]:
    # {closed}: nothing listens there; the node must fail before it dials anyway.
    return ["node", "--task", "linear", "--aggregator", f"{LOCAL}:{{closed}}", *extra]


def _cases(c: Path) -> dict[str, tuple[list[str], list[str]]]:
    """case -> (fedgrad arguments, texts the one line must contain)."""
    cert, key, ca = str(c / "server.pem"), str(c / "server.key"), str(c / "ca.pem")
    n1, n1_key = str(c / "nodes/n1.pem"), str(c / "nodes/n1.key")
    folder, junk, missing = str(c / "a-folder"), str(c / "junk.pem"), str(c / "missing.pem")
    a, n = _aggregator, _node
    return {
        "aggregator: missing certificate": (
            a("--tls-cert", missing, "--tls-key", key),
            [f"--tls-cert {missing}", "No such file"],
        ),
        "aggregator: unreadable key": (
            a("--tls-cert", cert, "--tls-key", folder),
            [f"--tls-key {folder}", "cannot read"],
        ),
        "aggregator: missing client CA": (
            a("--tls-cert", cert, "--tls-key", key, "--tls-client-ca", missing),
            [f"--tls-client-ca {missing}", "No such file"],
        ),
        "aggregator: client CA is not PEM": (
            a("--tls-cert", cert, "--tls-key", key, "--tls-client-ca", junk),
            [f"--tls-client-ca {junk}", "not a PEM CA certificate"],
        ),
        "aggregator: certificate and key swapped": (
            a("--tls-cert", key, "--tls-key", cert),
            ["swapped", "pass the certificate to --tls-cert and its key to --tls-key"],
        ),
        "aggregator: key of another certificate": (
            a("--tls-cert", cert, "--tls-key", n1_key),
            [f"{n1_key} is not the key of {cert}"],
        ),
        "aggregator: port in use": (
            ["aggregator", "--task", "linear", "--listen", f"{LOCAL}:{{busy}}"],
            ["port {busy} is already in use", "--listen"],
        ),
        "aggregator: listen without a port": (
            ["aggregator", "--task", "linear", "--listen", "localhost"],
            ["HOST:PORT", "'localhost'"],
        ),
        "node: missing CA": (n("--tls-ca", missing), [f"--tls-ca {missing}", "No such file"]),
        "node: CA is not PEM": (n("--tls-ca", junk), [f"--tls-ca {junk}", "not a PEM"]),
        "node: unreadable key": (
            n("--tls-ca", ca, "--tls-cert", n1, "--tls-key", folder),
            [f"--tls-key {folder}", "cannot read"],
        ),
        "node: certificate and key swapped": (
            n("--tls-ca", ca, "--tls-cert", n1_key, "--tls-key", n1),
            ["swapped"],
        ),
        "node: key of another certificate": (
            n("--tls-ca", ca, "--tls-cert", n1, "--tls-key", key),
            [f"{key} is not the key of {n1}"],
        ),
    }


@pytest.fixture(scope="module")
def runs(cli, certs) -> Iterator[dict[str, tuple[int | None, str, list[str]]]]:
    """Start every case at once (torch's import dominates); case -> (exit, stderr, texts)."""
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind((LOCAL, 0))
    busy.listen()
    ports = {"busy": str(busy.getsockname()[1]), "closed": str(cli.closed_port())}
    cases = _cases(certs)
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for case, (argv, _) in cases.items():
            procs[case] = subprocess.Popen(
                [*cli.argv, *(arg.format(**ports) for arg in argv)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli.env(),
            )  # fmt: skip
        results: dict[str, tuple[int | None, str, list[str]]] = {}
        deadline = time.monotonic() + ALL_CASES_TIMEOUT
        for case, proc in procs.items():
            try:
                err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[1]
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                err = f"still running after {ALL_CASES_TIMEOUT} s: the mistake was not caught"
            results[case] = (proc.returncode, err.replace(ports["busy"], "{busy}"), cases[case][1])
        yield results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        busy.close()


@pytest.mark.slow
@pytest.mark.timeout(ALL_CASES_TIMEOUT + 60)
@pytest.mark.parametrize("case", list(_cases(Path("certs"))))
def test_start_up_mistake_is_one_line_and_exit_2(runs, case):
    code, err, texts = runs[case]
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"one line, not:\n{err}"
    assert code == 2, f"exit {code}: {err}"
    command = case.split(":")[0]
    assert lines[0].startswith(f"fedgrad {command}: error: "), lines[0]
    for text in texts:
        assert text in lines[0], text


@pytest.mark.slow
def test_listen_without_a_port_gives_an_example(runs):
    assert "HOST:PORT, e.g. 127.0.0.1:50051" in runs["aggregator: listen without a port"][1]


# -- a failed TLS handshake: one line at once, not retries ------------------------------------
@pytest.fixture
def mtls_aggregator(serve, certs):
    return serve(
        "linear",
        tls_cert=str(certs / "server.pem"),
        tls_key=str(certs / "server.key"),
        tls_client_ca=str(certs / "ca.pem"),
    )


def _node_run(cli, address: str, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [*cli.argv, "node", "--task", "linear", "--aggregator", address, "--node-id", "n1"]
    # A budget the test would notice: the refusal must come long before it runs out.
    argv += ["--give-up-after", GIVE_UP_AFTER, *extra]
    return subprocess.run(argv, capture_output=True, text=True, env=cli.env(), timeout=RUN_TIMEOUT)


@pytest.mark.slow
def test_node_with_the_wrong_ca_stops_at_once_saying_check_tls_ca(cli, certs, mtls_aggregator):
    other = certs.parent / "other-certs"
    init_federation(other, ["n1"], [LOCAL])
    done = _node_run(
        cli,
        mtls_aggregator.address,
        "--tls-ca",
        str(other / "ca.pem"),
        "--tls-cert",
        str(certs / "nodes/n1.pem"),
        "--tls-key",
        str(certs / "nodes/n1.key"),
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fedgrad node: RefusedError: TLS handshake with the aggregator"), last
    assert f"--tls-ca {other / 'ca.pem'}" in last


@pytest.mark.slow
def test_plaintext_node_against_mtls_stops_at_once_saying_pass_tls_ca(cli, mtls_aggregator):
    done = _node_run(cli, mtls_aggregator.address)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "uses TLS but this node dials plaintext" in last and "--tls-ca" in last, last


# -- --log-format json: every record of a node is an object with node and event ---------------
@pytest.mark.slow
def test_node_json_logs_carry_node_and_event(cli):
    argv = [*cli.argv, "node", "--task", "linear", "--node-id", "json-node", "--log-format", "json"]
    argv += ["--aggregator", f"{LOCAL}:{cli.closed_port()}", "--give-up-after", "1.5"]
    done = subprocess.run(argv, capture_output=True, text=True, env=cli.env(), timeout=RUN_TIMEOUT)
    assert done.returncode == 1, done.stderr
    *records, last = done.stderr.strip().splitlines()
    # The command line's own last word (launch/cli.py) is plain text: see the module notes.
    assert last.startswith("fedgrad node: GaveUpError: gave up after"), last
    parsed = [json.loads(line) for line in records]
    assert parsed, "no log record before giving up"
    for record in parsed:
        assert record["node"] == "json-node", record
        assert record["event"], record
    retries = [r for r in parsed if r["event"] == "retry"]
    assert retries and all(r["reason"] == "UNAVAILABLE" for r in retries), parsed
