"""``fedgrad node --count M`` (M logical nodes in one process) and ``--simulate-delay``.

Real ``fedgrad aggregator`` and ``fedgrad node`` processes on 127.0.0.1 port 0 (the
``cli`` helpers of ``tests/conftest.py``); a fleet's nodes must be indistinguishable
from separate processes: the same ids at the aggregator, and bitwise the same final
parameters. No timing is asserted; deadlines only keep a broken run from hanging.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedgrad.auth import generate_token
from fedgrad.certs import init_federation
from fedgrad.client.fleet import fleet_configs, read_fleet_tokens
from fedgrad.client.node import Node, NodeResult, simulated_delay
from fedgrad.config import NodeConfig
from fedgrad.errors import ConfigError
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.task import load_task

#: Generous bound on one federation (imports, start-up, a few rounds on a busy machine).
RUN_TIMEOUT = 240.0
LOCAL = "127.0.0.1"


# -- running federations ------------------------------------------------------------------------
def _finish(proc: subprocess.Popen[str], what: str) -> str:
    """Wait for ``proc``; return its stderr, failing the test unless it exited 0."""
    out, err = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{err[-4000:]}"
    return err


def _aggregator(spawn, cli, workdir: Path, nodes: int, rounds: int, *extra: str):
    port_file = workdir / "port"
    proc = spawn(
        *cli.argv, "aggregator", "--task", "digits", "--listen", f"{LOCAL}:0",
        "--port-file", port_file, "--nodes", str(nodes), "--rounds", str(rounds),
        "--save", workdir / "final.safetensors", "--history", workdir / "history.csv",
        "--accumulate", "reproducible", "--no-progress", "--log-format", "json",
        "--finish-grace", "30", *extra,
    )  # fmt: skip
    return proc, cli.wait_port(port_file, proc)


def _node(cli, port: int, *flags: str) -> list[str]:
    return [*cli.argv, "node", "--task", "digits", "--aggregator", f"{LOCAL}:{port}", *flags]


def _federation(
    spawn, cli, workdir: Path, nodes: int, rounds: int, node_flags: Sequence[Sequence[str]]
) -> tuple[dict[str, torch.Tensor], list[dict], str]:
    """Train with one node process per entry of ``node_flags``.

    Returns:
        The final parameters, the aggregator's join records, the nodes' stderr.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    aggregator, port = _aggregator(spawn, cli, workdir, nodes, rounds)
    procs = [spawn(*_node(cli, port, *flags)) for flags in node_flags]
    logs = [
        _finish(proc, f"fedgrad node {' '.join(flags)}")
        for flags, proc in zip(node_flags, procs, strict=True)
    ]
    err = _finish(aggregator, "the aggregator")
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    joins = [r for r in records if r.get("event") == "join"]
    return load_file(str(workdir / "final.safetensors")), joins, "".join(logs)


def _history_nodes(workdir: Path) -> list[int]:
    lines = (workdir / "history.csv").read_text().splitlines()
    column = lines[0].split(",").index("nodes")
    return [int(line.split(",")[column]) for line in lines[1:]]


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def trained() -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    """Final parameters of federations already run in this module, by name (run once)."""
    return {}


def _count_four(
    spawn, cli, tmp_path_factory, trained, *flags: str
) -> tuple[dict[str, torch.Tensor], str]:
    """The final parameters and stderr of ``--count 4`` with ``flags``, 2 rounds (cached)."""
    key = " ".join(flags)
    if key not in trained:
        workdir = tmp_path_factory.mktemp("count4")
        node = ["--count", "4", "--node-id", "n", *flags]
        params, _, err = _federation(spawn, cli, workdir, 4, 2, [node])
        trained[key] = params, err
    return trained[key]


# -- one process, many nodes --------------------------------------------------------------------
@pytest.mark.slow
def test_count_runs_m_nodes_that_the_aggregator_sees(spawn, cli, tmp_path: Path) -> None:
    _, joins, _ = _federation(spawn, cli, tmp_path, 6, 3, [["--count", "6", "--node-id", "n"]])
    assert sorted(r["node"] for r in joins) == [f"n-{i}" for i in range(6)]
    assert _history_nodes(tmp_path) == [6, 6, 6]


