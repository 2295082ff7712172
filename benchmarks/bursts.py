"""What a burst leaves behind in a fastsocks server: its process tree's PSS and open fds, a
fresh server per burst, measured from the outside before the burst and a while after it.

    python benchmarks/bursts.py                       # all four bursts, 2 workers
    python benchmarks/bursts.py --bursts streams,passwords --settle 6 --json out.json

The bursts (each bounded, loopback only):
    streams     200 parallel streams through the proxy, 5 MB each way, every byte checked
    passwords   500 wrong passwords from one address, 8 in parallel (the address is blocked
                after max_failures, as designed: the rest are closed at accept)
    short       3000 short connections: greeting, CONNECT, 64 B echo, close
    halfopen    2000 handshakes that never finish, cut at the handshake deadline

tests/integration/test_bursts.py runs the same bursts and asserts the server gives back
what they took; this prints the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from fastsocks import rlimit

LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
PASSWORD_USER, PASSWORD = b"alice", b"correct horse"


@dataclass(frozen=True)
class Usage:
    pss_bytes: int
    fds: int

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.pss_bytes - other.pss_bytes, self.fds - other.fds)


def tree_usage(pid: int) -> Usage:
    """PSS and open fds of a process and its children (the master and its workers)."""
    root = psutil.Process(pid)
    pss = fds = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess), proc.oneshot():
            pss += proc.memory_full_info().pss
            fds += proc.num_fds()
    return Usage(pss, fds)


# --------------------------------------------------------------------- a server and a target


class Proxy:
    """``fastsocks`` on a free loopback port, its log collected; stopped by pid."""

    def __init__(self, command: list[str], args: list[str]) -> None:
        self.proc = subprocess.Popen([*command, "--listen", "127.0.0.1:0", *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 20
        while (port := self._port()) is None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("fastsocks did not start:\n" + "\n".join(self.lines))
            time.sleep(0.02)
        self.address = ("127.0.0.1", port)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def _port(self) -> int | None:
        for line in list(self.lines):
            if match := LISTENING.search(line):
                return int(match.group(1))
        return None

    def workers(self, n: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(psutil.Process(self.proc.pid).children()) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} workers did not start")
            time.sleep(0.02)

    def usage(self) -> Usage:
        return tree_usage(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._reader.join(5)


class Target:
    """A loopback server: echoes, or (after b"S" + 8-byte size) sends that many pattern
    bytes while reading as many, which it checks."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.address = self.sock.getsockname()
        self.bad = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            first = conn.recv(65536)
            if first[:1] != b"S":
                while first:
                    conn.sendall(first)
                    first = conn.recv(65536)
                return
            size = int.from_bytes(first[1:9], "big")
            sender = threading.Thread(target=_send_pattern, args=(conn, size))
            sender.start()
            if _read_pattern(conn, size, first[9:]) != size:
                self.bad += 1
            sender.join()

    def close(self) -> None:
        self.sock.close()


