"""The rules of every setting live in ``fedgrad.config``: the CLI and ``LocalCluster`` agree.

For each bad value the config dataclass raises a ``ConfigError``; the same value
given as a flag makes ``fedgrad`` exit 2 with that message on one line, and given
to ``LocalCluster`` raises that same message. Nothing is started: a value that
were accepted would fail the test at ``setup_logging`` (the first step after the
config is built).
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest

from fedgrad.config import AggregatorConfig, NodeConfig, check_setting
from fedgrad.errors import ConfigError
from fedgrad.launch import commands, demo
from fedgrad.launch.cli import main
from fedgrad.launch.local import LocalCluster

A, N = "aggregator", "node"
#: The case cannot go through LocalCluster (it sets the address and the shards itself).
CLI_ONLY = "cli-only"

BAD_VALUES: dict[str, tuple[str, list[str], dict[str, Any], str]] = {
    # case: (command, flags, the same as config settings, CLI prefix or CLI_ONLY)
    "rounds 0": (A, ["--rounds", "0"], {"rounds": 0}, ""),
    "nodes 0": (A, ["--nodes", "0"], {"nodes": 0}, ""),
    "min-nodes 0": (A, ["--min-nodes", "0"], {"min_nodes": 0}, ""),
    "min-nodes above nodes": (A, ["--nodes", "2", "--min-nodes", "3"],
                              {"nodes": 2, "min_nodes": 3}, ""),
    "round-timeout 0": (A, ["--round-timeout", "0"], {"round_timeout": 0.0}, ""),
    "round-timeout nan": (A, ["--round-timeout", "nan"], {"round_timeout": float("nan")}, ""),
    "start-timeout 0": (A, ["--start-timeout", "0"], {"start_timeout": 0.0}, ""),
    "start-timeout negative": (A, ["--start-timeout", "-5"], {"start_timeout": -5.0}, ""),
    "idle-timeout 0": (A, ["--idle-timeout", "0"], {"idle_timeout": 0.0}, ""),
    "slot-wait 0": (A, ["--slot-wait", "0"], {"slot_wait": 0.0}, ""),
    "finish-grace negative": (A, ["--finish-grace", "-1"], {"finish_grace": -1.0}, ""),
    "max-rpcs 0": (A, ["--max-rpcs", "0"], {"max_rpcs": 0}, ""),
    "max-inflight negative": (A, ["--max-inflight", "-1"], {"max_inflight": -1}, ""),
    "staging-mb 0": (A, ["--staging-mb", "0"], {"staging_mb": 0}, ""),
    "chunk below one element": (A, ["--chunk-bytes", "4"], {"chunk_bytes": 4}, ""),
    "chunk splitting elements": (A, ["--chunk-bytes", "1000001"], {"chunk_bytes": 1000001}, ""),
    "chunk above the message limit": (A, ["--chunk-bytes", str(8 << 20)],
                                      {"chunk_bytes": 8 << 20}, ""),
    "reduce not a choice": (A, ["--reduce", "medain"], {"reduce": "medain"}, ""),
    "optimizer unknown": (A, ["--optimizer", "adamx"], {"optimizer": "adamx"}, ""),
    "optimizer argument it does not take": (
        A, ["--optimizer", "adam", "--optimizer-arg", "momentum=0.9"],
        {"optimizer": "adam", "optimizer_args": (("momentum", "0.9"),)}, ""),
    "lr schedule unknown": (A, ["--lr-schedule", "exp"], {"lr_schedule": "exp"}, ""),
    "clip-grad-norm 0": (A, ["--clip-grad-norm", "0"], {"clip_grad_norm": 0.0}, ""),
    "broadcast dtype not a choice": (A, ["--broadcast-dtype", "int8"],
                                     {"broadcast_dtype": "int8"}, ""),
    "error feedback not a choice": (N, ["--error-feedback", "yes"], {"error_feedback": "yes"}, ""),
    "rounding not a choice": (N, ["--rounding", "up"], {"rounding": "up"}, ""),
    "node device unknown": (N, ["--device", "gpu"], {"device": "gpu"}, ""),
    "aggregator device unknown": (A, ["--device", "tpu"], {"device": "tpu"}, ""),
    "evaluate-every negative": (A, ["--evaluate-every", "-1"], {"evaluate_every": -1}, ""),
    "buffers not a choice": (A, ["--buffers", "global"], {"buffers": "global"}, ""),
    "optimizer not a choice": (A, ["--optimizer", "lbfgs"], {"optimizer": "lbfgs"}, ""),
    "accumulate not a choice": (A, ["--accumulate", "float16"], {"accumulate": "float16"}, ""),
    "aggregator log-format": (A, ["--log-format", "xml"], {"log_format": "xml"}, ""),
    "lr 0": (A, ["--lr", "0"], {"lr": 0.0}, ""),
    "lr negative": (A, ["--lr", "-0.5"], {"lr": -0.5}, ""),
    "metrics-port out of range": (A, ["--metrics-port", "70000"], {"metrics_port": 70000}, ""),
    "listen port out of range": (A, ["--listen", "127.0.0.1:99999"],
                                 {"listen": "127.0.0.1:99999"}, CLI_ONLY),
    "listen without port": (A, ["--listen", "localhost"], {"listen": "localhost"}, CLI_ONLY),
    "allow-nodes bad id": (A, ["--allow-nodes", "ok,not ok"],
                           {"allow_nodes": ("ok", "not ok")}, ""),
    "tls-cert without key": (A, ["--tls-cert", "s.pem"], {"tls_cert": "s.pem"}, ""),
    "tls-client-ca without cert": (A, ["--tls-client-ca", "ca.pem"],
                                   {"tls_client_ca": "ca.pem"}, ""),
    "node-id with a space": (N, ["--node-id", "node 1"], {"node_id": "node 1"}, ""),
    "node-id too long": (N, ["--node-id", "n" * 129], {"node_id": "n" * 129}, ""),
    "shard index out of range": (N, ["--shard", "5/2"], {"shard": (5, 2)}, CLI_ONLY),
    "shard of zero": (N, ["--shard", "0/0"], {"shard": (0, 0)}, CLI_ONLY),
    "aggregator without port": (N, ["--aggregator", "nohost"], {"aggregator": "nohost"},
                                CLI_ONLY),
    "give-up-after 0": (N, ["--give-up-after", "0"], {"give_up_after": 0.0}, ""),
    "call-timeout negative": (N, ["--call-timeout", "-1"], {"call_timeout": -1.0}, ""),
    "threads negative": (N, ["--threads", "-1"], {"threads": -1}, ""),
    "compress not a codec": (N, ["--compress", "int3"], {"compress": "int3"}, ""),
    "compress bad parameter": (N, ["--compress", "topk:2"], {"compress": "topk:2"}, ""),
    "node log-format": (N, ["--log-format", "xml"], {"log_format": "xml"}, ""),
    "client cert without CA": (N, ["--tls-cert", "c.pem", "--tls-key", "k.pem"],
                               {"tls_cert": "c.pem", "tls_key": "k.pem"}, ""),
    "demo nodes 0": ("demo", ["--nodes", "0"], {"nodes": 0}, ""),
    "demo rounds 0": ("demo", ["--rounds", "0"], {"rounds": 0}, ""),
}  # fmt: skip


def _config_error(command: str, settings: dict[str, Any]) -> str:
    cls = NodeConfig if command == N else AggregatorConfig
    with pytest.raises(ConfigError) as info:
        cls(**settings)
    return str(info.value)


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test at the first step a config that passed would take."""

    def accepted(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bad value was accepted")

    for key in [k for k in os.environ if k.startswith("FEDGRAD_")]:
        monkeypatch.delenv(key)
    monkeypatch.setattr(commands, "setup_logging", accepted)
    monkeypatch.setattr(demo.subprocess, "Popen", accepted)


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_cli_exits_2_with_the_config_message_on_one_line(
    case: str, nothing_starts: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    command, flags, settings, prefix = BAD_VALUES[case]
    message = _config_error(command, settings)
    argv = [command, *flags] + (["--out", str(tmp_path)] if command == "demo" else [])
    assert main(argv) == 2
    out, err = capsys.readouterr()
    prefix = "" if prefix == CLI_ONLY else prefix
    assert err == f"fedgrad {command}: error: {prefix}{message}\n", err
    assert "Traceback" not in out + err


@pytest.mark.parametrize("case", [c for c, v in BAD_VALUES.items() if v[3] != CLI_ONLY])
def test_local_cluster_raises_the_same_message(case: str) -> None:
    command, _, settings, _ = BAD_VALUES[case]
    message = _config_error(command, settings)
    with pytest.raises(ConfigError) as info:
        if command == N:
            LocalCluster("linear", nodes=2, node_options=settings)
        else:
            LocalCluster("linear", **settings)
    assert str(info.value) == message


def test_messages_say_what_to_fix() -> None:
    """Each message names the setting, the rule and the value given."""
    for case, (command, _, settings, _) in BAD_VALUES.items():
        message = _config_error(command, settings)
        assert any(name in message for name in settings), f"{case}: {message}"
        assert "must" in message or "need" in message or "go together" in message, message


def test_check_setting_is_the_rule_of_the_field() -> None:
    check_setting(AggregatorConfig, "start_timeout", None)
    check_setting(AggregatorConfig, "start_timeout", 12.5)
    with pytest.raises(ConfigError, match="start_timeout must be a number of seconds > 0"):
        check_setting(AggregatorConfig, "start_timeout", 0)
    with pytest.raises(ConfigError, match="no setting 'colour'"):
        check_setting(AggregatorConfig, "colour", 1)


def test_defaults_are_valid_and_replace_rechecks() -> None:
    cfg, node = AggregatorConfig(), NodeConfig()
    assert cfg.start_timeout is None, "default: wait up to the round timeout"
    assert replace(cfg, start_timeout=5.0).start_timeout == 5.0
    with pytest.raises(ConfigError, match="rounds"):
        replace(cfg, rounds=0)
    with pytest.raises(ConfigError, match="shard"):
        replace(node, shard=(1, 1))
    for obj in (cfg, node):
        for f in fields(obj):
            check_setting(type(obj), f.name, getattr(obj, f.name))


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"rounds": 2.0}, "rounds must be an integer"),
        ({"rounds": True}, "rounds must be an integer"),
        ({"round_timeout": "300"}, "round_timeout must be a number"),
        ({"allow_nodes": "n1,n2"}, "allow_nodes must be a sequence"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_wrong_types_from_python_are_refused(settings: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        AggregatorConfig(**settings)


def test_file_and_environment_values_name_their_source(
    tmp_path: Path,
    nothing_starts: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The message is the config's, prefixed by the key or variable it came from."""
    toml = tmp_path / "fedgrad.toml"
    toml.write_text("[aggregator]\nstart-timeout = -2\n")
    message = _config_error(A, {"start_timeout": -2.0})
    assert main([A, "--config", str(toml)]) == 2
    want = f"fedgrad aggregator: error: config file {toml}, key 'start-timeout': {message}\n"
    assert capsys.readouterr().err == want
    monkeypatch.setenv("FEDGRAD_THREADS", "-3")
    assert main([N]) == 2
    message = _config_error(N, {"threads": -3})
    assert (
        capsys.readouterr().err == f"fedgrad node: error: environment FEDGRAD_THREADS: {message}\n"
    )


def test_staging_slots_one_big_upload_at_a_time_and_every_part_on_a_shard() -> None:
    unsharded = AggregatorConfig(nodes=8)
    assert unsharded.staging_slots(100_000_000) == 1  # 95 MiB > half of 128 MiB
    assert unsharded.staging_slots(40 << 20) == 3
    assert unsharded.staging_slots(72) == 64
    assert replace(unsharded, max_inflight=2).staging_slots(100_000_000) == 2
    # A shard stages every node's part of a round: fewer slots than shard 0's could hold
    # other nodes' parts and leave both waiting.
    shard = replace(unsharded, shard="1/2", peers=("127.0.0.1:1", "127.0.0.1:2"))
    assert shard.staging_slots(100_000_000) == 8
    assert replace(shard, nodes=100).staging_slots(100_000_000) == 64
