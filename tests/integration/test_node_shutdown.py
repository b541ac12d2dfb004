"""Stopping a node at any moment: it cancels its call, calls Leave and returns (exit 0).

A stop is SIGTERM or SIGINT on a ``fedgrad node`` process, or ``Node.stop()`` from
another thread. Wherever it lands, the end is the same: the call in flight is
cancelled, not retried; the node calls Leave; ``run()`` returns a ``NodeResult`` (the
process exits 0 and says "SIGTERM: leaving the federation"); the aggregator shows the
node as "left". Each test first puts the node at one moment, on purpose:

- blocked in PullParameters, waiting for a round that will not open (``--nodes 2``,
  one node joined): the process (SIGTERM and SIGINT), and an in-process ``Node``
- mid-pull of a 64 MB model: the node is frozen (SIGSTOP) until the kernel holds
  parameter bytes it has not read, then thawed and signalled
- mid-push: the aggregator's only staging slot is held by another upload, so the
  node's upload waits inside PushGradients
- in-process: in a backoff wait, during the task's compute (the push never starts),
  before ``run()``, after ``run()`` finished
- in-process, at one exact point, through a trace hook (``sys.settrace``), which runs at
  a point between two bytecodes, as Python runs a signal handler: just before the pull
  starts, between its start and its publication for ``stop()`` to cancel, and a second
  signal's handler inside the first handler's ``stop()`` (while ``Event.set()`` holds
  its lock)

Real processes and real gRPC on 127.0.0.1 port 0. Every wait is bounded; the only
bound asserted is ``EXIT`` between the stop and the exit (Leave's deadline is 10 s).
"""

from __future__ import annotations

import copy
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import pytest
import torch
from polling import wait_until

from fedgrad.client.node import Node, NodeResult
from fedgrad.config import NodeConfig
from fedgrad.proto import fedgrad_pb2 as pb
from fedgrad.server.aggregator import NodeRecord
from fedgrad.task import Task, Update
from fedgrad.tasks.linear import LinearTask

#: Bound on a node's exit, or on ``run()`` returning, after the stop.
EXIT = 15.0
#: Bound on a node process reaching the moment under test (import torch, join, pull).
PROC_TIMEOUT = 150.0
#: Bound on any wait for a state the test caused (bytes queued, a slot taken).
WAIT = 30.0
#: Deadline of the hand-made calls.
CALL = 20.0
ROUND_FOREVER = 600.0  # a round deadline no test waits for
NODE = "node-1"
#: 64 MB of float32: a pull takes ~0.1 s of the node's time even once the bytes are here.
BIG = {"params": "16000000", "tensors": "4"}
BIG_FLAGS = ("--task", "synthetic", "--task-arg", "params=16000000", "--task-arg", "tensors=4")
LINEAR_FLAGS = ("--task", "linear")


# -- helpers ---------------------------------------------------------------------------------
def record(served: Any, node_id: str = NODE) -> NodeRecord | None:
    """Return a copy of what the aggregator knows of ``node_id``, read on its loop."""
    return served.call(lambda: copy.copy(served.core.nodes.get(node_id)))


def pulling(served: Any, node_id: str = NODE) -> bool:
    """True while ``node_id`` has a PullParameters stream open on the aggregator."""
    r = record(served, node_id)
    return r is not None and r.pulls > 0


def reported(served: Any) -> dict[str, str]:
    return served.call(lambda: dict(served.core.reported))


def states(stub: Any) -> dict[str, str]:
    """Node id -> state ("active", "dropped", "left"), as GetStatus reports them."""
    reply = stub.GetStatus(pb.StatusRequest(), timeout=CALL)
    return {n.node_id: n.state for n in reply.nodes}


def unread_bytes(port: int) -> int:
    """Bytes queued for this host's TCP clients of 127.0.0.1:``port`` and not read yet.

    The receive queues in /proc/net/tcp{,6} (Linux): what a frozen peer has not consumed.
    gRPC's sockets are IPv6 ones with IPv4-mapped addresses, hence both tables.
    """
    remote = f"0100007F:{port:04X}"  # 127.0.0.1 as the kernel prints it (also ends ::ffff:...)
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[2].endswith(remote):
                total += int(fields[4].split(":")[1], 16)
    return total


def node_process(spawn: Any, cli: Any, served: Any, *task_flags: str) -> subprocess.Popen[str]:
    """Start ``fedgrad node`` as node-1 (shard 1/2) against ``served``."""
    return spawn(*cli.argv, "node", *task_flags, "--aggregator", served.address,
                 "--node-id", NODE, "--shard", "1/2", "--give-up-after", "60")  # fmt: skip


