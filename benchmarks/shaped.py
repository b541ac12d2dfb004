"""fedgrad round time over shaped links: every process on its own network namespace.

Loopback has no bandwidth limit, so ``Topology`` gives each process a "host": its own
namespace, whose ``eth0`` is one end of a veth pair; the other ends hang on one bridge
in a separate "switch" namespace. ``tc`` shapes every host's link with a token bucket
(``tbf``) on the egress of both ends, so each host has ``rate_mbit`` up and down, full
duplex, like a port of a switched LAN::

    host fgsh-PID-S-agg0    eth0 10.214.X.1 ==tbf== fg0xPID --+
    host fgsh-PID-S-node0   eth0 10.214.X.2 ==tbf== fg1xPID --+-- bridge fgbrPID
    ...                                                       |   (namespace fgsh-PID-S-sw)

Every address is created here, in 10.214.X.0/24 (X from the pid); the hosts have no
route beyond that subnet, so nothing can leave it. Nothing is created in the root
namespace: the bridge and the switch ends of the veths live in the switch namespace,
and the teardown (``Topology.close``, run on any exit, KeyboardInterrupt included)
ends the processes it started there, deletes the links and then the namespaces.

``shaped_rounds`` runs ``fedgrad aggregator`` (or K shards), optional relays and N
``fedgrad node`` processes (synthetic task, no training compute, as ``fedgrad_round``)
each on its own host, and reports the steady-state round seconds, shard 0's bytes per
round (history ``bytes``) and every aggregator's and relay's peak RSS (``VmHWM``: over its
life, at start-up, and while serving, from when it listens). With
``loopback=True`` the same processes share 127.0.0.1, unshaped, for comparison.

Run: ``python -m benchmarks.shaped --params 50000000 --nodes 4 --shards 1 --rate-mbit 1000``
(``--relays R``, ``--rate-mbit 0`` for unshaped veths, ``--loopback``, ``--cli`` another
build's ``fedgrad``); prints JSON.
Needs root, ``ip`` and ``tc`` (iproute2) unless ``--loopback``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import BenchError, Procs, child_env, free_port, vm_hwm_bytes
from benchmarks.fedgrad_bench import _round_stats, _task, fedgrad_cli

__all__ = [
    "METRICS",
    "NOT_AVAILABLE",
    "NO_NETNS",
    "SUITE_NAMES",
    "Topology",
    "netns_unavailable",
    "shaped_rounds",
    "unavailable",
]

NS_PREFIX = "fgsh"
SERVICE_PORT = 50051  # every host is its own namespace, so the same port is free on each
NOT_AVAILABLE = "not available in this build"
NO_NETNS = "shaped links unavailable"
_MAX_HOSTS = 250  # one /24
_SEQ = itertools.count()
_PROBE = """import socket, sys, time
host, port, until = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while time.monotonic() < until:
    with socket.socket() as s:
        s.settimeout(1.0)
        if s.connect_ex((host, port)) == 0:
            sys.exit(0)
    time.sleep(0.1)
sys.exit(1)
"""


def _ip(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return _cmd(["ip", *args], check, timeout)


def _cmd(argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise BenchError(f"{' '.join(argv)}: no answer within {timeout:.0f}s") from err
    if check and done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done


def netns_unavailable() -> str | None:
    """Return why namespaces with shaped veths cannot be built here, None if they can."""
    if sys.platform != "linux":
        return f"{NO_NETNS}: network namespaces need Linux"
    if os.geteuid() != 0:
        return f"{NO_NETNS}: needs root for ip netns, veth and tc"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{NO_NETNS}: the {tool} command (iproute2) is not installed"
    return None


def _our_namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(NS_PREFIX + "-")]


def _remove_stale() -> None:
    """Remove the namespaces (and what runs there) of a run of this module that was killed."""
    for ns in _our_namespaces():
        pid = ns.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _end_pids(_ip("netns", "pids", ns, check=False).stdout.split())
            _ip("netns", "del", ns, check=False)


def _env() -> dict[str, str]:
    """``child_env`` without proxies: gRPC would send the hosts' traffic to one."""
    env = child_env()
    for key in [k for k in env if k.lower() in ("http_proxy", "https_proxy", "all_proxy")]:
        del env[key]
    return env


class _NoInterrupt:
    """Hold SIGINT off while tearing down, so a second Ctrl-C cannot leave links behind."""

    def __enter__(self) -> None:
        self.old: Any = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


