"""Import structure: the modules named here sit in no import cycle, counting imports made
only for type checking (a cycle of those is still two modules that must change together)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import presenced

ROOT = Path(presenced.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = ("presenced", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """presenced module -> the presenced modules it imports (anywhere in the file, relative
    imports resolved; a package's own parents are not counted: importing
    ``presenced.server.clients.paced`` runs ``presenced.server.clients`` first, whatever it
    imports)."""
    modules = {_module_name(path): path for path in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
            deps.update(
                target
                for target in targets
                if target in modules and target != name and not name.startswith(target + ".")
            )
        graph[name] = deps
    return graph


def in_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every module that imports itself through others."""
    return sorted(name for name in graph if reaches(graph, name, name))


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        name = todo.pop()
        if name == goal:
            return True
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return False


@pytest.mark.parametrize(
    "module",
    [
        "presenced.server.daemon",
        "presenced.server.exporter",
        "presenced.server.http_side",
        "presenced.server.ticker",
        "presenced.core.presence",
        "presenced.core.ticks",
    ],
)
def test_module_is_in_no_import_cycle(module: str) -> None:
    graph = import_graph()
    assert module in graph
    assert not reaches(graph, module, module), f"{module} imports itself through others"


def test_the_package_has_no_import_cycle() -> None:
    """No module of presenced imports itself through others, TYPE_CHECKING imports and
    package ``__init__`` re-exports included: the node imports nothing from the wings (the
    daemon wires them), and the wings reach each other in one direction each."""
    graph = import_graph()
    assert "presenced.server.node" in graph and "presenced.server.clients" in graph
    assert in_cycles(graph) == []


def test_the_node_imports_no_wing() -> None:
    graph = import_graph()
    wings = ("presenced.server.clients", "presenced.server.peers", "presenced.server.messaging")
    reached = {
        name
        for name in graph
        if reaches(graph, "presenced.server.node", name) and name.startswith(wings)
    }
    assert reached == set()


def test_the_checker_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert reaches(graph, "a", "a")
    assert not reaches(graph, "d", "d")
    assert in_cycles(graph) == ["a", "b", "c"]