def signal_and_finish(proc: subprocess.Popen[str], sig: signal.Signals) -> str:
    """Send ``sig``; return stderr once the process exited 0 within ``EXIT`` s, having left."""
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=EXIT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the node did not exit within {EXIT:.0f} s of {sig.name}") from None
    assert proc.returncode == 0, err
    assert f"{sig.name}: leaving the federation" in err, err
    assert "Traceback" not in err, err
    return err


def linear_node(address: str, task: Task | None = None, give_up_after: float = 60.0) -> Node:
    """A ``Node`` of the linear task (or ``task``), node-1 of 2."""
    cfg = NodeConfig(task="linear", aggregator=address, node_id=NODE, shard=(1, 2),
                     give_up_after=give_up_after)  # fmt: skip
    return Node(task or LinearTask(), cfg)


@dataclass
class Running:
    """A ``Node`` whose ``run()`` runs on its own thread; ``outcome`` gets its result or error.

    ``trace``, if set, is that thread's trace function (``sys.settrace``).
    """

    node: Node
    trace: Any = None
    thread: threading.Thread = field(init=False)
    outcome: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        def run() -> None:
            sys.settrace(self.trace)
            try:
                self.outcome.append(self.node.run())
            except BaseException as exc:  # reported by result()
                self.outcome.append(exc)

        self.thread = threading.Thread(target=run, name=f"run-{self.node.cfg.node_id}")
        self.thread.start()

    def result(self, timeout: float = EXIT) -> NodeResult:
        """Wait for ``run()`` (at most ``timeout`` s); return its ``NodeResult``."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"run() did not return within {timeout:.0f} s"
        [outcome] = self.outcome
        assert isinstance(outcome, NodeResult), f"run() raised {outcome!r}"
        return outcome


@pytest.fixture
def running() -> Iterator[Callable[..., Running]]:
    """Factory ``running(node, trace=None) -> Running``; at teardown each is stopped, joined, closed."""
    started: list[Running] = []

    def factory(node: Node, trace: Any = None) -> Running:
        started.append(Running(node, trace))
        return started[-1]

    yield factory
    for r in started:
        r.node.stop()
        r.thread.join(EXIT)
        r.node.close()


# -- fedgrad node processes ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_waiting_for_a_round_that_does_not_open(
    sig: signal.Signals, serve, connect, spawn, cli
) -> None:
    """Round 0 waits for a second node that never joins; the node blocked in its pull leaves."""
    served = serve("linear", nodes=2, round_timeout=ROUND_FOREVER)
    node = node_process(spawn, cli, served, *LINEAR_FLAGS)
    wait_until(lambda: pulling(served), "node-1 to wait in PullParameters", PROC_TIMEOUT)
    err = signal_and_finish(node, sig)
    assert "done: 0 uploads, final round 0" in err
    assert states(connect(served)) == {NODE: "left"}


@pytest.mark.slow
def test_sigterm_mid_pull_of_a_large_model(serve, hand_node, spawn, cli) -> None:
    """SIGTERM while 64 MB of parameters stream in: the stream is cancelled, nothing uploaded.

    node-1 waits for round 0 and is frozen (SIGSTOP); node-0 joins, round 0 opens and
    the aggregator streams into the frozen node's socket. Once the kernel holds bytes
    node-1 has not read (only the stream sends any), it is thawed and signalled: it is
    inside its pull, with most of the 64 MB still to come.
    """
    served = serve("synthetic", task_args=BIG, nodes=2, round_timeout=ROUND_FOREVER)
    node = node_process(spawn, cli, served, *BIG_FLAGS)
    wait_until(lambda: pulling(served), "node-1 to wait in PullParameters", PROC_TIMEOUT)
    node.send_signal(signal.SIGSTOP)
    other = hand_node(served, "node-0")  # round 0 opens
    wait_until(lambda: unread_bytes(served.port) > 0, "bytes node-1 has not read", WAIT)
    node.send_signal(signal.SIGCONT)
    signal_and_finish(node, signal.SIGTERM)
    assert states(other.stub)[NODE] == "left"
    assert NODE not in reported(served), "node-1 went on to upload after the stop"


@pytest.mark.slow
def test_sigterm_mid_push(serve, hand_node, wire, spawn, cli) -> None:
    """SIGTERM inside the node's upload: the upload is cancelled (nothing counted), node left.

    The aggregator has one staging slot, held by node-0's unfinished upload, so node-1's
    64 MB upload waits inside PushGradients. node-1 is frozen until the slot is taken,
    so that it cannot take the slot first.
    """
    served = serve("synthetic", task_args=BIG, nodes=2, max_inflight=1,
                   round_timeout=ROUND_FOREVER, idle_timeout=ROUND_FOREVER)  # fmt: skip
    node = node_process(spawn, cli, served, *BIG_FLAGS)
    wait_until(lambda: pulling(served), "node-1 to wait in PullParameters", PROC_TIMEOUT)
    node.send_signal(signal.SIGSTOP)
    other = hand_node(served, "node-0")  # round 0 opens
    release = threading.Event()

    def header_then_hold() -> Iterator[pb.GradientMessage]:
        yield pb.GradientMessage(header=wire.header(0, "node-0"))
        release.wait(PROC_TIMEOUT)

    held = other.stub.PushGradients.future(header_then_hold(), timeout=PROC_TIMEOUT)
    try:
        wait_until(lambda: served.call(lambda: len(served.core.intake.inflight)) == 1,
                   "node-0's upload to hold the only staging slot", WAIT)  # fmt: skip
        node.send_signal(signal.SIGCONT)
        wait_until(
            lambda: record(served).uploading, "node-1's upload to wait for the slot", PROC_TIMEOUT
        )
        signal_and_finish(node, signal.SIGTERM)
        wait_until(lambda: not record(served).uploading, "node-1's cancelled upload to end", EXIT)
        assert states(other.stub)[NODE] == "left"
        assert reported(served) == {}
    finally:
        held.cancel()
        release.set()


# -- Node in-process -------------------------------------------------------------------------
def test_stop_from_another_thread_ends_a_blocked_pull(serve, connect, running) -> None:
    """``stop()`` while ``run()`` waits in a pull for a round that will not open."""
    served = serve("linear", nodes=2, round_timeout=ROUND_FOREVER)
    run = running(linear_node(served.address))
    wait_until(lambda: pulling(served), "node-1 to wait in PullParameters", EXIT)
    run.node.stop()
    run.node.stop()  # idempotent
    assert run.result() == NodeResult(NODE, uploads=0, final_round=0)
    assert states(connect(served)) == {NODE: "left"}


def test_stop_during_a_backoff_wait(running, closed_port: int, caplog) -> None:
    """Nothing listens: join fails and backs off; ``stop()`` ends the wait, no GaveUpError."""
    caplog.set_level(logging.INFO, logger="fedgrad.node")
    run = running(linear_node(f"127.0.0.1:{closed_port}", give_up_after=600.0))
    wait_until(lambda: run.node.backoff.attempt >= 2, "join to fail twice", EXIT)
    run.node.stop()
    assert run.result() == NodeResult(NODE, uploads=0, final_round=0)
    assert any("stop requested: leaving the federation" in r.getMessage() for r in caplog.records)


class StopsItsNodeWhileComputing(LinearTask):
    """The linear task, calling ``node.stop()`` in the middle of computing round 0's update."""

    node: Node | None = None

    def compute_update(self, model: Any, data: Any, generator: torch.Generator) -> Update:
        assert self.node is not None
        self.node.stop("stopped mid-compute")
        return super().compute_update(model, data, generator)


