"""SIGHUP under load refuses and resets nothing: connections keep opening and streaming
through ten reloads, valid and broken, with zero failures and every byte checked."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

from support import recv_exact, socks5_connect

RELOADS = 10
CLIENTS = 4
CHUNK = 16 * 1024


def valid_config(port: int, generation: int) -> str:
    # Each valid generation changes the rules (a deny for a port nobody uses), so the
    # reload really swaps rule sets under the running sessions.
    return f"""
[limits]
max_sessions_per_client = 1000

[[rules]]
action = "deny"
port = [{40000 + generation}]

[[rules]]
action = "allow"
dest = ["127.0.0.1"]
port = [{port}]
"""


class Load:
    """Short sessions on CLIENTS threads and one long stream, all checking every byte."""

    def __init__(self, proxy, port: int) -> None:
        self.proxy, self.port = proxy, port
        self.stop = threading.Event()
        self.attempted = self.failed = 0
        self.bytes_checked = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.short_sessions, args=(i,), daemon=True) for i in range(CLIENTS)]
        self.threads.append(threading.Thread(target=self.long_stream, daemon=True))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def note(self, ok: bool, checked: int, why: str = "") -> None:
        with self.lock:
            self.attempted += 1
            self.bytes_checked += checked
            if not ok:
                self.failed += 1
                self.errors.append(why)

    def echo_session(self, payload: bytes) -> None:
        sock, (code, _, _) = socks5_connect(self.proxy, "127.0.0.1", self.port)
        with sock:
            if code != 0:
                raise ConnectionError(f"reply {code}")
            sock.sendall(payload)
            got = recv_exact(sock, len(payload))
        if hashlib.sha256(got).digest() != hashlib.sha256(payload).digest():
            raise ValueError("echoed bytes differ")

    def short_sessions(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            payload = os.urandom(CHUNK) + f"{i}:{n}".encode()
            try:
                self.echo_session(payload)
            except (OSError, ValueError) as exc:
                self.note(False, 0, f"client {i} session {n}: {exc}")
            else:
                self.note(True, len(payload))

    def long_stream(self) -> None:
        """One session open across every reload, a chunk each 10 ms."""
        try:
            sock, (code, _, _) = socks5_connect(self.proxy, "127.0.0.1", self.port)
        except OSError as exc:
            self.note(False, 0, f"long stream: {exc}")
            return
        checked = 0
        with sock:
            try:
                if code != 0:
                    raise ConnectionError(f"reply {code}")
                while not self.stop.is_set():
                    payload = os.urandom(CHUNK)
                    sock.sendall(payload)
                    if recv_exact(sock, len(payload)) != payload:
                        raise ValueError("echoed bytes differ")
                    checked += len(payload)
                    time.sleep(0.01)
            except (OSError, ValueError) as exc:
                self.note(False, checked, f"long stream: {exc}")
                return
        self.note(True, checked)


def test_ten_reloads_under_load_lose_nothing(start_server, tmp_path, echo_target):
    config = tmp_path / "fastsocks.toml"
    config.write_text(valid_config(echo_target.port, 0))
    server = start_server("--config", str(config), "--workers", "2")
    load = Load(server.address, echo_target.port)
    load.start()
    try:
        time.sleep(0.3)
        for generation in range(1, RELOADS + 1):
            broken = generation % 2 == 0
            config.write_text("[[rules]]\naction = 'perhaps'\n" if broken else valid_config(echo_target.port, generation))
            os.kill(server.pid, signal.SIGHUP)
            time.sleep(0.3)
    finally:
        load.finish()
    assert load.errors == []
    assert load.failed == 0
    assert load.attempted > 2 * RELOADS  # sessions did run during the reloads
    assert load.bytes_checked > RELOADS * CHUNK
    assert server.count_log(r"SIGHUP: reloaded") == RELOADS // 2
    assert server.count_log(r"SIGHUP: keeping the current configuration") == RELOADS // 2
    assert server.count_log(r"ERROR|CRITICAL|Traceback") == RELOADS // 2  # only the refusals
    print(f"reload under load: {load.attempted} sessions, {load.failed} failed, {load.bytes_checked} bytes checked")