class Topology:
    """Hosts (namespaces) on one bridge, each link shaped to ``rate_mbit``; a context manager.

    ``loopback=True`` builds nothing: every host is 127.0.0.1 with its own free port,
    so the same suite code runs unshaped on loopback.
    """

    def __init__(
        self, hosts: Sequence[str], rate_mbit: float | None = 1000, *, loopback: bool = False
    ) -> None:
        """Describe the topology; ``__enter__`` builds it and ``close`` removes it."""
        if len(set(hosts)) != len(hosts) or not 0 < len(hosts) <= _MAX_HOSTS:
            raise ValueError(f"1..{_MAX_HOSTS} distinct host names, got {list(hosts)}")
        if not all(h.isalnum() for h in hosts):
            raise ValueError(f"host names must be letters and digits: {list(hosts)}")
        if loopback and rate_mbit:
            raise ValueError("loopback cannot be shaped per host")
        self.hosts, self.rate_mbit, self.loopback = list(hosts), rate_mbit, loopback
        pid = os.getpid()
        self.tag = f"{NS_PREFIX}-{pid}-{next(_SEQ)}"
        self.switch = f"{self.tag}-sw"
        self.bridge = f"fgbr{pid}"
        self.subnet = f"10.214.{1 + pid % 254}"
        self._ports: dict[str, int] = {}
        self._children: list[subprocess.Popen[bytes]] = []

    def namespace(self, host: str) -> str:
        """Return the namespace of ``host``."""
        return f"{self.tag}-{host}"

    def link(self, host: str) -> str:
        """Return the switch-side name of ``host``'s veth (its peer is ``eth0``)."""
        return f"fg{self.hosts.index(host)}x{os.getpid()}"

    def address(self, host: str) -> str:
        """Return ``host``'s IPv4 address."""
        if self.loopback:
            return "127.0.0.1"
        return f"{self.subnet}.{self.hosts.index(host) + 1}"

    def port(self, host: str) -> int:
        """Return the port a service on ``host`` listens on (fixed; free on loopback)."""
        if not self.loopback:
            return SERVICE_PORT
        if host not in self._ports:
            self._ports[host] = free_port()
        return self._ports[host]

    def endpoint(self, host: str) -> str:
        """Return ``HOST:PORT`` of the service on ``host``."""
        return f"{self.address(host)}:{self.port(host)}"

    def names(self) -> dict[str, list[str]]:
        """Return every namespace and link this topology creates (for teardown checks)."""
        if self.loopback:
            return {"netns": [], "links": []}
        return {
            "netns": [self.switch, *(self.namespace(h) for h in self.hosts)],
            "links": [self.bridge, *(self.link(h) for h in self.hosts)],
        }

    def command(self, host: str, argv: Sequence[object]) -> list[str]:
        """Return ``argv`` run inside ``host``'s namespace (``ip netns exec`` execs it)."""
        self.hosts.index(host)  # ValueError for an unknown host
        args = [str(a) for a in argv]
        if self.loopback:
            return args
        # Killed with this process even by SIGKILL, when no teardown can run; the
        # namespaces left then go at the next run (_remove_stale).
        orphan = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        return ["ip", "netns", "exec", self.namespace(host), *orphan, *args]

    def spawn(self, procs: Procs, name: str, host: str, argv: Sequence[object],
              **kwargs: Any) -> subprocess.Popen[bytes]:  # fmt: skip
        """Start ``argv`` on ``host`` through ``procs`` (log, cleanup); ended by ``close``."""
        kwargs.setdefault("env", _env())
        proc = procs.spawn(name, self.command(host, argv), **kwargs)
        self._children.append(proc)
        return proc

    def run(self, host: str, argv: Sequence[object], timeout: float) -> subprocess.CompletedProcess:
        """Run a short command on ``host`` and return it (checked; BenchError on failure)."""
        return _cmd(self.command(host, argv), check=True, timeout=timeout)

    def wait_listening(self, host: str, timeout: float,
                       proc: subprocess.Popen[bytes] | None = None) -> None:  # fmt: skip
        """Poll, from ``host`` itself, until its service port accepts TCP connections.

        Raises:
            BenchError: ``proc`` exited first, or nothing listened within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        argv = [sys.executable, "-I", "-c", _PROBE, self.address(host), self.port(host), 2]
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise BenchError(f"the service on {host} exited with {proc.returncode}")
            if _cmd(self.command(host, argv), check=False, timeout=30).returncode == 0:
                return
        raise BenchError(f"nothing listening on {self.endpoint(host)} after {timeout:.0f}s")

    def __enter__(self) -> Topology:
        if self.loopback:
            return self
        if reason := netns_unavailable():
            raise BenchError(reason)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        left = self.close()
        if left and exc_type is None:
            raise BenchError(f"teardown left {left}")

    def _build(self) -> None:
        _remove_stale()
        _ip("netns", "add", self.switch)
        sw = ("-n", self.switch)
        _ip(*sw, "link", "set", "lo", "up")
        _ip(*sw, "link", "add", self.bridge, "type", "bridge")
        _ip(*sw, "link", "set", self.bridge, "up")
        for host in self.hosts:
            ns, port = self.namespace(host), self.link(host)
            _ip("netns", "add", ns)
            _ip(*sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip(*sw, "link", "set", port, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if self.rate_mbit:
                self._shape(self.switch, port)  # towards the host
                self._shape(ns, "eth0")  # from the host

    def _shape(self, ns: str, dev: str) -> None:
        """A token bucket on ``dev``'s egress: ``rate_mbit``, a 2 ms burst, 50 ms of queue.

        The burst is at least 32 KiB: at 80 Mbit/s that passed 73 Mbit/s of TCP payload,
        at 1 Gbit/s (250 KB) 947 Mbit/s; tbf splits larger GSO packets itself.
        """
        rate = float(self.rate_mbit or 0)
        burst = max(32 * 1024, int(rate * 1e6 / 8 * 0.002))
        _cmd(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
              "rate", f"{rate:g}mbit", "burst", str(burst), "latency", "50ms"])  # fmt: skip

    def close(self) -> list[str]:
        """End the processes started here, delete links and namespaces; return what is left."""
        with _NoInterrupt():
            _end(self._children)
            self._children.clear()
            if self.loopback:
                return []
            ours = self.names()["netns"]
            present = [ns for ns in _our_namespaces() if ns in ours]
            for ns in present:
                _end_pids(_ip("netns", "pids", ns, check=False).stdout.split())
            if self.switch in present:
                for link in [*(self.link(h) for h in self.hosts), self.bridge]:
                    _ip("-n", self.switch, "link", "del", link, check=False)
            for ns in present:
                _ip("netns", "del", ns, check=False)
            return [ns for ns in _our_namespaces() if ns in ours]


def _end(children: Sequence[subprocess.Popen[bytes]], grace: float = 5.0) -> None:
    """SIGTERM each child's process group (``Procs`` gives each its own), then SIGKILL."""
    for proc in children:
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in children:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass  # unkillable (D state): the namespace's pids are killed next


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _end_pids(pids: Sequence[str]) -> None:
    """SIGKILL what still runs inside one of our namespaces (started there by us)."""
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# -- the suite ---------------------------------------------------------------------------

