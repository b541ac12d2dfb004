"""The package layers that ``make lint`` checks with import-linter hold, and the check sees them.

``lint-imports`` reads ``[tool.importlinter]`` in pyproject.toml and analyses the
installed package. Under a strict editable install (``make install-dev``) that is a
tree of links made at install time: a module added since is invisible to it, and
so unchecked, until the package is installed again. These tests catch that, a core
module missing from the contract, and the lazy ``fedgrad.LocalCluster`` edge (the
one the contracts ignore) turning into a real import.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Source folder -> package, as pyproject.toml's [tool.setuptools.package-dir] maps them.
PACKAGE_DIRS = {
    "common": "fedgrad",
    "common/tasks": "fedgrad.tasks",
    "protos/fedgrad/proto": "fedgrad.proto",
    "server": "fedgrad.server",
    "client": "fedgrad.client",
    "launch": "fedgrad.launch",
}
REINSTALL = "pip install -e . --config-settings editable_mode=strict (make install-dev)"


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["name"]: c for c in config["contracts"]}


def _source_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def test_every_core_module_is_a_source_of_the_core_contract() -> None:
    not_core = {"server", "client", "launch", "proto"}
    # fedgrad.X and fedgrad.tasks (with its modules); not the package itself, which holds all.
    want = {
        ".".join(name.split(".")[:2])
        for name in _source_modules()
        if "." in name and name.split(".")[1] not in not_core
    }
    listed = set(_contracts()["the core imports no service and no launcher"]["source_modules"])
    assert listed == want, f"add to / remove from the contract: {sorted(want ^ listed)}"


def test_the_installed_package_holds_every_source_module() -> None:
    """lint-imports and the tests see what is installed: a module added since is not."""
    missing = [name for name in _source_modules() if importlib.util.find_spec(name) is None]
    assert not missing, f"not installed (run {REINSTALL}): {missing}"


def test_import_fedgrad_loads_neither_services_nor_launcher() -> None:
    """``fedgrad -> fedgrad.launch.local`` is ignored by the contracts because it is lazy."""
    code = (
        "import sys, fedgrad\n"
        "print(sorted(m for m in sys.modules if m.split('.')[:2] in"
        " (['fedgrad', 'server'], ['fedgrad', 'client'], ['fedgrad', 'launch'])))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_lint_imports_keeps_every_contract() -> None:
    script = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.fail(f"lint-imports is not installed: {REINSTALL} with the dev extra")
    done = subprocess.run(
        [script, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for name in _contracts():
        assert f"{name} KEPT" in done.stdout, done.stdout
