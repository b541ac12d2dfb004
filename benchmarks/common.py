"""Shared benchmark plumbing: free ports, child processes, RSS sampling, statistics.

Every suite runs its peers as separate OS processes on 127.0.0.1. ``Procs`` owns
them: each child gets its own session so that it (and whatever it spawns) can be
ended by its process-group id, and nothing outlives the suite, even on error.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import psutil

__all__ = [
    "GB",
    "MiB",
    "REPO_ROOT",
    "BenchError",
    "Procs",
    "RssSampler",
    "child_env",
    "free_port",
    "module_cmd",
    "percentile",
    "prometheus_value",
    "ratio",
    "rounds_result",
    "scrape_metrics",
    "summarize",
    "vm_hwm_bytes",
    "wait_listening",
]

MiB = 1 << 20
GB = 1e9  # throughput is reported in decimal GB/s, like the figures in issue 5
REPO_ROOT = Path(__file__).resolve().parent.parent

# Flower phones home (telemetry, update checks, its hub) unless told not to; the
# benchmark must never send traffic beyond 127.0.0.1, so every child gets these,
# and the platform URLs point at a closed local port as a backstop.
_OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_SUPERGRID_API_URL": "http://127.0.0.1:9/v1",
    "FLWR_SUPERGRID_ADDRESS": "127.0.0.1:9",
    "FLWR_MODEL_API_ENDPOINT": "http://127.0.0.1:9/v1/responses",
    # gloo binds the loopback interface only.
    "GLOO_SOCKET_IFNAME": "lo",
    "PYTHONUNBUFFERED": "1",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}


class BenchError(RuntimeError):
    """A suite could not produce a measurement (peer missing, child failed, timeout)."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Used where a child needs a port chosen before it starts (gloo's rendezvous,
    Flower, the fedgrad CLI); servers we write ourselves bind port 0 instead.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float, host: str = "127.0.0.1") -> None:
    """Poll until ``host:port`` accepts TCP connections.

    Raises:
        BenchError: nothing accepted within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise BenchError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def child_env(**extra: str) -> dict[str, str]:
    """Return the environment for benchmark children: offline, repo importable."""
    env = dict(os.environ)
    env.update(_OFFLINE_ENV)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env.update(extra)
    return env


def module_cmd(module: str, *args: object) -> list[str]:
    """Return the argv that runs ``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *(str(a) for a in args)]


def summarize(values: Iterable[float]) -> dict[str, Any]:
    """Return median, min, max and the raw values (empty input gives ``n == 0``)."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0, "median": None, "min": None, "max": None, "values": []}
    return {
        "n": len(vals),
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "values": vals,
    }


def percentile(values: Sequence[float], q: float) -> float | None:
    """Return the ``q``-th percentile (0-100) with linear interpolation, None if empty."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return None
    pos = (len(vals) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(vals) - 1)
    return vals[low] + (vals[high] - vals[low]) * (pos - low)


def rounds_result(seconds: Sequence[float], peak_rss_bytes: int, **params: Any) -> dict:
    """Summarize seconds per round without the first round, which also waits for joins.

    Returns:
        ``params``, ``peak_rss_bytes``, ``all_rounds`` and ``summarize`` of the rest.
    """
    steady = list(seconds[1:]) or list(seconds)
    return {**params, "peak_rss_bytes": peak_rss_bytes, "all_rounds": list(seconds),
            **summarize(steady)}  # fmt: skip


def ratio(num: float | None, den: float | None) -> float | None:
    """Return ``num / den``, or None when either side is missing or ``den`` is 0."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def vm_hwm_bytes(pid: int) -> int | None:
    """Return the kernel's peak resident set (``VmHWM``) of one process, None if it is gone.

    Exact for that process (no sampling gaps), but it excludes children and it
    vanishes with the process: read it while the process runs.
    """
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return None


def scrape_metrics(port: int, timeout: float = 2.0, host: str = "127.0.0.1") -> str | None:
    """Return the Prometheus text of ``http://host:port/metrics``, None if it did not answer."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as reply:
            return str(reply.read().decode())
    except OSError:
        return None