def _pattern(offset: int, n: int) -> bytes:
    block = hashlib.sha256(b"fastsocks burst").digest() * 2048  # 64 KiB, repeated
    start = offset % len(block)
    out = (block[start:] + block * (n // len(block) + 2))[:n]
    return out


def _send_pattern(sock: socket.socket, size: int) -> None:
    sent = 0
    while sent < size:
        chunk = _pattern(sent, min(65536, size - sent))
        sock.sendall(chunk)
        sent += len(chunk)


def _read_pattern(sock: socket.socket, size: int, already: bytes = b"") -> int:
    """How many bytes of the pattern arrived intact (stops at the first wrong one)."""
    got, data = 0, already
    while got < size:
        if not data:
            data = sock.recv(65536)
            if not data:
                break
        if data != _pattern(got, len(data)):
            break
        got += len(data)
        data = b""
    return got


# --------------------------------------------------------------------- SOCKS5, client side


def socks5(proxy, target, timeout_s: float = 20.0, source: str | None = None) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(timeout_s)
    if source:
        sock.bind((source, 0))
    sock.connect(proxy)
    host, port = target
    sock.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big"))
    reply = _recv_exact(sock, 12)
    if reply[:2] != b"\x05\x00" or reply[3] != 0:
        sock.close()
        raise ConnectionError(f"SOCKS5 refused: {reply!r}")
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def login(proxy, password: bytes, source: str = "127.0.0.1") -> str:
    """'ok', 'failed' or 'closed' (turned away at accept)."""
    with socket.socket() as sock:
        sock.settimeout(20)
        sock.bind((source, 0))
        sock.connect(proxy)
        try:
            sock.sendall(b"\x05\x01\x02")
            if sock.recv(2) != b"\x05\x02":
                return "closed"
            sock.sendall(b"\x01" + bytes([len(PASSWORD_USER)]) + PASSWORD_USER + bytes([len(password)]) + password)
            return "ok" if _recv_exact(sock, 2) == b"\x01\x00" else "failed"
        except (ConnectionError, OSError):
            return "closed"


# --------------------------------------------------------------------- the bursts


def burst_streams(proxy, target: Target, streams: int = 200, size: int = 5_000_000) -> dict:
    def one(i: int) -> int:
        with socks5(proxy, target.address) as sock:
            sock.sendall(b"S" + size.to_bytes(8, "big"))
            sender = threading.Thread(target=_send_pattern, args=(sock, size))
            sender.start()
            got = _read_pattern(sock, size)
            sender.join()
            return got
    started = time.monotonic()
    with ThreadPoolExecutor(streams) as pool:
        got = list(pool.map(one, range(streams)))
    seconds = time.monotonic() - started
    intact = sum(1 for n in got if n == size) if not target.bad else 0
    return {"streams": streams, "intact": intact, "mb_per_s": round(2 * streams * size / seconds / 1e6, 1)}


def burst_passwords(proxy, attempts: int = 500, parallel: int = 8) -> dict:
    with ThreadPoolExecutor(parallel) as pool:
        outcomes = list(pool.map(lambda i: login(proxy, b"guess %d" % i), range(attempts)))
    return {outcome: outcomes.count(outcome) for outcome in ("ok", "failed", "closed")}


def burst_short(proxy, target: Target, count: int = 3000, parallel: int = 16) -> dict:
    def one(i: int) -> bool:
        # 127.0.0.1-16 as sources: thousands of TIME_WAIT sockets from one address make
        # every connect() search for a free port.
        with socks5(proxy, target.address, source=f"127.0.0.{1 + i % 16}") as sock:
            sock.sendall(b"x" * 64)
            return _recv_exact(sock, 64) == b"x" * 64
    with ThreadPoolExecutor(parallel) as pool:
        ok = sum(pool.map(one, range(count)))
    return {"connections": count, "echoed": ok}


def burst_halfopen(proxy, count: int = 2000) -> dict:
    """Open them all, each with half a greeting; wait until the server cuts every one."""
    with contextlib.suppress(ValueError, OSError):
        rlimit.raise_fd_limit(count + 256)  # this process holds them all at once
    socks = []
    for i in range(count):
        sock = socket.socket()
        sock.bind((f"127.0.0.{1 + i % 16}", 0))
        sock.connect(proxy)
        sock.sendall(b"\x05")
        socks.append(sock)
    cut = 0
    for sock in socks:
        sock.settimeout(60)
        with contextlib.suppress(OSError):
            if sock.recv(1) == b"":
                cut += 1
        sock.close()
    return {"handshakes": count, "cut": cut}


@dataclass
class Result:
    burst: str
    outcome: dict
    before: Usage
    grown: Usage


def settled(seconds: float) -> Callable[[Proxy, Usage], Usage]:
    """What is left ``seconds`` after the clients went away."""
    def after(proxy: Proxy, before: Usage) -> Usage:
        time.sleep(seconds)
        return proxy.usage() - before
    return after


def run_burst(name: str, command: list[str], workers: int = 2,
              left: Callable[[Proxy, Usage], Usage] = settled(6.0)) -> Result:
    """A fresh server, warmed up by a few sessions, measured; the burst; then ``left`` says
    what it left behind. The server and the target are stopped however it ends."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--workers", str(workers)]
        if name == "passwords":
            users = Path(tmp) / "users.txt"
            users.write_text(_users_line())
            args += ["--users", str(users)]
        if name == "halfopen":
            args += ["--handshake-timeout", "3"]
        proxy = Proxy(command, args)
        target = Target()
        try:
            proxy.workers(workers)
            warm_up(proxy.address, target, name)
            time.sleep(1.0)
            before = proxy.usage()
            outcome = BURSTS[name](proxy.address, target)
            return Result(name, outcome, before, left(proxy, before))
        finally:
            proxy.stop()
            target.close()


def warm_up(proxy, target: Target, name: str) -> None:
    """What every server does in its first seconds: a few sessions per worker."""
    if name == "passwords":
        return  # the burst's own first checks are what it takes
    for i in range(32):
        with socks5(proxy, target.address, source=f"127.0.0.{1 + i % 16}") as sock:
            sock.sendall(b"warm")
            _recv_exact(sock, 4)


def _users_line() -> str:
    from fastsocks.users import hash_password
    return f"{PASSWORD_USER.decode()}:{hash_password(PASSWORD)}\n"


BURSTS = {
    "streams": lambda proxy, target: burst_streams(proxy, target),
    "passwords": lambda proxy, target: burst_passwords(proxy),
    "short": lambda proxy, target: burst_short(proxy, target),
    "halfopen": lambda proxy, target: burst_halfopen(proxy),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bursts", default=",".join(BURSTS), help="comma-separated: " + ", ".join(BURSTS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--settle", type=float, default=6.0, help="seconds after the burst (default 6)")
    parser.add_argument("--fastsocks", default=None, help="the server command (default: this Python's fastsocks)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    command = args.fastsocks.split() if args.fastsocks else [sys.executable, "-m", "fastsocks"]
    results = []
    for name in args.bursts.split(","):
        result = run_burst(name, command, args.workers, settled(args.settle))
        results.append(result)
        before, grown = result.before, result.grown
        print(f"{name:<10} {json.dumps(result.outcome)}  PSS {before.pss_bytes / 2**20:.1f} MiB "
              f"{grown.pss_bytes / 2**20:+.1f}, fds {before.fds} {grown.fds:+d}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
