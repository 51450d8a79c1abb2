"""presenced.core is pure: no I/O, no clocks, no randomness, no concurrency.

Everything with side effects lives in the shell (presenced.server and friends); the core can
then be tested deterministically and property-tested without a network or an event loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import presenced.core

FORBIDDEN = frozenset(
    {
        "trio",
        "trio_websocket",
        "ssl",
        "socket",
        "time",
        "random",
        "asyncio",
        "sqlite3",
        "secrets",
        "os",
        "threading",
        "selectors",
        "subprocess",
        "datetime",
    }
)

CORE = Path(presenced.core.__file__).resolve().parent
CORE_FILES = sorted(CORE.rglob("*.py"))


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every absolute module an ``import`` or ``from ... import`` names, anywhere in the file
    (also inside functions and ``if TYPE_CHECKING`` blocks), with its line."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def forbidden_imports(source: str) -> list[str]:
    tree = ast.parse(source)
    return [
        f"line {line}: {module}"
        for line, module in imported_modules(tree)
        if module.split(".")[0] in FORBIDDEN
    ]


def test_core_files_are_found() -> None:
    assert CORE_FILES, f"no .py files under {CORE}"
    assert CORE / "crdt.py" in CORE_FILES


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(CORE)))
def test_core_module_is_pure(path: Path) -> None:
    bad = forbidden_imports(path.read_text(encoding="utf-8"))
    assert not bad, f"{path.relative_to(CORE.parent)} imports I/O or nondeterminism: {bad}"


@pytest.mark.parametrize(
    "source",
    [
        "import time",
        "import os.path",
        "import trio_websocket as tw",
        "from datetime import datetime",
        "from asyncio.tasks import gather",
        "import attrs, random",
        "def f():\n    import socket\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ssl\n",
    ],
)
def test_checker_catches_forbidden_imports(source: str) -> None:
    assert forbidden_imports(source)


@pytest.mark.parametrize(
    "source",
    [
        "import attrs",
        "from collections.abc import Mapping",
        "from . import crdt",
        "from .time_utils import x",  # relative: a core module, not the stdlib
        "import timeit_like",  # only the exact top-level names are banned
        "from presenced.core.crdt import ReplicaId",
    ],
)
def test_checker_allows_pure_imports(source: str) -> None:
    assert not forbidden_imports(source)


#: What the presence node and the tick plan may not import besides I/O: the shell, the
#: configuration and authentication (they are handed plain values and interfaces).
SHELL = ("presenced.server", "presenced.config", "presenced.auth", "select", "ctypes")


@pytest.mark.parametrize("name", ["presence.py", "ticks.py"])
def test_the_presence_node_and_tick_plan_import_no_shell(name: str) -> None:
    tree = ast.parse((CORE / name).read_text(encoding="utf-8"))
    bad = [
        f"line {line}: {module}"
        for line, module in imported_modules(tree)
        if any(module == banned or module.startswith(banned + ".") for banned in SHELL)
    ]
    assert not bad, f"core/{name} imports the shell: {bad}"
