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
    """presenced module -> the presenced modules it imports (anywhere in the file)."""
    modules = {_module_name(path): path for path in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module in modules:
                    deps.add(node.module)
                deps.update(
                    f"{node.module}.{alias.name}"
                    for alias in node.names
                    if f"{node.module}.{alias.name}" in modules
                )
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names if alias.name in modules)
        deps.discard(name)
        graph[name] = deps
    return graph


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


def test_the_checker_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert reaches(graph, "a", "a")
    assert not reaches(graph, "d", "d")
