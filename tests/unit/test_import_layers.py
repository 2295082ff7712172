"""The pure layers (protocol/, policy) import no I/O and no higher fastsocks layer (DESIGN §3)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fastsocks

# The tree the other tests import (tree_check makes sure it is this checkout's own).
PACKAGE_DIR = Path(fastsocks.__file__).resolve().parent

# Modules that do I/O, keep time or run concurrently: none belongs in a pure layer.
FORBIDDEN_STDLIB = frozenset(
    {
        "socket", "selectors", "select", "os", "logging", "time", "threading", "_thread",
        "asyncio", "signal", "subprocess", "multiprocessing", "concurrent", "ssl", "mmap",
    }
)  # fmt: skip
ALLOWED_FASTSOCKS = ("fastsocks.errors", "fastsocks.protocol")


def module_name(path: Path) -> str:
    """``fastsocks/protocol/socks5.py`` -> ``fastsocks.protocol.socks5``."""
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


def test_protocol_package_exists() -> None:
    # Guards the test below against silently checking nothing.
    assert PACKAGE_DIR / "protocol" / "socks5.py" in PROTOCOL_FILES


@pytest.mark.parametrize("path", PROTOCOL_FILES + [PACKAGE_DIR / "policy.py"], ids=lambda p: p.name)
def test_protocol_and_policy_are_pure(path: Path) -> None:
    assert path.exists()
    assert violations(path) == []


# DESIGN.md §3: cli -> master -> worker -> session -> protocol; a module may import only
# modules of a lower rank (imports under ``if TYPE_CHECKING:`` are for annotations only).
RANKS = {
    "errors": 0, "__init__": 0, "__main__": 7,
    "protocol": 1, "settings": 1, "stats": 1, "logs": 0, "loop": 1, "resolver": 1,
    "_relay": 1, "_relay_types": 0, "users": 1, "auth": 1,  # auth imports users only for annotations
    "_relay_py": 2,  # the reference engine reads handshakes with protocol/ and describes them as access does
    "policy": 0, "limits": 1, "config": 2, "access": 1, "host": 1, "rlimit": 0, "heap": 0, "privileges": 0,
    "admission": 2, "bind": 2,  # bind is the session's BIND phase
    "chain": 2,  # the session's CONNECT through parent proxies, as bind is its BIND
    "eyeballs": 2,  # the session's direct connect, its addresses raced (RFC 8305)
    "outbound": 0,  # a non-blocking outbound connect, and its egress bind
    "systemd": 0,
    "handover": 2,  # the master's reading of the files, as every worker gets it
    "upgrade": 0,  # what a new master inherits from the old: fds and a pipe
    "quota": 0,
    "accounts": 2,  # the shared accounts' entries a session holds, and their counts to and from quota  # the SQLite usage counts: stdlib and errors only (commands/quota.py ranks as commands)
    "metrics": 2,  # the shared counters the worker adds to and the master's scrape reads
    "proxied": 3,  # a PROXY listener's header stage, before the session: beside session
    "listeners": 3, "session": 3, "udp": 3,  # udp sits beside session: only the worker imports it
    "worker": 4,
    "master": 5, "bench": 5,
    "cli": 6, "commands": 6,
}


def top_module(dotted: str) -> str | None:
    parts = dotted.split(".")
    if parts[0] != "fastsocks":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def runtime_fastsocks_imports(path: Path) -> set[str]:
    """fastsocks modules imported at run time by the top-level module at ``path``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # A relative import in a top-level module is relative to the fastsocks package.
            base = ("fastsocks." + (node.module or "")).rstrip(".") if node.level else (node.module or "")
            found.update([base] + [f"{base}.{alias.name}" for alias in node.names])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for name in found if (m := top_module(name)) is not None}


TOP_LEVEL = sorted(p for p in PACKAGE_DIR.glob("*.py"))


def test_every_module_has_a_rank() -> None:
    assert {p.stem for p in TOP_LEVEL} <= set(RANKS), "give new modules a rank above"


@pytest.mark.parametrize("path", TOP_LEVEL, ids=lambda p: p.name)
def test_no_module_imports_a_higher_layer(path: Path) -> None:
    me = RANKS[path.stem]
    upward = sorted(m for m in runtime_fastsocks_imports(path)
                    if m in RANKS and m != path.stem and RANKS[m] >= me and m not in ("__init__", "errors"))
    assert upward == [], f"{path.name} (rank {me}) imports {upward}"


def test_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "session.py"
    bad.write_text("from fastsocks.worker import Worker\nif TYPE_CHECKING:\n    from fastsocks.master import Master\n")
    assert runtime_fastsocks_imports(bad) == {"worker"}


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


# Calls go down only: below the worker, nothing names Worker, not even in an annotation
# (a session reaches its worker through host.SessionHost alone).
BELOW_WORKER = [p for p in TOP_LEVEL if RANKS[p.stem] < RANKS["worker"]]


def names_the_worker(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name) and node.id == "Worker":
            found.append(f"line {node.lineno}: Worker")
        elif isinstance(node, ast.Attribute) and node.attr == "worker":
            found.append(f"line {node.lineno}: .worker")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("worker"):
            found.append(f"line {node.lineno}: imports {node.module}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value == "Worker":
            found.append(f"line {node.lineno}: 'Worker'")  # a string annotation
    return found


@pytest.mark.parametrize("path", BELOW_WORKER, ids=lambda p: p.name)
def test_nothing_below_the_worker_names_it(path: Path) -> None:
    assert names_the_worker(path) == [], f"{path.name} reaches up to the worker"


def test_the_call_direction_check_catches_a_breach(tmp_path: Path) -> None:
    bad = tmp_path / "session.py"
    bad.write_text("if TYPE_CHECKING:\n    from fastsocks.worker import Worker\n"
                   "def f(s):\n    s.worker.loop\n")
    assert names_the_worker(bad) == ["line 2: imports fastsocks.worker", "line 4: .worker"]
