"""quota.py on real SQLite files, and ``fastsocks quota`` run as a real command: counts add up
across two stores on one file (two masters during an upgrade), a reset by one is seen by the
other's next add(), and a bad file fails with its name."""

from __future__ import annotations

import calendar
import json
import os
import sqlite3
import subprocess
import time

import pytest

from fastsocks.errors import ConfigError
from fastsocks.quota import QuotaStore, period_key
from support import fastsocks_command

ALICE, BOB, ODD = b"alice", b"bob", b"\xffn\xc3\xa9"  # RFC 1929 names are any octets, not UTF-8
DAY = "2026-12-08"


def utc(*fields: int) -> float:
    return float(calendar.timegm((*fields, 0, 0, 0)))


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def db(tmp_path) -> str:
    return str(tmp_path / "quota.db")


def test_counts_round_trip_exactly(db) -> None:
    with QuotaStore(db) as store:
        assert store.add(DAY, {ALICE: 100, ODD: 7, BOB: 0}) == {ALICE: 100, ODD: 7}  # a zero adds no row
        assert store.add(DAY, {ALICE: 50}) == {ALICE: 150, ODD: 7}
        store.add("2026-12-09", {BOB: 1})
        assert store.usage() == [(ALICE, DAY, 150), (ODD, DAY, 7), (BOB, "2026-12-09", 1)]
        assert store.usage(period=DAY, user=ODD) == [(ODD, DAY, 7)]
        assert store.usage(user=BOB) == [(BOB, "2026-12-09", 1)]
    with QuotaStore(db) as again:  # survives a restart
        assert again.usage(DAY) == [(ALICE, DAY, 150), (ODD, DAY, 7)]
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert set(raw.execute("SELECT typeof(user) FROM usage")) == {("blob",)}


def test_two_stores_on_one_file_both_count(db) -> None:
    with QuotaStore(db) as old, QuotaStore(db) as new:
        old.add(DAY, {ALICE: 10})
        assert new.add(DAY, {ALICE: 5, BOB: 1}) == {ALICE: 15, BOB: 1}
        assert old.add(DAY, {ALICE: 1}) == {ALICE: 16, BOB: 1}  # learns of bob from the other


def test_a_reset_by_another_store_is_seen_at_the_next_add(db) -> None:
    with QuotaStore(db) as master, QuotaStore(db) as command:
        master.add(DAY, {ALICE: 1000, BOB: 3})
        assert command.reset(ALICE, DAY) is True
        assert command.reset(b"nobody", DAY) is False
        assert command.reset(ALICE, "2026-12-09") is False
        assert master.add(DAY, {ALICE: 2}) == {ALICE: 2, BOB: 3}


def test_period_keys_are_utc_calendar_periods(monkeypatch) -> None:
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")  # UTC+14: local time is already the next day
    time.tzset()
    try:
        assert period_key("day", utc(2026, 12, 8, 23, 59, 59)) == "2026-12-08"
        assert period_key("day", utc(2026, 12, 9, 0, 0, 0)) == "2026-12-09"
        assert period_key("month", utc(2026, 12, 31, 23, 59, 59)) == "2026-12"
        assert period_key("month", utc(2027, 1, 1, 0, 0, 0)) == "2027-01"
        assert period_key("day", utc(2027, 1, 1, 0, 0, 0)) == "2027-01-01"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    with pytest.raises(ValueError, match="week"):
        period_key("week", 0.0)


def test_a_file_that_is_not_sqlite_is_refused_by_name(tmp_path) -> None:
    path = tmp_path / "users.txt"
    path.write_text("alice:$scrypt$...\n" * 100)
    before = open_fds()
    with pytest.raises(ConfigError) as caught:
        QuotaStore(str(path))
    assert open_fds() == before
    assert caught.value.path == str(path) and caught.value.field == "quota_db"
    assert str(caught.value).startswith(f"{path}: quota_db: not an SQLite database")


