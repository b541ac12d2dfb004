"""A node says at Join which model, seed and task it runs; a mismatched one stops at once.

Real aggregators (the ``serve`` fixture, 127.0.0.1 port 0) and real ``Node``s: the
aggregator refuses a node whose model, seed or task is not its own with
INVALID_ARGUMENT, and the node stops with the aggregator's message instead of
training something else.
"""

from __future__ import annotations

import pytest

from fedgrad.client.node import Node, join_request
from fedgrad.codec import Layout, manifest_to_proto, specs_of
from fedgrad.config import NodeConfig
from fedgrad.errors import ConfigError, RefusedError, TaskError
from fedgrad.task import load_task, trainable_parameters
from fedgrad.tasks.linear import LinearTask


def _node(address: str, seed: int = 0, **task_args: str) -> Node:
    cfg = NodeConfig(
        task="linear",
        task_args=tuple(task_args.items()),
        aggregator=address,
        node_id="n1",
        seed=seed,
        give_up_after=30.0,
    )
    return Node(load_task("linear", task_args, seed=seed), cfg)


def _refusal(node: Node) -> str:
    try:
        with pytest.raises(RefusedError) as info:
            node.run()
    finally:
        node.close()
    return str(info.value)


def test_the_request_carries_manifest_seed_and_canonical_task():
    task = load_task("linear", {"noise": "0.5", "features": "3"})
    model = task.model()
    layout = Layout(specs_of(trainable_parameters(model)))
    cfg = NodeConfig(task="linear", task_args=(("noise", "0.5"), ("features", "3")), seed=7)
    request = join_request(cfg, layout, num_samples=12)
    assert (request.node_id, request.num_samples) == ("node-0", 12)
    assert request.manifest == manifest_to_proto(layout.specs)
    assert request.HasField("seed") and request.seed == 7
    assert request.task == "linear?features=3&noise=0.5"  # sorted by key
    plain = join_request(NodeConfig(task="digits"), layout, 1)
    assert plain.task == "digits"


def test_a_negative_seed_is_refused_at_start_up():
    # JoinRequest.seed is a uint64: the config refuses what the wire cannot carry.
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        NodeConfig(seed=-1)
    assert join_request(NodeConfig(seed=0), Layout([]), 1).seed == 0


def test_another_seed_is_refused_at_join(serve):
    served = serve("linear", seed=1)
    message = _refusal(_node(served.address, seed=0))
    assert "INVALID_ARGUMENT" in message and "--seed 0" in message and "--seed 1" in message
    assert served.call(lambda: sorted(served.core.nodes)) == []


def test_other_task_options_are_refused_at_join(serve):
    served = serve("linear")
    message = _refusal(_node(served.address, noise="0.5"))
    assert "INVALID_ARGUMENT" in message and "linear?noise=0.5" in message


def test_another_model_is_refused_at_join(serve):
    served = serve("linear")
    message = _refusal(_node(served.address, features="3"))
    assert "INVALID_ARGUMENT" in message and "model differs" in message


def test_the_same_model_seed_and_task_join_and_train(serve):
    served = serve("linear", task_args={"noise": "0.5"}, seed=3, rounds=1)
    node = _node(served.address, seed=3, noise="0.5")
    try:
        result = node.run()
    finally:
        node.close()
    assert result.uploads == 1


class _Crashes(LinearTask):
    """The linear task whose gradient computation fails, as a buggy user task would."""

    def compute_update(self, model, data, generator):  # type: ignore[no-untyped-def]
        raise TaskError("the task crashed before its first upload")


def test_a_node_whose_task_crashes_leaves_so_the_round_does_not_wait_for_it(serve):
    # Issue 12, "Joining": a node whose task crashes before its first upload is not
    # waited for until the round deadline: it leaves, and the round closes without it.
    served = serve("linear", nodes=2, min_nodes=1, start_timeout=0.5, rounds=1, round_timeout=600.0)
    cfg = NodeConfig(task="linear", aggregator=served.address, node_id="crashes")
    node = Node(_Crashes(), cfg)
    try:
        with pytest.raises(TaskError, match="crashed"):
            node.run()
    finally:
        node.close()
    assert served.call(lambda: served.core.nodes["crashes"].state) == "left"
    good = _node(served.address)
    try:
        assert good.run().uploads == 1, "the round closes with the node that stayed"
    finally:
        good.close()
    assert served.call(lambda: served.core.history[0].nodes) == 1
