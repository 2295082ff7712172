"""The worker's control loop: a selector plus a heap of timers, nothing more.

Callbacks registered for an fd are called with no argument when it is ready; timers are
cancelled lazily (a cancelled entry stays in the heap and is skipped when due).
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
    __slots__ = ("when_s", "callback", "cancelled")

    def __init__(self, when_s: float, callback: Callable[[], None]) -> None:
        self.when_s = when_s
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

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
        timer = Timer(time.monotonic() + delay_s, callback)
        heapq.heappush(self._timers, (timer.when_s, next(self._seq), timer))
        return timer

    def run_once(self, max_wait_s: float) -> None:
        """Wait at most max_wait_s (less if a timer is due), then run what is ready."""
        timeout = max_wait_s
        if self._timers:
            timeout = min(timeout, max(0.0, self._timers[0][0] - time.monotonic()))
        for key, _mask in self.selector.select(timeout):
            self._call(key.data)
        self._run_due_timers()

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._call(timer.callback)

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
