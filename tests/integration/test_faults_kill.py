"""Faults that kill a process: a node mid-upload, the aggregator, a checkpoint write.

How these tests run (real gRPC, real signals, bounded waits): ``faults_support.py``.

Issue 3, "Faults" (the other bullets: ``faults_support.py``):

- node killed mid-upload: ``test_node_sigkilled_mid_upload_leaves_no_trace``,
  ``test_cli_node_sigkilled_mid_upload_restarts_and_training_matches``
- aggregator crash: ``test_aggregator_sigkill_at_random_moments_resumes_bitwise``,
  ``test_resumed_round_is_recomputed_bitwise``,
  ``test_interrupted_checkpoint_write_leaves_the_previous_one_loadable``,
  ``test_sigkill_during_a_large_checkpoint_write``
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from faultproxy import FaultProxy
from faults_support import (
    CALL,
    KILLED_NODE,
    PROC_TIMEOUT,
    ROUND_FOREVER,
    SYNTHETIC_ARGS,
    assert_params,
    constant_grads,
    core_state,
    finish,
    read_checkpoint_round,
    sgd_reference,
    slots_free,
    write_messages,
)
from polling import WAIT, wait_until
from safetensors.torch import load_file

from fedgrad.codec import manifest_from_proto
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.server.checkpoint import load_checkpoint

# == node killed mid-upload =========================================================================
KILL_POINTS = ["header", "half", "all-chunks", "waiting-for-slot"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_node_sigkilled_mid_upload_leaves_no_trace(
    point: str, serve, hand_node, spawn, tmp_path: Path, stalled
) -> None:
    """SIGKILL a node process anywhere in its upload stream: no trace, slot freed, it rejoins.

    ``waiting-for-slot``: the only staging slot is taken by another upload, so the
    killed node dies while its upload waits for one.
    """
    served = serve("linear", task_args=(("features", "63"),), nodes=2, chunk_bytes=64,
                   max_inflight=1, rounds=1, round_timeout=ROUND_FOREVER)  # fmt: skip
    a = hand_node(served, "node-0", num_samples=3)
    theta0 = served.state_dict()
    specs = a.specs
    # What the killed node streams: absurd values, so any trace would show in the step.
    poison = a.messages(0, constant_grads(specs, 1e6), num_samples=9)
    poison[0].header.node_id, poison[0].header.upload_id = "node-1", "node-1.r0"
    chunks = len(poison) - 2  # all but the header and the UploadEnd
    count = {"header": 1, "half": 1 + chunks // 2, "all-chunks": 1 + chunks}.get(point, 1)
    ga, gk = constant_grads(specs, 0.5), constant_grads(specs, -0.25)

    hand_node(served, "node-1", num_samples=9)  # round 0 opens; the process joins again
    holder = None
    if point == "waiting-for-slot":
        msgs = a.messages(0, ga)
        holder = stalled(a.stub, msgs[:2], msgs[2:])
        wait_until(lambda: core_state(served).free_slots == 0, "node-0 to hold the only slot")

    path = write_messages(
        tmp_path / "upload.bin", [pb.JoinRequest(node_id="node-1", num_samples=9), *poison]
    )
    killed = spawn(sys.executable, "-c", KILLED_NODE, served.address, path, str(count))
    assert killed.stdout is not None
    line = killed.stdout.readline()
    assert line.strip() == f"SENT {count}", line + (killed.stderr.read() if killed.poll() else "")
    wait_until(lambda: "node-1" in core_state(served).uploading, "the killed node's upload to open")
    time.sleep(0.2)  # let the sent chunks reach the server (not an assertion)
    before = core_state(served)
    killed.send_signal(signal.SIGKILL)
    killed.wait(WAIT)

    if holder is not None:
        holder.release()
        assert holder.result().round == 0
    else:
        wait_until(
            lambda: core_state(served).free_slots == 1, "the killed upload's slot to be freed"
        )
        after = core_state(served)
        assert after.count == len(after.reported), (
            f"the accumulator holds {after.count} uploads but {after.reported} are recorded:"
            " a retry of the killed upload would be applied twice"
        )
        assert after.same_accumulation(before), (
            f"the upload of a node killed after {count - 1} of {chunks} chunks (no half-close)"
            f" was counted: reported {after.reported}"
        )
        a.push(0, ga)
    wait_until(lambda: core_state(served).free_slots == 1, "the staging slot to be free")
    state = core_state(served)
    assert not state.uploading, (
        f"{sorted(state.uploading)} still marked as uploading after the process died: its"
        " restarted node would get RESOURCE_EXHAUSTED 'already has an upload in flight' forever"
    )
    assert (state.round, list(state.reported), state.count) == (0, ["node-0"], 1)

    # The node restarts with the same id: it rejoins and its real upload is counted.
    k = hand_node(served, "node-1", num_samples=9)
    assert k.pull(0)[0].round == 0
    assert k.push(0, gk).round == 0
    wait_until(lambda: core_state(served).finished, "the round to close with the restarted node")
    assert_params(served.state_dict(), sgd_reference(theta0, [(3, ga), (9, gk)], lr=0.1))


@pytest.mark.slow
def test_cli_node_sigkilled_mid_upload_restarts_and_training_matches(
    serve, spawn, cli, tmp_path: Path
) -> None:
    """The real node process, SIGKILLed while its upload streams, restarted with the same id.

    Its link runs through the fault proxy with a delay so the kill lands mid-stream;
    the final parameters equal an uninterrupted run's, bitwise (two nodes: the
    float64 sum of two products is exact and order-free, and the node's round
    randomness derives from (seed, node, round)).
    """
    from fedgrad.launch.local import LocalCluster

    rounds = 3
    served = serve("synthetic", task_args=SYNTHETIC_ARGS, nodes=2, rounds=rounds,
                   round_timeout=ROUND_FOREVER, finish_grace=20.0)  # fmt: skip
    task_flags: list[str] = ["--task", "synthetic"]
    for key, value in SYNTHETIC_ARGS:
        task_flags += ["--task-arg", f"{key}={value}"]

    def node(index: int, address: str) -> subprocess.Popen[str]:
        return spawn(*cli.argv, "node", *task_flags, "--aggregator", address,
                     "--node-id", f"node-{index}", "--shard", f"{index}/2",
                     "--give-up-after", "60")  # fmt: skip

    with FaultProxy(served.port) as proxy:
        proxy.delay(0.002)  # a slow link: ~0.5 s per 16 MB upload
        node0 = node(0, served.address)
        node1 = node(1, proxy.address)
        wait_until(lambda: "node-1" in core_state(served).uploading, "node-1 to be mid-upload",
                   timeout=PROC_TIMEOUT)  # fmt: skip
        node1.send_signal(signal.SIGKILL)
        node1.wait(WAIT)
        killed_in = core_state(served).round
        wait_until(lambda: slots_free(served), "node-1's staging slot to be freed")
        state = core_state(served)
        assert "node-1" not in state.reported and state.count == len(state.reported)
        assert state.round == killed_in, "the round must wait for the killed (still active) node"

        proxy.pass_through()
        restarted = node(1, proxy.address)
        for name, proc in (("node-0", node0), ("restarted node-1", restarted)):
            code, _, err = finish(proc)
            assert code == 0, f"{name} exited {code}:\n{err}"
    wait_until(lambda: core_state(served).finished, "training to finish")
    got = served.state_dict()

    with LocalCluster("synthetic", nodes=2, task_args=dict(SYNTHETIC_ARGS), seed=0) as cluster:
        want = cluster.run(rounds=rounds).params
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs from the uninterrupted run"


# == aggregator crash ==================================================================================
DIGITS_FLAGS = ("--task", "digits", "--seed", "0")


@pytest.mark.slow
def test_aggregator_sigkill_at_random_moments_resumes_bitwise(
    spawn, cli, tmp_path: Path, closed_port: int
) -> None:
    """SIGKILL the aggregator twice at random moments; restart it with the same command.

    The nodes keep running and reconnect on their own; the final parameters are
    bitwise those of an uninterrupted run (digits: FedAvg with seeded shuffles,
    Adam on the aggregator, so optimizer state must survive too).
    """
    from fedgrad.launch.local import LocalCluster

    rounds, seed = 14, int(os.environ.get("FEDGRAD_FAULT_SEED", "20240603"))
    rng = random.Random(seed)
    first = rng.randint(2, 4)
    kill_rounds = (first, rng.randint(first + 3, first + 6))
    ckpt, save = tmp_path / "ckpt", tmp_path / "final.safetensors"
    address = f"127.0.0.1:{closed_port}"
    command = (*cli.argv, "aggregator", *DIGITS_FLAGS, "--listen", address, "--nodes", "2",
               "--rounds", str(rounds), "--optimizer", "adam", "--lr", "0.01",
               "--checkpoint-dir", ckpt, "--save", save, "--finish-grace", "30",
               "--no-progress", "--port-file", tmp_path / "port")  # fmt: skip

    def start() -> subprocess.Popen[str]:
        (tmp_path / "port").unlink(missing_ok=True)
        proc = spawn(*command)
        assert cli.wait_port(tmp_path / "port", proc, timeout=PROC_TIMEOUT) == closed_port
        return proc

    aggregator = start()
    nodes = [
        spawn(
            *cli.argv,
            "node",
            *DIGITS_FLAGS,
            "--aggregator",
            address,
            "--node-id",
            f"node-{i}",
            "--shard",
            f"{i}/2",
            "--give-up-after",
            "90",
        )  # fmt: skip
        for i in range(2)
    ]
    resumed_at = []
    for k in kill_rounds:
        wait_until(lambda k=k: read_checkpoint_round(ckpt) >= k, f"round {k}", PROC_TIMEOUT)
        time.sleep(rng.uniform(0.0, 0.05))
        aggregator.send_signal(signal.SIGKILL)
        code, _, err = finish(aggregator, WAIT)
        assert code == -signal.SIGKILL, err
        committed = read_checkpoint_round(ckpt)
        assert committed < rounds, "killed after training ended: the kill rounds are too late"
        resumed_at.append(committed)
        aggregator = start()

    code, _, err = finish(aggregator)
    assert code == 0, f"aggregator exited {code}:\n{err}"
    for want in resumed_at[-1:]:
        assert f"resumed from checkpoint at round {want}" in err, err
    for i, proc in enumerate(nodes):
        code, _, node_err = finish(proc)
        assert code == 0, f"node-{i} exited {code}:\n{node_err}"

    got = load_file(str(save))
    with LocalCluster("digits", nodes=2, seed=0, optimizer="adam", lr=0.01) as cluster:
        want = cluster.run(rounds=rounds).params
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), (
            f"{name} differs from the uninterrupted run (kills at rounds {kill_rounds},"
            f" resumed at {resumed_at}, FEDGRAD_FAULT_SEED={seed})"
        )


@pytest.mark.slow
def test_resumed_round_is_recomputed_bitwise(
    serve, hand_node, spawn, cli, tmp_path: Path, closed_port: int
) -> None:
    """The aggregator dies after counting a node's upload; the resumed one gets the same bytes.

    digits: the node's minibatch shuffles come from the round's generator, seeded by
    (seed, node id, round), so the recomputed upload equals the lost one bitwise.
    """
    cfg = dict(listen=f"127.0.0.1:{closed_port}", nodes=2, rounds=3, seed=0,
               checkpoint_dir=str(tmp_path / "ckpt"), round_timeout=ROUND_FOREVER)  # fmt: skip
    first = serve("digits", **cfg)
    hand_node(first, "node-0", num_samples=100)  # never uploads: the round stays open
    log = tmp_path / "node.log"
    node = spawn(*cli.argv, "node", *DIGITS_FLAGS, "--aggregator", first.address,
                 "--node-id", "node-1", "--shard", "1/2", "--give-up-after", "60",
                 log=log)  # fmt: skip
    # count, not reported: an upload is reported when accepted and counted once reduced.
    wait_until(lambda: core_state(first).count == 1, "node-1's upload", PROC_TIMEOUT)
    lost = core_state(first)
    first.stop()  # the in-memory accumulation is gone; the checkpoint says round 0

    second = serve("digits", **cfg)
    wait_until(lambda: core_state(second).count == 1, "node-1 to redo round 0",
               PROC_TIMEOUT)  # fmt: skip
    again = core_state(second)
    assert (lost.round, again.round) == (0, 0)
    assert np.array_equal(lost.total, again.total), "the recomputed upload differs"
    # The aggregator counts before it replies: wait for the node to hear the reply too
    # (a SIGTERM right after the count could come before it logs the upload).
    wait_until(lambda: log.read_text().count("round 0 uploaded") == 2,
               "node-1 to hear its second upload counted", PROC_TIMEOUT)  # fmt: skip
    node.send_signal(signal.SIGTERM)
    assert node.wait(WAIT) == 0, log.read_text()
    assert log.read_text().count("round 0 uploaded") == 2, log.read_text()


LEFTOVERS = ["partial-temp-state", "truncated-new-state", "new-state-json-not-renamed"]


@pytest.mark.parametrize("leftover", LEFTOVERS)
def test_interrupted_checkpoint_write_leaves_the_previous_one_loadable(
    leftover: str, serve, hand_node, tmp_path: Path
) -> None:
    """Files a crash while writing round 3's checkpoint can leave; round 2's still loads.

    Rounds are checkpointed before they are published, so the test waits for a round
    to be *published* (``pull``), never for its JSON to appear: a JSON on disk neither
    means that its round takes uploads nor that its write (the cleanup after the
    commit) has returned. It once waited for the JSON, stopped the aggregator and
    restarted one while the round-2 write was still finishing in a thread the stop
    does not wait for; that write's cleanup deleted the restarted aggregator's
    ``state-3.safetensors`` (``tests/unit/test_checkpoint.py`` pins the fix).
    """
    ckpt = tmp_path / "ckpt"
    cfg = dict(nodes=1, rounds=6, checkpoint_dir=str(ckpt))
    served = serve("linear", **cfg)
    a = hand_node(served, "node-0", num_samples=4)
    for r in range(2):
        assert a.pull(r)[0].round == r
        a.push(r, constant_grads(a.specs, 0.5 + r))
    assert a.pull(2)[0].round == 2
    assert read_checkpoint_round(ckpt) == 2, "round 2 was published before its checkpoint"
    at_two = served.state_dict()
    served.stop()

    good = (ckpt / "state-2.safetensors").read_bytes()
    if leftover == "partial-temp-state":
        (ckpt / ".state-3.safetensors.tmp").write_bytes(good[: len(good) // 2])
    elif leftover == "truncated-new-state":
        (ckpt / "state-3.safetensors").write_bytes(good[: len(good) // 3])
    else:  # the state file was renamed, the JSON not yet: its temp is half written
        (ckpt / "state-3.safetensors").write_bytes(good)
        (ckpt / ".checkpoint.json.tmp").write_text('{"format": 1, "round": 3, "tens')

    loaded = load_checkpoint(ckpt)
    assert loaded is not None
    doc, params, _ = loaded
    assert doc["round"] == 2
    assert_params({k: params[k] for k in at_two}, at_two)

    resumed = serve("linear", **cfg)
    b = hand_node(resumed, "node-0", num_samples=4)
    assert b.reply.round == 2
    assert_params(resumed.state_dict(), at_two)
    b.push(2, constant_grads(b.specs, 0.25))  # the next checkpoint overwrites the debris
    assert b.pull(3)[0].round == 3
    loaded = load_checkpoint(ckpt)
    assert loaded is not None and loaded[0]["round"] == 3
    assert not list(ckpt.glob(".*.tmp")), f"debris left: {sorted(ckpt.glob('.*.tmp'))}"
    assert [p.name for p in ckpt.glob("state-*")] == ["state-3.safetensors"]


@pytest.mark.slow
def test_sigkill_during_a_large_checkpoint_write(spawn, cli, tmp_path: Path, connect, wire) -> None:
    """SIGKILL while a 120 MB checkpoint is being written: the previous one loads on restart."""
    ckpt, port_file = tmp_path / "ckpt", tmp_path / "port"
    command = (*cli.argv, "aggregator", "--task", "synthetic", "--task-arg", "params=30000000",
               "--task-arg", "tensors=3", "--listen", "127.0.0.1:0", "--port-file", port_file,
               "--nodes", "1", "--rounds", "3", "--checkpoint-dir", ckpt,
               "--no-progress")  # fmt: skip
    aggregator = spawn(*command)
    port = cli.wait_port(port_file, aggregator, timeout=PROC_TIMEOUT)
    stub = connect(port)
    reply = stub.Join(pb.JoinRequest(node_id="node-0", num_samples=1), timeout=PROC_TIMEOUT)
    assert read_checkpoint_round(ckpt) == 0  # written before round 0 opened
    specs = manifest_from_proto(reply.manifest)
    messages = wire.upload(
        wire.header(0, "node-0"), wire.chunks(specs, constant_grads(specs, 1.0), reply.chunk_bytes)
    )
    temp = ckpt / ".state-1.safetensors.tmp"
    call = stub.PushGradients.future(iter(messages), timeout=PROC_TIMEOUT)
    deadline = time.monotonic() + PROC_TIMEOUT
    while not temp.exists():  # the round-1 checkpoint is being written
        assert time.monotonic() < deadline, "no checkpoint write was seen"
        assert read_checkpoint_round(ckpt) == 0, "the round-1 checkpoint was written unseen"
        time.sleep(0.0005)
    aggregator.send_signal(signal.SIGKILL)
    code, _, _ = finish(aggregator, WAIT)
    assert code == -signal.SIGKILL
    try:  # the upload was acknowledged before the step, or cut by the kill
        call.result(timeout=CALL)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
    del messages

    committed = read_checkpoint_round(ckpt)
    loaded = load_checkpoint(ckpt)  # whatever the kill left, the committed checkpoint loads
    assert loaded is not None and loaded[0]["round"] == committed
    assert temp.exists(), "the kill missed the checkpoint write (raise params)"
    assert committed == 0, "killed mid-write: round 0 is still the committed checkpoint"
    assert all(not v.any() for v in loaded[1].values()), "round 0 holds the initial zeros"

    port_file.unlink()
    restarted = spawn(*command)
    port = cli.wait_port(port_file, restarted, timeout=PROC_TIMEOUT)
    reply = connect(port).Join(pb.JoinRequest(node_id="node-0", num_samples=1), timeout=CALL)
    assert reply.round == committed
    restarted.send_signal(signal.SIGTERM)
    code, _, err = finish(restarted, WAIT)
    assert code == 0, err
    assert f"resumed from checkpoint at round {committed}" in err, err
