"""Flower baseline, current deployment engine: SuperLink + SuperNodes + ``flwr run``.

Same workload as ``benchmarks.flower_grpc`` (N nodes each return P fp32 values
in T arrays, no compute, FedAvg), but through Flower 1.42's deployment engine,
whose Fleet and Control APIs now speak HTTP. Processes, all on 127.0.0.1:

* ``flower-superlink --insecure --host 127.0.0.1 --port L
  --disable-runtime-dependency-installation`` (no ``uv sync``: offline; the
  app's dependencies are already in this venv). It runs the ServerApp in a
  ``flower-superexec`` subprocess.
* N x ``flower-supernode --insecure --superlink 127.0.0.1:L --port Qi``; each
  runs the ClientApp in a ``flower-superexec`` subprocess.
* ``flwr run benchmarks/flower_app bench --run-config ...``, which builds the
  FAB from ``benchmarks/flower_app`` and submits it to connection "bench" of a
  private ``FLWR_HOME`` (nothing is written to ``~/.flwr``).

The ServerApp writes the seconds of each round to a JSON file; the harness
waits for it and samples the peak RSS of the SuperLink's process tree.

Run: ``python -m benchmarks.flower_deploy [--params 50000000] [--nodes 4] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    REPO_ROOT,
    BenchError,
    Procs,
    RssSampler,
    child_env,
    free_port,
    rounds_result,
    wait_listening,
)
from benchmarks.flower_grpc import flower_available

__all__ = ["APP_DIR", "measure_flower_deploy"]

APP_DIR = REPO_ROOT / "benchmarks" / "flower_app"


def _tool(name: str) -> str:
    """Return the path of a Flower console script next to this interpreter."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise BenchError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def _flower_env(home: Path) -> dict[str, str]:
    """Return the children's env: private FLWR_HOME, venv scripts on PATH.

    The SuperLink and SuperNodes start ``flower-superexec`` by name, so the
    venv's bin directory must be on PATH even when the venv is not activated.
    """
    env = child_env(FLWR_HOME=str(home))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _write_connection(home: Path, port: int) -> None:
    """Point the CLI's default SuperLink connection at our local SuperLink."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "bench"\n\n'
        f'[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )


def _wait_file(path: Path, procs: Procs, watched: dict, timeout: float) -> str:
    """Wait for ``path`` to be written; fail early if a watched child exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            time.sleep(0.05)  # the ServerApp writes it in one call; let it finish
            return path.read_text()
        for name, proc in watched.items():
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode}:\n{procs.log_tail(name)}")
        time.sleep(0.1)
    raise BenchError(f"no result from the ServerApp within {timeout:.0f}s")


def _start_federation(procs: Procs, env: dict, link_port: int, nodes: int) -> dict:
    """Start the SuperLink and the SuperNodes; return them by log name."""
    started = {
        "flower-superlink": procs.spawn(
            "flower-superlink",
            [_tool("flower-superlink"), "--insecure", "--host", "127.0.0.1",
             "--port", str(link_port), "--disable-runtime-dependency-installation"],
            env=env,
        )
    }  # fmt: skip
    for i in range(nodes):
        name = f"flower-supernode{i}"
        started[name] = procs.spawn(
            name,
            [_tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
             "--port", str(free_port()), "--max-wait-time", "300"],
            env=env,
        )  # fmt: skip
    return started


def _submit(procs: Procs, env: dict, config: str, timeout: float = 300) -> None:
    """Run ``flwr run`` until it has submitted the run (it retries until the link is up)."""
    deadline = time.monotonic() + timeout
    while True:
        cli = procs.spawn(
            "flwr-run", [_tool("flwr"), "run", str(APP_DIR), "bench", "--run-config", config],
            env=env,
        )  # fmt: skip
        if procs.wait(cli, timeout=120) == 0:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"flwr run failed:\n{procs.log_tail('flwr-run')}")
        time.sleep(2)  # most likely the SuperLink is still starting


def measure_flower_deploy(
    params: int,
    tensors: int = 20,
    nodes: int = 4,
    rounds: int = 3,
    procs: Procs | None = None,
    timeout: float = 1800,
) -> dict:
    """Run the workload on Flower's deployment engine; return seconds per round.

    Args:
        params: fp32 values each node returns per round.
        tensors: how many arrays those values are split into.
        nodes: SuperNodes (the round waits for all of them).
        rounds: FedAvg rounds; every round is reported.
        procs: where to start the children (a fresh ``Procs`` if None).
        timeout: seconds allowed for the rounds once submitted.

    Returns:
        ``summarize`` of seconds per round after the first (which also waits
        for the nodes and app processes), ``all_rounds``, and
        ``peak_rss_bytes`` of the SuperLink with its ServerApp process.

    Raises:
        BenchError: flwr is missing, a process failed, or the deadline passed.
    """
    if reason := flower_available():
        raise BenchError(reason)
    own = procs is None
    procs = procs or Procs()
    home = Path(tempfile.mkdtemp(prefix="flwr-home-", dir=procs.log_dir))
    out = home / "rounds.json"
    try:
        port = free_port()
        _write_connection(home, port)
        env = _flower_env(home)
        started = _start_federation(procs, env, port, nodes)
        with RssSampler(started["flower-superlink"].pid) as rss:
            config = (f"params={params} tensors={tensors} num-nodes={nodes} "
                      f"num-server-rounds={rounds} out-file='{out}'")  # fmt: skip
            wait_listening(port, timeout=120)
            _submit(procs, env, config)
            seconds = json.loads(_wait_file(out, procs, started, timeout))
    finally:
        if own:
            procs.close()
        shutil.rmtree(home / "apps", ignore_errors=True)  # installed FAB copies
    return rounds_result(seconds, rss.peak_bytes, params=params, tensors=tensors, nodes=nodes)


def main(argv: list[str] | None = None) -> None:
    """Run the measurement once and print it as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--tensors", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    result = measure_flower_deploy(args.params, args.tensors, args.nodes, args.rounds)
    print(json.dumps({k: v for k, v in result.items() if k != "values"}))


if __name__ == "__main__":
    main()
