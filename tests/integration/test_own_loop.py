"""Your own loop as a node (``fedgrad.connect``) against an aggregator that has only the
model (``--model``): bitwise the Task-based federation for the same data and seeds."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

import fedgrad
from fedgrad import LocalCluster
from fedgrad.seeding import round_generator
from fedgrad.task import ModelTask, load_task

SEED, NODES, ROUNDS = 6, 2, 4


def _digits(**args: str) -> Any:
    return load_task("digits", args, seed=SEED)


def _run_nodes(
    address: str, loop: Callable[[int, fedgrad.client.session.Connection], None]
) -> None:
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            with fedgrad.connect(
                address, f"node-{index}", num_samples=_samples(index), give_up_after=30
            ) as node:
                loop(index, node)
        except BaseException as e:  # reported below, on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(NODES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


def _samples(index: int) -> int:
    task = _digits()
    return task.num_samples(task.shard(index, NODES))


def test_own_loop_fedsgd_equals_the_task_based_federation_bitwise(serve) -> None:
    task = _digits(local_steps="0")
    with LocalCluster(task, nodes=NODES, seed=SEED, lr=0.5) as cluster:
        want = cluster.run(rounds=ROUNDS).params
    served = serve(
        ModelTask(task.model, "digits-model"), nodes=NODES, rounds=ROUNDS, seed=SEED, lr=0.5
    )

    def loop(index: int, node: Any) -> None:
        model = task.model()  # the aggregator's parameters replace these at once
        data = task.shard(index, NODES)
        opt = node.distributed_optimizer(model)
        steps = 0
        while not node.finished:
            opt.zero_grad()
            model.train()
            task.loss(model, data).backward()  # what the task's FedSGD computes
            opt.step()
            steps += 1
        assert steps == ROUNDS and node.current_round == ROUNDS

    _run_nodes(served.address, loop)
    got = served.state_dict()
    for name, value in want.items():
        assert torch.equal(got[name], value), f"{name} differs from the Task-based run"


def test_a_round_block_of_own_steps_equals_task_based_fedavg_bitwise(serve) -> None:
    task = _digits(local_steps="5")
    with LocalCluster(task, nodes=NODES, seed=SEED) as cluster:
        want = cluster.run(rounds=ROUNDS).params
    served = serve(
        ModelTask(task.model, "digits-model"), nodes=NODES, rounds=ROUNDS, seed=SEED, lr=task.lr
    )

    def loop(index: int, node: Any) -> None:
        model = task.model()
        data = task.shard(index, NODES)
        node.attach(model)
        while not node.finished:
            with node.round(model) as context:
                # The task's own local steps: its batches, its fresh SGD each round.
                batches = task.batches(data, round_generator(SEED, f"node-{index}", context.round))
                opt = torch.optim.SGD(model.parameters(), lr=task.local_lr)
                model.train()
                for _ in range(task.local_steps):
                    opt.zero_grad(set_to_none=True)
                    task.loss(model, next(batches)).backward()
                    opt.step()

    _run_nodes(served.address, loop)
    got = served.state_dict()
    for name, value in want.items():
        assert torch.equal(got[name], value), f"{name} differs from the Task-based run"


def test_local_steps_keep_the_local_optimizer_state_across_rounds(serve) -> None:
    task = _digits()
    served = serve(ModelTask(task.model, "digits-model"), nodes=NODES, rounds=3, seed=SEED, lr=1.0)
    momenta: dict[int, list[float]] = {0: [], 1: []}

    def loop(index: int, node: Any) -> None:
        model = task.model()
        local = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = node.distributed_optimizer(model, local=local, local_steps=3)
        data = task.shard(index, NODES)
        batches = task.batches(data, torch.Generator().manual_seed(index))
        while not node.finished:
            opt.zero_grad()
            task.loss(model, next(batches)).backward()
            before = node.current_round
            opt.step()
            if node.current_round != before:  # a round went up: the momentum must remain
                buffer = local.state[next(iter(model.parameters()))]["momentum_buffer"]
                momenta[index].append(float(buffer.abs().sum()))

    _run_nodes(served.address, loop)
    assert all(len(m) == 3 and all(v > 0 for v in m) for m in momenta.values()), momenta
    history = served.core.history
    assert [r.nodes for r in history] == [NODES] * 3


def test_a_finished_federation_says_so_instead_of_taking_more_steps(serve) -> None:
    task = _digits(local_steps="0")
    served = serve(ModelTask(task.model, "digits-model"), nodes=1, rounds=1, seed=SEED)
    with fedgrad.connect(served.address, "solo", num_samples=10) as node:
        model = task.model()
        opt = node.distributed_optimizer(model)
        task.loss(model, task.shard(0, 1)).backward()
        opt.step()
        assert node.finished
        with pytest.raises(fedgrad.FedgradError, match="training is finished"):
            opt.step()
