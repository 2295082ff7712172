"""The one tree under test: this checkout's own ``fastsocks/``, with its engine built.

The package sits at the top of the checkout (a flat layout, as uvloop's), so two trees can
answer ``import fastsocks``: the source tree (``python -m pytest`` puts the working
directory first on ``sys.path``) and a copy installed in site-packages. The tests are meant
for the first, built in place by an editable install, so that the layer test reads the very
files the other tests import, and an edited ``.py`` is tested without reinstalling.

Three ways to test something else, each stopped before collection with one sentence that
names the command that mends it: the tests would import another tree (a non-editable
install, or another checkout's); the compiled engine is missing (a bare clone run without
the install, which would otherwise fail as hundreds of ImportErrors); or a Cython source is
newer than the extension built from it (an edit or a checkout since the last build, which
would otherwise test the old engine without a word).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
PACKAGE = CHECKOUT / "fastsocks"
BUILD_COMMAND = "pip install -e '.[test]'"
EXTENSIONS = ("fastsocks._relay", "fastsocks.bench._loadgen")
CYTHON_SOURCES = ("*.pyx", "*.pxd", "*.pxi")


def problem() -> str | None:
    """What is wrong with the tree the tests would import, as one sentence; None if nothing."""
    spec = importlib.util.find_spec("fastsocks")
    imported = Path(spec.origin).resolve().parent if spec and spec.origin else None
    if imported != PACKAGE:
        where = imported or "nowhere"
        return (f"the tests would import fastsocks from {where}, not from this checkout's "
                f"{PACKAGE}: in {CHECKOUT} run `{BUILD_COMMAND}` (an editable install, built in place)")
    for name in EXTENSIONS:
        if found := engine_problem(name):
            return found
    return None


def engine_problem(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    module_file = PACKAGE.joinpath(*name.split(".")[1:])
    built = Path(spec.origin).resolve() if spec and spec.origin else None
    # An editable install's finder answers for submodules the tree lacks, from its own tree.
    if (built is None or built.parent != module_file.parent
            or not built.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))):
        return (f"{name} is not built in {module_file.parent} (the tests need the compiled engine, "
                f"not the source tree alone): run `{BUILD_COMMAND}` in {CHECKOUT}")
    newer = [p for p in cython_sources(module_file.parent) if p.stat().st_mtime > built.stat().st_mtime]
    if newer:
        return (f"{newer[0].relative_to(CHECKOUT)} is newer than the {name} extension built from it "
                f"({built.name}): rebuild it with `{BUILD_COMMAND}` in {CHECKOUT}")
    return None


def cython_sources(directory: Path) -> list[Path]:
    """The Cython files an extension in ``directory`` may include: its own directory's and the
    package root's (``_system.pxd`` is shared by both extensions)."""
    folders = {directory, PACKAGE}
    return sorted(p for folder in folders for pattern in CYTHON_SOURCES for p in folder.glob(pattern))


def pytest_configure(config) -> None:
    if (reason := problem()) is not None:
        raise pytest.UsageError(reason)
