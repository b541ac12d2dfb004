"""Fixtures of the integration tests that use ``faults_support`` (pytest finds them here)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from faults_support import StalledUpload


@pytest.fixture
def stalled() -> Iterator[Callable[..., StalledUpload]]:
    """Factory of ``StalledUpload``s, all released and cancelled at teardown."""
    made: list[StalledUpload] = []

    def factory(*args: Any, **kwargs: Any) -> StalledUpload:
        upload = StalledUpload(*args, **kwargs)
        made.append(upload)
        return upload

    yield factory
    for upload in made:
        upload.close()