def test_stop_during_compute_starts_no_push(serve, connect, running, caplog) -> None:
    """The update is computed but never pushed: the round counts nothing from the node."""
    caplog.set_level(logging.INFO, logger="fedgrad.node")
    served = serve("linear", nodes=1, round_timeout=ROUND_FOREVER)
    task = StopsItsNodeWhileComputing()
    task.node = node = linear_node(served.address, task=task)
    assert running(node).result(PROC_TIMEOUT) == NodeResult(NODE, uploads=0, final_round=0)
    assert reported(served) == {}
    assert states(connect(served)) == {NODE: "left"}
    assert any("stopped mid-compute: leaving" in r.getMessage() for r in caplog.records)


def test_stop_before_run(serve, connect, running) -> None:
    """``run()`` after ``stop()`` returns at once; the node never joined."""
    served = serve("linear", nodes=1)
    node = linear_node(served.address)
    node.stop()
    assert running(node).result() == NodeResult(NODE, uploads=0, final_round=0)
    assert states(connect(served)) == {}


def test_stop_after_run_finished(serve, running) -> None:
    """``stop()`` after training is over, before and after ``close()``, raises nothing."""
    served = serve("linear", nodes=1, rounds=1)
    node = linear_node(served.address)
    assert running(node).result(PROC_TIMEOUT).uploads == 1
    node.stop()
    node.close()
    node.stop()


