"""The worker's log handler: batched INFO lines go out whole, at most 4 KiB a write (one
write to a pipe of up to PIPE_BUF bytes is never interleaved with another worker's), a
WARNING at once; the cached timestamp reads as logging's own."""

from __future__ import annotations

import logging

import pytest

from fastsocks import logs


class Stream:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


@pytest.fixture
def handler():
    stream = Stream()
    handler = logs._Handler(stream)
    handler.setFormatter(logs._Formatter(logs.FORMAT))
    handler.addFilter(logs._ProcessNameFilter("worker 3"))
    handler.batching = True
    yield handler, stream


def record(level: int, msg: str, created: float = 1_765_000_000.25) -> logging.LogRecord:
    rec = logging.LogRecord("fastsocks.access", level, __file__, 1, msg, None, None)
    rec.created, rec.msecs = created, (created % 1) * 1000
    return rec


def emit(handler, rec) -> None:
    handler.handle(rec)  # filters, then emit, as logging calls it


def test_info_lines_wait_for_flush_and_go_out_whole_in_writes_of_at_most_4_kib(handler):
    h, stream = handler
    for i in range(300):
        emit(h, record(logging.INFO, f"client=127.0.0.1:{40000 + i} proto=socks5 reply=succeeded"))
    written_before_flush = sum(len(w) for w in stream.writes)
    h.flush()
    text = "".join(stream.writes)
    lines = text.splitlines()
    assert len(lines) == 300 and written_before_flush < len(text)
    assert all(len(w.encode()) <= logs.BATCH_BYTES and w.endswith("\n") for w in stream.writes)
    assert lines[0].endswith("INFO [worker 3] fastsocks.access: client=127.0.0.1:40000 proto=socks5 reply=succeeded")
    assert [int(line.split(":")[-1].split()[0]) for line in lines] == list(range(40000, 40300))


def test_a_warning_is_written_at_once_with_what_was_batched_before_it(handler):
    h, stream = handler
    emit(h, record(logging.INFO, "first"))
    assert stream.writes == []
    emit(h, record(logging.WARNING, "second"))
    assert len(stream.writes) == 1 and stream.writes[0].count("\n") == 2
    assert "INFO [worker 3] fastsocks.access: first" in stream.writes[0]
    assert "WARNING [worker 3] fastsocks.access: second" in stream.writes[0]


def test_without_batching_every_record_is_written_at_once(handler):
    h, stream = handler
    h.batching = False
    emit(h, record(logging.INFO, "one"))
    emit(h, record(logging.INFO, "two"))
    assert len(stream.writes) == 2


@pytest.mark.parametrize("created", [1_765_000_000.0, 1_765_000_000.999, 1_765_000_001.5, 1_765_003_600.042])
def test_the_cached_timestamp_reads_as_loggings_default(created):
    ours, theirs = logs._Formatter(logs.FORMAT), logging.Formatter(logs.FORMAT)
    rec = record(logging.INFO, "x", created)
    assert ours.formatTime(rec) == theirs.formatTime(rec)
    later = record(logging.INFO, "x", created + 0.5)
    assert ours.formatTime(later) == theirs.formatTime(later)


# --------------------------------------------------------------------- the direct path


@pytest.fixture
def worker_logging(monkeypatch):
    """logs.configure() as a worker has it (batching), into a Stream; restored after."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging._srcfile)
    logs.configure("info")
    logs.set_process_name("worker 3", batching=True)
    stream = Stream()
    root.handlers[0].stream = stream
    made = []
    real = logging.Logger.makeRecord
    monkeypatch.setattr(logging.Logger, "makeRecord", lambda self, *a, **k: made.append(1) or real(self, *a, **k))
    yield stream, made
    root.handlers[:], logging._srcfile = saved[0], saved[2]
    root.setLevel(saved[1])


MSG = ("%s reply=succeeded up=%d down=%d duration_s=%.3f end=%s",
       "client=[::1]:4000 proto=socks5 cmd=connect dest=127.0.0.1:80", 64, 128, 0.0125, "eof")


def only_ours() -> None:
    """Without pytest's own log handlers, which it adds to the root for each test's call."""
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if type(h) is logs._Handler]


def lines_of(stream, call) -> list[str]:
    call()
    logs.flush()
    text = "".join(stream.writes)
    stream.writes.clear()
    return text.splitlines()


def test_a_line_only_this_handler_would_see_is_written_as_logging_would_without_a_record(worker_logging):
    stream, made = worker_logging
    only_ours()
    access = logging.getLogger("fastsocks.access")
    direct = lines_of(stream, lambda: logs.info(access, *MSG))
    assert made == []  # no LogRecord: the direct path
    through_logging = lines_of(stream, lambda: access.info(*MSG))
    assert made == [1]
    assert len(direct) == len(through_logging) == 1
    stamp = len("2026-12-07 14:26:13,387")
    assert direct[0][stamp:] == through_logging[0][stamp:]
    assert direct[0][stamp:] == (" INFO [worker 3] fastsocks.access: client=[::1]:4000 proto=socks5 "
                                 "cmd=connect dest=127.0.0.1:80 reply=succeeded up=64 down=128 duration_s=0.013 end=eof")
    assert len(logging.Formatter(logs.FORMAT).formatTime(logging.makeLogRecord({}))) == stamp


@pytest.mark.parametrize("change", ["a handler", "a logger filter", "level warning", "a record factory", "no batching"])
def test_anything_else_that_would_see_the_record_gets_it(worker_logging, change, monkeypatch):
    stream, made = worker_logging
    only_ours()
    access = logging.getLogger("fastsocks.access")
    seen: list[logging.LogRecord] = []
    if change == "a handler":
        extra = logging.Handler()
        extra.emit = seen.append
        monkeypatch.setattr(logging.getLogger("fastsocks"), "handlers", [extra])
    elif change == "a logger filter":
        monkeypatch.setattr(access, "filters", [lambda rec: seen.append(rec) or True])
    elif change == "level warning":
        logging.getLogger().setLevel(logging.WARNING)
        access.manager._clear_cache()
    elif change == "a record factory":
        factory = logging.getLogRecordFactory()
        monkeypatch.setattr(logging, "_logRecordFactory", lambda *a, **k: seen.append(1) or factory(*a, **k))
    else:
        monkeypatch.setattr(logging.getLogger().handlers[0], "batching", False)
    lines = lines_of(stream, lambda: logs.info(access, *MSG))
    if change == "level warning":
        assert lines == [] and made == []
        return
    assert made == [1] and (change == "no batching" or len(seen) == 1)
    assert len(lines) == 1 and "end=eof" in lines[0]
