"""torch.distributed gloo baseline: all_reduce of P fp32 among N local processes.

This is the peer-to-peer reference for a round: gloo's C++ ring moves about
2(N-1)/N * P values per process with no central hop. Each of the N ranks is a
separate process on 127.0.0.1 (rendezvous over TCP on a free port, gloo bound
to ``lo``). By default the P values are ONE flat fp32 tensor, gloo's best case
(no per-tensor overhead), so the "at most 4x gloo" target is measured against
the strictest reference; ``tensors > 1`` splits P into equal tensors reduced
one after another.

Per iteration every rank passes a barrier, then rank 0 times the all_reduce
call(s); the result is the median over ``iters`` timed iterations after
``warmup`` untimed ones.

Run: ``python -m benchmarks.gloo [--params 50000000] [--world 4] [--iters 5]``
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import BenchError, Procs, free_port, module_cmd, summarize

__all__ = ["measure_allreduce"]

_MODULE = "benchmarks.gloo"  # children run this module; __name__ may be __main__


def _worker(rank: int, world: int, port: int, params: int, tensors: int, iters: int,
            warmup: int) -> None:  # fmt: skip
    """Join the group, all_reduce ``warmup + iters`` times; rank 0 prints the times."""
    import torch  # imported here: the parent harness does not need torch
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        flat = torch.ones(params, dtype=torch.float32)
        parts = list(flat.chunk(tensors)) if tensors > 1 else [flat]
        times = []
        for i in range(warmup + iters):
            dist.barrier()
            start = time.perf_counter()
            for part in parts:
                dist.all_reduce(part)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
        if rank == 0:
            print("RESULT " + json.dumps(times), flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure_allreduce(
    params: int,
    world: int = 4,
    iters: int = 5,
    warmup: int = 1,
    tensors: int = 1,
    procs: Procs | None = None,
    timeout: float = 600,
) -> dict:
    """Time a gloo all_reduce of ``params`` fp32 values among ``world`` processes.

    Args:
        params: fp32 elements reduced per iteration.
        world: number of rank processes.
        iters: timed iterations (after ``warmup`` untimed ones).
        warmup: untimed iterations (connection setup, first-touch of memory).
        tensors: 1 for one flat tensor, or split P into this many tensors.
        procs: where to start the children (a fresh ``Procs`` if None).
        timeout: seconds allowed for the whole measurement.

    Returns:
        ``summarize`` of seconds per all_reduce, plus the parameters.

    Raises:
        BenchError: a rank failed or the deadline passed.
    """
    own = procs is None
    procs = procs or Procs()
    try:
        port = free_port()
        ranks = [
            procs.spawn(
                f"gloo-rank{rank}",
                module_cmd(_MODULE, "worker", "--rank", rank, "--world", world, "--port", port,
                           "--params", params, "--tensors", tensors, "--iters", iters,
                           "--warmup", warmup),
                pipe_stdout=rank == 0,
            )
            for rank in range(world)
        ]  # fmt: skip
        times = json.loads(procs.read_line(ranks[0], "RESULT", timeout=timeout))
        for rank, proc in enumerate(ranks):
            if procs.wait(proc, timeout=60) != 0:
                raise BenchError(f"gloo rank {rank} failed:\n{procs.log_tail(f'gloo-rank{rank}')}")
    finally:
        if own:
            procs.close()
    return {"params": params, "world": world, "tensors": tensors, **summarize(times)}


def main(argv: list[str] | None = None) -> None:
    """Run one rank (``worker``) or, by default, the whole measurement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("role", nargs="?", default="bench", choices=["bench", "worker"])
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--tensors", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    if args.role == "worker":
        _worker(args.rank, args.world, args.port, args.params, args.tensors, args.iters,
                args.warmup)  # fmt: skip
        return
    result = measure_allreduce(args.params, args.world, args.iters, args.warmup, args.tensors)
    print(json.dumps({k: v for k, v in result.items() if k != "values"}))


if __name__ == "__main__":
    main()