_HELP: dict[tuple[str, ...], str | None] = {}


def _help_text(cli: Sequence[str], command: str) -> str | None:
    """Return ``fedgrad COMMAND --help``, None if the build has no such command (cached)."""
    key = (*cli, command)
    if key not in _HELP:
        done = _cmd([*cli, command, "--help"], check=False, timeout=60)
        _HELP[key] = done.stdout if done.returncode == 0 else None
    return _HELP[key]


def unavailable(shards: int = 1, relays: int = 0, cli: Sequence[str] | None = None) -> str | None:
    """Return why this build cannot run K shards or R relays, None if it can."""
    cli = list(cli or fedgrad_cli())
    if shards > 1:
        text = _help_text(cli, "aggregator") or ""
        if "--shard" not in text or "--peers" not in text:
            return f"sharded aggregator (--shard I/K --peers) {NOT_AVAILABLE}"
    if relays > 0 and _help_text(cli, "relay") is None:
        return f"fedgrad relay {NOT_AVAILABLE}"
    return None


def _deadlines(model_bytes: int, nodes: int, shards: int, relays: int,
               rate_mbit: float | None) -> tuple[float, float]:  # fmt: skip
    """Return the busiest link's seconds per direction per round and a node call timeout.

    A round moves, over one aggregator shard's link, a 1/K slice of the model to and from
    each of its downstreams (N nodes, or R relays); a relay's link carries its M nodes'
    full models and one upstream copy. Nodes time a transfer out at ``--call-timeout`` +
    bytes / 10 MB/s, which N nodes sharing one slow link can undercut.
    """
    if not rate_mbit:
        return 0.0, 10.0
    per_link = (relays or nodes) * model_bytes / shards
    if relays:
        per_link = max(per_link, (math.ceil(nodes / relays) + 1) * model_bytes)
    wire_s = per_link / (rate_mbit * 1e6 / 8)
    return wire_s, max(10.0, math.ceil(3 * wire_s))


