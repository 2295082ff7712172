"""Logging set-up: one line per record on stderr, tagged with the process's role.

Theory of operation
-------------------
Records go through the standard ``logging`` machinery (a user's handler or filter sees
every one), made cheap for the access log, which writes a line per session: no caller
lookup, thread or process fields (the format uses none of them), and the timestamp text
made once a second.

``info(logger, msg, *args)`` is ``logger.info(msg, *args)`` for the lines written per
session: when nothing but this module's own handler would see the record (no other
handler, filter, record factory or level in the way: the default set-up), it writes the
very line that record would have become straight into the handler's batch, without making
the record; otherwise (a handler of the user's, pytest's caplog) it logs as usual.

``--access-log FILE`` gives the access logger (``fastsocks.access``) a handler of its own on
that file (opened for append: every process writes whole batches, so lines never mix),
which ``reopen()`` opens anew by its name: logrotate's SIGUSR1, sent to the master, which
passes it on to every worker. ``--access-log-format json`` gives it a handler of its own in
any case (on that file, or on stderr beside the root's) that writes the message alone: each
line one JSON object, which carries its own time (access.py).

A worker batches its INFO and DEBUG lines: ``flush()``, which the worker calls at the end
of every loop turn, hands them on in batches of 4 KiB at most, whole lines only, so that
lines from several workers sharing one stderr pipe never interleave (a write of up to
PIPE_BUF bytes to a pipe is atomic). A WARNING or worse goes at once, with what was
batched before it. The worker's event loop never writes itself: a thread of the handler
(``_Writer``) does, so a log reader that stalls (a full pipe, a slow disk) cannot stop
the relay. While it stalls, batches wait, up to MAX_QUEUED_BYTES; past that they are
dropped and counted, and the first batch kept afterwards opens with a warning saying how
many lines were lost there. A worker killed with SIGKILL loses what was waiting.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import stat
import sys
import threading
import time

FORMAT = "%(asctime)s %(levelname)s [%(process_name)s] %(name)s: %(message)s"
BARE_FORMAT = "%(message)s"  # the JSON access lines: nothing around the object
BATCH_BYTES = 4096  # PIPE_BUF: one write of whole lines is never interleaved with another's
MAX_QUEUED_BYTES = 1 << 20  # a worker's lines waiting for a stalled reader; then they are dropped
STOP_WAIT_S = 2.0  # at exit, how long the writer may take to write what waits


class _Writer:
    """A worker handler's writing thread: batches in order, each in one write()."""

    def __init__(self, name: str, drop_line) -> None:
        self._drop_line = drop_line  # (lines dropped) -> the line that says so, in the handler's format
        self._queue: collections.deque = collections.deque()  # (stream, text or None: close it)
        self._queued_bytes = 0
        self._dropped_lines = 0
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"log writer {name}", daemon=True)
        self._thread.start()

    def put(self, stream, text: str) -> None:
        with self._lock:
            if self._queued_bytes + len(text) > MAX_QUEUED_BYTES:
                self._dropped_lines += text.count("\n")
                return
            if self._dropped_lines:  # said where the gap is: before the first batch kept after it
                text = self._drop_line(self._dropped_lines) + text
                self._dropped_lines = 0
            self._queue.append((stream, text))
            self._queued_bytes += len(text)
            self._lock.notify()

    def close_later(self, stream) -> None:
        """Close ``stream`` once what was queued for it is written (a reopen's old file)."""
        with self._lock:
            self._queue.append((stream, None))
            self._lock.notify()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(STOP_WAIT_S)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if not self._queue:
                    return
                stream, text = self._queue.popleft()
                if text is not None:
                    self._queued_bytes -= len(text)
            if text is None:
                stream.close()
                continue
            try:
                stream.write(text)
                stream.flush()
            except Exception:
                pass  # stderr gone: nowhere left to say so


class _ProcessNameFilter(logging.Filter):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.process_name = name

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_name = self.process_name
        return True


class _Formatter(logging.Formatter):
    """logging.Formatter's default asctime ("2026-12-07 14:26:13,387"), its seconds
    formatted once per second."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.time_text(record.created, record.msecs)

    def time_text(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._second_text = second, time.strftime(self.default_time_format,
                                                                    self.converter(created))
        return f"{self._second_text},{int(msecs):03d}"


class _Handler(logging.StreamHandler):
    """StreamHandler that, once ``batching`` is on, keeps INFO/DEBUG lines until flush()."""

    def __init__(self, stream, path: str | None = None) -> None:
        super().__init__(stream)
        self.path = path  # a file's name, for reopen(); None for stderr
        self.batching = False
        self.writer: _Writer | None = None  # a worker's: batches are written off its event loop
        self._lines: list[str] = []
        self._size = 0

    def emit(self, record: logging.LogRecord) -> None:
        if not self.batching:
            super().emit(record)
            return
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._add(line, record.levelno)

    def _add(self, line: str, levelno: int) -> None:
        if self._size + len(line) > BATCH_BYTES:
            self._write()
        self._lines.append(line)
        self._size += len(line)
        if levelno >= logging.WARNING:
            self._write()

    def flush(self) -> None:
        if self._lines:
            self._write()
        elif not self.batching:
            super().flush()
        # Batching and nothing batched: every record written so far was flushed with it.

    def reopen(self) -> None:
        """Write what is batched to the old file, then go on in a new one of the same name
        (a rotated file was renamed away: this creates it afresh). Raises OSError."""
        if self.path is None:
            return
        self.flush()
        new = open_log(self.path)
        old, self.stream = self.stream, new
        if self.writer is not None:
            self.writer.close_later(old)
        else:
            old.close()

    def drop_line(self, dropped: int) -> str:
        """The line that tells of lines the writer dropped, in this handler's format."""
        record = logging.LogRecord("fastsocks.logs", logging.WARNING, __file__, 0,
                                   "%d log lines dropped: the log's reader did not keep up", (dropped,), None)
        if self.formatter is not None and self.formatter._fmt == BARE_FORMAT:  # JSON lines: one more object
            return json.dumps({"ts": round(record.created, 3), "dropped_log_lines": dropped}) + self.terminator
        for flt in self.filters:
            flt.filter(record)
        return self.format(record) + self.terminator

    def close(self) -> None:
        """At exit: what is batched goes, and the writer writes what waits (a moment at most)."""
        self.flush()
        if self.writer is not None:
            self.writer.stop()
            self.writer = None
        super().close()

    def _write(self) -> None:
        text, self._lines, self._size = "".join(self._lines), [], 0
        if self.writer is not None:
            self.writer.put(self.stream, text)
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:
            pass  # stderr gone: nowhere left to say so (logging's own handleError prints there)


