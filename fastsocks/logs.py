"""Logging set-up: one line per record on stderr, tagged with the process's role.

Each record is written with a single write() call, so lines from several workers
sharing one stderr do not interleave.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s [%(process_name)s] %(name)s: %(message)s"


class _ProcessNameFilter(logging.Filter):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.process_name = name

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_name = self.process_name
        return True


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_ProcessNameFilter("master"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def set_process_name(name: str) -> None:
    """Called in a freshly forked worker: its records say which worker wrote them."""
    for handler in logging.getLogger().handlers:
        for flt in handler.filters:
            if isinstance(flt, _ProcessNameFilter):
                flt.process_name = name
