"""Username/password checks off the worker's loop thread, with a cache of recent successes.

Theory of operation
-------------------
A password hash costs tens of milliseconds on purpose, so ``verify()`` never computes one
on the loop thread. A small thread pool runs ``UserDB.verify`` (hashlib releases the GIL
while it hashes), queues the outcome and writes an eventfd; the worker's selector watches
``fileno()`` and calls ``dispatch()``, which runs the callbacks on the loop thread.

- A success is remembered for ``cache_ttl_s`` (LRU, at most ``cache_size`` entries), so a
  reconnecting client is answered at once, from inside ``verify()``. The cache is keyed by
  an HMAC-SHA256 of user name and password under a random per-process key: it holds no
  password, and its digests cannot be precomputed or matched across processes. Failures
  are never cached.
- Concurrent checks of the same user name and password share one hash.
- ``replace_users()`` swaps the users whole and empties the cache. A check still running
  against the old users is run again against the new ones when it finishes, so every
  answer is given by the users in force when it is delivered.
- ``close()`` drops checks in flight: their callbacks never run.

Create it in the worker, after the fork: a thread pool does not survive ``fork()``.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastsocks.users import UserDB

Callback = Callable[[bool], None]


class _Pending:
    """One check in flight and everyone waiting for its answer."""

    __slots__ = ("username", "password", "callbacks")

    def __init__(self, username: bytes, password: bytes) -> None:
        self.username = username
        self.password = password
        self.callbacks: list[Callback] = []


class Authenticator:
    def __init__(self, users: UserDB, threads: int = 2, cache_size: int = 1024, cache_ttl_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._users = users
        self._generation = 0  # bumped by replace_users(): tells stale outcomes apart
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="auth")
        self._done: collections.deque[tuple[bytes, int, bool | Exception]] = collections.deque()
        self._wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Pool threads write the eventfd under this lock, so close() never lets them
        # write to a closed fd whose number the process may have handed out again.
        self._wakeup_lock = threading.Lock()
        self._key = secrets.token_bytes(32)
        self._successes: collections.OrderedDict[bytes, float] = collections.OrderedDict()  # digest -> expiry
        self._cache_size = cache_size
        self._cache_ttl_s = cache_ttl_s
        self._clock = clock
        self._pending: dict[bytes, _Pending] = {}
        self.checks = 0  # hashes computed (a count that only grows)

    @property
    def users(self) -> UserDB:
        return self._users

    def fileno(self) -> int:
        return self._wakeup_fd

    def verify(self, username: bytes, password: bytes, callback: Callback) -> None:
        """Call ``callback(ok)`` from ``dispatch()``, or at once for a recent success."""
        if self._wakeup_fd < 0:
            raise RuntimeError("verify() called on a closed Authenticator")
        key = self._digest(username, password)
        if self._recently_succeeded(key):
            callback(True)
            return
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending(username, password)
            self._submit(key, pending)
        pending.callbacks.append(callback)

    def dispatch(self) -> None:
        """On the loop thread, when fileno() is readable: deliver finished checks.

        Every outcome is delivered first; then the first error (a check or a callback
        that raised; its callbacks got False) is raised for the loop to log.
        """
        try:
            os.eventfd_read(self._wakeup_fd)
        except BlockingIOError:
            pass
        errors: list[Exception] = []
        while self._done:
            key, generation, outcome = self._done.popleft()
            pending = self._pending.get(key)
            if pending is None:
                continue
            if generation != self._generation:
                self._submit(key, pending)  # checked against users replaced since
                continue
            del self._pending[key]
            if isinstance(outcome, Exception):
                errors.append(outcome)
            ok = outcome is True
            if ok:
                self._remember(key)
            errors.extend(_deliver(pending.callbacks, ok))
        if errors:
            raise RuntimeError(f"{len(errors)} error(s) while checking passwords") from errors[0]

    def replace_users(self, users: UserDB) -> None:
        """Check against ``users`` from now on (e.g. after SIGHUP re-read the file)."""
        self._users = users
        self._generation += 1
        self._successes.clear()

    def close(self) -> None:
        with self._wakeup_lock:
            wakeup_fd, self._wakeup_fd = self._wakeup_fd, -1
        if wakeup_fd >= 0:
            os.close(wakeup_fd)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pending.clear()
        self._done.clear()
        self._successes.clear()

    # --- the pool -------------------------------------------------------------

    def _submit(self, key: bytes, pending: _Pending) -> None:
        self.checks += 1
        self._pool.submit(self._check, key, self._generation, self._users, pending.username, pending.password)

    def _check(self, key: bytes, generation: int, users: UserDB, username: bytes, password: bytes) -> None:
        """Runs on a pool thread: it touches nothing of the loop's but the deque and the eventfd."""
        try:
            outcome: bool | Exception = bool(users.verify(username, password))
        except Exception as exc:  # noqa: BLE001 -- handed to the loop thread, which raises it
            outcome = exc
        self._done.append((key, generation, outcome))
        with self._wakeup_lock:
            if self._wakeup_fd >= 0:
                os.eventfd_write(self._wakeup_fd, 1)

    # --- the cache of successes -----------------------------------------------

    def _digest(self, username: bytes, password: bytes) -> bytes:
        # The length prefix keeps ("ab", "c") and ("a", "bc") apart.
        message = len(username).to_bytes(4, "big") + username + password
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _recently_succeeded(self, key: bytes) -> bool:
        expiry = self._successes.get(key)
        if expiry is None:
            return False
        if expiry <= self._clock():
            del self._successes[key]
            return False
        self._successes.move_to_end(key)
        return True

    def _remember(self, key: bytes) -> None:
        if self._cache_size <= 0 or self._cache_ttl_s <= 0:
            return
        self._successes[key] = self._clock() + self._cache_ttl_s
        self._successes.move_to_end(key)
        while len(self._successes) > self._cache_size:
            self._successes.popitem(last=False)


def _deliver(callbacks: list[Callback], ok: bool) -> list[Exception]:
    """Call every callback, even after one raises; return what they raised."""
    errors = []
    for callback in callbacks:
        try:
            callback(ok)
        except Exception as exc:  # noqa: BLE001 -- one session's bug must not cost the others
            errors.append(exc)
    return errors
