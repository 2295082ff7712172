"""Pytest picks up the shared fixtures here; the helpers live in support.py, which test
modules import directly (pyproject puts tests/ on sys.path)."""

import tree_check
from support import *  # noqa: F401,F403  (fixtures must be visible in conftest's namespace)

pytest_configure = tree_check.pytest_configure  # the tree under test is checked before collection
