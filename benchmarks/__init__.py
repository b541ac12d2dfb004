"""Benchmarks: fedgrad side by side with raw grpcio, torch.distributed gloo and Flower.

Run everything with ``python -m benchmarks.run [--quick] --out DIR`` (see README.md).
Every suite spawns its peers as separate processes on 127.0.0.1 only.
"""
