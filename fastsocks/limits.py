"""Counts that caps need across workers: sessions per client IP and per user, all sessions,
failed logins and blocked clients. One anonymous shared map, made by the master before it
forks (like stats.py), so that a cap means the same with 1 worker or 16.

Theory of operation
-------------------
No locks and no atomic instructions: each worker writes only its own row, and a count is
the sum of every row (each field is one aligned 8-byte word: another process reads the
old value or the new one). A reader may miss what another worker counted in the last
microseconds; a cap can thus be passed by at most workers-1 sessions, which no client can
widen, since it cannot choose the worker that serves it.

Clients and users are not stored, only counted in buckets: a keyed hash (BLAKE2b with a
random key made at start, so nobody can aim two names at one bucket) picks one bucket in
each of two tables, and the count is the smaller of the two sums (a count-min sketch).
Two keys share both buckets with a probability of about (keys / BUCKETS)², and then
their counts add up: a cap can only be reached early, never passed.

A dead worker's sessions died with it: the master zeroes its row's session counts before
the next worker takes the slot; failed logins and blocks outlive it.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from typing import NamedTuple

BUCKETS = 4096       # per table; two tables per kind
HASHES = 2
_TABLE = BUCKETS * HASHES
# Sections of a row, in words.
_OPEN = 0                                 # sessions of this worker
_CLIENTS = 8                              # sessions per client bucket
_USERS = _CLIENTS + _TABLE                # sessions per user bucket
_FAILS = _USERS + _TABLE                  # failed logins per client bucket, in the window...
_FAIL_WINDOW = _FAILS + _TABLE            # ...that started at this time (ms)
_BLOCKED = _FAIL_WINDOW + _TABLE          # blocked until (ms)
ROW_WORDS = _BLOCKED + _TABLE


class EngineCounts(NamedTuple):
    """Where the relay engine counts the sessions it serves itself (RelayEngine.front):
    this map's words, the worker's row, and the layout of a row, in words."""
    words: memoryview
    slot: int
    workers: int
    row_words: int
    open: int
    clients: int
    blocked: int
    buckets: int  # in each of the clients and blocked sections (both tables)


class SharedLimits:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._key = os.urandom(16)
        size = max(8 * ROW_WORDS * workers, mmap.PAGESIZE)
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
        self._words = memoryview(self._map).cast("q")

    def for_engine(self, slot: int) -> EngineCounts:
        """The map as the engine of worker ``slot`` counts in it: the same words, open_session,
        close_session, the caps and blocked_until over them, in C."""
        return EngineCounts(self._words, slot, self.workers, ROW_WORDS, _OPEN, _CLIENTS, _BLOCKED, _TABLE)

    # -- keys

    def buckets(self, key: bytes) -> tuple[int, int]:
        digest = int.from_bytes(hashlib.blake2b(key, digest_size=8, key=self._key).digest(), "little")
        return digest % BUCKETS, BUCKETS + (digest >> 32) % BUCKETS

    # -- sessions

    def open_session(self, slot: int, client: tuple[int, int]) -> None:
        base = slot * ROW_WORDS
        w = self._words
        w[base + _OPEN] += 1
        for b in client:
            w[base + _CLIENTS + b] += 1

    def close_session(self, slot: int, client: tuple[int, int], user: tuple[int, int] | None) -> None:
        base = slot * ROW_WORDS
        w = self._words
        w[base + _OPEN] -= 1
        for b in client:
            w[base + _CLIENTS + b] -= 1
        if user is not None:
            for b in user:
                w[base + _USERS + b] -= 1

    def add_user(self, slot: int, user: tuple[int, int]) -> None:
        base = slot * ROW_WORDS
        for b in user:
            self._words[base + _USERS + b] += 1

    def total(self) -> int:
        return sum(self._words[slot * ROW_WORDS + _OPEN] for slot in range(self.workers))

    def of_worker(self, slot: int) -> int:
        return self._words[slot * ROW_WORDS + _OPEN]

    def of_client(self, client: tuple[int, int]) -> int:
        return self._min_sum(_CLIENTS, client)

    def of_user(self, user: tuple[int, int]) -> int:
        return self._min_sum(_USERS, user)

    def _min_sum(self, section: int, buckets: tuple[int, int]) -> int:
        w = self._words
        return min(sum(w[slot * ROW_WORDS + section + b] for slot in range(self.workers)) for b in buckets)

    # -- failed logins and blocks (times in ms of CLOCK_MONOTONIC, shared by all processes)

    def note_failure(self, slot: int, client: tuple[int, int], now_ms: int, window_ms: int) -> int:
        """Count one failed login; return the failures of this client in the window."""
        w = self._words
        base = slot * ROW_WORDS
        for b in client:
            if w[base + _FAIL_WINDOW + b] <= now_ms - window_ms:
                w[base + _FAIL_WINDOW + b] = now_ms
                w[base + _FAILS + b] = 0
            w[base + _FAILS + b] += 1
        return min(sum(w[s * ROW_WORDS + _FAILS + b] for s in range(self.workers)
                       if w[s * ROW_WORDS + _FAIL_WINDOW + b] > now_ms - window_ms) for b in client)

    def block(self, slot: int, client: tuple[int, int], until_ms: int) -> None:
        base = slot * ROW_WORDS
        for b in client:
            self._words[base + _BLOCKED + b] = until_ms
            self._words[base + _FAILS + b] = 0  # the block answers these failures

    def blocked_until(self, client: tuple[int, int]) -> int:
        """0 when not blocked; both buckets must be blocked (count-min, as for counts)."""
        w = self._words
        return min(max(w[s * ROW_WORDS + _BLOCKED + b] for s in range(self.workers)) for b in client)

    def reset_sessions(self, slot: int) -> None:
        """Zero a dead worker's session counts (its sessions died with it)."""
        base = slot * ROW_WORDS
        w = self._words
        w[base + _OPEN] = 0
        for i in range(_CLIENTS, _FAILS):
            if w[base + i]:
                w[base + i] = 0

    def close(self) -> None:
        self._words.release()
        self._map.close()
