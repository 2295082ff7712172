"""Per-user traffic counts, one per calendar period (UTC), kept in an SQLite file.

Theory of operation. The master owns the writes: it sums what its workers relayed and
adds it here in one batch about once a second, never on a connection's path. It adds
deltas rather than writing totals, so two masters overlapping during an upgrade both count
correctly, and a reset made from another process (``fastsocks quota reset``) holds: the
master learns of it from the totals that its next ``add()`` returns. The file is in WAL
mode, so the command reads while the server writes.

User names are bytes (RFC 1929 §2 allows any octets) and are stored as BLOBs, exactly.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sqlite3
from collections.abc import Iterator, Mapping
from types import TracebackType

from fastsocks.errors import ConfigError

PERIODS = ("day", "month")
BUSY_TIMEOUT_S = 5.0  # how long a write waits for another process's to finish
SCHEMA = """CREATE TABLE IF NOT EXISTS usage (
    user BLOB NOT NULL,
    period TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (user, period))"""
ADD = ("INSERT INTO usage (user, period, bytes) VALUES (?, ?, ?) "
       "ON CONFLICT (user, period) DO UPDATE SET bytes = bytes + excluded.bytes")


def period_key(period: str, when_s: float) -> str:
    """The UTC calendar period holding POSIX time ``when_s``: "2026-12-08" or "2026-12"."""
    moment = datetime.datetime.fromtimestamp(when_s, datetime.timezone.utc)
    if period == "day":
        return f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
    if period == "month":
        return f"{moment.year:04d}-{moment.month:02d}"
    raise ValueError(f"period: expected one of {', '.join(PERIODS)}, not {period!r}")


class QuotaStore:
    """The usage table of one SQLite file; errors after opening are sqlite3.Error."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        parent = os.path.dirname(path)
        try:
            if parent:
                os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise ConfigError(path, None, "quota_db", f"cannot create its directory {parent}: {exc.strerror}") from None
        try:
            self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(SCHEMA)
        except sqlite3.Error as exc:
            self.close()
            raise ConfigError(path, None, "quota_db", open_problem(exc)) from None

    def add(self, period: str, deltas: Mapping[bytes, int]) -> dict[bytes, int]:
        """Add each user's delta to its count for ``period``, in one transaction; return the
        count of every user with a row for ``period`` (resets by others included)."""
        rows = [(bytes(user), period, delta) for user, delta in deltas.items() if delta]
        with self._transaction() as db:
            db.executemany(ADD, rows)
            return dict(db.execute("SELECT user, bytes FROM usage WHERE period = ?", (period,)))

    def usage(self, period: str | None = None, user: bytes | None = None) -> list[tuple[bytes, str, int]]:
        """Rows (user, period, bytes), by period then user; ``period`` and ``user`` filter."""
        filters = {"period": period, "user": None if user is None else bytes(user)}
        where = {column: value for column, value in filters.items() if value is not None}
        sql = "SELECT user, period, bytes FROM usage"
        if where:
            sql += " WHERE " + " AND ".join(f"{column} = ?" for column in where)
        return [tuple(row) for row in self._connection().execute(sql + " ORDER BY period, user", list(where.values()))]

    def reset(self, user: bytes, period: str) -> bool:
        """Set ``user``'s count for ``period`` to 0; False if it had no row."""
        cursor = self._connection().execute("UPDATE usage SET bytes = 0 WHERE user = ? AND period = ?",
                                            (bytes(user), period))
        return cursor.rowcount > 0

    def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()

    def __enter__(self) -> QuotaStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise ValueError(f"{self.path}: the quota store is closed")
        return self._db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so the busy timeout covers the whole batch.
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def open_problem(exc: sqlite3.Error) -> str:
    """Why SQLite could not open a file, in words that say what to fix."""
    text = str(exc)
    if "not a database" in text:
        return "not an SQLite database (is quota_db another file's path?)"
    if "unable to open" in text:
        return "cannot open or create it (a directory, or no write permission?)"
    return text
