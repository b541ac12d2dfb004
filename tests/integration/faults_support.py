"""Shared helpers of the fault tests (``test_faults_*.py``): bounds, snapshots, uploads.

Faults: rounds never hang, state is never corrupted, a crash loses no committed round.
Issue 3, "Faults", is split by topic:

- ``test_faults_rounds.py``   round deadline + quorum, late / repeated uploads
- ``test_faults_kill.py``     node killed mid-upload, aggregator crash and checkpoints
- ``test_faults_shutdown.py`` graceful shutdown (SIGTERM / SIGINT) and health
- ``test_faults_network.py``  slow peers: slow loris, blackhole, reset, slow link, stalled reader
- ``test_netns.py``           network partitions

Every case runs on the real gRPC stack: in-process aggregators on 127.0.0.1 port 0
(the ``serve`` fixture) driven by hand nodes, ``fedgrad`` CLI processes killed with
real signals, and a small TCP fault proxy (``faultproxy.py``) for lost replies,
resets, blackholes and slow links. Waits are bounded (``polling.py``); no timing is asserted
(round deadlines and idle deadlines are configuration, not measurements).

The ``stalled`` fixture that makes ``StalledUpload``s is in tests/integration/conftest.py.
"""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.server.checkpoint import CHECKPOINT_FILE

# -- bounds --------------------------------------------------------------------------------
#: Bound on a whole CLI process (import torch, a few rounds, reconnect backoff).
PROC_TIMEOUT = 150.0
#: Deadline of the hand-made calls of the fault tests.
CALL = 20.0
ROUND_FOREVER = 600.0  # a round deadline no test waits for

SYNTHETIC_ARGS = (("params", "4000000"), ("tensors", "4"))


# -- helpers ---------------------------------------------------------------------------------
def accumulated(core: Any) -> np.ndarray:
    """Return the open round's per-element sums (float64), through the sum kernel's API."""
    out = torch.empty(core.layout.numel, dtype=torch.float64)
    core.reducer.sum.result_into(0, out, 1.0)
    return out.numpy()


@dataclass(frozen=True)
class CoreState:
    """A consistent snapshot of what an upload may change, read on the server loop."""

    round: int
    reported: dict[str, str]
    count: int
    weight: float
    total: np.ndarray
    free_slots: int
    max_inflight: int
    held_bytes: int
    uploading: frozenset[str]
    finished: bool

    def same_accumulation(self, other: CoreState) -> bool:
        return (
            self.round == other.round
            and self.reported == other.reported
            and self.count == other.count
            and self.weight == other.weight
            and np.array_equal(self.total, other.total)
        )


def core_state(served: Any) -> CoreState:
    """Read the aggregator's round, accumulator and staging slots (thread-safe), once
    counted uploads are added (``Served.call_settled``)."""

    def read() -> CoreState:
        core = served.core
        return CoreState(
            round=core.round,
            reported=dict(core.reported),
            count=core.reducer.count,
            weight=core.reducer.total_weight,
            total=accumulated(core),
            free_slots=core.intake.max_inflight - sum(1 for t in core.intake.inflight if t.slot),
            max_inflight=core.intake.max_inflight,
            held_bytes=core.intake.held_bytes,
            uploading=frozenset(n for n, r in core.nodes.items() if r.uploading),
            finished=core.finished,
        )

    return served.call_settled(read)


def slots_free(served: Any) -> bool:
    """Return True once no upload holds a staging slot, staged bytes or an in-flight mark."""
    state = core_state(served)
    return state.free_slots == state.max_inflight and not state.held_bytes and not state.uploading


def constant_grads(specs: Sequence[Any], value: float) -> list[torch.Tensor]:
    return [torch.full(s.shape, value, dtype=s.dtype) for s in specs]


def sgd_reference(
    params: dict[str, torch.Tensor],
    contributions: Sequence[tuple[int, Sequence[torch.Tensor]]],
    lr: float,
) -> dict[str, torch.Tensor]:
    """One SGD step with the sample-weighted mean of ``(num_samples, grads)`` contributions."""
    total_weight = sum(n for n, _ in contributions)
    out = {}
    for i, (name, p) in enumerate(params.items()):
        acc = torch.zeros(p.shape, dtype=torch.float64)
        for n, grads in contributions:
            acc += grads[i].to(torch.float64) * n
        out[name] = p - lr * (acc / total_weight).to(p.dtype)
    return out