def prometheus_value(text: str, name: str, **labels: str) -> float | None:
    """Return the sample ``name{labels}`` of a Prometheus text exposition, None if absent.

    Only exact label sets match (``fedgrad_nodes{state="active"}``); enough for the
    gauges the benchmarks read, not a general parser.
    """
    want = name
    if labels:
        want += "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == want:
            return float(value)
    return None


class RssSampler:
    """Track the peak resident set size of a process and all its descendants.

    A daemon thread sums RSS over the tree every ``interval`` seconds; the peak
    of that sum is the figure compared against "3x model + 300 MB".
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        """Sample the tree rooted at ``pid`` every ``interval`` seconds once started."""
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def sample(self) -> int:
        """Return the current RSS sum of the tree in bytes (0 if it is gone)."""
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue  # a child exited between listing and sampling
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, self.sample())

    def __enter__(self) -> RssSampler:
        self.peak_bytes = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Procs:
    """Start child processes, read their output with deadlines, and always reap them."""

    def __init__(self, log_dir: Path | None = None) -> None:
        """Write each child's stderr (and stdout unless piped) to ``log_dir/<name>.log``."""
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="bench-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self._pending: dict[int, bytearray] = {}  # unread stdout bytes per child pid

    def spawn(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        pipe_stdout: bool = False,
        pipe_stdin: bool = False,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in its own session; its output goes to the log unless piped."""
        log = open(self.log_dir / f"{name}.log", "ab")
        self._logs.append(log)
        proc = subprocess.Popen(
            list(cmd),
            stdout=subprocess.PIPE if pipe_stdout else log,
            stderr=log,
            stdin=subprocess.PIPE if pipe_stdin else subprocess.DEVNULL,
            env=env or child_env(),
            cwd=cwd or REPO_ROOT,
            start_new_session=True,  # own process group: end it and its children by id
        )
        self.children.append(proc)
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        """Return the last lines of a child's log, for error messages."""
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        text = path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def read_line(self, proc: subprocess.Popen[bytes], prefix: str, timeout: float) -> str:
        """Return the rest of the first stdout line of ``proc`` starting with ``prefix``.

        Reads the raw pipe with ``os.read`` (a buffered ``readline`` could hide
        lines from ``select``); lines without the prefix are skipped.

        Raises:
            BenchError: the child exited or the deadline passed first.
        """
        assert proc.stdout is not None, "spawn the child with pipe_stdout=True"
        fd = proc.stdout.fileno()
        buf = self._pending.setdefault(proc.pid, bytearray())
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                while (nl := buf.find(b"\n")) >= 0:
                    line = bytes(buf[:nl]).decode(errors="replace")
                    del buf[: nl + 1]
                    if line.startswith(prefix):
                        return line[len(prefix) :].strip()
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if sel.select(timeout=min(left, 0.5)):
                    data = os.read(fd, 65536)
                    if not data:
                        break  # EOF: the child closed stdout (exited)
                    buf += data
        raise BenchError(f"no {prefix!r} line from pid {proc.pid} within {timeout:.0f}s")

    @staticmethod
    def wait(proc: subprocess.Popen[bytes], timeout: float) -> int:
        """Wait for ``proc`` to exit and return its code; raise BenchError on timeout."""
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise BenchError(f"pid {proc.pid} still running after {timeout:.0f}s") from err

    def close(self) -> None:
        """End every child still running (SIGTERM, then SIGKILL) and close the logs."""
        for proc in self.children:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            # Grandchildren (Flower's superexec, app processes) share the group.
            _signal_group(proc.pid, signal.SIGKILL)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    try:
                        pipe.close()
                    except BrokenPipeError:
                        pass  # the child is gone; nothing left to flush
        for log in self._logs:
            log.close()
        self.children.clear()
        self._logs.clear()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _signal_group(pgid: int, sig: int) -> None:
    """Signal the process group we created for one child; ignore if already gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
