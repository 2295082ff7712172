"""The processes of a run: a Supervisor starts each one in its own session and stops it by
its pid and its process group (so that no child outlives it), and stops whatever is still
running when the run ends, however it ends. Around them: free loopback ports, the SOCKS5
readiness probe, and start_server, which brings one server up and waits for it to answer.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

from comparison.servers import LOOPBACK, ServerSpec
from fastsocks.bench.targets import LISTEN_PORTS


class ServerError(RuntimeError):
    pass


class Supervisor:
    """Every process started through it and not yet stopped, by pid. As a context manager
    it stops all of them on the way out, on an error or an interrupt too."""

    def __init__(self) -> None:
        self.live: dict[int, subprocess.Popen] = {}

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def spawn(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``argv`` in its own session (so its process group holds its children)."""
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env)
        self.live[proc.pid] = proc
        return proc

    def stop_process(self, proc: subprocess.Popen, grace_s: float = 5.0) -> int | None:
        """SIGTERM the pid, wait, then SIGKILL its process group (it was started as its leader)."""
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    pass
            # Children (Dante's pools, fastsocks workers) share the group: none may outlive us.
            deadline = time.monotonic() + grace_s
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _group_alive(proc.pid) or proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        finally:
            self.live.pop(proc.pid, None)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in list(self.live.values()):
            self.stop_process(proc)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def signals_interrupt(signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                      ) -> Iterator[None]:
    """Inside, each of ``signals`` raises KeyboardInterrupt: Ctrl-C, kill and a closed terminal
    all end in the same clean-up (SIGINT explicitly too, since a shell starts background jobs
    with it ignored). The handlers before are back on the way out."""
    old_handlers = {sig: signal.signal(sig, _raise_interrupt) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def free_port(tries: int = 64) -> int:
    """A free loopback port for the next server, below the ephemeral range (as the bench's
    targets take theirs): after a fast connection-rate run every ephemeral port can be held
    by a socket in TIME_WAIT, and then bind(port 0) fails with EADDRINUSE for every later
    cell of the run."""
    low, high = LISTEN_PORTS
    for port in random.sample(range(low, high), tries):
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def socks_ready(port: int, timeout_s: float = 1.0) -> bool:
    """True when a SOCKS5 greeting offering 'no authentication' is accepted."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout_s) as sock:
            sock.sendall(b"\x05\x01\x00")
            reply = b""
            while len(reply) < 2:
                chunk = sock.recv(2 - len(reply))
                if not chunk:
                    return False
                reply += chunk
            return reply == b"\x05\x00"
    except OSError:
        return False


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` of a process's log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_server(spec: ServerSpec, workdir: Path, prefix: list[str], supervisor: Supervisor,
                 ready_timeout_s: float = 20.0, attempts: int = 3) -> tuple[subprocess.Popen, int, Path]:
    """Start ``spec`` on a free loopback port and wait until it answers SOCKS5 greetings."""
    last = ""
    for _ in range(attempts):
        port = free_port()
        log = workdir / f"{spec.name}-{port}.log"
        env = {**os.environ, "TMPDIR": str(workdir), **spec.env}
        proc = supervisor.spawn(prefix + spec.argv(port, workdir), log, env)
        deadline = time.monotonic() + ready_timeout_s
        good = 0
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            # Several in a row: with several workers every accept queue must be served.
            good = good + 1 if socks_ready(port) else 0
            if good >= 4:
                return proc, port, log
            time.sleep(0.02 if good else 0.05)
        code = supervisor.stop_process(proc)
        last = f"{spec.name} did not answer on {LOOPBACK}:{port} (exit code {code}):\n{log_tail(log)}"
    raise ServerError(last)
