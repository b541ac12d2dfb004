"""The node runtime's layering: the loop holds no gRPC; the client needs no server or launcher.

``client/transport.py`` owns every gRPC call, retry and status-code rule
(DESIGN.md, "Node runtime"); ``client/node.py`` acts on its domain values.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT = sorted((ROOT / "client").glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute names (``from a import b`` gives ``a`` and ``a.b``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_node_loop_holds_no_grpc() -> None:
    node = ROOT / "client" / "node.py"
    modules = imported_modules(node)
    assert not {m for m in modules if m == "grpc" or m.startswith("grpc.")}, modules
    assert "StatusCode" not in node.read_text()


@pytest.mark.parametrize("path", CLIENT, ids=lambda p: p.name)
def test_the_client_needs_neither_server_nor_launcher(path: Path) -> None:
    modules = imported_modules(path)
    assert not {m for m in modules if m.startswith(("fedgrad.server", "fedgrad.launch"))}


def test_method_paths_are_not_typed_by_hand() -> None:
    for path in CLIENT:
        assert "/fedgrad.v1." not in path.read_text(), path


@pytest.mark.parametrize("module", ["fedgrad.client.node", "fedgrad.client.transport"])
def test_client_modules_declare_existing_names(module: str) -> None:
    loaded = importlib.import_module(module)
    assert loaded.__all__ and all(hasattr(loaded, name) for name in loaded.__all__)
