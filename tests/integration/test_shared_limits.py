"""The shared accounts (_relay.Accounts, _accounts.pxi) and what both engines do with them:
buckets that several sessions read through together, in one process or several, and a
quota count that ends a session when it is used up.

A limit promises a lower bound on a transfer's duration and an upper bound on what has
moved by any moment; the tests check those, never how fast anything went."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time

import pytest
from support import OneWay, Relay, fd_count, limited_engine, tcp_pair  # noqa: F401 (a fixture)

from fastsocks import _relay
from fastsocks._relay_types import bucket_bytes

RATE = 200_000
BURST = bucket_bytes(RATE)[0]


@pytest.fixture
def engine(limited_engine):
    return limited_engine


@pytest.fixture
def accounts():
    return _relay.Accounts(1024)


# --------------------------------------------------------------------- the table


def test_one_name_one_entry_whatever_its_kind_and_sessions(accounts):
    alice = accounts.open(_relay.ACCOUNT_USER, b"alice")
    assert accounts.open(_relay.ACCOUNT_USER, b"alice") == alice
    assert accounts.open(_relay.ACCOUNT_CLIENT, b"alice") != alice
    bob = accounts.open(_relay.ACCOUNT_USER, b"bob")
    assert bob != alice and accounts.in_use == 3
    held = {name: refs for _i, kind, name, refs, _used in accounts.claimed() if kind == _relay.ACCOUNT_USER}
    assert held == {b"alice": 2, b"bob": 1}


def test_reclaim_frees_what_no_session_holds_and_keeps_counts_when_asked(accounts):
    alice = accounts.open(_relay.ACCOUNT_USER, b"alice")
    bob = accounts.open(_relay.ACCOUNT_USER, b"bob")
    carol = accounts.open(_relay.ACCOUNT_USER, b"carol")
    accounts.add_used(bob, 10)
    accounts.close(bob)
    accounts.close(carol)
    assert accounts.reclaim(keep_used=True) == 1           # carol: no session, no count
    assert {n for _i, _k, n, _r, _u in accounts.claimed()} == {b"alice", b"bob"}
    assert accounts.reclaim(keep_used=False) == 1          # bob's count goes too
    assert accounts.used(alice) == 0
    with pytest.raises(IndexError):
        accounts.used(bob)


def test_a_full_probe_run_is_said_not_overwritten():
    small = _relay.Accounts(4)
    entries = [small.open(_relay.ACCOUNT_USER, f"u{i}".encode()) for i in range(4)]
    assert sorted(entries) == [0, 1, 2, 3]
    assert small.open(_relay.ACCOUNT_USER, b"one too many") == -1
    assert small.open(_relay.ACCOUNT_USER, b"u2") == entries[2]


def test_a_dead_workers_holds_are_taken_back_from_its_slot():
    """A worker killed with sessions open never closes their entries: the master takes
    its slot's holds back, and what nobody else holds can be freed."""
    accounts = _relay.Accounts(256, workers=2)
    shared = accounts.open(_relay.ACCOUNT_USER, b"alice")  # the master's own hold
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            accounts.forked(1)
            accounts.open(_relay.ACCOUNT_USER, b"alice")
            accounts.open(_relay.ACCOUNT_USER, b"alice")
            accounts.open(_relay.ACCOUNT_CLIENT, b"\x7f\x00\x00\x01")
            os.write(ready_w, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"x"
    os.close(ready_r)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    refs = {name: r for _i, _k, name, r, _u in accounts.claimed()}
    assert refs == {b"alice": 3, b"\x7f\x00\x00\x01": 1}
    assert accounts.release_slot(1) == 3
    assert {name: r for _i, _k, name, r, _u in accounts.claimed()} == {b"alice": 1, b"\x7f\x00\x00\x01": 0}
    assert accounts.release_slot(1) == 0 and accounts.reclaim(keep_used=False) == 1
    accounts.close(shared)


def test_a_bucket_grants_its_burst_then_makes_the_reader_wait(accounts):
    entry = accounts.open(_relay.ACCOUNT_CLIENT, b"\x7f\x00\x00\x01")
    got, _ = accounts.take(entry, 1, RATE, 10 * BURST)
    assert got == BURST
    got, wait_s = accounts.take(entry, 1, RATE, 1000)
    assert got == 0 and wait_s > 0
    accounts.refund(entry, 1, 500)
    assert accounts.take(entry, 1, RATE, 1000)[0] >= 500
    assert accounts.take(entry, 0, RATE, 1000)[0] == 1000  # the other direction has its own


def test_bad_arguments_are_refused(accounts):
    with pytest.raises(ValueError):
        accounts.open(3, b"x")
    with pytest.raises(ValueError):
        accounts.open(_relay.ACCOUNT_USER, b"x" * (_relay.ACCOUNT_NAME_MAX + 1))
    entry = accounts.open(_relay.ACCOUNT_USER, b"x")
    with pytest.raises(ValueError):
        accounts.take(entry, 2, RATE, 1)
    with pytest.raises(IndexError):
        accounts.take(999, 0, RATE, 1)


# --------------------------------------------------------------------- engines


def send_until_refused(sock, payload: bytes) -> None:
    try:
        sock.sendall(payload)
    except OSError:
        pass  # the session ended at its quota: the relay is gone


def readable(sock) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    except OSError:
        return True


def drain(sock) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            return bytes(out)
        except OSError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def shared_relay(engine, accounts, tag: int, entry: int, **kwargs) -> Relay:
    engine.use_accounts(accounts)
    return Relay(engine, tag=tag, shared=((entry, 0, RATE),), **kwargs)


def test_two_sessions_share_one_bucket(engine, accounts):
    entry = accounts.open(_relay.ACCOUNT_USER, b"alice")
    started_s = time.monotonic()
    relays = [shared_relay(engine, accounts, tag, entry) for tag in (1, 2)]
    payloads = [os.urandom(200_000), os.urandom(200_000)]
    flows = [OneWay(relay, "down", payload) for relay, payload in zip(relays, payloads)]
    ended = []
    deadline = time.monotonic() + 30
    while len(ended) < 2:
        assert time.monotonic() < deadline, "relay made no progress in time"
        ended += engine.wait(0.02)
        # Both together, at every turn: never ahead of one bucket.
        assert engine.counters()[1] <= BURST + RATE * (time.monotonic() - started_s)
    for flow, payload in zip(flows, payloads):
        flow.join()
        assert flow.digest == hashlib.sha256(payload).hexdigest()
    assert sorted((e.tag, e.bytes_down, e.reason) for e in ended) == [(1, 200_000, "eof"), (2, 200_000, "eof")]
    assert time.monotonic() - started_s >= (400_000 - BURST) / RATE
    for relay in relays:
        relay.close_apps()


def test_a_bucket_is_shared_by_sessions_in_two_processes(accounts):
    """The table is shared memory: a forked process's engine reads through the same
    bucket, so two processes' sessions together stay within one bucket."""
    entry = accounts.open(_relay.ACCOUNT_CLIENT, b"\x7f\x00\x00\x01")
    payload = os.urandom(200_000)
    started_s = time.monotonic()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other "worker": one session, then its exit code says how it went
        code = 1
        try:
            os.close(ready_r)
            accounts.forked()
            engine = _relay.RelayEngine()
            relay = shared_relay(engine, accounts, 2, entry)
            flow = OneWay(relay, "down", payload)
            os.write(ready_w, b"x")
            relay.pump(lambda: relay.ended, timeout_s=30)
            flow.join()
            code = 0 if flow.received == len(payload) and relay.ended[0].reason == "eof" else 1
        finally:
            os._exit(code)
    try:
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"x"
        engine = _relay.RelayEngine()
        relay = shared_relay(engine, accounts, 1, entry)
        flow = OneWay(relay, "down", payload)
        relay.pump(lambda: relay.ended, timeout_s=30)
        flow.join()
        assert flow.received == len(payload)
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
        # 400 kB through one 200 kB/s bucket: each alone would have taken half of this.
        assert time.monotonic() - started_s >= (400_000 - BURST) / RATE
        relay.close_apps()
        engine.close()
    finally:
        os.close(ready_r)
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_a_session_stops_at_its_quota_and_the_next_one_moves_nothing(engine, accounts):
    entry = accounts.open(_relay.ACCOUNT_USER, b"alice")
    engine.use_accounts(accounts)
    quota = 300_000
    first = Relay(engine, tag=1, quota=(entry, quota))
    sender = threading.Thread(target=send_until_refused, args=(first.app_upstream, os.urandom(1 << 20)))
    sender.start()
    received = bytearray()
    first.app_client.setblocking(False)
    while not first.ended:
        first.pump(lambda: first.ended or readable(first.app_client))
        received += drain(first.app_client)
    sender.join(20)
    assert first.ended[0].reason == "quota" and first.ended[0].bytes_down == quota == accounts.used(entry)
    received += drain(first.app_client)
    assert len(received) == quota  # what it moved arrived; then the client saw the end
    first.close_apps()
    second = Relay(engine, tag=2, quota=(entry, quota))
    second.app_client.sendall(b"hello")
    second.pump(lambda: second.ended)
    assert second.ended[0][:4] == (2, 0, 0, "quota")
    second.close_apps()


def test_the_quota_counts_both_ways(engine, accounts):
    entry = accounts.open(_relay.ACCOUNT_USER, b"alice")
    engine.use_accounts(accounts)
    relay = Relay(engine, tag=1, quota=(entry, 10_000))
    relay.app_client.sendall(b"u" * 4000)
    relay.pump(lambda: engine.counters()[0] == 4000)
    relay.app_upstream.sendall(b"d" * 4000)
    relay.pump(lambda: engine.counters()[1] == 4000)
    assert accounts.used(entry) == 8000
    relay.app_upstream.sendall(b"d" * 4000)
    relay.pump(lambda: relay.ended)
    assert relay.ended[0].reason == "quota" and accounts.used(entry) == 10_000
    relay.close_apps()


BAD_SHARES = {
    "no such entry": lambda entry: {"shared": ((entry ^ 1, 0, RATE),)},
    "a quota of 0": lambda entry: {"quota": (entry, 0)},
    "a negative rate": lambda entry: {"shared": ((entry, -1, 0),)},
    "three entries": lambda entry: {"shared": ((entry, 0, RATE),) * 3},
}


@pytest.mark.parametrize("bad", sorted(BAD_SHARES))
def test_bad_shares_are_refused_and_their_fds_closed(engine, accounts, bad):
    kwargs = BAD_SHARES[bad](accounts.open(_relay.ACCOUNT_USER, b"alice"))
    before = fd_count()
    a, b = tcp_pair()
    with pytest.raises(ValueError):  # use_accounts() not called yet
        engine.add(a.detach(), b.detach(), 1, None, **kwargs)
    engine.use_accounts(accounts)
    a, b = tcp_pair()
    with pytest.raises((ValueError, IndexError)):
        engine.add(a.detach(), b.detach(), 1, None, **kwargs)
    assert fd_count() == before
