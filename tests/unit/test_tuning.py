"""Process tuning of the CLI commands (fedgrad.launch.tuning)."""

from __future__ import annotations

import gc
import platform

import pytest

from fedgrad.launch.tuning import freeze_startup_objects, limit_malloc_arenas


def test_arena_cap_leaves_an_operators_setting_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


def test_arena_cap_applies_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    on_glibc = platform.libc_ver()[0] == "glibc"
    # Capping this test process's arenas at 8 (glibc's default for 1 core) changes nothing visible.
    assert limit_malloc_arenas(8) is on_glibc


def test_freeze_moves_live_objects_out_of_the_collectors_sight() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
