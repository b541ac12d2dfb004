"""The first hour with fedgrad: the operator's credentials, tokens, task imports, metrics.

Each test starts a real aggregator on 127.0.0.1 port 0 (the ``serve`` fixture) or
real ``fedgrad`` processes; calls go through generated stubs over real gRPC, and
``fedgrad status|health|token`` run in-process through ``main``. The README's own
commands run in ``test_readme.py``.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from fedgrad.auth import (
    OPERATOR_IDENTITY,
    OPERATOR_NAME,
    bearer_metadata,
    generate_token,
    load_node_token,
    load_token_file,
    token_file_line,
)
from fedgrad.certs import init_federation
from fedgrad.errors import ConfigError
from fedgrad.launch.cli import main
from fedgrad.launch.commands import node_config
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.proto import fedgrad_pb2_grpc as pb_grpc
from fedgrad.server.service import MAX_STREAMS_PER_IDENTITY
from fedgrad.task import load_task

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 20.0
PROC_TIMEOUT = 120.0
OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
#: The ``fedgrad`` console script: unlike ``python -m``, it puts no folder of the user's on
#: ``sys.path`` itself, so a task found in the working directory is found by fedgrad.
FEDGRAD = Path(sys.executable).parent / "fedgrad"


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    """Run one RPC to its end; return OK or the status code it failed with."""
    try:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return OK


def node_calls(stub: pb_grpc.AggregatorStub, node: str, md: Any = ()) -> dict[str, Callable]:
    """Join, PullParameters, PushGradients and Leave as ``node``, each a thunk."""
    header = pb.GradientMessage(
        header=pb.UploadHeader(node_id=node, round=0, upload_id=f"{node}.r0", num_samples=1)
    )
    return {
        "Join": lambda: stub.Join(
            pb.JoinRequest(node_id=node, num_samples=1), timeout=TIMEOUT, metadata=md
        ),
        "PullParameters": lambda: stub.PullParameters(
            pb.PullRequest(node_id=node), timeout=TIMEOUT, metadata=md
        ),
        "PushGradients": lambda: stub.PushGradients(iter([header]), timeout=TIMEOUT, metadata=md),
        "Leave": lambda: stub.Leave(pb.LeaveRequest(node_id=node), timeout=TIMEOUT, metadata=md),
    }


def assert_no_node_call(stub: pb_grpc.AggregatorStub, md: Any = ()) -> None:
    """Every call that names a node (a real one, or the name "operator") is refused."""
    for node in ("n1", OPERATOR_NAME):
        for name, call in node_calls(stub, node, md).items():
            assert code_of(call) == DENIED, f"{name} as {node!r}"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki") / "certs"
    init_federation(out, ["n1", "n2"])
    return out


def mtls(certs: Path) -> dict[str, str]:
    return {
        "tls_cert": str(certs / "server.pem"),
        "tls_key": str(certs / "server.key"),
        "tls_client_ca": str(certs / "ca.pem"),
    }


def operator_flags(certs: Path) -> list[str]:
    ca, cert, key = (str(certs / n) for n in ("ca.pem", "operator.pem", "operator.key"))
    return ["--tls-ca", ca, "--tls-cert", cert, "--tls-key", key]


def secure_stub(address: str, certs: Path, name: str) -> tuple[grpc.Channel, Any]:
    pem, key = (certs / f"{name}.{e}" for e in ("pem", "key"))
    creds = grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(), key.read_bytes(), pem.read_bytes()
    )
    channel = grpc.secure_channel(address, creds)
    return channel, pb_grpc.AggregatorStub(channel)


# -- 3. the operator's certificate and token --------------------------------------------
def test_operator_certificate_reads_status_and_health_and_is_no_node(serve, certs, capsys):
    served = serve("linear", nodes=2, **mtls(certs))
    assert main(["status", served.address, *operator_flags(certs)]) == 0
    assert "round 0/" in capsys.readouterr().out
    assert main(["health", served.address, *operator_flags(certs)]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    channel, stub = secure_stub(served.address, certs, "operator")
    with channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert_no_node_call(stub)
        assert list(stub.GetStatus(pb.StatusRequest(), timeout=TIMEOUT).nodes) == []
    # A node's own certificate still acts as that node (the operator changed nothing).
    channel, stub = secure_stub(served.address, certs, "nodes/n1")
    with channel:
        assert code_of(node_calls(stub, "n1")["Join"]) == OK


def test_operator_token_reads_status_and_is_no_node(serve, tmp_path: Path, capsys):
    node_token, operator_token = generate_token(), generate_token()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(
        f"n1 {node_token}\n{token_file_line(OPERATOR_NAME, operator_token)}\n", encoding="utf-8"
    )
    tokens.chmod(0o600)
    (tmp_path / "operator.token").write_text(operator_token + "\n")
    served = serve("linear", nodes=2, tokens=str(tokens))
    assert main(["status", served.address, "--token-file", str(tmp_path / "operator.token")]) == 0
    assert "round 0/" in capsys.readouterr().out
    with grpc.insecure_channel(served.address) as channel:
        stub = pb_grpc.AggregatorStub(channel)
        assert_no_node_call(stub, bearer_metadata(operator_token))
        assert code_of(node_calls(stub, "n1", bearer_metadata(node_token))["Join"]) == OK
    assert load_token_file(tokens).identify(operator_token) == OPERATOR_IDENTITY


def test_with_mtls_and_tokens_the_operator_needs_both(serve, certs, tmp_path: Path, capsys):
    operator_token = generate_token()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(token_file_line(OPERATOR_NAME, operator_token) + "\n")
    tokens.chmod(0o600)
    token_file = tmp_path / "operator.token"
    token_file.write_text(operator_token)
    served = serve("linear", tokens=str(tokens), **mtls(certs))
    assert main(["status", served.address, *operator_flags(certs)]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    flags = [*operator_flags(certs), "--token-file", str(token_file)]
    assert main(["status", served.address, *flags]) == 0


def test_allow_nodes_keeps_the_operator_reading_status(serve, certs, capsys):
    # --allow-nodes lists nodes; the operator is none, reads status and still acts as none.
    served = serve("linear", allow_nodes=("n1", "n2"), **mtls(certs))
    assert main(["status", served.address, *operator_flags(certs)]) == 0
    assert "round 0" in capsys.readouterr().out


def test_status_and_health_say_what_to_pass(serve, certs, tmp_path: Path, capsys):
    served = serve("linear", **mtls(certs))
    ca = str(certs / "ca.pem")
    for argv in (["status", served.address], ["health", served.address, "--tls-ca", ca]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "UNAVAILABLE" in err and "--tls-cert" in err and "operator.pem" in err, err
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"n1 {generate_token()}\n")
    tokens.chmod(0o600)
    served = serve("linear", tokens=str(tokens))
    assert main(["status", served.address]) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err and "--token-file" in err and "fedgrad token" in err, err


# -- 4. metric names ---------------------------------------------------------------------
def readme_metric_names() -> set[str]:
    text = (REPO / "README.md").read_text()
    bullet = re.search(r"^- \*\*Metrics\*\*:(.*?)^- \*\*", text, re.M | re.S)
    assert bullet, "README.md has no '- **Metrics**:' bullet"
    return {re.sub(r"\{.*", "", name) for name in re.findall(r"`(fedgrad_[^`]+)`", bullet[1])}


def test_readme_metric_names_are_the_ones_served(serve) -> None:
    served = serve("linear", metrics_port=0)
    port = served.thread.server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    # What a query names: counters as NAME_total (prometheus_client adds the suffix),
    # histograms by their base name (NAME_bucket, NAME_sum, NAME_count), gauges as is.
    served_names = {f.name + "_total" if f.type == "counter" else f.name for f in families}
    assert readme_metric_names() == served_names


# -- 5. task modules from the working directory ------------------------------------------
TASK_MODULE = """
import torch
from fedgrad import Task


