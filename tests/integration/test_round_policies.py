"""Sampled, over-committed and asynchronous rounds over real gRPC (the stragglers issue).

- sampling: ``test_sampled_rounds_select_k_reproducibly``,
  ``test_a_resumed_sampled_run_selects_the_same_nodes``,
  ``test_an_unselected_node_waits_in_its_pull_and_its_upload_is_refused``,
  ``test_a_selected_node_killed_mid_run_is_replaced_and_training_finishes``
- over-commitment: ``test_overcommit_closes_each_round_with_the_first_k``
- asynchronous: ``test_async_versions_apply_buffer_uploads_and_replay_bitwise``,
  ``test_async_staleness_bound_aborts_with_the_current_version``,
  ``test_async_aggregator_killed_resumes_and_replays_bitwise``
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from faults_support import CALL, PROC_TIMEOUT, constant_grads, finish, read_checkpoint_round
from polling import WAIT, wait_until
from safetensors.torch import load_file

from fedgrad.config import AggregatorConfig
from fedgrad.launch.local import ClusterResult, LocalCluster
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.server.checkpoint import load_checkpoint
from fedgrad.server.replay import replay
from fedgrad.task import load_task

DIGITS = ("--task", "digits", "--seed", "0")


def _run(rounds: int, nodes: int = 6, **options: Any) -> ClusterResult:
    with LocalCluster("digits", nodes=nodes, **options) as cluster:
        return cluster.run(rounds=rounds)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _current_round(exc: grpc.RpcError) -> int:
    for key, value in exc.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "fedgrad-current-round":
            return int(value)
    raise AssertionError(f"no fedgrad-current-round: {exc.details()}")


# -- sampling ---------------------------------------------------------------------------
def test_sampled_rounds_select_k_reproducibly() -> None:
    first, again = _run(4, sample=2), _run(4, sample=2)
    assert [(h.selected, h.nodes) for h in first.history] == [(2, 2)] * 4
    for entry in first.journal:
        assert len(entry["selected"]) == 2
        assert {u["node"] for u in entry["uploads"]} == set(entry["selected"])
    assert [e["selected"] for e in first.journal] == [e["selected"] for e in again.journal]
    assert len({tuple(e["selected"]) for e in first.journal}) > 1, "rounds draw anew"
    assert _equal(first.params, again.params)
    other = _run(4, sample=2, seed=1)
    assert [e["selected"] for e in other.journal] != [e["selected"] for e in first.journal]


def test_a_resumed_sampled_run_selects_the_same_nodes(tmp_path: Path) -> None:
    whole = _run(5, sample=2, checkpoint_dir=str(tmp_path / "whole"))
    _run(2, sample=2, checkpoint_dir=str(tmp_path / "split"))
    resumed = _run(5, sample=2, checkpoint_dir=str(tmp_path / "split"))
    assert [e["selected"] for e in resumed.journal] == [e["selected"] for e in whole.journal]
    assert [h.round for h in resumed.history] == list(range(5))
    assert _equal(resumed.params, whole.params)


def test_an_unselected_node_waits_in_its_pull_and_its_upload_is_refused(serve, hand_node) -> None:
    served = serve("digits", nodes=3, sample=1, rounds=2, round_timeout=600.0)
    nodes = {n.node_id: n for n in (hand_node(served, f"n{i}") for i in range(3))}
    selected = served.call(lambda: served.core.engine.selected)
    assert selected is not None and len(selected) == 1
    (chosen,) = selected
    outsider = nodes[sorted(set(nodes) - selected)[0]]

    with pytest.raises(grpc.RpcError) as waited:
        stream = outsider.stub.PullParameters(
            pb.PullRequest(node_id=outsider.node_id, min_round=0), timeout=0.5
        )
        next(stream)
    assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, "it waits in its pull"

    g = constant_grads(outsider.specs, 0.25)
    with pytest.raises(grpc.RpcError) as refused:
        outsider.push(0, g)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not selected for round 0" in refused.value.details()

    status = outsider.stub.GetStatus(pb.StatusRequest(), timeout=CALL)
    states = {n.node_id: n.state for n in status.nodes}
    assert states[chosen] == "active" and states[outsider.node_id] == "unselected"
    assert (status.selected, status.mode, status.reported) == (1, "sync", 0)

    header, _ = nodes[chosen].pull(0)
    assert header.round == 0
    assert nodes[chosen].push(0, g).round == 0
    wait_until(lambda: served.call(lambda: served.core.round) == 1, "round 0 to close")
    history = served.call(lambda: list(served.core.history))
    assert (history[0].nodes, history[0].selected) == (1, 1)


def test_a_selected_node_killed_mid_run_is_replaced_and_training_finishes(
    spawn, cli, tmp_path: Path, closed_port: int
) -> None:
    address, ckpt = f"127.0.0.1:{closed_port}", tmp_path / "ckpt"
    aggregator = spawn(*cli.argv, "aggregator", *DIGITS, "--listen", address, "--nodes", "4",
                       "--sample", "2", "--rounds", "8", "--round-timeout", "2",
                       # All four join before round 0, however slowly their processes start
                       # (without it a late starter could find the run already over).
                       "--start-timeout", "120",
                       "--checkpoint-dir", ckpt, "--finish-grace", "5", "--no-progress",
                       "--port-file", tmp_path / "port")  # fmt: skip
    cli.wait_port(tmp_path / "port", aggregator, timeout=PROC_TIMEOUT)
    nodes = [
        spawn(
            *cli.argv,
            "node",
            *DIGITS,
            "--aggregator",
            address,
            "--node-id",
            f"node-{i}",
            "--shard",
            f"{i}/4",
            "--give-up-after",
            "60",
        )  # fmt: skip
        for i in range(4)
    ]
    wait_until(lambda: read_checkpoint_round(ckpt) >= 2, "round 2", PROC_TIMEOUT)
    nodes[0].send_signal(signal.SIGKILL)  # no Leave: the aggregator finds out by the deadline
    killed_at = read_checkpoint_round(ckpt)
    code, _, aggregator_err = finish(aggregator)
    assert code == 0, aggregator_err
    for proc in nodes[1:]:
        code, _, err = finish(proc)
        assert code == 0, f"{err[-3000:]}\nthe aggregator's log:\n{aggregator_err[-3000:]}"
    doc = load_checkpoint(str(ckpt))
    assert doc is not None
    journal = doc[0]["journal"]
    assert [e["version"] for e in journal] == list(range(8))
    for entry in journal:
        assert entry["uploads"], f"round {entry['version']} applied nothing"
        assert {u["node"] for u in entry["uploads"]} <= set(entry["selected"])
    # Once it missed a deadline, the dead node is not drawn again (it never came back).
    late = [e for e in journal[killed_at + 1 :] if "node-0" in e["selected"]]
    assert len(late) <= 1, f"node-0 selected again after it missed a deadline: {late}"


# -- over-commitment --------------------------------------------------------------------
def test_overcommit_closes_each_round_with_the_first_k() -> None:
    result = _run(4, nodes=5, sample=2, overcommit=2.0)
    assert [(h.selected, h.nodes) for h in result.history] == [(4, 2)] * 4
    for entry in result.journal:
        assert len(entry["uploads"]) == 2
        assert {u["node"] for u in entry["uploads"]} <= set(entry["selected"])
    assert result.history[-1].test_accuracy > 0.8


# -- asynchronous -----------------------------------------------------------------------
def test_async_versions_apply_buffer_uploads_and_replay_bitwise() -> None:
    options = {"mode": "async", "buffer": 2, "max_staleness": 3, "staleness": "polynomial:1"}
    with LocalCluster("digits", nodes=5, **options) as cluster:
        result = cluster.run(rounds=8)
        again = cluster.replay(result.journal)
    assert [e["version"] for e in result.journal] == list(range(8))
    for record, entry in zip(result.history, result.journal, strict=True):
        stale = [u["staleness"] for u in entry["uploads"]]
        assert len(stale) == 2 == record.nodes
        assert max(stale) == record.staleness_max <= 3
        assert record.staleness_mean == pytest.approx(sum(stale) / len(stale))
        assert all(u["staleness"] == entry["version"] - u["computed_on"] for u in entry["uploads"])
    assert any(r.staleness_max > 0 for r in result.history), "5 nodes, buffer 2: some stale"
    assert _equal(again, result.params), "the journal replays to bitwise the same parameters"
    shuffled = [dict(e, uploads=list(reversed(e["uploads"]))) for e in result.journal]
    shuffled[0]["uploads"][0] = dict(shuffled[0]["uploads"][0], weight=1)
    with LocalCluster("digits", nodes=5, **options) as cluster:
        assert not _equal(cluster.replay(shuffled), result.params), "the replay can fail"


def test_async_staleness_bound_aborts_with_the_current_version(serve, hand_node) -> None:
    served = serve("linear", nodes=2, mode="async", buffer=1, max_staleness=1, rounds=10)
    a, b = hand_node(served, "node-0", 4), hand_node(served, "node-1", 4)
    g = constant_grads(a.specs, 0.5)
    for version in (0, 1):
        assert a.push(version, g).round == version
        wait_until(lambda v=version: served.call(lambda: served.core.round) == v + 1, "a version")
    params = served.state_dict()
    with pytest.raises(grpc.RpcError) as info:
        b.push(0, g)
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert "2 versions old" in info.value.details()
    assert _current_round(info.value) == 2
    assert _equal(served.state_dict(), params), "a refused upload leaves no trace"
    assert b.push(1, g).round == 1, "staleness 1 is within the bound"
    wait_until(lambda: served.call(lambda: served.core.round) == 3, "version 3")
    record = served.call(lambda: served.core.history[-1])
    assert (record.nodes, record.staleness_max, record.selected) == (1, 1, 0)


@pytest.mark.slow
def test_async_aggregator_killed_resumes_and_replays_bitwise(
    spawn, cli, tmp_path: Path, closed_port: int
) -> None:
    rounds, address = 12, f"127.0.0.1:{closed_port}"
    ckpt, save = tmp_path / "ckpt", tmp_path / "final.safetensors"
    command = (*cli.argv, "aggregator", *DIGITS, "--listen", address, "--nodes", "3",
               "--mode", "async", "--buffer", "2", "--rounds", str(rounds),
               "--checkpoint-dir", ckpt, "--save", save, "--finish-grace", "20",
               "--no-progress", "--port-file", tmp_path / "port")  # fmt: skip

    def start() -> subprocess.Popen[str]:
        (tmp_path / "port").unlink(missing_ok=True)
        proc = spawn(*command)
        cli.wait_port(tmp_path / "port", proc, timeout=PROC_TIMEOUT)
        return proc

    aggregator = start()
    nodes = [
        spawn(
            *cli.argv,
            "node",
            *DIGITS,
            "--aggregator",
            address,
            "--node-id",
            f"node-{i}",
            "--shard",
            f"{i}/3",
            "--give-up-after",
            "90",
        )  # fmt: skip
        for i in range(3)
    ]
    wait_until(lambda: read_checkpoint_round(ckpt) >= 4, "version 4", PROC_TIMEOUT)
    aggregator.send_signal(signal.SIGKILL)
    assert finish(aggregator, WAIT)[0] == -signal.SIGKILL
    resumed_at = read_checkpoint_round(ckpt)
    assert resumed_at < rounds
    aggregator = start()
    code, _, err = finish(aggregator)
    assert code == 0, err
    assert f"resumed from checkpoint at round {resumed_at}" in err
    for proc in nodes:
        assert finish(proc)[0] == 0

    doc = load_checkpoint(str(ckpt))
    assert doc is not None
    journal = doc[0]["journal"]
    assert [e["version"] for e in journal] == list(range(rounds)), "no version lost or doubled"
    cfg = AggregatorConfig(task="digits", nodes=3, mode="async", buffer=2, rounds=rounds)
    want = replay(
        cfg,
        journal,
        lambda: load_task("digits", {}, seed=0),
        lambda node: (int(node.rpartition("-")[2]), 3),
    )
    got = load_file(str(save))
    assert _equal(got, want), "the saved model is the journal's replay: nothing applied twice"
