"""The prefork master and its workers, as a user running `fastsocks` sees them: process
counts, signals, respawns, drains, log lines, file descriptors."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from support import alive, fastsocks_command, socks5_connect, wait_until


def fetch_echo(proxy, target, payload: bytes = b"ping") -> bytes:
    sock, (code, _, _) = socks5_connect(proxy, *target.address)
    with sock:
        assert code == 0
        sock.sendall(payload)
        data = b""
        while len(data) < len(payload):
            chunk = sock.recv(65536)
            assert chunk, "proxy closed early"
            data += chunk
        return data


def test_help_explains_the_options():
    out = subprocess.run(fastsocks_command() + ["--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for option in ("--listen", "--workers", "--accept-mode", "--graceful-timeout",
                   "--handshake-timeout", "--connect-timeout", "--idle-timeout"):
        assert option in out.stdout
    assert "127.0.0.1:1080" in out.stdout


@pytest.mark.parametrize("listen, message", [
    ("127.0.0.1:99999", "expected a port 0-65535"),
    ("localhost:1080", "the host must be an IP address"),
    ("::1:1080", "write IPv6 addresses as [ADDR]:PORT"),
])
def test_bad_listen_address_is_a_clear_error(listen, message):
    out = subprocess.run(fastsocks_command() + ["--listen", listen],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert f"--listen: '{listen}': {message}" in out.stderr


def test_first_line_says_where_and_how_many_workers(start_server, echo_target):
    server = start_server("--workers", "3")
    first = server.lines[0]
    assert f"listening on 127.0.0.1:{server.port}" in first and "3 workers" in first
    assert len(server.wait_workers(3)) == 3
    assert fetch_echo(server.address, echo_target) == b"ping"


@pytest.mark.parametrize("mode", ["reuseport", "shared"])
def test_every_worker_accepts_in_both_modes(start_server, echo_target, mode):
    server = start_server("--workers", "2", "--accept-mode", mode)
    server.wait_workers(2)
    for _ in range(200):
        assert fetch_echo(server.address, echo_target) == b"ping"
    assert server.stop() == 0
    summary = server.wait_for_log(r"accepted per worker \[(\d+), (\d+)\]")
    counts = [int(summary.group(1)), int(summary.group(2))]
    assert sum(counts) == 200
    if mode == "reuseport":
        assert min(counts) > 0, f"one worker got nothing: {counts}"


def test_killed_worker_is_replaced_and_the_port_keeps_answering(start_server, echo_target):
    server = start_server("--workers", "2")
    workers = server.wait_workers(2)
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    # While the slot is empty, the port still answers (the other worker, and the
    # socket stays open in the master).
    assert fetch_echo(server.address, echo_target) == b"ping"
    replaced = wait_until(lambda: (w := server.workers()) and len(w) == 2 and victim not in w and w,
                          what="a replacement worker")
    assert len(replaced) == 2
    server.wait_for_log(rf"worker \d \(pid {victim}\) killed by SIGKILL")
    for _ in range(50):
        assert fetch_echo(server.address, echo_target) == b"ping"


STOP_LINE = (r"stopped: accepted per worker \[(\d+)\], .*; per worker CPU s \[([\d.]+)\], "
             r"peak RSS MiB \[([\d.]+)\], peak open fds \[(\d+)\]")


def test_the_stop_line_says_what_each_worker_used_across_respawns(start_server, echo_target):
    """Per worker slot: CPU seconds over every generation (a killed worker's included), the
    peak RSS, and the peak of open fds (here: 20 sessions held open when the stop began)."""
    server = start_server("--workers", "1")
    (first,) = server.wait_workers(1)
    payload = os.urandom(64 << 10)
    for _ in range(200):
        assert fetch_echo(server.address, echo_target, payload) == payload
    with psutil.Process(first).oneshot():
        times, rss = psutil.Process(first).cpu_times(), psutil.Process(first).memory_info().rss
    os.kill(first, signal.SIGKILL)
    (second,) = wait_until(lambda: (w := server.workers()) and first not in w and w, what="a new worker")
    held = []
    for _ in range(20):
        sock, (code, _, _) = socks5_connect(server.address, *echo_target.address)
        assert code == 0
        held.append(sock)
    fds_held = psutil.Process(second).num_fds()
    server.proc.send_signal(signal.SIGTERM)
    server.wait_for_log("SIGTERM: draining")
    for sock in held:
        sock.close()
    assert server.stop() == 0
    accepted, cpu_s, rss_mib, fds = server.wait_for_log(STOP_LINE).groups()
    assert int(accepted) >= 20  # plus what the killed worker had written before it died
    assert float(cpu_s) >= times.user + times.system   # the killed worker's CPU is counted
    # The kernel's RSS counters run a few pages per thread behind; the unit must be MiB.
    assert 0.9 <= float(rss_mib) / (rss / (1 << 20)) <= 4
    assert int(fds) >= fds_held >= 40                  # two sockets per held session


def test_a_hung_worker_is_killed_and_replaced(start_server, echo_target):
    server = start_server("--workers", "1", "--worker-timeout", "2")
    (hung,) = server.wait_workers(1)
    os.kill(hung, signal.SIGSTOP)     # alive, but its heartbeat stops
    server.wait_for_log(rf"worker 0 \(pid {hung}\) stopped answering", timeout_s=15)
    wait_until(lambda: (w := server.workers()) and hung not in w, timeout_s=10, what="a new worker")
    assert fetch_echo(server.address, echo_target) == b"ping"


def test_sigterm_lets_a_running_transfer_finish_then_exits_zero(start_server, tcp_target):
    block = os.urandom(1 << 20)
    total_blocks = 40
    started = threading.Event()

    def slow_source(conn):
        conn.recv(16)
        for i in range(total_blocks):
            conn.sendall(block)
            if i == 2:
                started.set()
            time.sleep(0.02)

    target = tcp_target(slow_source)
    server = start_server("--workers", "1")
    sock, (code, _, _) = socks5_connect(server.address, *target.address)
    assert code == 0
    sock.sendall(b"go")
    result = {}

    def download():
        h, n = hashlib.sha256(), 0
        while chunk := sock.recv(1 << 16):
            h.update(chunk)
            n += len(chunk)
        result["digest"], result["bytes"] = h.hexdigest(), n

    reader = threading.Thread(target=download)
    reader.start()
    assert started.wait(10)
    server.proc.send_signal(signal.SIGTERM)
    server.wait_for_log("draining")
    # New connections are refused while the old one drains.
    with pytest.raises(OSError):
        socks5_connect(server.address, *target.address, timeout_s=2)
    reader.join(60)
    sock.close()
    assert result["bytes"] == total_blocks * len(block)
    assert result["digest"] == hashlib.sha256(block * total_blocks).hexdigest()
    assert server.proc.wait(30) == 0
    assert server.count_log(r"reply=succeeded .* end=eof") == 1


def test_graceful_timeout_cuts_sessions_that_never_end(start_server, echo_target):
    server = start_server("--workers", "1", "--graceful-timeout", "1")
    sock, (code, _, _) = socks5_connect(server.address, *echo_target.address)
    assert code == 0
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    sock.settimeout(5)
    assert sock.recv(10) == b""   # the proxy closed the idle session
    assert server.count_log("graceful timeout, closing 1 sessions") == 1
    sock.close()


def test_sigquit_stops_at_once(start_server, echo_target):
    server = start_server("--workers", "2")
    server.wait_workers(2)
    sock, (code, _, _) = socks5_connect(server.address, *echo_target.address)
    assert code == 0
    server.proc.send_signal(signal.SIGQUIT)
    server.proc.wait(10)
    sock.settimeout(5)
    assert sock.recv(10) == b""
    sock.close()


def test_workers_exit_when_the_master_dies(start_server):
    server = start_server("--workers", "2")
    workers = server.wait_workers(2)
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(10)

    def all_gone():
        return not any(alive(pid) for pid in workers)

    wait_until(all_gone, timeout_s=10, what="orphaned workers to exit")


def test_relayed_sessions_leak_no_fd_in_the_worker(start_server, echo_target):
    server = start_server("--workers", "1")
    (worker,) = server.wait_workers(1)
    assert fetch_echo(server.address, echo_target) == b"ping"   # warm up lazily made fds
    server.wait_for_log("fastsocks.access")                    # and its session is closed
    before = psutil.Process(worker).num_fds()
    for i in range(100):
        payload = os.urandom(100_000 if i % 10 == 0 else 64)
        assert fetch_echo(server.address, echo_target, payload) == payload
    # A few that end with the client resetting, and a few refused.
    for _ in range(10):
        sock, (code, _, _) = socks5_connect(server.address, *echo_target.address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    wait_until(lambda: server.count_log("fastsocks.access") >= 111, what="all access lines")
    assert wait_until(lambda: psutil.Process(worker).num_fds() == before or None, timeout_s=10,
                      what=f"worker fds back to {before}")


def test_a_worker_boot_error_stops_the_master_with_a_clear_message(tmp_path):
    """A source checkout run without building the extension: the workers cannot load the
    relay engine, and the master stops with a message instead of respawning them forever."""
    import shutil
    import sysconfig

    import fastsocks

    package = os.path.dirname(fastsocks.__file__)
    shutil.copytree(package, tmp_path / "fastsocks",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.pyx", "*.c"))
    # -S: no site-packages .pth files, so the editable install's finder cannot hand the child
    # this checkout's built engine; the dependencies come from site-packages by PYTHONPATH.
    site_packages = dict.fromkeys(sysconfig.get_path(name) for name in ("purelib", "platlib"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *site_packages]))
    proc = subprocess.run([sys.executable, "-S", "-m", "fastsocks", "--listen", "127.0.0.1:0", "--workers", "2"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "the relay engine is not built" in proc.stderr
    assert "could not start" in proc.stderr
    assert "respawning" not in proc.stderr