class MyTask(Task):
    lr = 0.1

    def model(self):
        return torch.nn.Linear(2, 1)

    def shard(self, index, count):
        x = torch.arange(8.0).reshape(4, 2) + index
        return x, x.sum(dim=1, keepdim=True)

    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's folder holding ``mypkg/mod.py`` with a task ``MyTask``, nothing installed."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "mod.py").write_text(TASK_MODULE)
    return tmp_path


def user_env(cli: Any) -> dict[str, str]:
    env = cli.env()
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.slow
def test_task_from_the_working_directory_without_pythonpath(spawn, cli, project: Path):
    port_file, env, task = project / "port", user_env(cli), "mypkg.mod:MyTask"
    aggregator = spawn(
        FEDGRAD, "aggregator", "--task", task, "--listen", "127.0.0.1:0", "--port-file",
        port_file, "--rounds", "2", "--no-progress", env=env, cwd=project,
    )  # fmt: skip
    port = cli.wait_port(port_file, aggregator)
    node = spawn(
        FEDGRAD, "node", "--task", task, "--aggregator", f"127.0.0.1:{port}", env=env, cwd=project
    )
    outputs = {}
    for name, proc in (("node", node), ("aggregator", aggregator)):
        outputs[name] = "".join(proc.communicate(timeout=PROC_TIMEOUT))
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{outputs[name]}"
    assert "done: 2 uploads" in outputs["node"], outputs["node"]


