"""Process tuning of the CLI commands (fedgrad.launch.tuning)."""

from __future__ import annotations

import gc
import platform

import pytest

from fedgrad.launch.tuning import freeze_startup_objects, limit_malloc_arenas, pin_mmap_threshold


def test_arena_cap_leaves_an_operators_setting_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


def test_arena_cap_applies_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    on_glibc = platform.libc_ver()[0] == "glibc"
    # Capping this test process's arenas at 8 (glibc's default for 1 core) changes nothing visible.
    assert limit_malloc_arenas(8) is on_glibc


def test_mmap_threshold_leaves_an_operators_setting_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert pin_mmap_threshold() is False


def test_mmap_threshold_applies_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    on_glibc = platform.libc_ver()[0] == "glibc"
    # 32 MiB, glibc's own ceiling for the dynamic threshold: nothing visible changes.
    assert pin_mmap_threshold(32 << 20) is on_glibc


def test_freeze_moves_live_objects_out_of_the_collectors_sight() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
