"""``fastsocks example-config`` and ``fastsocks check-config FILE``: the configuration file."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from fastsocks import config
from fastsocks.errors import ConfigError
from fastsocks.settings import Settings

EXIT_OK, EXIT_USAGE = 0, 2
EXAMPLE = Path(__file__).parents[1] / "fastsocks.example.toml"


def example_main(argv: list[str]) -> int:
    """``fastsocks example-config > fastsocks.toml``: the commented example, every key."""
    argparse.ArgumentParser(prog="fastsocks example-config",
                            description="Print a fully commented example configuration file.").parse_args(argv)
    sys.stdout.write(EXAMPLE.read_text(encoding="utf-8"))
    return EXIT_OK


def check_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastsocks check-config",
                                     description="Validate a configuration file without starting a server.")
    parser.add_argument("file", help="the TOML configuration file")
    args = parser.parse_args(argv)
    settings = load(args.file)
    if settings is None:
        return EXIT_USAGE
    users = ""
    if settings.users_file:
        from fastsocks.users import load_users

        try:
            users = f", {len(load_users(settings.users_file))} users in {settings.users_file}"
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return EXIT_USAGE
    quota = ""
    if settings.quota_bytes and settings.quota_db:  # Settings refuses a quota without a file
        problem = quota_file_problem(settings.quota_db)
        if problem is not None:
            print(problem, file=sys.stderr)
            return EXIT_USAGE
        quota = f", quota {settings.quota_bytes} bytes per user per {settings.quota_period} in {settings.quota_db}"
    policy = settings.policy
    print(f"{args.file}: OK: listen {', '.join(str(a) for a in settings.listen)}, "
          f"methods {', '.join(settings.methods)}{users}, {len(policy.rules)} rules, "
          f"default {'allow' if policy.default_allow else 'deny'}{quota}")
    if settings.allow_open_proxy and settings.open_proxy_problem():
        print(f"warning: allow_open_proxy: {settings.open_proxy_problem()}", file=sys.stderr)
    return EXIT_OK


def quota_file_problem(path: str) -> str | None:
    """What would stop the server from keeping its quota counts in ``path``, without
    creating anything: an existing file must be an SQLite database, else the nearest
    existing directory on its way must be writable."""
    import os
    import sqlite3

    from fastsocks.quota import open_problem

    if os.path.exists(path):
        try:
            with contextlib.closing(sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)) as db:
                db.execute("PRAGMA schema_version")
        except sqlite3.Error as exc:
            return f"{path}: quota_db: {open_problem(exc)}"
        return None
    parent = Path(path).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"{path}: quota_db: cannot create it: {parent} is not a directory this user can write in"
    return None


def load(path: str) -> Settings | None:
    """The settings of ``path``, or None once its error is printed (file:line: field: why)."""
    try:
        return config.load(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None
