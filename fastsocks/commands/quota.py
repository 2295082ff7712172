"""``fastsocks quota show`` and ``fastsocks quota reset``: the per-user counts of a quota file.

The file is ``--db PATH``, or ``[limits] quota_db`` of ``--config`` (which also gives the
period and the quota). The server writes it in WAL mode, so both work while it runs; it adds
to the counts rather than overwriting them, so a reset holds and is seen at its next batch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
import time
from dataclasses import dataclass

from fastsocks.commands.config_files import load
from fastsocks.errors import ConfigError
from fastsocks.quota import PERIODS, QuotaStore, period_key

EXIT_OK, EXIT_NOTHING, EXIT_USAGE = 0, 1, 2
UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
PERIOD_KEY = re.compile(r"\d{4}-\d{2}(-\d{2})?")


@dataclass(frozen=True)
class Target:
    """Which file, which kind of period, and the quota when a config names one (0: unknown)."""

    db: str
    period: str
    quota_bytes: int = 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    target = find_target(args)
    if target is None:
        return EXIT_USAGE
    if not os.path.exists(target.db):
        return fail(f"{target.db}: no such file (the server makes it once it counts with a quota)", EXIT_USAGE)
    try:
        with QuotaStore(target.db) as store:
            return args.run(store, target, args)
    except ConfigError as exc:
        return fail(str(exc), EXIT_USAGE)
    except sqlite3.Error as exc:
        return fail(f"{target.db}: cannot read it: {exc}", EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsocks quota",
                                     description="Show or reset the per-user traffic counts that "
                                                 "[limits] quota_bytes is checked against.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{show,reset}")
    show = commands.add_parser("show", help="each user's count, used and quota",
                               description="Each user's count for the current period (UTC).")
    add_target(show)
    show.add_argument("--period", choices=PERIODS, help="day or month (default: the config's, else day)")
    show.add_argument("--all", action="store_true", help="every period in the file, not the current one only")
    show.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    show.add_argument("user", nargs="?", help="this user only")
    show.set_defaults(run=show_main)
    reset = commands.add_parser("reset", help="set a user's count to 0",
                                description="Set a user's count for the current period (or --period-key) "
                                            "to 0; a running server picks it up at its next batch.")
    reset.add_argument("user", help="the user name")
    add_target(reset)
    reset.add_argument("--period-key", type=period_key_arg, metavar="KEY",
                       help="the period to reset, as 2026-12-08 or 2026-12 (default: the current one)")
    reset.set_defaults(run=reset_main, period=None)
    return parser


def add_target(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", "-c", metavar="FILE", help="the server's config file (its [limits] quota_db)")
    where.add_argument("--db", metavar="PATH", help="the quota file itself")


def period_key_arg(text: str) -> str:
    if not PERIOD_KEY.fullmatch(text):
        raise argparse.ArgumentTypeError("expected a day as 2026-12-08 or a month as 2026-12")
    return text


def find_target(args: argparse.Namespace) -> Target | None:
    """The file and period the arguments name; None once the error is printed."""
    if args.db is not None:
        return Target(args.db, args.period or "day")
    settings = load(args.config)  # None: its error is printed
    if settings is None:
        return None
    if settings.quota_db is None:
        fail(f"{args.config} sets no quota file: set `[limits] quota_db`", EXIT_USAGE)
        return None
    period = args.period or settings.quota_period
    # A quota is per its own period: counts of another kind of period have none.
    return Target(settings.quota_db, period, settings.quota_bytes if period == settings.quota_period else 0)


def show_main(store: QuotaStore, target: Target, args: argparse.Namespace) -> int:
    current = period_key(target.period, time.time())
    user = os.fsencode(args.user) if args.user is not None else None
    rows = [describe(row, target, current) for row in store.usage(None if args.all else current, user)]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print(render(rows))
    else:
        print(f"no counts{'' if args.all else ' for ' + current} in {target.db}")
    return EXIT_OK


def reset_main(store: QuotaStore, target: Target, args: argparse.Namespace) -> int:
    user = os.fsencode(args.user)
    key = args.period_key or period_key(target.period, time.time())
    before = store.usage(key, user)
    if not store.reset(user, key):
        return fail(f"{args.user} has no count for {key} in {target.db}: nothing to reset", EXIT_NOTHING)
    was = before[0][2] if before else 0
    print(f"fastsocks quota: reset {args.user} for {key} to 0 (was {human_bytes(was)}) in {target.db}; "
          f"a running server picks it up at its next batch, within about a second")
    return EXIT_OK


def describe(row: tuple[bytes, str, int], target: Target, current: str) -> dict:
    user, key, used = row
    # Only counts of the quota's kind of period (a day's key is as long as today's) have it.
    quota = target.quota_bytes if target.quota_bytes and len(key) == len(current) else None
    return {"user": user.decode("utf-8", "backslashreplace"), "period": key, "bytes": used,
            "quota_bytes": quota, "percent": round(100 * used / quota, 1) if quota else None}


def render(rows: list[dict]) -> str:
    header = ["user", "period", "used", "bytes"]
    quota = any(row["quota_bytes"] for row in rows)
    if quota:
        header += ["quota", "used %"]
    table = [header]
    for row in rows:
        line = [row["user"], row["period"], human_bytes(row["bytes"]), str(row["bytes"])]
        if quota:
            line += ["-", "-"] if row["quota_bytes"] is None else [human_bytes(row["quota_bytes"]),
                                                                   f"{row['percent']:.1f}%"]
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table)


def human_bytes(count: int) -> str:
    """1610612736 -> "1.5 GiB"."""
    value, unit = float(count), UNITS[0]
    for unit in UNITS:
        if value < 1024 or unit == UNITS[-1]:
            break
        value /= 1024
    return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"


def fail(message: str, code: int) -> int:
    print(f"fastsocks quota: {message}", file=sys.stderr)
    return code