def info(logger: logging.Logger, msg: str, *args) -> None:
    """logger.info(msg, *args); see the module docstring for the direct path."""
    handler = _sole_handler(logger)
    if handler is None:
        logger.info(msg, *args)
        return
    if handler.formatter._fmt == BARE_FORMAT:
        handler._add(f"{msg % args}{handler.terminator}", logging.INFO)
        return
    created = time.time()  # as LogRecord: created, then msecs from it
    msecs = int((created - int(created)) * 1000) + 0.0
    handler._add(f"{handler.formatter.time_text(created, msecs)} {logging.getLevelName(logging.INFO)} "
                 f"[{handler.filters[0].process_name}] {logger.name}: {msg % args}{handler.terminator}",
                 logging.INFO)


def _sole_handler(logger: logging.Logger) -> _Handler | None:
    """This module's batching handler when it alone would see an INFO record of ``logger``,
    as logging would make and pass it; else None."""
    if not logger.isEnabledFor(logging.INFO) or logging.getLogRecordFactory() is not logging.LogRecord:
        return None
    node = logger
    # Up to the first logger with handlers: the root, or one that does not propagate (the
    # access logger with --access-log).
    while not node.handlers and node.parent is not None:
        if node.filters or not node.propagate or node.disabled:
            return None
        node = node.parent
    if node.parent is not None and node.propagate:
        return None  # handlers here and above
    handlers = node.handlers
    if node.filters or node.disabled or len(handlers) != 1 or type(handlers[0]) is not _Handler:
        return None
    handler = handlers[0]
    if (not handler.batching or handler.level > logging.INFO or len(handler.filters) != 1
            or type(handler.filters[0]) is not _ProcessNameFilter or type(handler.formatter) is not _Formatter
            or handler.formatter._fmt not in (FORMAT, BARE_FORMAT)):
        return None
    return handler


def open_log(path: str):
    return open(path, "a", encoding="utf-8", errors="backslashreplace")


def configure(level: str, access_log: str | None = None, access_format: str = "text") -> None:
    # What the format does not show is not computed per record (the logging HOWTO's
    # "Optimization"): the caller's file and line, thread, process and multiprocessing names.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = _Handler(sys.stderr)
    handler.setFormatter(_Formatter(FORMAT))
    handler.addFilter(_ProcessNameFilter("master"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    access = logging.getLogger("fastsocks.access")
    access.handlers[:] = []
    access.propagate = True
    if access_log is not None or access_format == "json":
        # open_log's OSError: the caller says so.
        own = _Handler(open_log(access_log), access_log) if access_log is not None else _Handler(sys.stderr)
        own.setFormatter(_Formatter(BARE_FORMAT if access_format == "json" else FORMAT))
        own.addFilter(_ProcessNameFilter("master"))
        access.handlers[:] = [own]
        access.propagate = False


def _handlers() -> list[logging.Handler]:
    return logging.getLogger().handlers + logging.getLogger("fastsocks.access").handlers


def reopen() -> None:
    """SIGUSR1: every log file opened anew by its name (logrotate's convention)."""
    for handler in _handlers():
        if isinstance(handler, _Handler):
            try:
                handler.reopen()
            except OSError as exc:
                logging.getLogger(__name__).error("cannot reopen the log file %s: %s; writing on to the old one",
                                                  handler.path, exc.strerror)


def set_process_name(name: str, batching: bool = False) -> None:
    """Called in a freshly forked worker: its records say which worker wrote them; with
    ``batching``, its INFO lines wait for flush()."""
    for handler in _handlers():
        for flt in handler.filters:
            if isinstance(flt, _ProcessNameFilter):
                flt.process_name = name
        if isinstance(handler, _Handler):
            handler.batching = batching


def write_off_loop(name: str) -> None:
    """A worker's batches from now on are written by a thread of each handler writing to a
    pipe, a socket or a terminal, never by its event loop (no thread survives a fork: each
    worker starts its own here). A regular file has no reader to stall: its writes go to
    the page cache, and the loop makes them itself, sparing every batch a thread's wake-up
    (measured: some 30 us of proxy CPU per connection on fastsocks bench cps)."""
    for handler in _handlers():
        if isinstance(handler, _Handler) and handler.writer is None and not _regular_file(handler.stream):
            handler.writer = _Writer(name, handler.drop_line)


def _regular_file(stream) -> bool:
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # no fd of its own (a test's stream): not a file
        return False


def flush() -> None:
    """Write what the handlers batched (a worker calls it once per loop turn)."""
    for handler in _handlers():
        handler.flush()
