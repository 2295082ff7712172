"""Name resolution off the worker's loop thread.

getaddrinfo runs on a small bounded thread pool; each result is queued and an eventfd is
written, which the worker's selector watches; ``dispatch()`` then runs the callbacks on
the loop thread. A per-worker cache (TTL, bounded size) answers repeated names at once,
and concurrent queries for the same name share one lookup.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

# (family, sockaddr) pairs in the order getaddrinfo gave them. A tuple: the same value is
# handed to every caller and kept in the cache, so nobody may change it.
Addresses = tuple[tuple[int, tuple], ...]
Callback = Callable[[Addresses | None, OSError | None], None]


class Resolver:
    def __init__(self, threads: int, cache_ttl_s: float, cache_size: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="resolver")
        self._done: collections.deque = collections.deque()
        self._wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._cache: collections.OrderedDict[tuple[str, int], tuple[float, Addresses]] = collections.OrderedDict()
        self._cache_ttl_s = cache_ttl_s
        self._cache_size = cache_size
        self._waiting: dict[tuple[str, int], list[Callback]] = {}

    def fileno(self) -> int:
        return self._wakeup_fd

    def resolve(self, host: str, port: int, callback: Callback) -> None:
        """Call ``callback(addresses, None)`` or ``callback(None, error)`` from ``dispatch()``
        (or at once, from the cache)."""
        key = (host, port)
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > time.monotonic():
                self._cache.move_to_end(key)
                callback(cached[1], None)
                return
            del self._cache[key]
        waiters = self._waiting.get(key)
        if waiters is not None:
            waiters.append(callback)
            return
        self._waiting[key] = [callback]
        self._pool.submit(self._lookup, key)

    def _lookup(self, key: tuple[str, int]) -> None:
        """Runs on a pool thread: nothing here touches the loop's state but the deque."""
        try:
            infos = socket.getaddrinfo(key[0], key[1], type=socket.SOCK_STREAM)
            result = (tuple((family, sockaddr) for family, _, _, _, sockaddr in infos), None)
        except OSError as exc:
            result = (None, exc)
        except UnicodeError as exc:
            # The idna codec refuses the name (an empty label, one over 63 bytes): the
            # callbacks must run all the same, or their sessions wait for ever.
            result = (None, socket.gaierror(socket.EAI_NONAME, f"not a valid host name ({exc})"))
        except Exception as exc:  # never leave a waiting session without an answer
            result = (None, OSError(errno.EIO, f"lookup failed: {exc!r}"))
        self._done.append((key, result))
        os.eventfd_write(self._wakeup_fd, 1)

    def dispatch(self) -> None:
        """On the loop thread, when fileno() is readable: deliver finished lookups."""
        try:
            os.eventfd_read(self._wakeup_fd)
        except BlockingIOError:
            pass
        while self._done:
            key, (addresses, error) = self._done.popleft()
            if addresses:
                self._remember(key, addresses)
            for callback in self._waiting.pop(key, ()):
                callback(addresses, error)

    def _remember(self, key: tuple[str, int], addresses: Addresses) -> None:
        self._cache[key] = (time.monotonic() + self._cache_ttl_s, addresses)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._wakeup_fd >= 0:
            os.close(self._wakeup_fd)
            self._wakeup_fd = -1
