"""The one bounded wait of the integration tests: poll a condition, fail naming what was awaited.

Waits here are for states a test caused (a round to close, a node to block in a call),
never for time to pass; the bound only decides how soon a broken run reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["WAIT", "wait_until"]

#: Default bound on a wait for a state the test caused.
WAIT = 30.0


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that value.

    Raises:
        AssertionError: still falsy after ``timeout`` seconds; the message names ``what``.
    """
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)
    return value
