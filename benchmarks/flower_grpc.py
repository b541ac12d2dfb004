"""Flower baseline, deprecated gRPC path: ``start_server`` / ``start_client`` (flwr 1.42).

Flower 1.42 still ships the pre-1.13 API under ``flwr.compat`` (re-exported as
``flwr.server.start_server`` and ``flwr.client.start_client``) with its
bidirectional-streaming gRPC transport. The workload mirrors fedgrad's
``synthetic`` task: N client processes each return P fp32 values in T tensors
from ``fit`` with no compute; the server runs FedAvg (legacy strategy, no
evaluation, initial parameters given so no client is asked for them).

Round time = end of ``aggregate_fit`` minus start of ``configure_fit`` of the
same round, measured inside the server; the harness samples the server's
peak RSS. Flower's deprecation notices are dropped by a logging filter (they
are expected: measuring this path is the point) and its telemetry is off.

Run: ``python -m benchmarks.flower_grpc [--params 50000000] [--clients 4] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import time
import warnings

from benchmarks.common import (
    BenchError,
    Procs,
    RssSampler,
    free_port,
    module_cmd,
    rounds_result,
    wait_listening,
)

__all__ = ["flower_available", "measure_flower_grpc", "quiet_flower"]

_MODULE = "benchmarks.flower_grpc"  # children run this module; __name__ may be __main__


def flower_available() -> str | None:
    """Return None if flwr is installed, else the reason it is not.

    Looks the package up without importing it: importing flwr here would
    pull its deprecation warnings into the harness process (errors in tests).
    """
    if importlib.util.find_spec("flwr") is None:
        return "flwr not importable; install the bench extra: pip install -e .[bench]"
    return None


class _DropDeprecations(logging.Filter):
    """Drop Flower's "DEPRECATED FEATURE" log records, keep everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in str(record.msg)


def quiet_flower() -> None:
    """Silence the deprecation notices of the compat API in this process."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("flwr").addFilter(_DropDeprecations())


def _arrays(params: int, tensors: int) -> list:
    """Return P fp32 ones split into ``tensors`` contiguous arrays (views of one buffer)."""
    import numpy as np

    return np.array_split(np.ones(params, dtype=np.float32), tensors)


def _server(port: int, clients: int, rounds: int, params: int, tensors: int) -> None:
    """Run FedAvg for ``rounds`` rounds; print ``RESULT [seconds per round]``."""
    quiet_flower()
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig, start_server
    from flwr.server.strategy import FedAvg

    starts: dict[int, float] = {}
    seconds: list[float] = []

    class TimedFedAvg(FedAvg):
        """FedAvg that timestamps each round from configure_fit to aggregate_fit."""

        def configure_fit(self, server_round, parameters, client_manager):
            starts[server_round] = time.monotonic()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} client failures")
            seconds.append(time.monotonic() - starts[server_round])
            return out

    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_available_clients=clients,
        accept_failures=False,
        initial_parameters=ndarrays_to_parameters(_arrays(params, tensors)),
    )
    start_server(
        server_address=f"127.0.0.1:{port}",
        config=ServerConfig(num_rounds=rounds),
        strategy=strategy,
    )
    print("RESULT " + json.dumps(seconds), flush=True)


def _client(port: int, params: int, tensors: int) -> None:
    """Connect and answer every fit with the same P values (no compute)."""
    quiet_flower()
    from flwr.client import NumPyClient, start_client

    arrays = _arrays(params, tensors)

    class StaticClient(NumPyClient):
        """Return fixed arrays: the cost measured is Flower's, not training's."""

        def get_parameters(self, config):
            return arrays

        def fit(self, parameters, config):
            return arrays, 1, {}

        def evaluate(self, parameters, config):
            return 0.0, 1, {}

    start_client(
        server_address=f"127.0.0.1:{port}",
        client=StaticClient().to_client(),
        insecure=True,
        max_wait_time=120,  # bounded: give up if the server never appears
    )


def measure_flower_grpc(
    params: int,
    tensors: int = 20,
    clients: int = 4,
    rounds: int = 3,
    procs: Procs | None = None,
    timeout: float = 1200,
) -> dict:
    """Run Flower's deprecated gRPC path and return seconds per round and server peak RSS.

    Args:
        params: fp32 values each client returns per round.
        tensors: how many arrays those values are split into.
        clients: client processes (the round waits for all of them).
        rounds: FedAvg rounds; every round is reported.
        procs: where to start the children (a fresh ``Procs`` if None).
        timeout: seconds allowed for the whole run.

    Returns:
        ``summarize`` of seconds per round after the first (which includes client
        start-up), ``all_rounds``, and ``peak_rss_bytes`` of the server.

    Raises:
        BenchError: flwr is missing, a child failed, or the deadline passed.
    """
    if reason := flower_available():
        raise BenchError(reason)
    own = procs is None
    procs = procs or Procs()
    try:
        port = free_port()
        common = ["--port", port, "--params", params, "--tensors", tensors]
        server = procs.spawn(
            "flower-grpc-server",
            module_cmd(_MODULE, "server", *common, "--clients", clients, "--rounds", rounds),
            pipe_stdout=True,
        )
        with RssSampler(server.pid) as rss:
            wait_listening(port, timeout=120)
            for i in range(clients):
                procs.spawn(f"flower-grpc-client{i}", module_cmd(_MODULE, "client", *common))
            try:
                seconds = json.loads(procs.read_line(server, "RESULT", timeout=timeout))
            except BenchError as err:
                raise BenchError(f"{err}\n{procs.log_tail('flower-grpc-server')}") from err
    finally:
        if own:
            procs.close()
    return rounds_result(seconds, rss.peak_bytes, params=params, tensors=tensors, clients=clients)


def main(argv: list[str] | None = None) -> None:
    """Run the server, a client, or (default) the whole measurement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("role", nargs="?", default="bench", choices=["bench", "server", "client"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--tensors", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.role == "server":
        _server(args.port, args.clients, args.rounds, args.params, args.tensors)
    elif args.role == "client":
        _client(args.port, args.params, args.tensors)
    else:
        result = measure_flower_grpc(args.params, args.tensors, args.clients, args.rounds)
        print(json.dumps({k: v for k, v in result.items() if k != "values"}))


if __name__ == "__main__":
    main()
