"""Once-per-process warnings (fedgrad.logs.once_per_process) under threads."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable

import pytest

from fedgrad.logs import once_per_process


def _call_together(fn: Callable[[str], None], threads: int = 8) -> None:
    start = threading.Barrier(threads)

    def call() -> None:
        start.wait()
        fn("same")

    workers = [threading.Thread(target=call) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=10)


@pytest.mark.parametrize("decorator", [once_per_process, functools.cache])
def test_threads_calling_together_run_it_once_only_with_once_per_process(decorator) -> None:
    ran: list[str] = []

    def warn(key: str) -> None:
        time.sleep(0.05)  # a slow first call: the others arrive before the cache is filled
        ran.append(key)

    _call_together(decorator(warn))
    # functools.cache lets threads that miss together all run it (what a fleet's nodes did).
    assert (len(ran) == 1) is (decorator is once_per_process), ran


def test_other_arguments_run_again_and_cache_clear_resets() -> None:
    ran: list[str] = []
    warn = once_per_process(ran.append)
    warn("a")
    warn("a")
    warn("b")
    assert ran == ["a", "b"]
    warn.cache_clear()  # type: ignore[attr-defined]
    warn("a")
    assert ran == ["a", "b", "a"]
