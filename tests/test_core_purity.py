"""presenced.core is pure: no I/O, no clocks, no randomness, no concurrency, no shell.

Everything with side effects lives in the shell (presenced.server and friends); the core can
then be tested deterministically and property-tested without a network or an event loop. The
core imports nothing of presenced but itself: the shell, the configuration, auth, the CLIs,
the clients and the test helpers build on the core, never the other way round (no cycles).
The check reads every core file's syntax tree, so an import inside a function or an
``if TYPE_CHECKING`` block counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import presenced.core

#: Standard and third-party modules the core may not import (nor anything under them): I/O,
#: clocks, randomness, concurrency, and dynamic imports that would hide the others.
FORBIDDEN = frozenset(
    {
        "asyncio",
        "concurrent",
        "ctypes",
        "datetime",
        "importlib",
        "multiprocessing",
        "os",
        "random",
        "secrets",
        "select",
        "selectors",
        "signal",
        "socket",
        "sqlite3",
        "ssl",
        "subprocess",
        "threading",
        "_thread",
        "time",
        "uuid",
    }
)
#: Every top-level module whose name starts so: trio, trio_websocket, and their kin.
FORBIDDEN_PREFIXES = ("trio",)
#: The only part of presenced the core may import: itself. The shell (presenced.server), the
#: configuration, auth, the CLIs, the clients and the test helpers all build on the core.
PACKAGE, CORE_PACKAGE = "presenced", "presenced.core"
#: Builtins that do I/O or run code the checker cannot see.
FORBIDDEN_CALLS = frozenset({"open", "print", "input", "breakpoint", "__import__", "exec", "eval"})

CORE = Path(presenced.core.__file__).resolve().parent
CORE_FILES = sorted(CORE.rglob("*.py"))


def imported_modules(tree: ast.AST, package: str = CORE_PACKAGE) -> list[tuple[int, str]]:
    """Every module an ``import`` or ``from ... import`` names, anywhere in the file (also
    inside functions and ``if TYPE_CHECKING`` blocks), with its line.

    Relative imports are resolved against ``package`` (the importing file's package), and
    ``from presenced import X`` counts as importing ``presenced.X``, so neither hides the
    shell behind another spelling.
    """
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if not node.module or module == PACKAGE:  # the names may be modules themselves
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return found


def is_forbidden(module: str) -> bool:
    top = module.split(".")[0]
    if top == PACKAGE:
        return not (module == CORE_PACKAGE or module.startswith(CORE_PACKAGE + "."))
    return top in FORBIDDEN or top.startswith(FORBIDDEN_PREFIXES)


def forbidden_imports(source: str, package: str = CORE_PACKAGE) -> list[str]:
    tree = ast.parse(source)
    bad = [
        f"line {line}: {module}"
        for line, module in imported_modules(tree, package)
        if is_forbidden(module)
    ]
    bad += [
        f"line {node.lineno}: {node.func.id}()"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in FORBIDDEN_CALLS
    ]
    return bad


def package_of(path: Path) -> str:
    """The dotted package a core file belongs to (``presenced.core`` or a subpackage)."""
    return ".".join([CORE_PACKAGE, *path.parent.relative_to(CORE).parts])


def test_core_files_are_found() -> None:
    assert CORE_FILES, f"no .py files under {CORE}"
    assert CORE / "crdt.py" in CORE_FILES


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(CORE)))
def test_core_module_is_pure(path: Path) -> None:
    bad = forbidden_imports(path.read_text(encoding="utf-8"), package_of(path))
    assert not bad, f"{path.relative_to(CORE.parent)} reaches outside the pure core: {bad}"


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
        "import select",
        "from ctypes import CDLL",
        "import trio",
        "from trio.lowlevel import current_clock",
        "import trio_typing",
        "import sqlite3",
        "from importlib import import_module",
        "from presenced.server.node import Node",
        "import presenced.server",
        "from presenced.server.messaging import store",
        "from presenced.config import Config",
        "from presenced import config",
        "from presenced.auth import Verifier",
        "from presenced.cli import main",
        "from presenced.cli_status import x",
        "from presenced.client import Client",
        "from presenced.client_resume import x",
        "from presenced.testing.memory_store import MemoryStore",
        "import presenced",
        "from presenced import __version__",
        "from ..server import node",  # relative, out of the core
        "from .. import auth",
        "def f():\n    return __import__('socket')\n",
        "def f(path):\n    return open(path).read()\n",
        "print('hello')",
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
        "import presenced.core.crdt",
        "from presenced.core import crdt",
        "from presenced import core",
        "import tracemalloc_like, selectors_like, osmium",  # prefixes ban only trio*
        "def f(x):\n    return x.open()\n",  # a method, not the builtin
    ],
)
def test_checker_allows_pure_imports(source: str) -> None:
    assert not forbidden_imports(source)


def test_relative_imports_resolve_against_the_files_own_package() -> None:
    """Two dots from a core subpackage are still the core; from the core they are the shell."""
    assert not forbidden_imports("from .. import crdt", "presenced.core.gossip")
    assert forbidden_imports("from ... import server", "presenced.core.gossip")
    assert package_of(CORE / "crdt.py") == "presenced.core"
    assert package_of(CORE / "sub" / "x.py") == "presenced.core.sub"
