"""Limits that all sessions of one user, or of one client address, share in every worker,
and users' quotas: the entries of the shared accounts (``_relay.Accounts``; the table's
theory is in _accounts.pxi) a session reads through and counts in, and how the counts
reach the quota file and come back from it.

The worker's side (``Ledger``): a relayed session opens the entry of its user and of its
client address when a limit applies to it (``[limits]`` or its rule's
``user_rate_*``/``client_rate_*``, and ``quota_bytes``), hands them to the engine with
add(shared=, quota=), and closes them when it ends. A user whose count has reached the
quota gets no new session.

The master's side (``QuotaBook``), about once a second and never on a connection's path:
it adds what each user's entry counted since the last batch to the quota file
(quota.QuotaStore), learns every user's total for the period back, and moves each entry's
count to that total (a reset by ``fastsocks quota reset``, or another master's counts
during an upgrade, reach the workers this way). Users with a count in the file get an
entry before their next session asks. When the calendar period (UTC) turns, the old one
is written out and every count starts at 0. Entries no session holds are then freed,
except users' counts while a quota is on.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from fastsocks.quota import QuotaStore, period_key
from fastsocks.settings import Settings

if TYPE_CHECKING:
    from fastsocks._relay import Accounts

log = logging.getLogger(__name__)

QUOTA_BATCH_S = 1.0     # how often the master writes the counts out
ACCOUNT_USER = 1        # _relay.ACCOUNT_USER, _relay.ACCOUNT_CLIENT
ACCOUNT_CLIENT = 2


def new_accounts(workers: int = 1) -> Accounts | None:
    """The shared table, made by the master before it forks; None when the engine is not
    built (then no worker can boot, and the first one to try says why)."""
    try:
        from fastsocks._relay import Accounts
    except ImportError:
        return None
    return Accounts(workers=workers)


class Held(NamedTuple):
    """What one relayed session holds: the entries to close when it ends, and add()'s
    shared and quota arguments."""
    entries: tuple[int, ...]
    shared: tuple[tuple[int, int, int], ...]
    quota: tuple[int, int] | None


NOTHING = Held((), (), None)
NAME_MAX = 255  # _relay.ACCOUNT_NAME_MAX: RFC 1929's longest user name


def account_name(user: bytes) -> bytes:
    """The entry's name for a user: the name itself; a longer one (a SOCKS4 USERID or an
    HTTP Basic user can be) by its SHA-256, so that it still counts, alone."""
    if len(user) <= NAME_MAX:
        return user
    return b"sha256:" + hashlib.sha256(user).hexdigest().encode()


class Ledger:
    """A worker's use of the shared accounts."""

    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts

    def over_quota(self, settings: Settings, user: bytes) -> str | None:
        """Why ``user`` may start no session now (its quota is used up), or None."""
        if not settings.quota_bytes or not user:
            return None
        entry = self.accounts.open(ACCOUNT_USER, account_name(user))
        if entry < 0:
            return "the shared accounts table is full: no room to count this user's quota"
        try:
            used = self.accounts.used(entry)
        finally:
            self.accounts.close(entry)
        if used < settings.quota_bytes:
            return None
        return f"over quota: {used} of {settings.quota_bytes} bytes used this {settings.quota_period} (UTC)"

    def hold(self, settings: Settings, rule: int, user: bytes, client: Callable[[], bytes]) -> Held | None:
        """The entries a session ``rule`` allowed reads through and counts in, opened
        (``client()``: its packed address, asked only when a client limit applies); None
        when the table has no room for one (the session cannot be limited: refused)."""
        user_up, user_down, client_up, client_down = settings.shared_rates(rule)
        quota = settings.quota_bytes if user else 0
        wanted = []
        if user and (user_up or user_down or quota):
            wanted.append((ACCOUNT_USER, account_name(user), user_up, user_down))
        if client_up or client_down:
            wanted.append((ACCOUNT_CLIENT, client(), client_up, client_down))
        if not wanted:
            return NOTHING
        entries: list[int] = []
        shared: list[tuple[int, int, int]] = []
        quota_at: tuple[int, int] | None = None
        for kind, name, up, down in wanted:
            entry = self.accounts.open(kind, name)
            if entry < 0:
                self.release(entries)
                return None
            entries.append(entry)
            if up or down:
                shared.append((entry, up, down))
            if kind == ACCOUNT_USER and quota:
                quota_at = (entry, quota)
        return Held(tuple(entries), tuple(shared), quota_at)

    def quota_entry(self, settings: Settings, user: bytes) -> int | None:
        """The opened entry a UDP association of ``user`` counts its bytes in (the worker
        adds them once a tick: datagrams never pass through Python), or None."""
        if not settings.quota_bytes or not user:
            return None
        entry = self.accounts.open(ACCOUNT_USER, account_name(user))
        return entry if entry >= 0 else None

    def count(self, entry: int, moved: int) -> int:
        """Add ``moved`` bytes to an entry's count; its new count."""
        return self.accounts.add_used(entry, moved)

    def release(self, entries) -> None:
        for entry in entries:
            self.accounts.close(entry)