# -- stop() at one exact point ---------------------------------------------------------------
def pull_starts(frame: FrameType) -> bool:
    """True for the frame of a PullParameters call being started (grpc's multicallable)."""
    return frame.f_code.co_name == "__call__" and isinstance(
        frame.f_locals.get("self"), grpc.UnaryStreamMultiCallable
    )


def stop_hook(node: Node, at: str, fired: list[str]) -> Callable[..., Any]:
    """A trace function that calls ``node.stop()`` once, as the first pull starts.

    ``at="call"``: the transport checked for a stop and is entering grpc; the call does
    not exist yet. ``at="return"``: grpc has started the call and returns it; the
    transport has not published it for ``stop()`` to cancel yet.
    """

    def on_return(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "return" and not fired:
            fired.append(at)
            node.stop(f"stop at {at}")
        return on_return

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        if fired or event != "call" or not pull_starts(frame):
            return None
        if at == "return":
            return on_return
        fired.append(at)
        node.stop(f"stop at {at}")
        return None

    return trace


@pytest.mark.parametrize("at", ["call", "return"], ids=["before-the-call", "before-publication"])
def test_stop_in_the_window_around_the_start_of_a_call(at: str, serve, connect, running) -> None:
    """The pull would wait for a round that never opens: only the cancellation ends it."""
    served = serve("linear", nodes=2, round_timeout=ROUND_FOREVER)
    fired: list[str] = []
    node = linear_node(served.address)
    run = running(node, trace=stop_hook(node, at, fired))
    assert run.result() == NodeResult(NODE, uploads=0, final_round=0)
    assert fired == [at]
    wait_until(lambda: not pulling(served), "the cancelled pull to end on the aggregator", EXIT)
    assert states(connect(served)) == {NODE: "left"}


class Deadlocked(AssertionError):
    """Raised by the alarm: the main thread is stuck."""


@contextmanager
def alarm_after(seconds: float) -> Iterator[None]:
    """Raise ``Deadlocked`` in the main thread after ``seconds``, even inside a blocked acquire.

    Replaces the alarm for the duration (pytest-timeout may use it) and then restores it.
    """

    def ring(signum: int, frame: Any) -> None:
        raise Deadlocked(f"the main thread was stuck for {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, ring)
    pending = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        signal.setitimer(signal.ITIMER_REAL, *pending)


def test_a_second_signal_inside_the_first_stop(serve, connect, running, caplog) -> None:
    """SIGUSR2's handler runs while SIGUSR1's is inside ``stop()``; both return, the first wins.

    Python runs a handler between two bytecodes of the main thread, also inside another
    handler; ``signal.raise_signal`` runs it at once. The main thread's trace hook raises
    SIGUSR2 when ``Event.set()`` calls ``notify_all()``, i.e. while it holds the Event's
    non-reentrant lock: a ``stop()`` that set the Event again there would wait forever.
    """
    caplog.set_level(logging.INFO, logger="fedgrad.node")
    served = serve("linear", nodes=2, round_timeout=ROUND_FOREVER)
    run = running(linear_node(served.address))
    wait_until(lambda: pulling(served), "node-1 to wait in PullParameters", EXIT)
    nested: list[bool] = []

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        if (
            not nested
            and event == "call"
            and frame.f_code is threading.Condition.notify_all.__code__
            and frame.f_back is not None
            and frame.f_back.f_code is threading.Event.set.__code__
        ):
            nested.append(True)
            signal.raise_signal(signal.SIGUSR2)
        return None

    def handler(signum: int, frame: Any) -> None:
        run.node.stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    tracing = sys.gettrace()
    try:
        with alarm_after(EXIT):
            sys.settrace(trace)
            try:
                signal.raise_signal(signal.SIGUSR1)
            finally:
                sys.settrace(tracing)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    assert nested, "the hook never ran inside Event.set()"
    assert run.result() == NodeResult(NODE, uploads=0, final_round=0)
    assert states(connect(served)) == {NODE: "left"}
    leaving = [r.getMessage() for r in caplog.records if "leaving the federation" in r.getMessage()]
    assert leaving == ["SIGUSR1: leaving the federation"]
