"""Giving the C heap back after a burst (glibc malloc; elsewhere these do nothing).

Measured here: a password check (scrypt, ln=14 r=8) needs 16 MiB, and each checking thread
kept its own malloc arena's 16 MiB after its checks ended; malloc_trim() cannot return the
top of a thread's arena, only the main one's. So a worker keeps one arena for all its
threads (``one_arena()``, before any thread starts: the GIL serialises them anyway), and
``trim()`` returns its free pages once a burst is over: free chunks are madvise()d away and
the top of the heap is given back. Between trims freed memory is reused as before, so a
check during a burst is no slower (67 ms with or without).
"""

from __future__ import annotations

import ctypes

M_ARENA_MAX = -8  # mallopt(3)


def _libc():
    """The C library already linked in (dlopen(NULL): no search, no subprocess), if it is
    glibc's, which has both calls."""
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


class Heap:
    """The C heap of this process: one per worker, made after the fork."""

    def __init__(self) -> None:
        self._libc = _libc()

    @property
    def available(self) -> bool:
        return self._libc is not None

    def one_arena(self) -> bool:
        """Every thread allocates from the main arena, which trim() can return; False where
        the C library cannot be told so."""
        return self._libc is not None and self._libc.mallopt(M_ARENA_MAX, 1) == 1

    def trim(self) -> bool:
        """Give free heap pages back to the kernel; True if some were."""
        return self._libc is not None and self._libc.malloc_trim(0) == 1


class TrimPolicy:
    """When a worker trims: once something happened since the last trim (``activity``, a
    count that only grows: sessions opened and closed, passwords checked), when it is quiet
    (at most QUIET_ACCEPTS accepts in the last tick), at most every MIN_INTERVAL_S; while it
    stays busy, at most every BUSY_INTERVAL_S."""

    QUIET_ACCEPTS = 16
    MIN_INTERVAL_S = 2.0
    BUSY_INTERVAL_S = 60.0

    def __init__(self, now_s: float) -> None:
        self.trimmed_s = now_s
        self.trimmed_activity = 0

    def due(self, now_s: float, activity: int, accepts_last_tick: int) -> bool:
        if activity == self.trimmed_activity:
            return False
        since_s = now_s - self.trimmed_s
        if since_s < self.MIN_INTERVAL_S:
            return False
        return accepts_last_tick <= self.QUIET_ACCEPTS or since_s >= self.BUSY_INTERVAL_S

    def trimmed(self, now_s: float, activity: int) -> None:
        self.trimmed_s, self.trimmed_activity = now_s, activity