class QuotaBook:
    """The master's side: the counts to and from the quota file, and the table's sweep."""

    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts
        self.store: QuotaStore | None = None
        self.settings: Settings | None = None
        self.period = ""
        self.flushed: dict[int, tuple[bytes, int]] = {}  # entry -> (user, its count as last squared)
        self.due_s = 0.0
        self.failing = False  # the last batch failed (logged once until one succeeds)

    def configure(self, settings: Settings) -> None:
        """At start and at every reload: open the quota file named (ConfigError if it
        cannot be), take the period's counts from it."""
        if settings.quota_db and settings.quota_bytes and (self.store is None or self.store.path != settings.quota_db):
            store = QuotaStore(settings.quota_db)  # raises ConfigError naming the file
            if self.store is not None:
                self.write_out()
                self.store.close()
            self.store, self.flushed, self.period = store, {}, ""
        elif not settings.quota_bytes and self.store is not None:
            self.write_out()
            self.store.close()
            self.store = None
        self.settings = settings
        self.due_s = 0.0
        if self.store is not None:
            self.write_out()  # the period's counts so far, in the entries before any session asks

    def tick(self, now_s: float | None = None) -> None:
        """Called by the master's loop; does a batch once QUOTA_BATCH_S has passed."""
        mono = time.monotonic()
        if mono < self.due_s:
            return
        self.due_s = mono + QUOTA_BATCH_S
        if self.store is not None:
            self.write_out(time.time() if now_s is None else now_s)
        if self.accounts.in_use:
            self.accounts.reclaim(self.store is not None)

    def write_out(self, now_s: float | None = None) -> None:
        """One batch: the counts since the last into the file, the file's totals back into
        the entries; a new period first closes the old one."""
        if self.store is None or self.settings is None:
            return
        period = period_key(self.settings.quota_period, time.time() if now_s is None else now_s)
        try:
            if self.period and period != self.period:
                self.square(self.period)       # the old period's last bytes
                for entry, _name, _refs in self.users():
                    self.accounts.swap_used(entry, 0)
                self.flushed = {}
                log.info("quota: period %s begins; every user's count starts at 0", period)
            self.period = period
            self.square(period)
        except sqlite3.Error as exc:
            if not self.failing:
                log.error("quota: cannot write the counts to %s: %s; keeping them in memory and trying again",
                          self.store.path, exc)
            self.failing = True
            return
        if self.failing:
            log.warning("quota: writing the counts to %s again", self.store.path)
        self.failing = False

    def users(self) -> list[tuple[int, bytes, int]]:
        return [(entry, name, refs) for entry, kind, name, refs, _used in self.accounts.claimed()
                if kind == ACCOUNT_USER]

    def square(self, period: str) -> None:
        """Add each user entry's new bytes to the file; set every entry to the file's total."""
        assert self.store is not None  # write_out's caller checked
        seen = {}
        deltas: dict[bytes, int] = {}
        for entry, kind, name, _refs, used in self.accounts.claimed():
            if kind != ACCOUNT_USER:
                continue
            last_name, last = self.flushed.get(entry, (name, 0))
            base = last if last_name == name else 0
            deltas[name] = deltas.get(name, 0) + used - base
            seen[name] = (entry, used)
        totals = self.store.add(period, deltas)
        self.flushed = {}
        for name, total in totals.items():
            if name not in seen:
                if total == 0:
                    continue
                entry = self.accounts.open(ACCOUNT_USER, name)  # counted elsewhere: known before it asks
                if entry < 0:
                    log.error("quota: the shared accounts table is full; %r's count waits", name)
                    continue
                self.accounts.close(entry)
                used = self.accounts.used(entry)
            else:
                entry, used = seen[name]
            if total != used:
                self.accounts.add_used(entry, total - used)  # what moved meanwhile stays counted
            self.flushed[entry] = (name, total)

    def close(self) -> None:
        """At the master's exit: the last batch."""
        if self.store is not None:
            self.write_out()
            self.store.close()
            self.store = None
