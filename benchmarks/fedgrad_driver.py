"""Light-weight fedgrad node driver: many protocol-level nodes as threads of one process.

A CLI node is a process with torch and a model; 200 of them would not fit on
this machine. The driver speaks the wire contract of
``protos/fedgrad/proto/fedgrad.proto`` directly through the generated stubs:
Join, then per round PullParameters (header, then chunks, counted but not
decoded) and PushGradients (header, then ``chunk_bytes`` chunks of an all-zero
flat stream, in order). The chunk messages are built once per process and
shared by its threads, so the driver costs only serialization (~3.6 GB/s
here) and never limits what the aggregator can take in. Every node has its own channel
(its own TCP connection), like separate machines would.

It also times each pull and push, which is how the benchmark measures the
broadcast and a single node's push throughput against raw grpcio.

Run (against a running ``fedgrad aggregator --task synthetic ...``):
``python -m benchmarks.fedgrad_driver --target 127.0.0.1:PORT --nodes 50 [--first 0]``
"""

from __future__ import annotations

import argparse
import bisect
import json
import threading
import time
from dataclasses import asdict, dataclass, field

import grpc

from fedgrad.framing import decode_chunk, encode_chunk
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.proto import fedgrad_pb2_grpc as pb_grpc
from fedgrad.wire import method_path

__all__ = ["DriverNode", "NodeStats", "run_nodes"]

_ITEMSIZE = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.FLOAT64: 8}
# A chunk is at most ~1 MiB plus framing; leave headroom over gRPC's 4 MiB default.
_OPTIONS = [
    ("grpc.max_receive_message_length", 4 * 1024 * 1024 + 65536),
    ("grpc.max_send_message_length", 4 * 1024 * 1024 + 65536),
]
_CALL_TIMEOUT = 30.0


def stream_chunks(manifest: pb.Manifest, chunk_bytes: int) -> list[bytes]:
    """Cut an all-zero flat stream for ``manifest`` into chunk messages, in order.

    Each chunk names the tensor and byte offset where its data begins; data
    runs on into the following tensors, as the contract allows. Empty tensors
    are skipped (a chunk never starts inside one).
    """
    sizes = []
    for spec in manifest.tensors:
        numel = 1
        for dim in spec.shape:
            numel *= dim
        sizes.append(numel * _ITEMSIZE[spec.dtype])
    ends, total = [], 0
    for size in sizes:
        total += size
        ends.append(total)
    zeros = bytes(min(chunk_bytes, total))
    chunks, pos = [], 0
    while pos < total:
        index = bisect.bisect_right(ends, pos)  # first tensor ending after pos: non-empty
        offset = pos - (ends[index] - sizes[index])
        n = min(chunk_bytes, total - pos)
        # Serialized once, like a real node's hand-framed chunks (fedgrad.framing).
        chunks.append(encode_chunk(index, offset, [zeros[:n]]))
        pos += n
    return chunks


def _data_len(raw: bytes) -> int:
    view = decode_chunk(raw)
    return (
        view.data_len if view is not None else len(pb.ParameterMessage.FromString(raw).chunk.data)
    )


@dataclass
class NodeStats:
    """What one driver node saw: per-round pull and push times (seconds) and bytes."""

    node_id: str
    rounds: list[int] = field(default_factory=list)
    pull_seconds: list[float] = field(default_factory=list)
    push_seconds: list[float] = field(default_factory=list)
    stream_bytes: int = 0
    error: str = ""


