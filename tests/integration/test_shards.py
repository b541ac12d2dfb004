"""A sharded aggregator (issue 15): K shards equal one, all or nothing, bad input refused.

Every shard is a real grpc.aio server on 127.0.0.1; the nodes are fedgrad nodes
(``LocalCluster(shards=K)``) or hand-driven streams that stop where a killed node would.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fedgrad import LocalCluster
from fedgrad.codec import Layout, byte_view, iter_chunk_pieces, manifest_from_proto
from fedgrad.config import AggregatorConfig
from fedgrad.errors import ConfigError
from fedgrad.framing import encode_chunk
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.proto import fedgrad_pb2_grpc as pb_grpc
from fedgrad.server.app import ServerThread
from fedgrad.shards import Piece, piece_specs, piece_views
from fedgrad.task import load_task

CALL = 30.0


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_k_shards_step_bitwise_like_one_aggregator(optimizer: str) -> None:
    runs = {}
    for k in (1, 2, 4):
        with LocalCluster(
            "linear", nodes=3, shards=k, optimizer=optimizer, accumulate="reproducible"
        ) as cluster:
            runs[k] = cluster.run(3)
    for k in (2, 4):
        assert runs[k].params.keys() == runs[1].params.keys()
        for name, value in runs[1].params.items():
            assert torch.equal(runs[k].params[name], value), (k, name)
        assert [r.train_loss for r in runs[k].history] == [r.train_loss for r in runs[1].history]


def test_slices_of_tensors_across_shards_step_like_one_aggregator() -> None:
    # 3 tensors of 333 elements over 4 shards: every boundary cuts a tensor.
    args = {"params": "999", "tensors": "3"}
    runs = {}
    for k in (1, 4):
        with LocalCluster("synthetic", nodes=2, task_args=args, shards=k, optimizer="adam") as c:
            runs[k] = c.run(3)
    for name, value in runs[1].params.items():
        assert torch.equal(runs[4].params[name], value), name


def test_shards_that_stage_parts_in_files_step_bitwise_like_one_aggregator(
    tmp_path: Path,
) -> None:
    # 4 nodes, --staging-mb 1, a 1.2 MB model: the unsharded aggregator stages one upload
    # at a time, so each shard keeps one part in memory and the other three in files.
    args, runs, spilled = {"params": "300000", "tensors": "3"}, {}, {}
    for k in (1, 2, 4):
        with LocalCluster(
            "synthetic", nodes=4, task_args=args, shards=k, optimizer="adam", staging_mb=1,
            spill_dir=str(tmp_path),
        ) as cluster:  # fmt: skip
            runs[k] = cluster.run(3)
            servers = [t.server for t in (cluster._server, *cluster._followers)]
            spilled[k] = [(s.follower or s.core).counters.bytes_spilled for s in servers]
    assert spilled[1] == [0], "unsharded, uploads are added as they come: nothing to spill"
    for k in (2, 4):
        assert all(spilled[k]), f"every one of {k} shards staged parts in files: {spilled[k]}"
        for name, value in runs[1].params.items():
            assert torch.equal(runs[k].params[name], value), (k, name)
    assert not any(tmp_path.iterdir()), "spill files are unlinked: none is left behind"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Shards:
    threads: list[ServerThread]
    peers: tuple[str, ...]

    @property
    def core(self) -> Any:
        return self.threads[0].server.core

    def stub(self, i: int) -> pb_grpc.AggregatorStub:
        return pb_grpc.AggregatorStub(grpc.insecure_channel(self.peers[i]))


@pytest.fixture
def shards() -> Iterator[Any]:
    started: list[ServerThread] = []

    def start(
        k: int,
        per_shard: dict[int, dict[str, Any]] | None = None,
        task_args: dict[str, str] | None = None,
        **cfg: Any,
    ) -> Shards:
        peers = tuple(f"127.0.0.1:{_port()}" for _ in range(k))
        name = "synthetic" if task_args else "linear"
        task = load_task(name, task_args)
        for i in reversed(range(k)):
            options = {**cfg, **(per_shard or {}).get(i, {})}
            shard_cfg = AggregatorConfig(
                task=name, task_args=tuple(sorted((task_args or {}).items())), shard=f"{i}/{k}",
                peers=peers, listen=peers[i], progress=False, **options,
            )  # fmt: skip
            thread = ServerThread(task, shard_cfg)
            thread.start()
            started.append(thread)
        return Shards(list(reversed(started[-k:])), peers)

    yield start
    for thread in started:
        thread.stop()


class Driven:
    """A node pushing its parts by hand: to the shards it chooses, ended or not."""

    def __init__(self, shards: Shards, node_id: str) -> None:
        self.shards, self.node_id = shards, node_id
        self.reply = shards.stub(0).Join(
            pb.JoinRequest(node_id=node_id, num_samples=1), timeout=CALL
        )
        self.specs = manifest_from_proto(self.reply.manifest)
        self.pieces = [
            [Piece(p.tensor, p.first, p.count) for p in s.pieces]
            for s in self.reply.shard_map.shards
        ]

    def messages(self, i: int, grads: list[torch.Tensor], round_: int = 0, end: bool = True,
                 **header: Any) -> list[pb.GradientMessage]:  # fmt: skip
        specs = piece_specs(self.specs, self.pieces[i])
        layout = Layout(specs)
        views = [byte_view(v.contiguous()) for v in piece_views(grads, self.pieces[i])]
        fields = {
            "round": round_, "node_id": self.node_id, "upload_id": f"{self.node_id}.r{round_}",
            "num_samples": 1, "shard": i, "shard_map": self.reply.shard_map.map_id, **header,
        }  # fmt: skip
        out = [pb.GradientMessage(header=pb.UploadHeader(**fields))]
        for t, o, p in iter_chunk_pieces(views, layout, 1 << 20):
            out.append(pb.GradientMessage.FromString(encode_chunk(t, o, p)))
        if end:
            out.append(pb.GradientMessage(end=pb.UploadEnd(total_bytes=layout.total)))
        return out

    def push(self, i: int, grads: list[torch.Tensor], **kw: Any) -> Any:
        return self.shards.stub(i).PushGradients.future(
            iter(self.messages(i, grads, **kw)), timeout=CALL
        )


def _grads(specs: list[Any], value: float) -> list[torch.Tensor]:
    return [torch.full(s.shape, value, dtype=s.dtype) for s in specs]


def _pull_all(sh: Shards, driven: Driven, min_round: int) -> list[torch.Tensor]:
    out = [torch.zeros(s.shape, dtype=s.dtype) for s in driven.specs]
    for i in range(len(sh.peers)):
        stream = sh.stub(i).PullParameters(
            pb.PullRequest(node_id=driven.node_id, min_round=min_round), timeout=CALL
        )
        messages = list(stream)
        assert messages[0].header.round == min_round
        data = bytearray(b"".join(m.chunk.data for m in messages[1:]))
        start = 0
        for view in piece_views(out, driven.pieces[i]):
            size = view.numel() * view.element_size()
            view.copy_(torch.frombuffer(data[start : start + size], dtype=view.dtype))
            start += size
    return out


#: 1.2 MB of parameters against --staging-mb 1: each shard keeps one node's part in
#: memory and stages the others in files (``AggregatorConfig.memory_slots``).
SPILLING = {"task_args": {"params": "300000", "tensors": "3"}, "staging_mb": 1}


@pytest.mark.parametrize("staging", ["in memory", "spilled"])
@pytest.mark.parametrize(
    "sent", ["1 of 3", "2 of 3", "all but shard 0's UploadEnd", "all but shard 2's UploadEnd"]
)
def test_a_node_that_dies_mid_upload_counts_on_no_shard(
    shards: Any, sent: str, staging: str
) -> None:
    sh = shards(
        3, nodes=3, min_nodes=2, round_timeout=4.0, rounds=2, idle_timeout=2.0, lr=1.0,
        **(SPILLING if staging == "spilled" else {}),
    )  # fmt: skip
    a, b, c = (Driven(sh, n) for n in ("a", "b", "c"))
    theta0 = _pull_all(sh, a, 0)
    # c dies part-way: only some shards get its complete part.
    doomed = _grads(c.specs, 100.0)
    if sent == "1 of 3":
        calls = [c.push(2, doomed)]
    elif sent == "2 of 3":
        calls = [c.push(1, doomed), c.push(2, doomed)]
    elif sent == "all but shard 0's UploadEnd":
        calls = [c.push(1, doomed), c.push(2, doomed), c.push(0, doomed, end=False)]
    else:
        calls = [c.push(0, doomed), c.push(1, doomed), c.push(2, doomed, end=False)]
    for call in calls:
        try:
            call.result(timeout=CALL)
        except grpc.RpcError:
            pass  # the parts that did not complete, and shard 0's refusal
    for node, value in ((a, 1.0), (b, 3.0)):
        replies = [node.push(i, _grads(node.specs, value)) for i in range(3)]
        for r in replies:
            r.result(timeout=CALL)
    theta1 = _pull_all(sh, a, 1)
    # lr 1, weighted mean of a (1.0) and b (3.0) with one sample each: theta0 - 2.
    for before, after in zip(theta0, theta1, strict=True):
        assert torch.equal(after, before - 2.0)
    assert sh.core.history[0].nodes == 2
    servers = [t.server for t in sh.threads]
    spilled = [(s.follower or s.core).counters.bytes_spilled for s in servers]
    # Spilling, a shard that still holds c's part (or a's, while b's arrives) keeps the
    # next part in a file.
    assert any(spilled) if staging == "spilled" else not any(spilled), spilled


def test_uploads_for_another_shard_map_or_round_are_refused_and_leave_no_trace(shards: Any) -> None:
    sh = shards(2, nodes=1, rounds=2)
    a = Driven(sh, "a")
    _pull_all(sh, a, 0)
    grads = _grads(a.specs, 1.0)
    cases = [
        (1, {"shard": 0}, grpc.StatusCode.INVALID_ARGUMENT, "shard 0's pieces"),
        (0, {"shard": 1}, grpc.StatusCode.INVALID_ARGUMENT, "shard 1's pieces"),
        (1, {"shard_map": "0123456789abcdef"}, grpc.StatusCode.FAILED_PRECONDITION, "shard map"),
        (0, {"shard_map": "0123456789abcdef"}, grpc.StatusCode.FAILED_PRECONDITION, "shard map"),
        (1, {"round": 1, "upload_id": "a.r1"}, grpc.StatusCode.FAILED_PRECONDITION, "not open"),
    ]
    for i, header, code, words in cases:
        fields = dict(header)
        round_ = fields.pop("round", 0)
        msgs = a.messages(i, grads, round_=round_, **fields)
        with pytest.raises(grpc.RpcError) as err:
            sh.stub(i).PushGradients(iter(msgs), timeout=CALL)
        assert err.value.code() == code, (i, header, err.value.details())
        assert words in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        sh.stub(1).Join(pb.JoinRequest(node_id="z"), timeout=CALL)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert sh.peers[0] in err.value.details()
    # Nothing counted anywhere: a correct upload still closes round 0 with a alone.
    for r in [a.push(i, grads) for i in range(2)]:
        r.result(timeout=CALL)
    theta1 = _pull_all(sh, a, 1)
    assert len(theta1) == len(a.specs)


def test_parts_that_disagree_on_presummed_count_on_no_shard(shards: Any) -> None:
    # A relay's sum is added as it is, a node's upload times its weight: a part that says
    # otherwise than shard 0's header would step the shards differently.
    sh = shards(2, nodes=2, rounds=2, idle_timeout=2.0, lr=1.0)
    a, b = Driven(sh, "a"), Driven(sh, "b")
    theta0 = _pull_all(sh, a, 0)
    lying = a.push(1, _grads(a.specs, 100.0), presummed=True)
    with pytest.raises(grpc.RpcError) as err:
        a.push(0, _grads(a.specs, 100.0)).result(timeout=CALL)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "presummed=True" in err.value.details()
    lying.result(timeout=CALL)
    # Nothing counted: a's honest upload (retried, the same id) and b's close round 0.
    # a's shard 1 part goes first: shard 0 must not find the lying one still held there.
    a.push(1, _grads(a.specs, 1.0)).result(timeout=CALL)
    b_parts = [b.push(i, _grads(b.specs, 3.0)) for i in range(2)]
    a.push(0, _grads(a.specs, 1.0)).result(timeout=CALL)
    for r in b_parts:
        r.result(timeout=CALL)
    theta1 = _pull_all(sh, a, 1)
    for before, after in zip(theta0, theta1, strict=True):
        assert torch.equal(after, before - 2.0)


def test_shards_with_different_settings_refuse_to_form_a_federation(shards: Any) -> None:
    sh = shards(2, per_shard={1: {"seed": 7}}, nodes=1, rounds=1, start_timeout=5.0)
    with pytest.raises(ConfigError, match=r"seed: '7' here, '0' on shard 0"):
        sh.threads[0].call(sh.core.wait_finished(), timeout=CALL)


def test_a_shard_checks_its_spill_folder_before_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedgrad.server import sharding

    args = SPILLING["task_args"]
    peers = (f"127.0.0.1:{_port()}", f"127.0.0.1:{_port()}")

    def setup(spill_dir: Path) -> sharding.ShardSetup:
        cfg = AggregatorConfig(
            task="synthetic", task_args=tuple(sorted(args.items())), shard="1/2", peers=peers,
            listen=peers[1], nodes=4, staging_mb=1, spill_dir=str(spill_dir),
        )  # fmt: skip
        return sharding.ShardSetup(load_task("synthetic", args), cfg)

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=rf"--spill-dir {blocker}/spill: .*writable folder"):
        setup(blocker / "spill")
    setup(tmp_path / "made" / "spill")  # a missing folder is made, as --checkpoint-dir is
    assert (tmp_path / "made" / "spill").is_dir()
    # 4 held parts of 0.6 MB, none in memory (the model is over --staging-mb 1): 2.4 MB.
    monkeypatch.setattr(sharding.shutil, "disk_usage", lambda _: type("U", (), {"free": 10**6}))
    with pytest.raises(ConfigError, match=r"up to 2 MB of them in files, more than the 1 MB"):
        setup(tmp_path)


def test_mutual_tls_between_shards_and_nodes(shards: Any, tmp_path: Path) -> None:
    from fedgrad.certs import init_federation
    from fedgrad.client.node import Node
    from fedgrad.config import NodeConfig

    init_federation(tmp_path, ["n0", "n1", "shard-0"])
    ca, node_dir = str(tmp_path / "ca.pem"), tmp_path / "nodes"
    mtls = {
        "tls_cert": str(tmp_path / "server.pem"), "tls_key": str(tmp_path / "server.key"),
        "tls_client_ca": ca, "peer_ca": ca, "peer_cert": str(node_dir / "shard-0.pem"),
        "peer_key": str(node_dir / "shard-0.key"),
    }  # fmt: skip
    sh = shards(2, nodes=2, rounds=3, accumulate="reproducible", **mtls)
    results: dict[str, Any] = {}

    def run(i: int) -> None:
        cfg = NodeConfig(
            task="linear", aggregator=sh.peers[0], node_id=f"n{i}", shard=(i, 2), tls_ca=ca,
            tls_cert=str(node_dir / f"n{i}.pem"), tls_key=str(node_dir / f"n{i}.key"),
            give_up_after=30.0,
        )  # fmt: skip
        node = Node(load_task("linear"), cfg)
        try:
            results[cfg.node_id] = node.run()
        finally:
            node.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == ["n0", "n1"] and all(r.uploads == 3 for r in results.values())
    gathered = sh.threads[0].call(sh.core.peers.gather(sh.core))
    with LocalCluster("linear", nodes=2, accumulate="reproducible") as cluster:
        want = cluster.run(3).params
    for name, value in want.items():
        assert torch.equal(gathered[name], value), name
    # Only shard 0's certificate may give the other shards orders; plaintext gets nowhere.
    creds = grpc.ssl_channel_credentials(
        Path(ca).read_bytes(),
        (node_dir / "n0.key").read_bytes(),
        (node_dir / "n0.pem").read_bytes(),
    )
    sync = pb.ShardSyncRequest(shard=1, shards=2)
    with grpc.secure_channel(sh.peers[1], creds) as channel:
        call = channel.unary_unary(
            "/fedgrad.v1.ShardPeer/Sync",
            request_serializer=pb.ShardSyncRequest.SerializeToString,
            response_deserializer=pb.ShardSyncReply.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            call(sync, timeout=CALL)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "only shard 0" in err.value.details()
    with grpc.insecure_channel(sh.peers[1]) as channel:
        call = channel.unary_unary(
            "/fedgrad.v1.ShardPeer/Sync",
            request_serializer=pb.ShardSyncRequest.SerializeToString,
            response_deserializer=pb.ShardSyncReply.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            call(sync, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_shards_need_the_peer_credentials() -> None:
    base = {"task": "linear", "shard": "0/2", "peers": ("127.0.0.1:1", "127.0.0.1:2")}
    with pytest.raises(ConfigError, match="peer_ca"):
        AggregatorConfig(**base, tls_cert="c.pem", tls_key="k.pem")
    with pytest.raises(ConfigError, match="peer_cert and peer_key"):
        AggregatorConfig(
            **base, tls_cert="c.pem", tls_key="k.pem", tls_client_ca="ca.pem", peer_ca="ca.pem"
        )
    with pytest.raises(ConfigError, match="need shard"):
        AggregatorConfig(task="linear", peer_ca="ca.pem")


def test_tokens_between_shards_and_nodes(shards: Any, tmp_path: Path) -> None:
    from fedgrad.auth import generate_token

    tokens = {n: generate_token() for n in ("n0", "n1", "shard-0")}
    token_file = tmp_path / "tokens"
    token_file.write_text("".join(f"{n} {t}\n" for n, t in tokens.items()))
    token_file.chmod(0o600)
    peer_token = tmp_path / "shard-0.token"
    peer_token.write_text(tokens["shard-0"] + "\n")
    peer_token.chmod(0o600)
    sh = shards(2, nodes=1, rounds=2, tokens=str(token_file), peer_token=str(peer_token))
    with LocalCluster("linear", nodes=1) as cluster:
        want = cluster.run(2).params
    from fedgrad.client.node import Node
    from fedgrad.config import NodeConfig

    cfg = NodeConfig(
        task="linear", aggregator=sh.peers[0], node_id="n0", shard=(0, 1), token=tokens["n0"],
        give_up_after=30.0,
    )  # fmt: skip
    node = Node(load_task("linear"), cfg)
    try:
        assert node.run().uploads == 2
    finally:
        node.close()
    gathered = sh.threads[0].call(sh.core.peers.gather(sh.core))
    for name, value in want.items():
        assert torch.equal(gathered[name], value), name
    # n1's token may not give the shards orders.
    with grpc.insecure_channel(sh.peers[1]) as channel:
        call = channel.unary_unary(
            "/fedgrad.v1.ShardPeer/Commit",
            request_serializer=pb.ShardCommitRequest.SerializeToString,
            response_deserializer=pb.ShardCommitReply.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            call(pb.ShardCommitRequest(node_id="n1"), timeout=CALL,
                 metadata=(("authorization", f"Bearer {tokens['n1']}"),))  # fmt: skip
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_shard_0_evaluates_the_whole_model_each_round() -> None:
    runs = {}
    for k in (1, 2):
        with LocalCluster("digits", nodes=2, shards=k, accumulate="reproducible") as cluster:
            runs[k] = cluster.run(3)
    for one, two in zip(runs[1].history, runs[2].history, strict=True):
        assert one.test_accuracy == one.test_accuracy  # the task evaluates: not NaN
        assert (two.test_loss, two.test_accuracy) == (one.test_loss, one.test_accuracy)
    for name, value in runs[1].params.items():
        assert torch.equal(runs[2].params[name], value), name
