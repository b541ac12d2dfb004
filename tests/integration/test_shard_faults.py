"""A shard killed with SIGKILL mid-training and restarted with the same command (issue 15).

Shards and nodes are ``fedgrad`` processes on 127.0.0.1. The run with a kill must end
with bitwise the parameters of an uninterrupted run: the restarted shard resumes from
its checkpoint, and the open round restarts on every shard (nodes upload it again).
A shard that stays down blocks the rounds with a status that names it.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load_file

from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.proto import fedgrad_pb2_grpc as pb_grpc
from tests.conftest import free_port

pytestmark = pytest.mark.slow

ROUNDS = 8
WAIT = 120.0


def _fedgrad() -> list[str]:
    return [sys.executable, "-m", "fedgrad.launch.cli"]


class Federation:
    """K shard processes and 2 node processes; shard commands kept to restart them."""

    def __init__(
        self, spawn: Any, tmp: Path, k: int, name: str, task: Sequence[str] = ("linear",),
        shard_flags: Sequence[str] = (),
    ) -> None:  # fmt: skip
        self.spawn, self.tmp, self.k = spawn, tmp / name, k
        self.tmp.mkdir()
        self.peers = [f"127.0.0.1:{free_port()}" for _ in range(k)]
        self.commands: list[list[str]] = []
        for i in range(k):
            self.commands.append([
                *_fedgrad(), "aggregator", "--task", *task, "--nodes", "2", *shard_flags,
                "--rounds", str(ROUNDS), "--round-timeout", "60", "--finish-grace", "20",
                "--shard", f"{i}/{k}", "--peers", ",".join(self.peers),
                "--listen", self.peers[i], "--checkpoint-dir", str(self.tmp / f"ckpt{i}"),
                "--no-progress",
                *(["--save", str(self.tmp / "final.safetensors")] if i == 0 else []),
            ])  # fmt: skip
        self.shards: list[Any] = [None] * k
        for i in reversed(range(k)):
            self.start_shard(i)
        self.nodes = [
            spawn(
                *_fedgrad(),
                "node",
                "--task",
                *task,
                "--aggregator",
                self.peers[0],
                "--node-id",
                f"n{j}",
                "--shard",
                f"{j}/2",
                "--simulate-delay",
                "0.4",
                "--give-up-after",
                "120",
                log=self.tmp / f"node{j}.log",
            )  # fmt: skip
            for j in range(2)
        ]

    def start_shard(self, i: int) -> None:
        self.shards[i] = self.spawn(*self.commands[i], log=self.tmp / f"shard{i}-{time.time()}.log")

    def status(self) -> pb.StatusReply | None:
        with grpc.insecure_channel(self.peers[0]) as channel:
            try:
                return pb_grpc.AggregatorStub(channel).GetStatus(pb.StatusRequest(), timeout=2)
            except grpc.RpcError:
                return None

    def wait_round(self, at_least: int) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            reply = self.status()
            if reply is not None and reply.round >= at_least:
                return
            time.sleep(0.05)
        raise AssertionError(f"round {at_least} not reached: {self.logs()}")

    def finish(self) -> dict[str, torch.Tensor]:
        for proc in [*self.nodes, *self.shards]:
            try:
                assert proc.wait(timeout=WAIT) == 0, self.logs()
            except Exception:
                raise AssertionError(self.logs()) from None
        return load_file(str(self.tmp / "final.safetensors"))

    def logs(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log"))
        )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    from fedgrad import LocalCluster

    with LocalCluster("linear", nodes=2) as cluster:
        return cluster.run(ROUNDS).params


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_shard_restarted_resumes_and_the_result_is_bitwise_unchanged(
    spawn: Any, tmp_path: Path, reference: dict[str, torch.Tensor], victim: int
) -> None:
    fed = Federation(spawn, tmp_path, 2, f"kill{victim}")
    fed.wait_round(3)
    fed.shards[victim].send_signal(signal.SIGKILL)
    fed.shards[victim].wait(timeout=30)
    time.sleep(0.5)
    fed.start_shard(victim)
    final = fed.finish()
    assert final.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(final[name], value), (name, fed.logs())
    restarts = "restarts on every shard" in fed.logs() or victim == 0
    assert restarts, fed.logs()


#: 1.2 MB of parameters against --staging-mb 1: every held part is in a file.
SPILLING = ("synthetic", "--task-arg", "params=300000", "--task-arg", "tensors=3")


def test_a_shard_killed_with_parts_in_files_restarts_and_the_result_is_bitwise_unchanged(
    spawn: Any, tmp_path: Path
) -> None:
    # The reference is the same federation, uninterrupted (the measure).
    spill = tmp_path / "spill"
    flags = ("--staging-mb", "1", "--spill-dir", str(spill))
    reference = Federation(spawn, tmp_path, 2, "uninterrupted", SPILLING, flags).finish()
    fed = Federation(spawn, tmp_path, 2, "kill-spilled", SPILLING, flags)
    fed.wait_round(3)
    fed.shards[1].send_signal(signal.SIGKILL)
    fed.shards[1].wait(timeout=30)
    time.sleep(0.5)
    fed.start_shard(1)
    final = fed.finish()
    for name, value in reference.items():
        assert torch.equal(final[name], value), (name, fed.logs())
    assert not any(spill.iterdir()), "the killed shard's spill files went with it"


def test_a_shard_that_stays_down_blocks_rounds_with_a_status_naming_it(
    spawn: Any, tmp_path: Path
) -> None:
    fed = Federation(spawn, tmp_path, 2, "down")
    fed.wait_round(2)
    fed.shards[1].send_signal(signal.SIGKILL)
    fed.shards[1].wait(timeout=30)
    deadline = time.monotonic() + WAIT
    phase = ""
    while time.monotonic() < deadline:
        reply = fed.status()
        phase = reply.phase if reply is not None else ""
        if "shard 1 unreachable" in phase:
            break
        time.sleep(0.1)
    assert "blocked: shard 1 unreachable" in phase, fed.logs()
    stuck = fed.status()
    assert stuck is not None and not stuck.finished
    # Back with the same command: training goes on to the end.
    fed.start_shard(1)
    fed.finish()


def test_shard_processes_with_different_settings_both_exit_2_saying_which(spawn: Any) -> None:
    peers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    procs = []
    for i, seed in ((1, "7"), (0, "0")):
        procs.append(spawn(
            *_fedgrad(), "aggregator", "--task", "linear", "--nodes", "1", "--seed", seed,
            "--shard", f"{i}/2", "--peers", ",".join(peers), "--listen", peers[i],
            "--no-progress",
        ))  # fmt: skip
    for proc in procs:
        out, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 2, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("fedgrad aggregator: error:"), err
        assert "seed: '7' here, '0' on shard 0" in last, err
