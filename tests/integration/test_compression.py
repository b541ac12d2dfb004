"""Compressed updates and broadcasts through real gRPC: int8, top-k, PowerSGD, bfloat16.

int8 is compared with a reference dequantization written here; the lossy codecs with
error feedback are checked for training and bitwise reproducibility; ``--broadcast-dtype``
against a reference whose nodes compute on rounded parameters while the master does
not round; a node SIGKILLed and restarted with ``--state-dir`` resumes its residual.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from faults_support import PROC_TIMEOUT, ROUND_FOREVER, core_state, finish
from polling import wait_until

from fedgrad import LocalCluster, Task
from fedgrad.codec import Layout, specs_of
from fedgrad.codecs import codec_for
from fedgrad.seeding import round_generator
from fedgrad.task import load_task, trainable_parameters

SEED = 3
SYNTHETIC = {"params": "30000", "tensors": "4", "shape": "matrix"}


def _dequantized(g: torch.Tensor, block: int) -> torch.Tensor:
    """The int8 round trip by hand: per block scale = max|x| / 127, q = rint(x / scale)."""
    x = g.reshape(-1).numpy().astype(np.float32)
    out = np.zeros_like(x)
    for i in range(0, x.size, block):
        part = x[i : i + block]
        scale = np.float32(np.abs(part).max() / np.float32(127))
        if scale > 0:
            q = np.clip(np.rint(part / scale), -127, 127).astype(np.int8)
            out[i : i + block] = q.astype(np.float32) * scale
    return torch.from_numpy(out).view(g.shape)


def _reference(
    task: Task, nodes: int, rounds: int, *, wire: Any = None, broadcast: Any = None
) -> dict[str, torch.Tensor]:
    """Weighted mean of ``wire(update)`` in float64, SGD at the task's lr; nodes compute on
    the parameters rounded to ``broadcast`` (the master copy is never rounded)."""
    torch.manual_seed(SEED)
    model = task.model()
    params = [p for _, p in trainable_parameters(model)]
    torch.manual_seed(SEED)
    seen = task.model()  # what the nodes hold
    theirs = [p for _, p in trainable_parameters(seen)]
    opt = torch.optim.SGD(params, lr=task.lr)
    for r in range(rounds):
        with torch.no_grad():
            for mine, node in zip(params, theirs, strict=True):
                node.copy_(mine.to(broadcast) if broadcast is not None else mine)
        sums = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
        total = 0
        for i in range(nodes):
            update = task.compute_update(
                seen, task.shard(i, nodes), round_generator(SEED, f"node-{i}", r)
            )
            total += update.num_samples
            for s, g in zip(sums, update.gradients, strict=True):
                sent = wire(g) if wire is not None else g
                s += update.num_samples * sent.to(torch.float64)
        for p, s in zip(params, sums, strict=True):
            p.grad = (s / total).to(p.dtype)
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(task: Any, rounds: int, nodes: int = 2, task_args: Any = None, **options: Any) -> Any:
    node_options = options.pop("node_options", None)
    with LocalCluster(
        task, nodes=nodes, task_args=task_args, seed=SEED, node_options=node_options,
        timeout=120, **options,
    ) as cluster:  # fmt: skip
        return cluster.run(rounds=rounds)


@pytest.mark.parametrize("block", [256, 7])
def test_int8_federation_equals_the_reference_dequantization(block: int) -> None:
    result = _run("synthetic", 3, task_args=SYNTHETIC, node_options={"compress": f"int8:{block}"})
    want = _reference(
        load_task("synthetic", SYNTHETIC, seed=SEED), 2, 3, wire=lambda g: _dequantized(g, block)
    )
    for name, value in want.items():
        torch.testing.assert_close(result.params[name], value, rtol=1e-6, atol=1e-7)
    plain = _run("synthetic", 3, task_args=SYNTHETIC).history[-1].bytes
    specs = Layout(specs_of(trainable_parameters(load_task("synthetic", SYNTHETIC).model())))
    payload = codec_for(f"int8:{block}", specs.specs).layout.total
    assert payload < specs.total * (1 + 4 / block) / 4 + 4 * 4  # a float32 scale per block
    saved = plain - result.history[-1].bytes
    assert saved == 2 * (specs.total - payload), "the history counts each upload's payload"


@pytest.mark.parametrize(
    "options",
    [
        {"compress": "int8", "rounding": "stochastic"},
        {"compress": "topk:0.05"},
        {"compress": "topk:0.05,bfloat16", "error_feedback": "off"},
        {"compress": "powersgd:2"},
    ],
    ids=["int8-stochastic", "topk", "topk-bf16-no-feedback", "powersgd"],
)
def test_lossy_codecs_train_and_seeded_runs_are_bitwise_equal(options: dict[str, str]) -> None:
    args = {"local_steps": "0"}  # FedSGD: every round's gradient goes through the codec
    first = _run("digits", 4, nodes=2, task_args=args, node_options=options)
    again = _run("digits", 4, nodes=2, task_args=args, node_options=options)
    for name, value in first.params.items():
        assert torch.equal(value, again.params[name]), f"{name} differs between two seeded runs"
    losses = [r.train_loss for r in first.history]
    assert losses[-1] < losses[0], f"training did not progress: {losses}"


def test_broadcast_dtype_rounds_what_nodes_see_and_not_the_master() -> None:
    result = _run("linear", 4, broadcast_dtype="bfloat16")
    want = _reference(load_task("linear", {}, seed=SEED), 2, 4, broadcast=torch.bfloat16)
    for name, value in want.items():
        torch.testing.assert_close(result.params[name], value, rtol=1e-6, atol=1e-7)
    weights = next(iter(result.params.values()))
    assert not torch.equal(weights, weights.to(torch.bfloat16).float()), "the master was rounded"
    plain = _run("linear", 4)
    assert result.history[-1].bytes < plain.history[-1].bytes


@pytest.mark.slow
@pytest.mark.parametrize("state_dir", [True, False], ids=["state-dir", "no-state-dir"])
def test_a_restarted_node_resumes_its_residual_from_the_state_dir(
    serve, spawn, cli, tmp_path: Path, state_dir: bool
) -> None:
    """SIGKILL node-1 once round 1 counted its upload, restart it with the same command:
    with --state-dir the run equals an uninterrupted one bitwise; without, it does not."""
    rounds, codec = 5, "topk:0.02"
    served = serve("synthetic", task_args=SYNTHETIC, nodes=2, rounds=rounds, seed=SEED,
                   round_timeout=ROUND_FOREVER, finish_grace=20.0)  # fmt: skip
    flags = ["--task", "synthetic", "--seed", str(SEED), "--compress", codec]
    for key, value in SYNTHETIC.items():
        flags += ["--task-arg", f"{key}={value}"]

    def node(index: int) -> subprocess.Popen[str]:
        extra = ["--state-dir", str(tmp_path / f"state-{index}")] if state_dir else []
        if index == 0:  # slow: node-1 has reported and waits when it is killed
            extra += ["--simulate-delay", "0.5"]
        return spawn(*cli.argv, "node", *flags, *extra, "--aggregator", served.address,
                     "--node-id", f"node-{index}", "--shard", f"{index}/2",
                     "--give-up-after", "60")  # fmt: skip

    node0, node1 = node(0), node(1)
    wait_until(lambda: core_state(served).round >= 1 and "node-1" in core_state(served).reported,
               "node-1's upload in round 1", timeout=PROC_TIMEOUT)  # fmt: skip
    node1.send_signal(signal.SIGKILL)
    node1.wait(PROC_TIMEOUT)
    restarted = node(1)
    for name, proc in (("node-0", node0), ("restarted node-1", restarted)):
        code, _, err = finish(proc)
        assert code == 0, f"{name} exited {code}:\n{err}"
    wait_until(lambda: core_state(served).finished, "training to finish")
    got = served.state_dict()
    want = _run("synthetic", rounds, task_args=SYNTHETIC, node_options={"compress": codec}).params
    same = all(torch.equal(got[name], want[name]) for name in want)
    assert same is state_dir, (
        "with --state-dir the restarted node must resume its residual (bitwise equal run);"
        " without it a restart starts from zero (the run differs)"
    )
