"""The worker's control loop: a selector plus a heap of timers, nothing more.

Callbacks registered for an fd are called with no argument when it is ready; timers are
cancelled lazily (a cancelled entry stays in the heap and is skipped when due; it drops its
callback at once, and the heap is rebuilt without such entries once they are most of it).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Timer:
    __slots__ = ("when_s", "callback", "cancelled", "loop")

    def __init__(self, when_s: float, callback: Callable[[], None], loop: Loop) -> None:
        self.when_s = when_s
        self.callback = callback
        self.cancelled = False
        self.loop = loop

    def cancel(self) -> None:
        """Idempotent. The callback (and the session it holds) is let go at once; the heap
        entry goes when due, or when cancelled ones make up most of the heap."""
        if not self.cancelled:
            self.cancelled = True
            self.callback = None
            self.loop._timer_cancelled()


class Loop:
    COMPACT_AT = 256  # cancelled timers in the heap before it may be rebuilt without them

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._cancelled = 0  # cancelled timers still in the heap

    def add_reader(self, fileobj, callback: Callable[[], None]) -> None:
        self.selector.register(fileobj, selectors.EVENT_READ, callback)

    def add_writer(self, fileobj, callback: Callable[[], None]) -> None:
        self.selector.register(fileobj, selectors.EVENT_WRITE, callback)

    def remove(self, fileobj) -> None:
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass  # not registered, or already closed: removal is idempotent

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay_s, callback, self)
        heapq.heappush(self._timers, (timer.when_s, next(self._seq), timer))
        return timer

    def run_once(self, max_wait_s: float) -> None:
        """Wait at most max_wait_s (less if a timer is due), then run what is ready."""
        for key, _mask in self.selector.select(self.timeout(max_wait_s)):
            self._call(key.data)
        self._run_due_timers()

    def timeout(self, max_wait_s: float) -> float:
        """How long one may wait for fds: max_wait_s, or less if a timer is due sooner."""
        if self._timers:
            return min(max_wait_s, max(0.0, self._timers[0][0] - time.monotonic()))
        return max_wait_s

    def fileno(self) -> int:
        """The selector's epoll fd: readable when a watched fd is (to nest this loop in
        another wait, as the worker does in the relay engine's)."""
        return self.selector.fileno()

    def run_timers(self) -> None:
        """Run the timers that are due (run_once without waiting for or serving fds)."""
        self._run_due_timers()

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                self._cancelled -= 1
            else:
                self._call(timer.callback)

    def _timer_cancelled(self) -> None:
        """A handshake timer is cancelled as soon as the request arrives: without this the
        heap of a busy worker would hold every one until its deadline (asyncio does the same)."""
        self._cancelled += 1
        if self._cancelled >= self.COMPACT_AT and self._cancelled * 2 > len(self._timers):
            self._timers = [entry for entry in self._timers if not entry[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0

    @staticmethod
    def _call(callback: Callable[[], None]) -> None:
        """A bug in one callback is logged and costs that callback, never the worker."""
        try:
            callback()
        except Exception:
            log.exception("unexpected error in %r", callback)

    def close(self) -> None:
        self.selector.close()
        self._timers.clear()
        self._cancelled = 0
