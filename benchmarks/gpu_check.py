"""A maintainer's check of ``--device cuda`` on a machine with a GPU (one short run).

It trains the digits CNN in-process (aggregator and 4 nodes over loopback gRPC) on the CPU
and with the nodes (and then also the aggregator's step) on CUDA, prints the round times
and the accuracies side by side, then times the node-side copies of a 50M-parameter
model between the device and pinned host memory (the path every pull and push takes).
Then it runs the CUDA tests. Exit 0 when CUDA training matches the CPU's accuracy within
0.02 and the tests pass.

Run: ``python -m benchmarks.gpu_check`` (about a minute on one GPU).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import torch

from fedgrad import LocalCluster


def _run(**options: object) -> tuple[float, float]:
    node_options = options.pop("node_options", None)
    args = {"model": "cnn"}
    with LocalCluster("digits", nodes=4, task_args=args, node_options=node_options, **options) as c:
        history = c.run(rounds=6).history
    return statistics.median(r.seconds for r in history[1:]), history[-1].test_accuracy


def _copies(params: int = 50_000_000, tensors: int = 20) -> tuple[float, float]:
    """Seconds to move a model device -> pinned host and back (median of 5)."""
    size = params // tensors
    device = [torch.randn(size, device="cuda") for _ in range(tensors)]
    host = [torch.empty(size, pin_memory=True) for _ in range(tensors)]
    down, up = [], []
    for _ in range(5):
        torch.cuda.synchronize()
        began = time.perf_counter()
        for h, d in zip(host, device, strict=True):
            h.copy_(d, non_blocking=True)
        torch.cuda.synchronize()
        down.append(time.perf_counter() - began)
        began = time.perf_counter()
        for h, d in zip(host, device, strict=True):
            d.copy_(h, non_blocking=True)
        torch.cuda.synchronize()
        up.append(time.perf_counter() - began)
    return statistics.median(down), statistics.median(up)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    rows = {
        "cpu": _run(),
        "nodes on cuda": _run(node_options={"device": "cuda"}),
        "nodes + step on cuda": _run(node_options={"device": "cuda"}, device="cuda"),
    }
    print(f"{'run':24s} {'round s (median)':>18s} {'accuracy':>9s}")
    for name, (seconds, accuracy) in rows.items():
        print(f"{name:24s} {seconds:18.3f} {accuracy:9.3f}")
    down, up = _copies()
    print(f"50M float32, device -> pinned host {down:.3f} s, pinned host -> device {up:.3f} s")
    close = all(abs(a - rows["cpu"][1]) < 0.02 for _, a in rows.values())
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "tests/integration/test_devices.py"], check=False
    )
    return 0 if close and tests.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
