"""The PushGradients reply means "counted"; the add into the accumulator comes after it.

Real aggregator on 127.0.0.1:0, hand nodes over real gRPC. The aggregator's own
worker-thread calls (the reduce, the step) are held on a ``threading.Event`` so
the moments between "counted" and "added", and "step begun" and "round closed",
can be observed; nothing is mocked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
import torch

from fedgrad.task import load_task

TASK = ("synthetic", {"params": "3000", "tensors": "3"})
LR = 0.5
HOLD_LIMIT = 30.0  # a held call is released by the test long before this


def _held(fn: Callable[..., Any], gate: threading.Event, entered: threading.Event) -> Callable:
    """Wrap ``fn`` so that it waits for ``gate`` (in the caller's thread) before running."""

    def run(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        if not gate.wait(HOLD_LIMIT):
            raise RuntimeError("the test never released the gate")
        return fn(*args, **kwargs)

    return run


def _gradients(specs: Any, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s.shape, generator=gen, dtype=torch.float32) for s in specs]


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def test_reply_comes_before_the_add_and_the_round_waits_for_it(serve, hand_node) -> None:
    task = load_task(TASK[0], TASK[1], seed=0)
    served = serve(task, nodes=2, rounds=2, lr=LR, optimizer="sgd", reduce="weighted-mean")
    samples = (30, 70)
    nodes = [hand_node(served, f"node-{i}", num_samples=n) for i, n in enumerate(samples)]
    _, theta0 = nodes[0].pull(0)
    gate, entered = threading.Event(), threading.Event()
    core = served.core
    served.call(lambda: setattr(core.reducer, "add", _held(core.reducer.add, gate, entered)))
    grads = [_gradients(nodes[0].specs, seed) for seed in (1, 2)]

    try:
        for node, g in zip(nodes, grads, strict=True):
            assert node.push(0, g).round == 0  # replied while the add is held
        assert entered.wait(10), "the reduce never started"
        state = served.call(lambda: (core.round, core.reducer.count, core.engine.pending_adds))
        # Both counted, none added, the round open: it waits for its counted uploads.
        assert state == (0, 0, 2)
        assert served.call(lambda: set(core.reported)) == {"node-0", "node-1"}
        assert served.call(lambda: core.phase) == "collecting"
    finally:
        gate.set()

    header, theta1 = nodes[0].pull(1)
    assert header.round == 1
    total = sum(samples)
    for t0, t1, g0, g1 in zip(theta0, theta1, *grads, strict=True):
        mean = (samples[0] * g0.double() + samples[1] * g1.double()) / total
        torch.testing.assert_close(t1, (t0.double() - LR * mean).float(), rtol=1e-6, atol=1e-7)
    assert served.call(lambda: (core.reducer.count, core.engine.pending_adds)) == (0, 0)


def test_upload_finishing_during_the_step_is_aborted_with_the_next_round(serve, hand_node) -> None:
    task = load_task(TASK[0], TASK[1], seed=0)
    served = serve(task, nodes=2, rounds=2, round_timeout=0.5, min_nodes=1, start_timeout=60.0)
    early, late = (hand_node(served, f"node-{i}") for i in range(2))
    specs = early.specs
    gate, entered = threading.Event(), threading.Event()
    core = served.core
    served.call(lambda: setattr(core.model, "step", _held(core.model.step, gate, entered)))

    try:
        early.push(0, _gradients(specs, 1))
        # The deadline closes round 0 with the quorum of one; its step is held.
        assert entered.wait(10), "the round never began its step"
        assert served.call(lambda: (core.round, core.phase)) == (0, "stepping")
        with pytest.raises(grpc.RpcError) as caught:
            late.push(0, _gradients(specs, 2))
        assert caught.value.code() == grpc.StatusCode.ABORTED
        trailing = dict(caught.value.trailing_metadata() or ())
        assert trailing.get("fedgrad-current-round") == "1"
        assert served.call(lambda: set(core.reported)) == {"node-0"}
    finally:
        gate.set()

    header, _ = late.pull(1)
    assert header.round == 1
    _wait(lambda: served.call(lambda: core.phase) != "stepping", "the round to close")
    # The aborted upload left no trace: round 1 starts empty and takes the late node's upload.
    assert late.push(1, _gradients(specs, 3)).round == 1