def assert_params(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14, msg=name)


def status(stub: Any) -> pb.StatusReply:
    return stub.GetStatus(pb.StatusRequest(), timeout=CALL)


def node_states(reply: pb.StatusReply) -> dict[str, str]:
    return {n.node_id: n.state for n in reply.nodes}


def log_lines(caplog: pytest.LogCaptureFixture, logger: str, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger and text in r.getMessage()]


class StalledUpload:
    """A PushGradients call that sends ``first``, then stops sending until ``release()``.

    The call runs in grpc's own thread (``.future``); the stream is not half-closed
    while stalled. ``release()`` sends ``rest`` and half-closes. Always released at
    ``close()``, so no thread outlives the test.
    """

    def __init__(
        self, stub: Any, first: Sequence[Any], rest: Sequence[Any] = (), timeout: float = 60.0
    ) -> None:
        self._go = threading.Event()
        self.sent = threading.Event()

        def messages() -> Iterator[Any]:
            yield from first
            self.sent.set()
            self._go.wait(timeout)
            yield from rest

        self.future = stub.PushGradients.future(messages(), timeout=timeout)

    def release(self) -> None:
        self._go.set()

    def result(self, timeout: float = CALL) -> Any:
        return self.future.result(timeout=timeout)

    def code(self, timeout: float = CALL) -> grpc.StatusCode:
        try:
            self.future.result(timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    def close(self) -> None:
        self._go.set()
        self.future.cancel()


def finish(proc: subprocess.Popen[str], timeout: float = PROC_TIMEOUT) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def after_reset(call: Callable[[], Any], attempts: int = 10) -> Any:
    """Make ``call`` on a channel whose connection was just reset: retry UNAVAILABLE (bounded).

    The channel may still try the dead connection once, as a node's backoff would.
    """
    for attempt in range(attempts):
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                raise
            time.sleep(0.1)


def read_checkpoint_round(directory: Path) -> int:
    """Return the round of the committed checkpoint in ``directory``, or -1."""
    try:
        return int(json.loads((directory / CHECKPOINT_FILE).read_text())["round"])
    except (OSError, ValueError, KeyError):
        return -1


# A node process that joins, streams the first COUNT messages of an upload through raw
# gRPC (the bytes were serialized by the test), says so, and hangs until it is killed.
# No fedgrad import: it starts in a fraction of a second.
KILLED_NODE = r"""
import struct, sys, threading, grpc
target, path, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
blob, msgs, pos = open(path, "rb").read(), [], 0
while pos < len(blob):
    (n,) = struct.unpack_from("<Q", blob, pos)
    msgs.append(blob[pos + 8 : pos + 8 + n])
    pos += 8 + n
same = lambda b: b
channel = grpc.insecure_channel(target)
join = channel.unary_unary("/fedgrad.v1.Aggregator/Join", request_serializer=same,
                           response_deserializer=same)
push = channel.stream_unary("/fedgrad.v1.Aggregator/PushGradients", request_serializer=same,
                            response_deserializer=same)
join(msgs[0], timeout=20)
def upload():
    yield from msgs[1 : 1 + count]
    print("SENT", count, flush=True)
    threading.Event().wait()
push(upload(), timeout=600)
"""


def write_messages(path: Path, messages: Iterable[Any]) -> Path:
    path.write_bytes(
        b"".join(
            struct.pack("<Q", len(raw)) + raw for raw in (m.SerializeToString() for m in messages)
        )
    )
    return path


# -- health -------------------------------------------------------------------------------
class HealthPoller:
    """Poll grpc.health.v1 Check("") in a thread; record every answer until stopped."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = self.stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                self.seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
            except grpc.RpcError as exc:
                self.seen.append(exc.code().name)
            time.sleep(0.01)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(10)
        self.channel.close()
        return self.seen
