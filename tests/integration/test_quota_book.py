"""The master's side of quotas (accounts.QuotaBook): the counts the engines keep in the
shared accounts go to the SQLite file in batches, and the file's totals come back."""

from __future__ import annotations

import calendar
import sqlite3

import pytest

from fastsocks import _relay
from fastsocks.accounts import ACCOUNT_USER, Ledger, QuotaBook
from fastsocks.quota import QuotaStore
from fastsocks.settings import Settings

DAY_1 = calendar.timegm((2026, 12, 8, 12, 0, 0))
DAY_2 = calendar.timegm((2026, 12, 9, 0, 0, 1))


@pytest.fixture
def settings(tmp_path):
    return Settings(workers=1, quota_bytes=1000, quota_db=str(tmp_path / "quota.sqlite"))


def book_of(settings, now_s=DAY_1) -> tuple[QuotaBook, _relay.Accounts]:
    accounts = _relay.Accounts(256)
    book = QuotaBook(accounts)
    book.configure(settings)
    book.write_out(now_s)
    return book, accounts


def count(accounts, user: bytes, n: int) -> int:
    """What an engine does as a session of ``user`` moves n bytes."""
    entry = accounts.open(ACCOUNT_USER, user)
    accounts.add_used(entry, n)
    accounts.close(entry)
    return entry


def file_totals(settings, period="2026-12-08") -> dict:
    with QuotaStore(settings.quota_db) as store:
        return {user: n for user, _p, n in store.usage(period)}


def test_counts_reach_the_file_and_come_back_after_a_restart(settings):
    book, accounts = book_of(settings)
    count(accounts, b"alice", 600)
    book.write_out(DAY_1)
    count(accounts, b"alice", 500)
    book.close()
    assert file_totals(settings) == {b"alice": 1100}
    _book, fresh = book_of(settings)  # a new master: the count is there before a session asks
    assert Ledger(fresh).over_quota(settings, b"alice") == "over quota: 1100 of 1000 bytes used this day (UTC)"
    assert Ledger(fresh).over_quota(settings, b"bob") is None


def test_two_masters_overlapping_add_up(settings):
    old, old_accounts = book_of(settings)
    new, new_accounts = book_of(settings)
    count(old_accounts, b"alice", 300)
    count(new_accounts, b"alice", 400)
    old.write_out(DAY_1)
    new.write_out(DAY_1)
    assert file_totals(settings) == {b"alice": 700}
    old.write_out(DAY_1)  # each learns the other's bytes
    assert Ledger(old_accounts).over_quota(settings, b"alice") is None
    count(old_accounts, b"alice", 300)
    old.write_out(DAY_1)
    new.write_out(DAY_1)
    assert "1000 of 1000" in Ledger(new_accounts).over_quota(settings, b"alice")


def test_a_reset_in_the_file_reaches_the_entries_and_keeps_what_moved_since(settings):
    book, accounts = book_of(settings)
    entry = count(accounts, b"alice", 1000)
    book.write_out(DAY_1)
    with QuotaStore(settings.quota_db) as store:
        assert store.reset(b"alice", "2026-12-08")
    accounts.add_used(entry, 50)  # moved after the reset, before the batch
    book.write_out(DAY_1)
    assert accounts.used(entry) == 50 and file_totals(settings) == {b"alice": 50}


def test_a_new_day_writes_out_the_old_and_starts_at_zero(settings):
    book, accounts = book_of(settings)
    entry = count(accounts, b"alice", 900)
    book.write_out(DAY_1)
    accounts.add_used(entry, 100)
    book.write_out(DAY_2)
    assert file_totals(settings) == {b"alice": 1000}
    assert file_totals(settings, "2026-12-09") == {}
    assert accounts.used(entry) == 0
    count(accounts, b"alice", 10)
    book.write_out(DAY_2)
    assert file_totals(settings, "2026-12-09") == {b"alice": 10}


def test_entries_nobody_holds_are_freed_but_counts_kept_while_a_quota_is_on(settings):
    book, accounts = book_of(settings)
    count(accounts, b"alice", 10)
    accounts.close(accounts.open(ACCOUNT_USER, b"bob"))
    book.tick(DAY_1)
    assert [name for _i, _k, name, _r, _u in accounts.claimed()] == [b"alice"]
    book.configure(Settings(workers=1))  # the quota is gone (a reload): so are the counts' entries
    book.tick(DAY_1)
    assert accounts.in_use == 0


def test_a_failing_file_is_logged_once_and_the_counts_wait(settings, caplog, monkeypatch):
    book, accounts = book_of(settings)
    entry = count(accounts, b"alice", 10)

    def broken(period, deltas):
        raise sqlite3.OperationalError("disk I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(book.store, "add", broken)
        for _ in range(3):
            book.write_out(DAY_1)
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "quota" in r.getMessage()]
    assert len(errors) == 1 and settings.quota_db in errors[0].getMessage()
    assert accounts.used(entry) == 10  # kept in memory...
    book.write_out(DAY_1)
    assert file_totals(settings) == {b"alice": 10}  # ...and written once the file works again


def test_a_name_longer_than_an_entry_holds_still_counts_alone(settings):
    """A SOCKS4 USERID or an HTTP Basic user may be longer than RFC 1929's 255 bytes."""
    from fastsocks.accounts import account_name

    _book, accounts = book_of(settings)
    ledger = Ledger(accounts)
    long_a, long_b = b"a" * 300, b"a" * 299 + b"b"
    held = ledger.hold(settings, -1, long_a, lambda: b"\x7f\x00\x00\x01")
    accounts.add_used(held.quota[0], 1000)
    assert "1000 of 1000" in ledger.over_quota(settings, long_a)
    assert ledger.over_quota(settings, long_b) is None
    assert account_name(long_a) != account_name(long_b) and account_name(b"alice") == b"alice"
    assert _relay.ACCOUNT_NAME_MAX == 255