@dataclass
class _Run:
    """One run's processes: K aggregator shards, R relays, N nodes, one host each."""

    procs: Procs
    topo: Topology
    cli: list[str]
    work: Path
    task: list[str]
    servers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)  # by host
    nodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log(self, host: str) -> str:
        return f"{host}-{self.work.name}"

    def serve(self, hosts: Sequence[str], argvs: Sequence[Sequence[object]]) -> None:
        """Start a server on each host, then wait until all listen (peers may wait on peers)."""
        for host, argv in zip(hosts, argvs, strict=True):
            self.servers[host] = self.topo.spawn(self.procs, self.log(host), host, argv)
        for host in hosts:
            try:
                self.topo.wait_listening(host, 120, self.servers[host])
            except BenchError as err:
                raise BenchError(f"{err}\n{self.procs.log_tail(self.log(host))}") from err

    def aggregators(self, shards: int, downstream: int, rounds: int, extra: Sequence[str]) -> None:
        """Start shard 0..K-1 (the plain aggregator when K = 1); shard 0 writes the history."""
        hosts = [f"agg{i}" for i in range(shards)]
        peers = ["--peers", ",".join(self.topo.endpoint(h) for h in hosts)]
        self.serve(hosts, [[
            *self.cli, "aggregator", *self.task, "--listen", self.topo.endpoint(host),
            "--nodes", downstream, "--rounds", rounds, "--lr", "0.1", "--insecure",
            "--finish-grace", "10", "--no-progress",
            *(["--shard", f"{i}/{shards}", *peers] if shards > 1 else []),
            *(["--history", self.work / "history.csv"] if i == 0 else []), *extra,
        ] for i, host in enumerate(hosts)])  # fmt: skip

    def relays(self, count: int, nodes: int, extra: Sequence[str] = ()) -> list[str]:
        """Start ``count`` relays under shard 0; return each node's upstream host."""
        hosts = [f"relay{j}" for j in range(count)]
        behind = [range(j * nodes // count, (j + 1) * nodes // count) for j in range(count)]
        insecure = ["--insecure"] if "--insecure" in (_help_text(self.cli, "relay") or "") else []
        self.serve(hosts, [[
            *self.cli, "relay", *self.task, "--upstream", self.topo.endpoint("agg0"), "--listen",
            self.topo.endpoint(host), "--nodes", len(ids), "--node-id", f"relay-{r}", *insecure,
            *extra,
        ] for r, (host, ids) in enumerate(zip(hosts, behind, strict=True))])  # fmt: skip
        return [next((h for h, ids in zip(hosts, behind, strict=True) if i in ids), "agg0")
                for i in range(nodes)]  # fmt: skip

    def start_nodes(self, upstreams: list[str], call_timeout: float) -> None:
        """Start node I of N (data shard I/N) on host nodeI, talking to ``upstreams[I]``."""
        flags = ["--call-timeout", f"{call_timeout:g}"] if call_timeout > 10 else []
        for i, up in enumerate(upstreams):
            self.nodes[f"node{i}"] = self.topo.spawn(self.procs, self.log(f"node{i}"), f"node{i}", [
                *self.cli, "node", *self.task, "--aggregator", self.topo.endpoint(up),
                "--node-id", f"n{i}", "--shard", f"{i}/{len(upstreams)}", *flags,
            ])  # fmt: skip

    def reset_peaks(self) -> dict[str, int]:
        """Return each server's ``VmHWM`` so far (start-up), then reset it to its RSS now.

        Writing 5 to ``/proc/PID/clear_refs`` resets the peak (Linux 4.0+): ``watch`` then
        reads the peak while serving, apart from the start-up (a shard builds the whole
        model once, to take its pieces from the seeded initial values).
        """
        peaks = {host: vm_hwm_bytes(proc.pid) or 0 for host, proc in self.servers.items()}
        for proc in self.servers.values():
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
        return peaks

    def watch(self, deadline: float) -> dict[str, int]:
        """Wait for every server to exit 0, reading its ``VmHWM``; return the peaks by host.

        Raises:
            BenchError: a server failed, a node failed before shard 0 finished, or the
                deadline passed.
        """
        peaks = dict.fromkeys(self.servers, 0)
        lead = self.servers["agg0"]
        while any(p.poll() is None for p in self.servers.values()):
            for host, proc in self.servers.items():
                peaks[host] = max(peaks[host], vm_hwm_bytes(proc.pid) or 0)
            for host, proc in {**self.servers, **self.nodes}.items():
                code = proc.poll()
                if code not in (None, 0) and (host in self.servers or lead.poll() is None):
                    raise BenchError(f"{host} exited with {code}:\n"
                                     f"{self.procs.log_tail(self.log(host))}")  # fmt: skip
            if time.monotonic() > deadline:
                running = [h for h, p in self.servers.items() if p.poll() is None]
                raise BenchError(f"{running} still running after the deadline:\n"
                                 f"{self.procs.log_tail(self.log(running[0]))}")  # fmt: skip
            time.sleep(0.1)
        return peaks


def shaped_rounds(
    params: int, tensors: int = 20, nodes: int = 4, rounds: int = 4,
    procs: Procs | None = None, shards: int = 1, relays: int = 0,
    rate_mbit: float | None = 1000, extra: Sequence[str] = (), *, loopback: bool = False,
    timeout: float = 900, cli: Sequence[str] | None = None, relay_extra: Sequence[str] = (),
) -> dict:  # fmt: skip
    """Run the aggregator (K shards), R relays and N nodes, each on its own shaped host.

    Args:
        params: fp32 parameters of the synthetic model, in ``tensors`` tensors.
        nodes: ``fedgrad node`` processes (shard I/N of the data each).
        rounds: rounds to train; the first (joins, first touch) is not in the median.
        procs: where to start the children (a fresh ``Procs`` if None).
        shards: aggregator shards (``--shard I/K --peers``); nodes know shard 0 only.
        relays: ``fedgrad relay`` processes, each a node to shard 0 (so its ``--nodes``
            is R); the nodes split evenly between them.
        rate_mbit: every host's link rate, each direction; None or 0: unshaped veths.
        extra: more ``fedgrad aggregator`` flags, given to every shard.
        loopback: no namespaces, every process on 127.0.0.1 (``rate_mbit`` must be None).
        timeout: seconds allowed for the rounds.
        cli: argv prefix of the ``fedgrad`` command (default this checkout's).

    Returns:
        ``_round_stats`` of shard 0's history (``median`` s/round of the rounds after the
        first, ``round_bytes``, ``peak_rss_bytes`` = shard 0's ``VmHWM``), plus
        ``bytes_per_round`` (median, rounds after the first), ``rss_bytes`` per shard and
        relay (and ``startup_rss_bytes``, ``serving_rss_bytes``: before and after they all
        listen), ``max_aggregator_rss_bytes``, ``max_aggregator_serving_rss_bytes`` and ``wire_s`` (the busiest link's seconds per
        direction per round at ``rate_mbit``).

    Raises:
        BenchError: a CLI or namespaces are unavailable, a process failed, or it timed out.
    """
    cli = list(cli or fedgrad_cli())
    if reason := unavailable(shards, relays, cli):
        raise BenchError(reason)
    if nodes < 1 or shards < 1 or not 0 <= relays <= nodes:
        raise ValueError(f"need nodes, shards >= 1 and relays in 0..nodes: {nodes, shards, relays}")
    hosts = [*(f"agg{i}" for i in range(shards)), *(f"relay{j}" for j in range(relays)),
             *(f"node{i}" for i in range(nodes))]  # fmt: skip
    wire_s, call_timeout = _deadlines(params * 4, nodes, shards, relays, rate_mbit)
    own = procs is None
    procs = procs or Procs()
    try:
        with Topology(hosts, rate_mbit or None, loopback=loopback) as topo:
            work = Path(tempfile.mkdtemp(prefix="shaped-", dir=procs.log_dir))
            run = _Run(procs, topo, cli, work, _task(params, tensors))
            run.aggregators(shards, relays or nodes, rounds, extra)
            upstreams = run.relays(relays, nodes, relay_extra)
            startup = run.reset_peaks()
            run.start_nodes(upstreams, call_timeout)
            serving = run.watch(time.monotonic() + timeout)
            rss = {host: max(startup[host], serving[host]) for host in serving}
            rows = _history(work / "history.csv", rounds)
    finally:
        if own:
            procs.close()
    stats = _round_stats(rows, params, rss["agg0"])
    steady = stats["round_bytes"][1:] or stats["round_bytes"]
    return {
        "nodes": nodes, "tensors": tensors, "shards": shards, "relays": relays,
        "rate_mbit": rate_mbit or None, "loopback": loopback, **stats,
        "bytes_per_round": statistics.median(steady),
        "rss_bytes": rss, "startup_rss_bytes": startup, "serving_rss_bytes": serving,
        "max_aggregator_rss_bytes": max(rss[f"agg{i}"] for i in range(shards)),
        "max_aggregator_serving_rss_bytes": max(serving[f"agg{i}"] for i in range(shards)),
        "wire_s": wire_s or None, "node_call_timeout_s": call_timeout,
    }  # fmt: skip


def _history(path: Path, rounds: int) -> list[dict]:
    """Return shard 0's history rows; BenchError unless it holds every round.

    An aggregator that was sent SIGTERM exits 0 after a graceful shutdown, with fewer rounds.
    """
    if not path.exists():
        raise BenchError(f"shard 0 wrote no history at {path}")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if len(rows) < rounds:
        raise BenchError(f"shard 0 exited after {len(rows)} of {rounds} rounds ({path})")
    return rows


# -- benchmarks.run's table (registered in benchmarks/run.py) ---------------------------

Getter = Callable[[dict], float | None]
#: The suite names benchmarks/run.py registers for this module.
SUITE_NAMES = ("shaped_k1", "shaped_k2", "shaped_k4", "shaped_relay2", "shaped_relay2_f32",
               "unshaped_k1", "unshaped_k2")  # fmt: skip
_ROWS: list[tuple[str, str, Getter]] = [
    ("round_s", "s/round", lambda r: r["median"]),
    ("bytes_mb", "MB/round (shard 0)", lambda r: r["bytes_per_round"] / 1e6),
    ("peak_rss_mb", "MB (shard 0)", lambda r: r["peak_rss_bytes"] / 1e6),
    ("max_shard_rss_mb", "MB (largest shard)", lambda r: r["max_aggregator_rss_bytes"] / 1e6),
    ("max_shard_serving_rss_mb", "MB (largest shard, while serving)",
     lambda r: r["max_aggregator_serving_rss_bytes"] / 1e6),
]  # fmt: skip
#: suite -> [(metric, unit, getter)], as ``report.METRICS``.
METRICS: dict[str, list[tuple[str, str, Getter]]] = {name: _ROWS for name in SUITE_NAMES}


def main(argv: list[str] | None = None) -> None:
    """Run one configuration and print its JSON (``values`` left out)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--tensors", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--relays", type=int, default=0)
    parser.add_argument("--rate-mbit", type=float, default=1000, help="0: unshaped")
    parser.add_argument("--loopback", action="store_true", help="127.0.0.1, no namespaces")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--logs", type=Path, help="children's logs here (default a temp dir)")
    parser.add_argument("--cli", help="a fedgrad executable to run (default: this venv's)")
    parser.add_argument("--relay-arg", action="append", default=[],
                        help="one more argument of every relay (repeatable)")  # fmt: skip
    parser.add_argument("--aggregator-arg", action="append", default=[],
                        help="one more argument of every shard (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    # SIGTERM too unwinds through the teardown, as KeyboardInterrupt does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rate = None if args.loopback or not args.rate_mbit else args.rate_mbit
    cli = [args.cli] if args.cli else None
    with Procs(args.logs) as procs:
        try:
            result = shaped_rounds(args.params, args.tensors, args.nodes, args.rounds, procs,
                                   args.shards, args.relays, rate, args.aggregator_arg,
                                   loopback=args.loopback,
                                   timeout=args.timeout, cli=cli,
                                   relay_extra=args.relay_arg)  # fmt: skip
        except BenchError as err:
            raise SystemExit(f"shaped benchmark failed: {err}") from err
    print(json.dumps({k: v for k, v in result.items() if k != "values"}, default=str))


if __name__ == "__main__":
    main()
