"""Pytest picks up the shared fixtures here; the helpers live in support.py, which test
modules import directly (pyproject puts tests/ on sys.path)."""

from support import *  # noqa: F401,F403  (fixtures must be visible in conftest's namespace)
