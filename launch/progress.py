"""A live one-line progress bar for the aggregator when stderr is a terminal."""

from __future__ import annotations

import asyncio
import math
import sys
import time
from typing import TextIO

from fedgrad.server.aggregator import Aggregator

__all__ = ["render_progress", "run_progress"]


def render_progress(core: Aggregator, rate: float, width: int = 24) -> str:
    """Return the progress line: round, a bar of uploads in this round, throughput, loss."""
    expected = max(1, sum(1 for r in core.nodes.values() if r.state == "active"))
    done = len(core.engine.reported)
    filled = min(width, round(width * done / expected))
    loss = core.history[-1].train_loss if core.history else math.nan
    # Before the first round closes there is no loss yet: show none rather than "nan".
    shown = "" if math.isnan(loss) else f"loss {loss:.4f}  "
    return (
        f"round {min(core.round + 1, core.cfg.rounds)}/{core.cfg.rounds} "
        f"[{'#' * filled}{'.' * (width - filled)}] {done}/{expected} uploads  "
        f"{rate / 1e6:7.1f} MB/s  {shown}{core.phase}"
    )


async def run_progress(core: Aggregator, stream: TextIO = sys.stderr, every: float = 0.5) -> None:
    """Redraw the progress line until cancelled."""
    last_bytes, last_time = (
        core.counters.bytes_received + core.counters.bytes_sent,
        time.monotonic(),
    )
    while True:
        await asyncio.sleep(every)
        now, moved = time.monotonic(), core.counters.bytes_received + core.counters.bytes_sent
        rate = (moved - last_bytes) / max(now - last_time, 1e-9)
        last_bytes, last_time = moved, now
        stream.write("\r\033[K" + render_progress(core, rate))
        stream.flush()
