"""Password checks off the loop thread: a selectors loop watches fileno() and calls dispatch()."""

from __future__ import annotations

import os
import selectors
import threading
from collections.abc import Callable

import pytest

from fastsocks.auth import Authenticator
from fastsocks.users import UserDB, hash_password

# A bound on waiting for the pool, so that a bug fails the test instead of hanging it.
GIVE_UP_S = 10.0


class StubUsers:
    """A UserDB stand-in that counts checks and can hold them until ``gate`` is set."""

    def __init__(self, passwords: dict[bytes, bytes], *, hold: bool = False, error: Exception | None = None) -> None:
        self.passwords = passwords
        self.calls: list[bytes] = []
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)
        self.error = error
        if not hold:
            self.gate.set()

    def verify(self, username: bytes, password: bytes) -> bool:
        self.calls.append(username)
        self.started.release()
        assert self.gate.wait(GIVE_UP_S)
        if self.error is not None:
            raise self.error
        return self.passwords.get(username) == password


class Results:
    """Callbacks that record what they were told."""

    def __init__(self) -> None:
        self.values: list[tuple[str, bool]] = []

    def callback(self, name: str) -> Callable[[bool], None]:
        return lambda ok: self.values.append((name, ok))


def run_loop(auth: Authenticator, done: Callable[[], bool]) -> None:
    """Play the worker's loop: wait on fileno(), dispatch(), until ``done()``."""
    with selectors.DefaultSelector() as selector:
        selector.register(auth.fileno(), selectors.EVENT_READ)
        for _ in range(1000):
            if done():
                return
            if selector.select(GIVE_UP_S):
                auth.dispatch()
    pytest.fail("the authenticator never delivered")


@pytest.fixture
def make_auth():
    made: list[Authenticator] = []

    def make(db, **kwargs) -> Authenticator:
        auth = Authenticator(db, **kwargs)
        made.append(auth)
        return auth

    yield make
    for auth in made:
        auth.close()


def test_real_users_good_and_bad_password(make_auth) -> None:
    db = UserDB({b"alice": hash_password("wonderland", scrypt_ln=10)})
    auth = make_auth(db)
    results = Results()
    auth.verify(b"alice", b"wonderland", results.callback("good"))
    auth.verify(b"alice", b"looking-glass", results.callback("bad"))
    auth.verify(b"mallory", b"wonderland", results.callback("unknown"))
    run_loop(auth, lambda: len(results.values) == 3)
    assert sorted(results.values) == [("bad", False), ("good", True), ("unknown", False)]
    assert auth.users is db


def test_second_success_is_served_from_the_cache(make_auth) -> None:
    users = StubUsers({b"alice": b"pw"})
    auth = make_auth(users)
    results = Results()
    auth.verify(b"alice", b"pw", results.callback("first"))
    assert results.values == []  # never on the caller's thread
    run_loop(auth, lambda: results.values)
    auth.verify(b"alice", b"pw", results.callback("again"))
    assert results.values == [("first", True), ("again", True)]  # at once, without the loop
    assert users.calls == [b"alice"]


def test_failures_are_never_cached(make_auth) -> None:
    users = StubUsers({b"alice": b"pw"})
    auth = make_auth(users)
    results = Results()
    for attempt in range(2):
        auth.verify(b"alice", b"guess", results.callback(f"try {attempt}"))
        run_loop(auth, lambda expected=attempt + 1: len(results.values) == expected)
    assert results.values == [("try 0", False), ("try 1", False)]
    assert users.calls == [b"alice", b"alice"]


def test_cache_key_separates_user_from_password(make_auth) -> None:
    users = StubUsers({b"ab": b"c"})
    auth = make_auth(users)
    results = Results()
    auth.verify(b"ab", b"c", results.callback("ab"))
    run_loop(auth, lambda: results.values)
    auth.verify(b"a", b"bc", results.callback("a"))
    run_loop(auth, lambda: len(results.values) == 2)
    assert results.values == [("ab", True), ("a", False)]


def test_replace_users_clears_the_cache(make_auth) -> None:
    auth = make_auth(StubUsers({b"alice": b"pw"}))
    results = Results()
    auth.verify(b"alice", b"pw", results.callback("old"))
    run_loop(auth, lambda: results.values)
    new_users = StubUsers({b"bob": b"pw"})  # alice was removed from the file
    auth.replace_users(new_users)
    assert auth.users is new_users
    auth.verify(b"alice", b"pw", results.callback("new"))
    run_loop(auth, lambda: len(results.values) == 2)
    assert results.values == [("old", True), ("new", False)]
    assert new_users.calls == [b"alice"]