def test_a_directory_that_cannot_be_made_is_refused_by_name(tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = blocker / "sub" / "quota.db"
    with pytest.raises(ConfigError) as caught:
        QuotaStore(str(path))
    assert str(caught.value) == f"{path}: quota_db: cannot create its directory {blocker / 'sub'}: Not a directory"


def test_a_missing_directory_is_made(tmp_path) -> None:
    path = tmp_path / "state" / "fastsocks" / "quota.db"
    with QuotaStore(str(path)) as store:
        store.add(DAY, {ALICE: 1})
    assert path.is_file()


def test_a_directory_as_the_file_is_refused_by_name(tmp_path) -> None:
    with pytest.raises(ConfigError, match=f"^{tmp_path}: quota_db: cannot open or create it"):
        QuotaStore(str(tmp_path))


def quota(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*fastsocks_command(), "quota", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def filled(db) -> str:
    """A file with today's counts for alice (1.5 GiB) and a non-UTF-8 name, and an old day's."""
    with QuotaStore(db) as store:
        store.add(period_key("day", time.time()), {ALICE: 3 << 29, ODD: 2048})
        store.add("2000-01-01", {BOB: 5})
    return db


def test_show_with_a_db_lists_todays_counts(filled) -> None:
    result = quota("show", "--db", filled)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["user", "period", "used", "bytes"]
    today = period_key("day", time.time())
    assert lines[1].split() == ["alice", today, "1.5", "GiB", str(3 << 29)]
    assert lines[2].split() == ["\\xffné", today, "2.0", "KiB", "2048"]
    assert len(lines) == 3  # not the old day's
    assert "bob" in quota("show", "--db", filled, "--all").stdout


def test_show_with_a_config_shows_the_quota(tmp_path, filled) -> None:
    config = tmp_path / "fastsocks.toml"
    config.write_text('[limits]\nquota_bytes = 3221225472\nquota_db = "quota.db"\nquota_period = "day"\n')
    result = quota("show", "--config", str(config), "alice")
    assert result.returncode == 0, result.stderr
    header, alice = result.stdout.splitlines()
    assert header.split() == ["user", "period", "used", "bytes", "quota", "used", "%"]
    assert alice.split()[-3:] == ["3.0", "GiB", "50.0%"]


def test_show_json(tmp_path, filled) -> None:
    config = tmp_path / "fastsocks.toml"
    config.write_text('[limits]\nquota_bytes = 4096\nquota_db = "quota.db"\n')
    rows = json.loads(quota("show", "-c", str(config), "--json", "--all").stdout)
    today = period_key("day", time.time())
    assert rows == [
        {"user": "bob", "period": "2000-01-01", "bytes": 5, "quota_bytes": 4096, "percent": 0.1},
        {"user": "alice", "period": today, "bytes": 3 << 29, "quota_bytes": 4096, "percent": 39321600.0},
        {"user": "\\xffné", "period": today, "bytes": 2048, "quota_bytes": 4096, "percent": 50.0},
    ]
    month = json.loads(quota("show", "-c", str(config), "--json", "--period", "month").stdout)
    assert month == []  # the file holds days only


def test_reset_then_show(filled) -> None:
    result = quota("reset", "alice", "--db", filled)
    assert result.returncode == 0, result.stderr
    assert "reset alice" in result.stdout and "(was 1.5 GiB)" in result.stdout
    assert "next batch" in result.stdout
    rows = json.loads(quota("show", "--db", filled, "--json", "alice").stdout)
    assert [row["bytes"] for row in rows] == [0]
    old = quota("reset", "bob", "--db", filled, "--period-key", "2000-01-01")
    assert old.returncode == 0, old.stderr


def test_reset_of_an_unknown_user_exits_1(filled) -> None:
    result = quota("reset", "nobody", "--db", filled)
    assert result.returncode == 1
    assert "nothing to reset" in result.stderr and filled in result.stderr


@pytest.mark.parametrize("command", ["show", "reset alice"])
def test_a_bad_db_path_exits_2_naming_it(tmp_path, command) -> None:
    missing = str(tmp_path / "nowhere" / "quota.db")
    result = quota(*command.split(), "--db", missing)
    assert result.returncode == 2
    assert missing in result.stderr and len(result.stderr.splitlines()) == 1
    not_sqlite = tmp_path / "fastsocks.toml"
    not_sqlite.write_text("[server]\n" * 200)
    result = quota(*command.split(), "--db", str(not_sqlite))
    assert result.returncode == 2
    assert result.stderr == f"fastsocks quota: {not_sqlite}: quota_db: not an SQLite database " \
                            f"(is quota_db another file's path?)\n"


def test_a_config_without_a_quota_file_exits_2(tmp_path) -> None:
    config = tmp_path / "fastsocks.toml"
    config.write_text("[limits]\nmax_sessions = 10\n")
    result = quota("show", "--config", str(config))
    assert result.returncode == 2
    assert str(config) in result.stderr and "[limits] quota_db" in result.stderr


@pytest.mark.parametrize("state", ["fine", "missing", "not sqlite"])
def test_check_config_says_whether_the_quota_file_would_do(tmp_path, state) -> None:
    db = tmp_path / "state" / "quota.sqlite"
    if state == "fine":
        QuotaStore(str(db)).close()
    elif state == "not sqlite":
        db.parent.mkdir()
        db.write_bytes(b"no database here" * 64)
    path = tmp_path / "fastsocks.toml"
    path.write_text('[limits]\nquota_bytes = 1000\nquota_db = "state/quota.sqlite"\n')
    result = subprocess.run([*fastsocks_command(), "check-config", str(path)], capture_output=True, text=True,
                            timeout=60)
    if state == "not sqlite":
        assert result.returncode == 2 and f"{db}: quota_db: not an SQLite database" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert f"quota 1000 bytes per user per day in {db}" in result.stdout
    assert db.exists() == (state != "missing")  # checking creates nothing
