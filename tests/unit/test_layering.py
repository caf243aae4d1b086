"""The sans-IO rule: protocol, auth, session and pool-core code never touches I/O or clocks.

Those layers take bytes and timestamps in and hand bytes and events out; only trioproxy/_server
and friends talk to trio, sockets and TLS. This walks the AST of every module in the sans-IO
layers (whichever of them exist yet) and fails on any import of an I/O or clock module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import trioproxy

PACKAGE_DIR = Path(next(iter(trioproxy.__path__)))

SANS_IO_DIRS = ("_protocol", "_auth", "_session")
SANS_IO_FILES = ("_pool/core.py", "_cluster/keys.py")

FORBIDDEN = frozenset({"trio", "socket", "ssl", "time", "asyncio", "selectors"})


def sans_io_modules() -> list[Path]:
    found: set[Path] = set()
    for name in SANS_IO_DIRS:
        directory = PACKAGE_DIR / name
        if directory.is_dir():
            found.update(directory.rglob("*.py"))
    for name in SANS_IO_FILES:
        path = PACKAGE_DIR / name
        if path.is_file():
            found.add(path)
    return sorted(found)


def forbidden_imports(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """Return (line, module) for every import of a forbidden top-level module in ``source``."""
    bad: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        elif (
            # __import__("trio") / importlib.import_module("trio")
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            modules = [node.args[0].value]
        else:
            continue
        bad.extend((node.lineno, module) for module in modules if module.split(".")[0] in FORBIDDEN)
    return bad


def test_sans_io_layers_import_no_io() -> None:
    violations: list[str] = []
    for path in sans_io_modules():
        rel = path.relative_to(PACKAGE_DIR.parent)
        violations.extend(
            f"{rel}:{line}: imports {module}"
            for line, module in forbidden_imports(path.read_text(encoding="utf-8"), str(path))
        )
    assert not violations, "sans-IO layers must not do I/O:\n" + "\n".join(violations)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import trio", [(1, "trio")]),
        ("import trio.lowlevel as ll", [(1, "trio.lowlevel")]),
        ("from time import monotonic", [(1, "time")]),
        ("import os, socket", [(1, "socket")]),
        ("if True:\n    import ssl", [(2, "ssl")]),
        ("def f():\n    import asyncio", [(2, "asyncio")]),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import selectors",
            [(3, "selectors")],
        ),
        ("import importlib\nimportlib.import_module('trio')", [(2, "trio")]),
        ("__import__('socket')", [(1, "socket")]),
        ("from . import time", []),
        ("from .time import x", []),
        ("import timeit, trioproxy.errors, sslib", []),
        ("import hashlib, hmac, secrets, struct", []),
    ],
)
def test_checker(source: str, expected: list[tuple[int, str]]) -> None:
    assert forbidden_imports(source) == expected


def test_layer_list_is_sane() -> None:
    # Every path we scan lies inside the package; an empty list (nothing written yet) is fine.
    for path in sans_io_modules():
        assert PACKAGE_DIR in path.parents