@pytest.mark.slow
def test_count_four_trains_what_four_processes_train(
    spawn, cli, tmp_path: Path, tmp_path_factory, trained
) -> None:
    # --threads 1 as --count's nodes have by default: MKL's kernels with 2 threads sum in
    # another order than with 1 on some CPUs (AMD EPYC here), so bits differ by threading.
    alone = [["--node-id", f"n-{i}", "--shard", f"{i}/4", "--threads", "1"] for i in range(4)]
    separate, _, _ = _federation(spawn, cli, tmp_path, 4, 2, alone)
    _assert_bitwise_equal(_count_four(spawn, cli, tmp_path_factory, trained)[0], separate)


@pytest.mark.slow
def test_simulated_delays_change_no_bit(spawn, cli, tmp_path_factory, trained) -> None:
    plain, quiet = _count_four(spawn, cli, tmp_path_factory, trained)
    delay = ("--simulate-delay", "0.02:0.08")
    delayed, warned = _count_four(spawn, cli, tmp_path_factory, trained, *delay)
    _assert_bitwise_equal(plain, delayed)
    assert warned.count("simulating stragglers") == 1, "one warning for the whole process"
    assert "simulating stragglers" not in quiet


@pytest.mark.slow
def test_two_hundred_nodes_in_one_process_train_two_rounds(spawn, cli, tmp_path: Path) -> None:
    flags = ["--count", "200", "--node-id", "n", "--give-up-after", "120"]
    _, joins, _ = _federation(spawn, cli, tmp_path, 200, 2, [flags])
    assert len({r["node"] for r in joins}) == 200
    assert _history_nodes(tmp_path) == [200, 200]


def _status_nodes(connect, served) -> dict[str, str]:
    reply = connect(served).GetStatus(pb.StatusRequest(), timeout=20)
    return {n.node_id: n.state for n in reply.nodes}