def test_load_task_looks_in_the_working_directory(project: Path, monkeypatch) -> None:
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(project))])
    monkeypatch.delitem(sys.modules, "mypkg", raising=False)
    monkeypatch.delitem(sys.modules, "mypkg.mod", raising=False)
    assert type(load_task("mypkg.mod:MyTask")).__name__ == "MyTask"
    assert sys.path[0] == str(project)
    with pytest.raises(ConfigError, match="working directory"):
        load_task("nosuchpkg.mod:MyTask")


@pytest.mark.slow
def test_example_script_runs_from_any_folder(cli, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "custom_task.py")], cwd=tmp_path,
        env=user_env(cli), capture_output=True, text=True, timeout=PROC_TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(re.findall(r"^round +\d+: eval loss \d", done.stdout, re.M)) == 30, done.stdout


# -- 6. fedgrad token and what token errors say -------------------------------------------
def test_token_prints_a_new_token(capsys) -> None:
    assert main(["token"]) == 0 and main(["token"]) == 0
    first, second = capsys.readouterr().out.split()
    assert first != second
    assert load_node_token(None, environ={"FEDGRAD_TOKEN": first}) == first


def test_token_writes_a_private_file_and_its_hashed_line(tmp_path: Path, capsys) -> None:
    old = os.umask(0)
    try:
        out = tmp_path / "n1.token"
        assert main(["token", "--out", str(out), "--sha256", "n1"]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o600
    token = load_node_token(out)
    assert token and token not in (printed := capsys.readouterr().out)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(printed)
    tokens.chmod(0o600)
    assert re.fullmatch(r"n1 sha256:[0-9a-f]{64}\n", printed)
    assert load_token_file(tokens).identify(token) == "n1"
    # An existing file is kept unless --overwrite, which also makes it private again.
    assert main(["token", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and load_node_token(out) == token
    out.chmod(0o644)
    assert main(["token", "--out", str(out), "--overwrite"]) == 0
    assert load_node_token(out) != token and out.stat().st_mode & 0o777 == 0o600


def test_token_refuses_a_bad_name_before_writing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.token"
    assert main(["token", "--out", str(out), "--sha256", "not a node"]) == 2
    assert "invalid node id" in capsys.readouterr().err and not out.exists()


def test_token_errors_name_the_flag_and_the_command(tmp_path: Path) -> None:
    missing, short = tmp_path / "missing.token", tmp_path / "short.token"
    short.write_text("tiny\n")
    for path in (missing, short):
        with pytest.raises(ConfigError) as info:
            node_config({"token_file": str(path)})
        assert f"--token-file {path}" in str(info.value) and "fedgrad token" in str(info.value)
    with pytest.raises(ConfigError, match="--tokens .*fedgrad token"):
        load_token_file(missing)


# -- 7. header-less uploads per identity (docs/security.md) ------------------------------
def test_headerless_uploads_are_capped_per_identity(serve, tmp_path: Path) -> None:
    token = generate_token()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"n1 {token}\n")
    tokens.chmod(0o600)
    served = serve("linear", tokens=str(tokens), idle_timeout=60.0)

    async def hold_then_one_more() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = pb_grpc.AggregatorStub(channel)
            md = bearer_metadata(token)
            held = [stub.PushGradients(metadata=md, timeout=TIMEOUT) for _ in range(2)]
            for call in held:
                await call.wait_for_connection()  # the call is open on the server, no message
            extra = stub.PushGradients(metadata=md, timeout=TIMEOUT)
            try:
                await extra
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            finally:
                for call in held:
                    call.cancel()
            return OK

    assert MAX_STREAMS_PER_IDENTITY == 2  # the number docs/security.md states
    assert asyncio.run(hold_then_one_more()) == grpc.StatusCode.RESOURCE_EXHAUSTED
