"""Raw grpcio baseline: the ceiling of Python gRPC on this machine, without protobuf.

A server process and client processes on 127.0.0.1 exchange opaque 1 MiB
``bytes`` messages through generic method handlers with identity serializers
(``None``: grpcio hands the raw bytes through), so what is measured is grpcio's
transport alone. Three figures:

* upload: one client streams P bytes to the server (client stream), GB/s;
* download: the server streams P bytes to one client (server stream), GB/s;
* fan-in: N client processes upload P bytes each at once; total GB/s.

The server is ``grpc.aio`` (as fedgrad's aggregator is); clients are the sync
API (as fedgrad's node is). Clients warm up, then wait for a "go" line on stdin
per repetition so that fan-in starts together; they report start and end on
the system-wide monotonic clock (CLOCK_MONOTONIC), comparable across processes.

Run: ``python -m benchmarks.raw_grpc [--payload-mib 256] [--clients 4] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator

import grpc

from benchmarks.common import GB, BenchError, MiB, Procs, module_cmd, summarize

__all__ = ["measure", "measure_download", "measure_fanin", "measure_upload"]

_MODULE = "benchmarks.raw_grpc"  # children run this module; __name__ may be __main__
_UPLOAD = "/bench.Raw/Upload"
_DOWNLOAD = "/bench.Raw/Download"
# 1 MiB messages: the chunk size the design settled on, under the 4 MiB default.
CHUNK = MiB
_OPTIONS = [("grpc.so_reuseport", 0)]


# -- server (child process) -------------------------------------------------
async def _upload(request_iterator, context) -> bytes:
    """Count the bytes of a client stream and reply with the count."""
    total = 0
    async for msg in request_iterator:
        total += len(msg)
    return total.to_bytes(8, "little")


async def _download(request: bytes, context):
    """Stream ``int(request)`` bytes as 1 MiB messages (one shared buffer)."""
    total = int(request)
    block = bytes(CHUNK)
    sent = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        yield block if n == CHUNK else block[:n]
        sent += n


async def _serve() -> None:
    """Serve both methods on 127.0.0.1 port 0; print ``PORT <n>``; run until killed."""
    handler = grpc.method_handlers_generic_handler(
        "bench.Raw",
        {
            "Upload": grpc.stream_unary_rpc_method_handler(_upload),
            "Download": grpc.unary_stream_rpc_method_handler(_download),
        },
    )
    server = grpc.aio.server(options=_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    await server.wait_for_termination()


# -- client (child process) -------------------------------------------------
def _chunks(total: int) -> Iterator[bytes]:
    block = bytes(CHUNK)
    sent = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        yield block if n == CHUNK else block[:n]
        sent += n


def _transfer(channel: grpc.Channel, mode: str, payload: int) -> int:
    """Move ``payload`` bytes once in ``mode``; return the bytes the receiver counted."""
    if mode == "upload":
        upload = channel.stream_unary(_UPLOAD)
        return int.from_bytes(upload(_chunks(payload), timeout=600), "little")
    download = channel.unary_stream(_DOWNLOAD)
    return sum(len(m) for m in download(str(payload).encode(), timeout=600))


def _client(target: str, mode: str, payload: int, warmup_bytes: int) -> None:
    """Warm up, then per stdin "go" line transfer once and print ``DONE start end``."""
    with grpc.insecure_channel(target, options=_OPTIONS) as channel:
        _transfer(channel, mode, warmup_bytes)
        print("READY", flush=True)
        for line in sys.stdin:
            if line.strip() != "go":
                break
            start = time.monotonic()
            got = _transfer(channel, mode, payload)
            end = time.monotonic()
            if got != payload:
                raise SystemExit(f"moved {got} bytes, expected {payload}")
            print(f"DONE {start} {end}", flush=True)


# -- harness (parent) -------------------------------------------------------
def measure(
    mode: str, payload: int, clients: int = 1, repeats: int = 3, procs: Procs | None = None
) -> dict:
    """Measure throughput of ``clients`` concurrent transfers of ``payload`` bytes each.

    Args:
        mode: "upload" (client stream) or "download" (server stream).
        payload: bytes per client per repetition.
        clients: number of client processes moving data at the same time.
        repeats: timed repetitions (after one warm-up transfer per client).
        procs: where to start the children (a fresh ``Procs`` if None).

    Returns:
        ``summarize`` of total GB/s per repetition, plus the parameters.
    """
    own = procs is None
    procs = procs or Procs()
    try:
        server = procs.spawn("raw-grpc-server", module_cmd(_MODULE, "serve"), pipe_stdout=True)
        port = int(procs.read_line(server, "PORT", timeout=60))
        args = ["client", "--target", f"127.0.0.1:{port}", "--mode", mode, "--payload", payload]
        kids = [
            procs.spawn(f"raw-grpc-client{i}", module_cmd(_MODULE, *args), pipe_stdout=True,
                        pipe_stdin=True)
            for i in range(clients)
        ]  # fmt: skip
        for kid in kids:
            procs.read_line(kid, "READY", timeout=120)
        rates = [_one_repeat(procs, kids, payload) for _ in range(repeats)]
        for kid in kids:
            kid.stdin.close()  # type: ignore[union-attr]
            procs.wait(kid, timeout=30)
    finally:
        if own:
            procs.close()
    return {"mode": mode, "payload_bytes": payload, "clients": clients, **summarize(rates)}


def _one_repeat(procs: Procs, kids: list, payload: int) -> float:
    """Start every client at once; return total GB/s over the union of their spans."""
    for kid in kids:
        kid.stdin.write(b"go\n")
        kid.stdin.flush()
    spans = [procs.read_line(kid, "DONE", timeout=600).split() for kid in kids]
    start = min(float(s) for s, _ in spans)
    end = max(float(e) for _, e in spans)
    return len(kids) * payload / (end - start) / GB


def measure_upload(payload: int, repeats: int = 3, procs: Procs | None = None) -> dict:
    """Client-stream throughput of one client (GB/s); see ``measure``."""
    return measure("upload", payload, 1, repeats, procs)


def measure_download(payload: int, repeats: int = 3, procs: Procs | None = None) -> dict:
    """Server-stream throughput to one client (GB/s); see ``measure``."""
    return measure("download", payload, 1, repeats, procs)


def measure_fanin(
    payload: int, clients: int = 4, repeats: int = 3, procs: Procs | None = None
) -> dict:
    """Total client-stream throughput of ``clients`` concurrent uploaders (GB/s)."""
    return measure("upload", payload, clients, repeats, procs)


def main(argv: list[str] | None = None) -> None:
    """Run as the server, a client, or (default) the three measurements."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("role", nargs="?", default="bench", choices=["bench", "serve", "client"])
    parser.add_argument("--target")
    parser.add_argument("--mode", choices=["upload", "download"], default="upload")
    parser.add_argument("--payload", type=int, help="bytes per transfer (client role)")
    parser.add_argument("--payload-mib", type=int, default=256)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.role == "serve":
        asyncio.run(_serve())
    elif args.role == "client":
        _client(args.target, args.mode, args.payload, warmup_bytes=min(args.payload, 64 * MiB))
    else:
        payload = args.payload_mib * MiB
        try:
            for result in (
                measure_upload(payload, args.repeats),
                measure_download(payload, args.repeats),
                measure_fanin(payload, args.clients, args.repeats),
            ):
                print(json.dumps({k: v for k, v in result.items() if k != "values"}))
        except BenchError as err:
            raise SystemExit(f"raw grpc benchmark failed: {err}") from err


if __name__ == "__main__":
    main()
