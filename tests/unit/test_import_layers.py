"""The pure layers (protocol/, policy) import no I/O and no higher fastsocks layer (DESIGN §3)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "src" / "fastsocks"

# Modules that do I/O, keep time or run concurrently: none belongs in a pure layer.
FORBIDDEN_STDLIB = frozenset(
    {
        "socket", "selectors", "select", "os", "logging", "time", "threading", "_thread",
        "asyncio", "signal", "subprocess", "multiprocessing", "concurrent", "ssl", "mmap",
    }
)  # fmt: skip
ALLOWED_FASTSOCKS = ("fastsocks.errors", "fastsocks.protocol")


def module_name(path: Path) -> str:
    """``src/fastsocks/protocol/socks5.py`` -> ``fastsocks.protocol.socks5``."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, module: str, *, is_package: bool = False) -> list[str]:
    """Every module ``source`` imports, relative imports made absolute.

    ``from a import b`` yields ``a.b``, since ``b`` may be a submodule
    (``from fastsocks import session``); the rules judge it by its prefix.
    """
    package = module if is_package else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node.module, node.level, package)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
    return names


def resolve(name: str | None, level: int, package: str) -> str:
    if level == 0:
        return name or ""
    parent = package.rsplit(".", level - 1)[0] if level > 1 else package
    return f"{parent}.{name}" if name else parent


def violation(name: str) -> str | None:
    top = name.split(".")[0]
    if top in FORBIDDEN_STDLIB:
        return f"imports {name}: I/O, time or concurrency"
    if top == "fastsocks" and not any(name == ok or name.startswith(ok + ".") for ok in ALLOWED_FASTSOCKS):
        return f"imports {name}: only fastsocks.errors and fastsocks.protocol are allowed"
    return None


def violations(path: Path) -> list[str]:
    names = imported_names(path.read_text(), module_name(path), is_package=path.name == "__init__.py")
    return [f"{path.relative_to(PACKAGE_DIR)}: {problem}" for name in names if (problem := violation(name))]


PROTOCOL_FILES = sorted((PACKAGE_DIR / "protocol").glob("*.py"))
POLICY_FILES = sorted([*PACKAGE_DIR.glob("policy*.py"), *PACKAGE_DIR.glob("policy/**/*.py")])


def test_protocol_package_exists() -> None:
    # Guards the test below against silently checking nothing.
    assert PACKAGE_DIR / "protocol" / "socks5.py" in PROTOCOL_FILES


@pytest.mark.parametrize("path", PROTOCOL_FILES, ids=lambda p: p.name)
def test_protocol_is_pure(path: Path) -> None:
    assert violations(path) == []


@pytest.mark.skipif(not POLICY_FILES, reason="no policy module yet")
@pytest.mark.parametrize("path", POLICY_FILES or [None], ids=lambda p: getattr(p, "name", "none"))
def test_policy_is_pure(path: Path) -> None:
    assert violations(path) == []


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("import socket", True),
        ("import os.path", True),
        ("from time import monotonic", True),
        ("from logging import getLogger", True),
        ("import selectors, threading", True),
        ("from fastsocks import session", True),
        ("from fastsocks.worker import Worker", True),
        ("from .. import config", True),
        ("from ..session import Session", True),
        ("import fastsocks", True),
        ("def f():\n    import select", True),
        ("import ipaddress, enum", False),
        ("from fastsocks.errors import ProtocolError", False),
        ("from fastsocks import errors", False),
        ("from ..errors import ProtocolError", False),
        ("from . import socks5", False),
        ("from .socks5 import Reply", False),
        ("from fastsocks.protocol.socks5 import Reply", False),
    ],
)
def test_checker_catches_bad_imports(source: str, bad: bool) -> None:
    names = imported_names(source, "fastsocks.protocol.example")
    assert any(violation(name) for name in names) is bad, names
