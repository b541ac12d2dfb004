"""The ``fedgrad`` command line, run as separate processes over real gRPC on loopback.

Every process leads its own process group, is waited for with a timeout and is
killed at teardown; tests that start processes are marked ``slow``. Help text is
checked in-process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fedgrad.config import AggregatorConfig, NodeConfig
from fedgrad.history import read_history
from fedgrad.launch.cli import build_parser, main, subparser
from fedgrad.launch.commands import aggregator_config
from fedgrad.launch.flags import shown
from fedgrad.launch.options import resolve
from fedgrad.tasks.linear import LinearTask

#: Generous bound on any one process (import torch, a few rounds); no timing is asserted.
PROC_TIMEOUT = 120.0
ROUNDS = 3


def _finish(proc: subprocess.Popen[str], timeout: float = PROC_TIMEOUT) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# -- a federation of three processes --------------------------------------------------------------
@pytest.mark.slow
def test_aggregator_and_two_nodes_as_processes(spawn, cli, tmp_path: Path) -> None:
    save, history, port_file = tmp_path / "X.safetensors", tmp_path / "H.csv", tmp_path / "port"
    aggregator = spawn(
        *cli.argv, "aggregator", "--task", "linear", "--listen", "127.0.0.1:0",
        "--port-file", port_file, "--nodes", "2", "--rounds", str(ROUNDS),
        "--save", save, "--history", history, "--no-progress", "--finish-grace", "20",
    )  # fmt: skip
    port = cli.wait_port(port_file, aggregator)
    nodes = [
        spawn(
            *cli.argv,
            "node",
            "--task",
            "linear",
            "--aggregator",
            f"127.0.0.1:{port}",
            "--node-id",
            f"node-{i}",
            "--shard",
            f"{i}/2",
            "--give-up-after",
            "30",
        )  # fmt: skip
        for i in range(2)
    ]
    for i, node in enumerate(nodes):
        code, _, err = _finish(node)
        assert code == 0, f"node-{i} exited {code}:\n{err}"
    code, _, err = _finish(aggregator)
    assert code == 0, f"aggregator exited {code}:\n{err}"

    task = LinearTask(seed=0)
    want = task.model().state_dict()
    saved = load_file(str(save))
    assert set(saved) == set(want)
    for name, value in want.items():
        assert saved[name].shape == value.shape and saved[name].dtype == value.dtype
    with safe_open(str(save), framework="pt") as fh:
        assert fh.metadata().get("round") == str(ROUNDS)

    records = read_history(history)
    assert [r.round for r in records] == [0, 1, 2]
    assert all(r.nodes == 2 for r in records)

    # Two full shards, weighted mean: the same as 3 steps of full-batch descent
    # (float64; tolerance as in test_training.py).
    torch.manual_seed(0)
    model = task.model()
    opt = torch.optim.SGD(model.parameters(), lr=task.lr)
    for _ in range(ROUNDS):
        opt.zero_grad()
        task.loss(model, task.full_data()).backward()
        opt.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(saved[name], value.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_the_aggregator_process_never_imports_torch_dynamo(spawn, cli, tmp_path: Path) -> None:
    # Adam with a schedule, checkpoints and --save: every use of torch.optim a run makes.
    # -X importtime lists each module a process imports on stderr (to log files: it is
    # more than a pipe holds); the node imports torch._dynamo on purpose (its first
    # optimizer, at start-up), so the check can see it.
    env = cli.env(PYTHONPROFILEIMPORTTIME="1")
    port_file, agg_log, node_log = tmp_path / "port", tmp_path / "agg.log", tmp_path / "node.log"
    aggregator = spawn(
        *cli.argv, "aggregator", "--task", "linear", "--listen", "127.0.0.1:0",
        "--port-file", port_file, "--nodes", "1", "--rounds", "2", "--optimizer", "adam",
        "--lr-schedule", "cosine", "--checkpoint-dir", tmp_path / "ckpt",
        "--save", tmp_path / "X.safetensors", "--no-progress", "--finish-grace", "20",
        env=env, log=agg_log,
    )  # fmt: skip
    port = cli.wait_port(port_file, aggregator)
    node = spawn(
        *cli.argv, "node", "--task", "linear", "--aggregator", f"127.0.0.1:{port}",
        "--node-id", "n0", "--give-up-after", "30", env=env, log=node_log,
    )  # fmt: skip
    assert node.wait(PROC_TIMEOUT) == 0, node_log.read_text()[-3000:]
    assert aggregator.wait(PROC_TIMEOUT) == 0, agg_log.read_text()[-3000:]
    assert "| torch._dynamo" in node_log.read_text()
    assert "| torch._dynamo" not in agg_log.read_text()
    assert (tmp_path / "X.safetensors").exists()
    # Plaintext on loopback: neither loads cryptography (~7 MB resident), only TLS does.
    for log in (agg_log, node_log):
        assert "| cryptography" not in log.read_text(), log.name


@pytest.mark.slow
def test_node_gives_up_on_a_closed_port(spawn, cli, closed_port: int) -> None:
    node = spawn(
        *cli.argv, "node", "--task", "linear", "--aggregator", f"127.0.0.1:{closed_port}",
        "--give-up-after", "2",
    )  # fmt: skip
    code, out, err = _finish(node, timeout=60)
    assert code != 0
    assert "gave up" in err.lower(), err
    assert "Traceback" not in err, "a clear message, not a stack trace"


@pytest.mark.slow
def test_demo(spawn, cli, tmp_path: Path) -> None:
    out_dir = tmp_path / "demo"
    demo = spawn(
        *cli.argv, "demo", "--nodes", "2", "--rounds", str(ROUNDS), "--out", out_dir,
        "--task", "linear",
    )  # fmt: skip
    code, out, err = _finish(demo, timeout=240)
    assert code == 0, f"demo exited {code}:\n{out}\n{err}"
    assert len(read_history(out_dir / "history.csv")) == ROUNDS
    assert (out_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- help -----------------------------------------------------------------------------------------
def _parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


SUBCOMMANDS = [path for path, _ in _parsers(build_parser())]


@pytest.mark.slow
def test_top_level_help_of_the_installed_script(spawn) -> None:
    script = Path(sys.executable).parent / "fedgrad"
    code, out, err = _finish(spawn(script, "--help"), timeout=60)
    assert code == 0, err
    for name in ("aggregator", "node", "demo"):
        assert name in out


@pytest.mark.parametrize("path", SUBCOMMANDS, ids=lambda p: " ".join(p) or "fedgrad")
def test_help_exits_zero(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*path, "--help"])
    assert info.value.code == 0
    assert "usage: fedgrad" in capsys.readouterr().out


def test_every_option_has_help() -> None:
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if not choice.help:
                        missing.append(f"fedgrad {' '.join(path)} {choice.dest} (subcommand)")
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                name = "/".join(action.option_strings) or action.dest
                missing.append(f"fedgrad {' '.join(path)} {name}")
    assert not missing, "options without help text:\n" + "\n".join(missing)


CONFIGS = {"aggregator": AggregatorConfig, "node": NodeConfig}
#: Flags that are no setting of the config: they are turned into one or used by the CLI.
CLI_ONLY_DESTS = {"help", "config", "port_file", "no_progress", "token_file", "compress"}
#: Flags of ``fedgrad node --count`` (the process, not one node's config).
CLI_ONLY_DESTS |= {"count", "first", "workers"}
#: Settings whose help shows the default in the flag's own syntax.
SHOWN_AS = {"simulate_delay": "0"}


@pytest.mark.parametrize("command", list(CONFIGS))
def test_every_flag_is_a_setting_and_its_help_shows_the_config_default(command: str) -> None:
    """Help defaults are read from the config dataclass, never retyped (STYLE.md 15)."""
    defaults = {f.name: f.default for f in dataclasses.fields(CONFIGS[command])}
    problems = []
    for action in subparser(build_parser(), command)._actions:
        if action.dest in CLI_ONLY_DESTS:
            continue
        if action.dest not in defaults:
            problems.append(f"{action.option_strings}: no setting {action.dest!r}")
            continue
        default = defaults[action.dest]
        if default in (None, True, False, ()):
            continue  # no value to show; the help says in words what happens
        text = "/".join(map(str, default)) if isinstance(default, tuple) else shown(default)
        text = SHOWN_AS.get(action.dest, text)
        if f"default {text}" not in (action.help or ""):
            problems.append(f"{action.option_strings}: help does not show 'default {text}'")
    assert not problems, "\n".join(problems)


def test_start_timeout_flag_sets_the_setting() -> None:
    parser = build_parser()
    given = parser.parse_args(["aggregator", "--start-timeout", "7.5"])
    values = resolve(subparser(parser, "aggregator"), given, "aggregator", {})
    assert aggregator_config(values).start_timeout == 7.5
    given = parser.parse_args(["aggregator"])
    values = resolve(subparser(parser, "aggregator"), given, "aggregator", {})
    assert aggregator_config(values).start_timeout is None
    help_text = subparser(parser, "aggregator").format_help()
    assert "--start-timeout SEC" in help_text and "the round timeout" in help_text


# -- bad configuration ----------------------------------------------------------------------------
AGGREGATOR = ("aggregator", "--listen", "127.0.0.1:0", "--nodes", "1", "--rounds", "1")
BAD_CONFIGS = {
    # case: (arguments after the CLI, extra environment, text the message must contain)
    "malformed --task-arg": ((*AGGREGATOR, "--task", "linear", "--task-arg", "samples"), {},
                             "KEY=VALUE"),
    "bad task option value": ((*AGGREGATOR, "--task", "linear", "--task-arg", "samples=-3"), {},
                              "samples"),
    "unknown task option": ((*AGGREGATOR, "--task", "linear", "--task-arg", "colour=red"), {},
                            "colour"),
    "shard index out of range": (("node", "--task", "linear", "--shard", "5/2"), {}, "5/2"),
    "malformed shard": (("node", "--task", "linear", "--shard", "1-2"), {}, "I/N"),
    "unknown config key": ((*AGGREGATOR, "--task", "linear", "--config", "{toml}"), {},
                           "colour"),
    "non-numeric environment": ((*AGGREGATOR, "--task", "linear"), {"FEDGRAD_ROUNDS": "abc"},
                                "FEDGRAD_ROUNDS"),
    "unknown task": (("node", "--task", "nosuchtask"), {}, "nosuchtask"),
    # A chunk smaller than one float64 cannot carry an element; one above gRPC's 4 MiB
    # default cannot reach a node (its channel keeps the default limit).
    "chunk smaller than an element": ((*AGGREGATOR, "--task", "linear", "--chunk-bytes", "4"),
                                      {}, "chunk"),
    "chunk above the message limit": ((*AGGREGATOR, "--task", "linear",
                                       "--chunk-bytes", str(8 << 20)), {}, "chunk"),
    # Checked by the config, not argparse (tests/unit/test_config.py has the full table).
    "reduce not a choice": ((*AGGREGATOR, "--task", "linear", "--reduce", "medain"), {},
                            "reduce must be one of"),
    "start timeout not positive": ((*AGGREGATOR, "--task", "linear", "--start-timeout", "0"),
                                   {}, "start_timeout must be"),
}  # fmt: skip


@pytest.fixture(scope="module")
def bad_config_runs(cli, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple]]:
    """Run every BAD_CONFIGS case at once (each is a full interpreter start-up).

    Yields case -> (exit code or None, output). An aggregator that accepts its
    config writes its --port-file: it is stopped there and reported as accepted;
    a node that accepts its config gives up on a closed port after 1 s.
    """
    tmp = tmp_path_factory.mktemp("config")
    toml = tmp / "bad.toml"
    toml.write_text('rounds = 2\ncolour = "blue"\n')
    node_guard = ["--aggregator", f"127.0.0.1:{cli.closed_port()}", "--give-up-after", "1"]
    procs, port_files = {}, {}
    for i, (case, (args, env, _)) in enumerate(BAD_CONFIGS.items()):
        argv = [a.replace("{toml}", str(toml)) for a in args]
        if argv[0] == "node":
            argv += node_guard
        else:
            port_files[case] = tmp / f"port-{i}"
            argv += ["--port-file", str(port_files[case])]
        procs[case] = subprocess.Popen(
            [*cli.argv, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=cli.env(**env), start_new_session=True,
        )  # fmt: skip
    results: dict[str, tuple] = {}
    try:
        deadline = time.monotonic() + PROC_TIMEOUT
        while len(results) < len(procs) and time.monotonic() < deadline:
            for case, proc in procs.items():
                if case in results:
                    continue
                accepted = case in port_files and port_files[case].exists()
                if proc.poll() is None and not accepted:
                    continue
                if accepted:
                    proc.kill()
                out, err = proc.communicate(timeout=30)
                code = None if accepted else proc.returncode
                results[case] = (
                    code,
                    ("ACCEPTED: it started serving\n" if accepted else "") + out + err,
                )
            time.sleep(0.1)
        for case in procs.keys() - results.keys():
            results[case] = (None, "still running: the bad value was accepted")
        yield results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_exits_2_naming_the_problem(bad_config_runs, case: str) -> None:
    code, output = bad_config_runs[case]
    assert code == 2, f"exit {code}:\n{output}"
    assert BAD_CONFIGS[case][2] in output, output
    assert "Traceback" not in output
