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
