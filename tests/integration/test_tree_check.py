"""The tests refuse, in one sentence before collection, to run against anything but this
checkout's own fastsocks/ with its engine built and current (tree_check.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tree_check

ENGINE_TEST = '''
from pathlib import Path
import fastsocks._relay, fastsocks.bench._loadgen

def test_the_engine_comes_from_this_tree():
    here = Path(__file__).resolve().parents[1] / "fastsocks"
    assert Path(fastsocks._relay.__file__).parent == here
'''


def make_checkout(root: Path, *, built: bool) -> Path:
    """A copy of this checkout's package and test scaffolding, with or without its build."""
    skip = ["__pycache__", "*.c", "*.html"] + ([] if built else ["*.so"])
    shutil.copytree(tree_check.PACKAGE, root / "fastsocks", ignore=shutil.ignore_patterns(*skip))
    shutil.copy2(tree_check.CHECKOUT / "pyproject.toml", root)
    (root / "tests").mkdir()
    for name in ("conftest.py", "tree_check.py", "support.py"):
        shutil.copy2(tree_check.CHECKOUT / "tests" / name, root / "tests")
    (root / "tests" / "test_engine.py").write_text(ENGINE_TEST)
    return root


def run_pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_a_built_tree_runs_its_tests(tmp_path):
    checkout = make_checkout(tmp_path / "built", built=True)
    done = run_pytest(checkout)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr


def test_a_tree_without_its_engine_is_refused_by_name(tmp_path):
    # `python -m pytest` in the checkout imports its fastsocks/; the engine is not there.
    checkout = make_checkout(tmp_path / "bare", built=False)
    done = run_pytest(checkout)
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert (f"ERROR: fastsocks._relay is not built in {checkout / 'fastsocks'}" in done.stderr
            and f"run `pip install -e '.[test]'` in {checkout}" in done.stderr), done.stderr
    assert "passed" not in done.stdout


def test_an_engine_older_than_its_source_is_refused(tmp_path):
    checkout = make_checkout(tmp_path / "stale", built=True)
    source = checkout / "fastsocks" / "_udp_relay.pxi"
    later = max(p.stat().st_mtime for p in (checkout / "fastsocks").glob("*.so")) + 10
    os.utime(source, (later, later))
    done = run_pytest(checkout)
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert "ERROR: fastsocks/_udp_relay.pxi is newer than the fastsocks._relay extension" in done.stderr


def test_tests_that_would_import_another_tree_are_refused(tmp_path):
    # Started from elsewhere, the copy's tests would import whatever `fastsocks` the
    # environment installed (here: the checkout running this test), not the copy's own.
    checkout = make_checkout(tmp_path / "other", built=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_pytest(elsewhere, str(checkout / "tests"))
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert (f"ERROR: the tests would import fastsocks from {tree_check.PACKAGE}, "
            f"not from this checkout's {checkout / 'fastsocks'}") in done.stderr