def _wait_for(condition, what: str, timeout: float = RUN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_makes_every_node_leave_and_exits_zero(serve, connect, spawn, cli, sig) -> None:
    served = serve("linear", nodes=7)  # one more than the fleet: round 0 never opens
    fleet = spawn(*cli.argv, "node", "--task", "linear", "--aggregator", served.address,
                  "--count", "6", "--node-id", "s")  # fmt: skip
    _wait_for(lambda: len(_status_nodes(connect, served)) == 6, "6 joined nodes")
    fleet.send_signal(sig)
    _finish(fleet, "the fleet")
    assert _status_nodes(connect, served) == {f"s-{i}": "left" for i in range(6)}


# -- credentials per node -----------------------------------------------------------------------
def _token_files(tmp_path: Path, ids: Sequence[str], wrong: str | None = None) -> tuple[Path, Path]:
    """Write the aggregator's --tokens and the fleet's --token-file; ``wrong`` gets another."""
    tokens = {n: generate_token() for n in ids}
    theirs, ours = tmp_path / "tokens.txt", tmp_path / "fleet.tokens"
    theirs.write_text("".join(f"{n} {t}\n" for n, t in tokens.items()))
    mine = {n: generate_token() if n == wrong else t for n, t in tokens.items()}
    ours.write_text("# one line per node\n" + "".join(f"{n} {t}\n" for n, t in mine.items()))
    for path in (theirs, ours):
        path.chmod(0o600)
    return theirs, ours


@pytest.mark.slow
def test_each_node_sends_its_own_token(serve, spawn, cli, tmp_path: Path) -> None:
    theirs, ours = _token_files(tmp_path, ["t-0", "t-1", "t-2"])
    served = serve("linear", nodes=3, rounds=2, tokens=str(theirs))
    fleet = spawn(*cli.argv, "node", "--task", "linear", "--aggregator", served.address,
                  "--count", "3", "--node-id", "t", "--token-file", ours)  # fmt: skip
    _finish(fleet, "the fleet")
    assert served.call(lambda: [r.nodes for r in served.core.history]) == [3, 3]


@pytest.mark.slow
def test_a_failed_node_is_named_in_the_one_line_exit(serve, spawn, cli, tmp_path: Path) -> None:
    theirs, ours = _token_files(tmp_path, ["t-0", "t-1"], wrong="t-1")
    served = serve("linear", nodes=1, rounds=1, tokens=str(theirs))
    fleet = spawn(*cli.argv, "node", "--task", "linear", "--aggregator", served.address,
                  "--count", "2", "--node-id", "t", "--token-file", ours)  # fmt: skip
    _, err = fleet.communicate(timeout=RUN_TIMEOUT)
    assert fleet.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fedgrad node: RefusedError: ") and "'t-1'" in last, last
    assert "UNAUTHENTICATED" in last, last
    assert "Traceback" not in err, err
    assert served.call(lambda: [r.nodes for r in served.core.history]) == [1]  # t-0 trained


@pytest.mark.slow
def test_node_in_tls_paths_is_each_nodes_id(serve, spawn, cli, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_federation(certs, ["m-0", "m-1"], [LOCAL])
    served = serve(
        "linear",
        nodes=2,
        rounds=1,
        tls_cert=str(certs / "server.pem"),
        tls_key=str(certs / "server.key"),
        tls_client_ca=str(certs / "ca.pem"),
    )
    fleet = spawn(
        *cli.argv, "node", "--task", "linear", "--aggregator", served.address,
        "--count", "2", "--node-id", "m", "--tls-ca", certs / "ca.pem",
        "--tls-cert", certs / "nodes/{node}.pem", "--tls-key", certs / "nodes/{node}.key",
    )  # fmt: skip
    _finish(fleet, "the fleet")
    assert served.call(lambda: [r.nodes for r in served.core.history]) == [2]


# -- start-up mistakes: exit 2, one line --------------------------------------------------------
#: case -> (node flags, text of the error line). {closed}: a port nothing listens on.
MISTAKES = {
    "bad --simulate-delay": (["--simulate-delay", "1:x"], "argument --simulate-delay"),
    "--simulate-delay MIN > MAX": (["--simulate-delay", "2:1"], "0 <= MIN <= MAX"),
    "--count 0": (["--count", "0"], "argument --count: must be > 0"),
    "--shard I/N with --count": (["--count", "3", "--shard", "1/4"], "use --shard ordinal/4"),
    "--first without ordinal": (["--count", "3", "--first", "3"], "--first needs --shard"),
    "--workers without --count": (["--workers", "2"], "--workers goes with --count"),
    "--tls-cert without {node}": (
        ["--count", "2", "--tls-ca", "ca.pem", "--tls-cert", "n.pem", "--tls-key", "n.key"],
        "put {node} in the path",
    ),
    "a node without a token": (
        ["--count", "3", "--node-id", "n", "--token-file", "{tokens}"],
        "no token for node 'n-2'",
    ),
    "a bad node id": (["--count", "2", "--node-id", "bad/id"], "node bad/id-0"),
}


@pytest.fixture(scope="module")
def mistakes(cli, tmp_path_factory) -> dict[str, tuple[int, str]]:
    """Run every case at once (torch's import dominates); case -> (exit code, stderr)."""
    tokens = tmp_path_factory.mktemp("tokens") / "fleet.tokens"
    tokens.write_text(f"n-0 {generate_token()}\nn-1 {generate_token()}\n")
    tokens.chmod(0o600)
    address = f"{LOCAL}:{cli.closed_port()}"
    procs = {
        case: subprocess.Popen(
            [
                *cli.argv,
                "node",
                "--task",
                "linear",
                "--aggregator",
                address,
                *(f.format(tokens=tokens) if "{tokens}" in f else f for f in flags),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=cli.env(),
        )  # fmt: skip
        for case, (flags, _) in MISTAKES.items()
    }
    try:
        errors = {case: p.communicate(timeout=RUN_TIMEOUT)[1] for case, p in procs.items()}
        return {case: (procs[case].returncode, err) for case, err in errors.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MISTAKES))
def test_start_up_mistake_is_exit_2_and_one_error_line(mistakes, case: str) -> None:
    code, err = mistakes[case]
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert errors[0].startswith("fedgrad node: error: "), errors[0]
    assert MISTAKES[case][1] in errors[0], errors[0]
    assert code == 2, err


# -- the delay and the configs, in-process ------------------------------------------------------
def _waiting_in_train_round(thread: threading.Thread) -> bool:
    """True if ``thread`` is in an ``Event.wait`` that ``Node.train_round`` called."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None and frame.f_back is not None:
        if frame.f_code.co_name == "wait" and frame.f_back.f_code.co_name == "train_round":
            return True
        frame = frame.f_back
    return False


def test_stop_ends_a_simulated_delay_at_once(serve) -> None:
    served = serve("linear", nodes=1)
    cfg = NodeConfig(task="linear", aggregator=served.address, simulate_delay=(600.0, 600.0))
    node = Node(load_task("linear"), cfg)
    done: list[NodeResult] = []
    thread = threading.Thread(target=lambda: done.append(node.run()), daemon=True)
    thread.start()
    _wait_for(lambda: _waiting_in_train_round(thread), "wait in round 0's delay")
    node.stop("test")
    thread.join(RUN_TIMEOUT)  # far below the 600 s delay
    node.close()
    assert not thread.is_alive() and done and done[0].uploads == 0


def test_simulated_delay_is_seeded_and_in_range() -> None:
    cfg = NodeConfig(node_id="n-1", seed=3, simulate_delay=(0.5, 2.0))
    draws = [simulated_delay(cfg, r) for r in range(50)]
    assert all(0.5 <= d <= 2.0 for d in draws) and len(set(draws)) == 50
    assert draws == [simulated_delay(cfg, r) for r in range(50)]  # a restart waits the same
    other = NodeConfig(node_id="n-2", seed=3, simulate_delay=(0.5, 2.0))
    assert draws != [simulated_delay(other, r) for r in range(50)]
    assert simulated_delay(NodeConfig(simulate_delay=(1.5, 1.5)), 7) == 1.5
    assert simulated_delay(NodeConfig(), 7) == 0.0


def test_the_delay_does_not_draw_from_torch() -> None:
    cfg = NodeConfig(simulate_delay=(0.0, 1.0))
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    simulated_delay(cfg, 0)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_fleet_configs_name_shard_and_credential_each_node() -> None:
    base = NodeConfig(tls_ca="ca.pem", tls_cert="c/{node}.pem", tls_key="c/{node}.key")
    tokens = {f"p-{i}": f"token-of-p-{i}-{'x' * 16}" for i in range(2, 6)}
    configs = fleet_configs(base, "p", 3, first=2, shards=8, tokens=tokens)
    assert [c.node_id for c in configs] == ["p-2", "p-3", "p-4"]
    assert [c.shard for c in configs] == [(2, 8), (3, 8), (4, 8)]
    assert [c.token for c in configs] == [tokens[c.node_id] for c in configs]
    assert [c.tls_cert for c in configs] == ["c/p-2.pem", "c/p-3.pem", "c/p-4.pem"]
    assert configs[0].tls_key == "c/p-2.key"
    assert [c.shard for c in fleet_configs(NodeConfig(), "q", 4)] == [(i, 4) for i in range(4)]
    with pytest.raises(ConfigError, match=r"node p-8: shard 8/8"):
        fleet_configs(NodeConfig(), "p", 3, first=6, shards=8)


def test_fleet_token_file_is_plaintext_node_token_lines(tmp_path: Path) -> None:
    good = tmp_path / "good"
    one, two = generate_token(), generate_token()
    good.write_text(f"# comment\n\nn-0 {one}\n  n-1   {two}  \n")
    assert read_fleet_tokens(good) == {"n-0": one, "n-1": two}
    cases = {
        "hashed": (f"n-0 sha256:{'a' * 64}\n", r"bad:1: with --count"),
        "three fields": (f"n-0 {one} extra\n", r"bad:1: with --count"),
        "twice": (f"n-0 {one}\nn-0 {two}\n", r"bad:2: a second line for node 'n-0'"),
        "shared": (f"n-0 {one}\nn-1 {one}\n", "share one token"),
        "short": ("n-0 short\n", "16-1024 printable"),
    }
    for name, (text, message) in cases.items():
        bad = tmp_path / "bad"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_fleet_tokens(bad)
        assert one not in str(message), name
    with pytest.raises(ConfigError, match="cannot read"):
        read_fleet_tokens(tmp_path / "missing")
