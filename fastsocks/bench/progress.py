"""A one-line progress bar on stderr: shown only on a terminal, only once a run has gone
on for a couple of seconds, redrawn at most ten times a second, erased at the end."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 28


class ProgressBar:
    def __init__(self, enabled: bool = True, stream: TextIO | None = None, delay_s: float = 2.0) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.delay_s = delay_s
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def update(self, fraction: float | None, text: str) -> None:
        """``fraction`` of the work done (None: unknown), and what to say next to the bar."""
        now = time.monotonic()
        if not self.enabled or now - self.started < self.delay_s or now - self._last_draw < 0.1:
            return
        self._last_draw = now
        if fraction is None:
            bar = ""
        else:
            filled = round(WIDTH * min(max(fraction, 0.0), 1.0))
            bar = f"[{'#' * filled}{'.' * (WIDTH - filled)}] {fraction:4.0%} "
        self.stream.write(f"\r\x1b[K{bar}{text}  {now - self.started:5.1f} s")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False