class DriverNode:
    """One protocol-level node on its own channel."""

    def __init__(self, target: str, node_id: str, num_samples: int = 1) -> None:
        """Open a channel to ``target``; nothing is sent until ``run``."""
        self.node_id, self.num_samples = node_id, num_samples
        self.channel = grpc.insecure_channel(target, options=_OPTIONS)
        self.stub = pb_grpc.AggregatorStub(self.channel)
        # Raw-bytes calls, as the fedgrad node makes them: no protobuf copy per chunk.
        self._pull = self.channel.unary_stream(
            method_path("PullParameters"), request_serializer=pb.PullRequest.SerializeToString
        )
        self._push = self.channel.stream_unary(
            method_path("PushGradients"), response_deserializer=pb.PushReply.FromString
        )
        self.stats = NodeStats(node_id)
        self.chunks: list[bytes] = []
        self.session = ""

    def join(self, chunks_cache: dict) -> None:
        """Join; build (or reuse from ``chunks_cache``) the upload chunks of the manifest."""
        reply = self.stub.Join(
            pb.JoinRequest(node_id=self.node_id, num_samples=self.num_samples),
            timeout=_CALL_TIMEOUT, wait_for_ready=True,
        )  # fmt: skip
        self.session = reply.session_id
        key = (reply.manifest.SerializeToString(), reply.chunk_bytes)
        with _CACHE_LOCK:  # threads of one process share the (read-only) chunks
            if key not in chunks_cache:
                chunks_cache[key] = stream_chunks(reply.manifest, reply.chunk_bytes)
        self.chunks = chunks_cache[key]
        self.total_bytes = sum(decode_chunk(m).data_len for m in self.chunks)

    def pull(self, min_round: int, timeout: float) -> tuple[pb.ParameterHeader, float]:
        """Stream the parameters of the first round >= ``min_round``; count the bytes.

        Returns:
            The header, and the seconds from its arrival to the end of the
            stream: the transfer alone, not the server-side wait for the round.
        """
        stream = self._pull(
            pb.PullRequest(node_id=self.node_id, min_round=min_round), timeout=timeout
        )
        header = pb.ParameterMessage.FromString(next(stream)).header
        start = time.monotonic()
        got = sum(_data_len(raw) for raw in stream)
        if got != header.total_bytes:
            raise RuntimeError(f"pulled {got} of {header.total_bytes} bytes")
        return header, time.monotonic() - start

    def push(self, round_: int, timeout: float) -> None:
        """Upload one all-zero gradient for ``round_``."""
        header = pb.UploadHeader(
            round=round_, node_id=self.node_id, num_samples=self.num_samples,
            upload_id=f"{self.node_id}.r{round_}.{self.session[:12]}",
        )  # fmt: skip

        def messages():
            yield pb.GradientMessage(header=header).SerializeToString()
            yield from self.chunks  # built once, shared read-only by all threads
            end = pb.UploadEnd(total_bytes=self.total_bytes)
            yield pb.GradientMessage(end=end).SerializeToString()

        self._push(messages(), timeout=timeout)

    def run(self, deadline: float, chunks_cache: dict) -> NodeStats:
        """Join and train until the aggregator says finished or ``deadline`` passes."""
        try:
            self.join(chunks_cache)
            next_round = 0
            while time.monotonic() < deadline:
                header, pull_s = self.pull(next_round, timeout=deadline - time.monotonic())
                if header.finished:
                    break
                start = time.monotonic()
                try:
                    self.push(header.round, timeout=max(1.0, deadline - time.monotonic()))
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.ABORTED:  # stale round: pull again
                        raise
                    next_round = header.round + 1
                    continue
                self._record(header, pull_s, time.monotonic() - start)
                next_round = header.round + 1
            else:
                self.stats.error = "deadline passed before the aggregator finished"
        except (grpc.RpcError, RuntimeError) as err:
            self.stats.error = f"{type(err).__name__}: {err}"
        finally:
            self.channel.close()
        return self.stats

    def _record(self, header: pb.ParameterHeader, pull_s: float, push_s: float) -> None:
        self.stats.rounds.append(header.round)
        self.stats.pull_seconds.append(pull_s)
        self.stats.push_seconds.append(push_s)
        self.stats.stream_bytes = header.total_bytes


_CACHE_LOCK = threading.Lock()


def run_nodes(target: str, node_ids: list[str], timeout: float) -> list[NodeStats]:
    """Run one thread per node id until the aggregator finishes or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    cache: dict = {}
    nodes = [DriverNode(target, nid) for nid in node_ids]
    results: list[NodeStats] = [n.stats for n in nodes]
    threads = [
        threading.Thread(target=n.run, args=(deadline, cache), name=n.node_id, daemon=True)
        for n in nodes
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + 5)
    return results


def main(argv: list[str] | None = None) -> None:
    """Drive ``--nodes`` nodes named ``d<first+i>``; print ``RESULT <json list>``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", required=True, help="aggregator HOST:PORT (127.0.0.1 only)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--first", type=int, default=0, help="index of the first node id")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    ids = [f"d{args.first + i}" for i in range(args.nodes)]
    stats = run_nodes(args.target, ids, args.timeout)
    print("RESULT " + json.dumps([asdict(s) for s in stats]), flush=True)


if __name__ == "__main__":
    main()
