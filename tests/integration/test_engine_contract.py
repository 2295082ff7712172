"""The engine's contract: ``fastsocks/_relay.pyi`` is what the built Cython module has (mypy's
stubtest), and the pure-Python twin ``_relay_py`` has the very same public surface, every
name both ways: module, RelayEngine, UdpRelay and UdpFlow."""

from __future__ import annotations

import __future__
import ast
import inspect
import os
import socket
import subprocess
import sys

import pytest
import tree_check

from fastsocks import _relay, _relay_py

STUB = tree_check.PACKAGE / "_relay.pyi"
CLASSES = ("RelayEngine", "UdpRelay", "UdpFlow")

# What stubtest reports that no stub can express, each for its reason. Anything else it
# reports fails the test; and since these must appear, a stubtest that did not find the
# stub (and so checked nothing) fails it too.
STUBTEST_EXPECTED = {
    # Cython's module internals.
    "fastsocks._relay.__pyx_capi__", "fastsocks._relay.__reduce_cython__",
    "fastsocks._relay.__setstate_cython__", "fastsocks._relay.__test__",
    # A cdef class's __init__ is a slot wrapper with no signature to compare; the stub's is
    # the one the twin has, and test_the_twin_takes_the_stubs_arguments checks it.
    "fastsocks._relay.RelayEngine.__init__", "fastsocks._relay.UdpRelay.__init__",
    "fastsocks._relay.UdpFlow.__init__", "fastsocks._relay.Accounts.__init__",
}


def test_stubtest_finds_the_stub_true_to_the_built_engine(tmp_path):
    env = dict(os.environ, MYPY_CACHE_DIR=str(tmp_path / "mypy-cache"))
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-m", "mypy.stubtest", "--concise", "fastsocks._relay"],
                          cwd=tree_check.CHECKOUT, env=env, capture_output=True, text=True, timeout=600)
    reported = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("fastsocks.")}
    assert reported == STUBTEST_EXPECTED, done.stdout + done.stderr


# --------------------------------------------------------------------- the stub's names


def stub_names() -> tuple[set[str], dict[str, set[str]]]:
    """Public names of the stub's module (runtime objects only: no type_check_only class)
    and of each class."""
    module: set[str] = set()
    classes: dict[str, set[str]] = {}
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.ClassDef):
            if any(getattr(d, "id", None) == "type_check_only" for d in node.decorator_list):
                continue
            module.add(node.name)
            classes[node.name] = {name for item in node.body for name in _defined(item)}
        else:
            module.update(_defined(node))
    return {n for n in module if not n.startswith("_")}, {
        cls: {n for n in names if not n.startswith("_")} for cls, names in classes.items()}


def _defined(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.FunctionDef):
        return [node.name]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    if isinstance(node, ast.ImportFrom):  # re-exports: "from x import A as A"
        return [alias.name for alias in node.names if alias.asname == alias.name]
    return []


def public(obj) -> set[str]:
    return {name for name in dir(obj) if not name.startswith("_")}


def module_surface(module) -> set[str]:
    """What a module offers, less what it imported for itself."""
    return {name for name in public(module)
            if not inspect.ismodule(getattr(module, name)) and not isinstance(getattr(module, name), __future__._Feature)}


class Owner:
    """UdpOwner's hooks, answered trivially."""

    def allowed(self, family, sockaddr):
        return True

    def remote_socket(self, family):
        return None

    def send_to_name(self, name, port, payload):
        pass

    def warn_foreign(self, source):
        pass


@pytest.fixture(params=[_relay, _relay_py], ids=["cython", "python"])
def instances(request):
    """One of each class of an engine module, made as the worker makes them."""
    module = request.param
    relay = module.UdpRelay()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    sock.bind(("127.0.0.1", 0))
    made = {"RelayEngine": module.RelayEngine(), "UdpRelay": relay,
            "UdpFlow": relay.new_flow(Owner(), sock, "127.0.0.1", 0)}
    yield module, made
    made["UdpFlow"].close()
    relay.close()
    made["RelayEngine"].close()
    sock.close()


def test_both_modules_offer_exactly_the_stubs_names(instances):
    module, _ = instances
    assert module_surface(module) == stub_names()[0]


@pytest.mark.parametrize("cls", CLASSES)
def test_both_engines_classes_offer_exactly_the_stubs_names(instances, cls):
    _, made = instances
    assert public(made[cls]) == stub_names()[1][cls]


def test_the_twin_takes_the_stubs_arguments():
    """The compiled __init__ has no signature to read; the twin's is compared with the stub's."""
    stub = {node.name: node for node in ast.parse(STUB.read_text()).body if isinstance(node, ast.ClassDef)}
    for cls in CLASSES:
        inits = [item for item in stub[cls].body if isinstance(item, ast.FunctionDef) and item.name == "__init__"]
        if not inits:
            continue
        args = inits[0].args
        expected = [a.arg for a in args.args[1:]], [a.arg for a in args.kwonlyargs]
        params = list(inspect.signature(getattr(_relay_py, cls)).parameters.values())
        got = ([p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD],
               [p.name for p in params if p.kind is p.KEYWORD_ONLY])
        assert got == expected, cls