def test_check_in_flight_is_redone_against_replaced_users(make_auth) -> None:
    old_users = StubUsers({b"alice": b"pw"}, hold=True)
    auth = make_auth(old_users)
    results = Results()
    auth.verify(b"alice", b"pw", results.callback("in flight"))
    assert old_users.started.acquire(timeout=GIVE_UP_S)
    new_users = StubUsers({})
    auth.replace_users(new_users)
    old_users.gate.set()
    run_loop(auth, lambda: results.values)
    assert results.values == [("in flight", False)]
    assert new_users.calls == [b"alice"]
    auth.verify(b"alice", b"pw", results.callback("again"))  # the stale success was not cached
    run_loop(auth, lambda: len(results.values) == 2)
    assert new_users.calls == [b"alice", b"alice"]


def test_cache_entries_expire(make_auth) -> None:
    now = [1000.0]
    users = StubUsers({b"alice": b"pw"})
    auth = make_auth(users, cache_ttl_s=300.0, clock=lambda: now[0])
    results = Results()
    auth.verify(b"alice", b"pw", results.callback("first"))
    run_loop(auth, lambda: results.values)
    now[0] += 299.0
    auth.verify(b"alice", b"pw", results.callback("cached"))
    now[0] += 2.0
    auth.verify(b"alice", b"pw", results.callback("expired"))
    run_loop(auth, lambda: len(results.values) == 3)
    assert results.values == [("first", True), ("cached", True), ("expired", True)]
    assert users.calls == [b"alice", b"alice"]


def test_cache_is_bounded(make_auth) -> None:
    users = StubUsers({b"a": b"pw", b"b": b"pw", b"c": b"pw"})
    auth = make_auth(users, cache_size=2)
    results = Results()
    for count, name in enumerate((b"a", b"b", b"c"), start=1):
        auth.verify(name, b"pw", results.callback(name.decode()))
        run_loop(auth, lambda expected=count: len(results.values) == expected)
    auth.verify(b"c", b"pw", results.callback("c cached"))
    auth.verify(b"a", b"pw", results.callback("a evicted"))
    run_loop(auth, lambda: len(results.values) == 5)
    assert users.calls == [b"a", b"b", b"c", b"a"]


def test_concurrent_checks_of_one_pair_share_a_hash(make_auth) -> None:
    users = StubUsers({b"alice": b"pw"}, hold=True)
    auth = make_auth(users)
    results = Results()
    for name in ("one", "two", "three"):
        auth.verify(b"alice", b"pw", results.callback(name))
    auth.verify(b"alice", b"other", results.callback("other"))
    users.gate.set()
    run_loop(auth, lambda: len(results.values) == 4)
    assert sorted(results.values) == [("one", True), ("other", False), ("three", True), ("two", True)]
    assert users.calls == [b"alice", b"alice"]


def test_a_check_that_raises_answers_false_then_raises_on_the_loop(make_auth) -> None:
    auth = make_auth(StubUsers({}, error=MemoryError("scrypt")))
    results = Results()
    auth.verify(b"alice", b"pw", results.callback("x"))
    with pytest.raises(RuntimeError) as info:
        run_loop(auth, lambda: results.values)
    assert results.values == [("x", False)]
    assert isinstance(info.value.__cause__, MemoryError)


def test_a_raising_callback_does_not_starve_the_others(make_auth) -> None:
    users = StubUsers({b"alice": b"pw"}, hold=True)
    auth = make_auth(users)
    results = Results()

    def broken(ok: bool) -> None:
        raise ValueError("session bug")

    auth.verify(b"alice", b"pw", broken)
    auth.verify(b"alice", b"pw", results.callback("fine"))
    users.gate.set()
    with pytest.raises(RuntimeError):
        run_loop(auth, lambda: results.values)
    assert results.values == [("fine", True)]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_close_leaks_no_fd_and_is_idempotent() -> None:
    before = open_fds()
    auth = Authenticator(StubUsers({b"alice": b"pw"}))
    results = Results()
    auth.verify(b"alice", b"pw", results.callback("x"))
    run_loop(auth, lambda: results.values)
    assert os.get_inheritable(auth.fileno()) is False
    auth.close()
    auth.close()
    assert auth.fileno() == -1
    assert open_fds() == before
    with pytest.raises(RuntimeError, match="closed"):
        auth.verify(b"alice", b"pw", results.callback("late"))


def test_check_finishing_after_close_writes_to_no_fd() -> None:
    users = StubUsers({b"alice": b"pw"}, hold=True)
    auth = Authenticator(users)
    results = Results()
    auth.verify(b"alice", b"pw", results.callback("dropped"))
    assert users.started.acquire(timeout=GIVE_UP_S)
    old_fd = auth.fileno()
    auth.close()
    reused_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # most likely the same number
    try:
        users.gate.set()
        auth._pool.shutdown(wait=True)  # let the check finish
        if reused_fd == old_fd:
            with pytest.raises(BlockingIOError):
                os.eventfd_read(reused_fd)
    finally:
        os.close(reused_fd)
    assert results.values == []
