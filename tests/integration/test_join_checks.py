"""Join checks the node's model, seed and task; JoinReply says whether the round is open.

Issue 12, "Joining": a mismatched node is refused at Join with a clear status and
message, never registered or counted, and the federation keeps waiting for a
matching node. Also the contract's round_open, seed and contract_version, and
OUT_OF_RANGE for a pull past the last round.
"""

from __future__ import annotations

import grpc
import pytest

from fedgrad.codec import TensorSpec, manifest_to_proto, specs_of
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.task import load_task, trainable_parameters
from fedgrad.wire import CONTRACT_VERSION, task_identity

CALL = 20.0


def _specs(task: str = "linear") -> list[TensorSpec]:
    model = load_task(task, {}).model()
    return specs_of(trainable_parameters(model))


def _join(stub, node_id: str, **fields) -> pb.JoinReply:
    return stub.Join(pb.JoinRequest(node_id=node_id, num_samples=4, **fields), timeout=CALL)


def _status(stub) -> pb.StatusReply:
    return stub.GetStatus(pb.StatusRequest(), timeout=CALL)


def _refused(stub, node_id: str, **fields) -> str:
    with pytest.raises(grpc.RpcError) as info:
        _join(stub, node_id, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return info.value.details()


def test_a_node_with_another_model_is_refused_at_join_and_never_counted(serve, connect) -> None:
    served = serve("linear", nodes=1, rounds=1, seed=5)
    stub = connect(served)
    good = _specs()
    wrong = [TensorSpec(good[0].name, good[0].dtype, (good[0].shape[0] + 1, *good[0].shape[1:]))]
    wrong += good[1:]
    details = _refused(stub, "odd", manifest=manifest_to_proto(wrong))
    assert f"{good[0].name!r}" in details and str(list(wrong[0].shape)) in details, details
    assert str(list(good[0].shape)) in details, details
    status = _status(stub)
    assert (status.phase, list(status.nodes)) == ("waiting", []), "never registered or started"
    fewer = _refused(stub, "short", manifest=manifest_to_proto(good[:1]))
    assert f"1 tensors here but {len(good)}" in fewer
    reply = _join(stub, "good", manifest=manifest_to_proto(good), seed=5,
                  task=task_identity("linear"))  # fmt: skip
    assert reply.round_open and _status(stub).phase == "collecting"
    assert [n.node_id for n in _status(stub).nodes] == ["good"]


def test_another_seed_or_task_is_refused_at_join(serve, connect) -> None:
    served = serve("linear", nodes=2, rounds=1, seed=5)
    stub = connect(served)
    assert "--seed 6" in _refused(stub, "n", seed=6) and "--seed 5" in _refused(stub, "n", seed=6)
    details = _refused(stub, "n", task=task_identity("linear", [("samples", "10")]))
    assert "'linear?samples=10'" in details and "'linear'" in details
    assert list(_status(stub).nodes) == []


def test_join_reply_says_whether_the_round_is_open(serve, connect) -> None:
    served = serve("linear", nodes=2, rounds=2, seed=7)
    stub = connect(served)
    first = _join(stub, "a")
    assert (first.round, first.round_open, first.seed) == (0, False, 7)
    assert first.contract_version == CONTRACT_VERSION == 2
    with pytest.raises(grpc.RpcError) as info:
        pushes = iter([pb.GradientMessage(header=pb.UploadHeader(
            round=0, node_id="a", upload_id="a.r0", num_samples=1))])  # fmt: skip
        stub.PushGradients(pushes, timeout=CALL)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _join(stub, "b").round_open is True


def test_a_pull_past_the_last_round_is_out_of_range(serve, connect) -> None:
    served = serve("linear", nodes=1, rounds=2)
    stub = connect(served)
    _join(stub, "a")
    stream = stub.PullParameters(pb.PullRequest(node_id="a", min_round=3), timeout=CALL)
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "past the last round" in info.value.details()
    header = next(stub.PullParameters(pb.PullRequest(node_id="a", min_round=0), timeout=CALL))
    assert header.header.round == 0, "min_round <= total_rounds still works"
