"""A log reader that stalls cannot stop a worker: nobody reads the server's stderr pipe
(it fills after 64 KiB), yet thousands of sessions go on being served; lines past the
queue's cap are dropped, counted, and said to be dropped once the reader is back."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

import psutil

from fastsocks import logs
from support import accepts, fastsocks_command, free_port, socks5_connect, wait_until

SESSIONS = 3000  # some 450 KB of access lines: the pipe holds 64 KiB


def test_sessions_go_on_while_nobody_reads_the_log(echo_target):
    port = free_port()
    proc = subprocess.Popen(fastsocks_command() + ["--listen", f"127.0.0.1:{port}", "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until(lambda: accepts(port), what="the server listening")
        for n in range(SESSIONS):
            sock, (code, _, _) = socks5_connect(("127.0.0.1", port), "127.0.0.1", echo_target.port, timeout_s=10)
            with sock:
                assert code == 0, f"session {n}"
                sock.sendall(b"x")
                assert sock.recv(1) == b"x", f"session {n}"
        assert proc.poll() is None
        # The reader comes back: what waited is written, in order, whole lines.
        proc.send_signal(signal.SIGTERM)
        text = proc.stderr.read().decode()
        assert proc.wait(30) == 0
        lines = text.splitlines()
        assert sum(1 for line in lines if "fastsocks.access: client=127.0.0.1:" in line) > 1000
        assert all(line.startswith("20") for line in lines), "a line was cut or mixed with another"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


class StalledStream:
    """A stream whose write() waits until the test lets it go, then keeps what it got."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.written: list[str] = []
        self.closed = False

    def write(self, text: str) -> None:
        self.go.wait(10)
        self.written.append(text)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_past_the_cap_lines_are_dropped_and_the_next_batch_says_how_many():
    stream = StalledStream()
    writer = logs._Writer("worker 9", lambda n: f"DROPPED {n}\n")
    try:
        batch = "x" * 99 + "\n"
        writer.put(stream, batch)  # taken by the thread, which now waits in write()
        wait_until(lambda: writer._queued_bytes == 0, what="the first batch taken")
        fits = logs.MAX_QUEUED_BYTES // len(batch)
        for _ in range(fits + 50):
            writer.put(stream, batch)
        stream.go.set()
        writer.put(stream, "after\n")
        wait_until(lambda: stream.written and stream.written[-1].endswith("after\n"), what="everything written")
    finally:
        stream.go.set()
        writer.stop()
    assert len(stream.written) == 1 + fits + 1
    assert stream.written[-1] == "DROPPED 50\nafter\n"  # said once, before the next batch


def test_a_worker_writes_its_lines_off_its_loop():
    """The worker's handlers each have a writer thread (set up after the fork)."""
    before = threading.active_count()
    logs.configure("info")
    try:
        logs.set_process_name("worker 9", batching=True)
        read_end, write_end = os.pipe()  # stderr as a service manager gives it: a pipe
        pipe = os.fdopen(write_end, "w")
        logs._handlers()[0].stream = pipe
        logs.write_off_loop("worker 9")
        handler = logs._handlers()[0]
        assert handler.writer is not None and threading.active_count() == before + 1
    finally:
        logs.set_process_name("master", batching=False)
        for handler in logs._handlers():
            handler.close()
        pipe.close()
        os.close(read_end)
        logs.configure("info")
    assert psutil.Process().num_threads() >= 1


def test_a_log_file_is_written_by_the_loop_itself(tmp_path):
    """A regular file has no reader to stall: no thread, no wake-up per batch."""
    before = threading.active_count()
    logs.configure("info", str(tmp_path / "access.log"))
    try:
        logs.set_process_name("worker 9", batching=True)
        logs.write_off_loop("worker 9")
        access = logging.getLogger("fastsocks.access").handlers[0]
        assert access.writer is None
        logs.info(logging.getLogger("fastsocks.access"), "client=%s reply=succeeded", "127.0.0.1:1")
        logs.flush()
        assert "client=127.0.0.1:1 reply=succeeded" in (tmp_path / "access.log").read_text()
    finally:
        logs.set_process_name("master", batching=False)
        for handler in logs._handlers():
            handler.close()
        logs.configure("info")
    assert threading.active_count() <= before + 1  # the root's (stderr here) may have one
