"""The public API is what ``__all__`` declares, and every declared name exists.

Like httpx's ``tests/test_exported_members.py``: a name added to or dropped from
the API is a deliberate change to this test.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

import fedgrad

#: The intended top-level API (README, ``fedgrad/__init__.py`` docstring).
PUBLIC_API = {
    "ClusterResult",
    "ConfigError",
    "FedgradError",
    "GaveUpError",
    "LocalCluster",
    "RoundContext",
    "RoundRecord",
    "Task",
    "TaskError",
    "Update",
    "__version__",
    "connect",
    "load_task",
}

PUBLIC_MODULES = [
    "fedgrad.errors",
    "fedgrad.codec",
    "fedgrad.task",
    "fedgrad.history",
    "fedgrad.config",
]


def test_top_level_all_is_exactly_the_public_api() -> None:
    assert len(fedgrad.__all__) == len(set(fedgrad.__all__)), "duplicates in fedgrad.__all__"
    assert set(fedgrad.__all__) == PUBLIC_API


@pytest.mark.parametrize("name", sorted(PUBLIC_API))
def test_top_level_names_exist(name: str) -> None:
    # LocalCluster and ClusterResult are imported lazily (module __getattr__).
    assert getattr(fedgrad, name) is not None


def test_lazy_names_are_the_launch_objects() -> None:
    from fedgrad.launch import local

    assert fedgrad.LocalCluster is local.LocalCluster
    assert fedgrad.ClusterResult is local.ClusterResult
    with pytest.raises(AttributeError):
        _ = fedgrad.NoSuchThing  # type: ignore[attr-defined]


def test_top_level_names_are_the_defining_objects() -> None:
    from fedgrad import errors, history, task

    assert fedgrad.Task is task.Task and fedgrad.Update is task.Update
    assert fedgrad.load_task is task.load_task
    assert fedgrad.RoundRecord is history.RoundRecord
    for name in ("ConfigError", "FedgradError", "GaveUpError", "TaskError"):
        assert getattr(fedgrad, name) is getattr(errors, name)
    assert isinstance(fedgrad.__version__, str) and fedgrad.__version__


def test_star_import_gives_the_public_api() -> None:
    namespace: dict[str, object] = {}
    exec("from fedgrad import *", namespace)  # the behaviour under test
    assert PUBLIC_API - {"__version__"} <= set(namespace)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_public_module_declares_existing_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    declared = getattr(module, "__all__", None)
    assert declared, f"{module_name} has no __all__"
    assert len(declared) == len(set(declared)), f"duplicates in {module_name}.__all__"
    missing = [name for name in declared if not hasattr(module, name)]
    assert not missing, f"{module_name}.__all__ names missing objects: {missing}"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_public_module_defines_what_it_declares(module_name: str) -> None:
    # Declared classes and functions come from fedgrad, not from a dependency by accident.
    module = importlib.import_module(module_name)
    for name in module.__all__:
        member = getattr(module, name)
        if inspect.isclass(member) or inspect.isfunction(member):
            assert member.__module__.startswith("fedgrad"), f"{module_name}.{name}"
