"""Upgrade without a dropped connection: a new master, from the code installed now, takes
over the very listening sockets of the running one.

Theory of operation
-------------------
SIGUSR2 (or ``fastsocks upgrade``) to the master: it forks a child that execs the command
line the master was started with (``sys.orig_argv``: the interpreter loads the code
installed *now*). The child inherits every listening socket, the metrics socket and the
write end of a pipe; ``FASTSOCKS_UPGRADE`` in its environment says which fd is which
(``Inheritance``). The new master reads its configuration as at any start, checks that
the sockets it inherits are the ones it would have bound, forks its workers, and once each
has booted writes one byte to the pipe. From then on both generations accept on the same
sockets, so a connection waiting in a backlog is taken by one or the other, never lost.

The old master, on that byte, hands its place over (systemd: ``MAINPID=``), stops
accepting and serving metrics, and drains: its workers finish their sessions within the
graceful timeout, then it exits. If the pipe closes without the byte (the new master
failed: a broken config, a changed listen address, an import error), or nothing comes
within UPGRADE_TIMEOUT_S, the old master stops the child, logs why and keeps serving.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import MutableMapping
from dataclasses import dataclass

ENVIRON = "FASTSOCKS_UPGRADE"
UPGRADE_TIMEOUT_S = 60.0  # the new master's whole start: imports, config, workers booted
READY = b"R"


@dataclass(frozen=True, slots=True)
class Inheritance:
    """What a new master gets from the old one, by fd number."""
    rows: tuple[tuple[int, ...], ...]  # per listen address: its socket, or one per slot (reuseport)
    proxied: tuple[bool, ...]          # per address: its clients open with a PROXY header
    reuseport: bool
    activated: bool                    # the sockets came from systemd, not from listen
    metrics_fd: int | None
    ready_fd: int
    old_pid: int

    def to_environ(self) -> str:
        return json.dumps({"rows": self.rows, "proxied": self.proxied, "reuseport": self.reuseport,
                           "activated": self.activated, "metrics_fd": self.metrics_fd,
                           "ready_fd": self.ready_fd, "old_pid": self.old_pid})

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str]) -> Inheritance | None:
        """The inheritance this process was started with, taken out of the environment
        (nothing it starts inherits it); None at an ordinary start. ValueError if garbled."""
        text = environ.pop(ENVIRON, "")
        if not text:
            return None
        try:
            given = json.loads(text)
            return cls(tuple(tuple(int(fd) for fd in row) for row in given["rows"]),
                       tuple(bool(p) for p in given["proxied"]), bool(given["reuseport"]),
                       bool(given["activated"]),
                       None if given["metrics_fd"] is None else int(given["metrics_fd"]),
                       int(given["ready_fd"]), int(given["old_pid"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{ENVIRON}={text!r}: {exc}") from None

    def sockets(self) -> list[list[socket.socket]]:
        """The listening sockets, close-on-exec again."""
        rows = [[socket.socket(fileno=fd) for fd in row] for row in self.rows]
        for row in rows:
            for sock in row:
                sock.set_inheritable(False)
        return rows

    def metrics_socket(self) -> socket.socket | None:
        if self.metrics_fd is None:
            return None
        sock = socket.socket(fileno=self.metrics_fd)
        sock.set_inheritable(False)
        return sock

    def announce_ready(self) -> None:
        """Tell the old master that this one serves: it drains from now on."""
        try:
            os.write(self.ready_fd, READY)
        except OSError:
            pass  # the old master is gone already: nobody to tell
        os.close(self.ready_fd)


@dataclass(slots=True)
class Successor:
    """The old master's view of the new one while it starts."""
    pid: int
    ready_fd: int  # the pipe's read end
    started_s: float
    exit_code: int | None = None

    def overdue(self) -> bool:
        return time.monotonic() - self.started_s > UPGRADE_TIMEOUT_S

    def read_ready(self) -> bool | None:
        """True: it serves. False: the pipe closed without a word (it failed). None: not yet."""
        try:
            data = os.read(self.ready_fd, 1)
        except BlockingIOError:
            return None
        return data == READY

    def close(self) -> None:
        if self.ready_fd >= 0:
            os.close(self.ready_fd)
            self.ready_fd = -1


def exec_successor(inheritance: Inheritance, environ: dict[str, str]) -> None:
    """In the forked child: make the inherited fds survive exec, then become the new
    master. Never returns: if exec fails the child says why on stderr and exits 1."""
    try:
        fds = [fd for row in inheritance.rows for fd in row] + [inheritance.ready_fd]
        if inheritance.metrics_fd is not None:
            fds.append(inheritance.metrics_fd)
        for fd in fds:
            os.set_inheritable(fd, True)
        environ = dict(environ, **{ENVIRON: inheritance.to_environ()})
        argv = list(sys.orig_argv) or [sys.executable]
        os.execve(sys.executable, argv, environ)
    except BaseException as exc:  # a forked child must never return
        try:
            os.write(2, f"fastsocks: upgrade: cannot start {sys.executable}: {exc}\n".encode())
        finally:
            os._exit(1)
