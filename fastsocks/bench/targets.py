"""The built-in target: echo, bulk source and bulk sink on one loopback port.

The compiled ``TargetServer`` runs in a forked child, so that it has a core of its own
and never shares the load generator's. The child serves until its stop pipe reports
EOF: when we close our end, and just as well when we die and the kernel closes it for
us, so no exit path of ours leaves a target behind. ``serve_forever`` runs the same
server in the foreground for ``fastsocks bench serve``.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
import socket
import sys
import traceback
from collections.abc import Callable

from fastsocks.bench._loadgen import Pattern, TargetServer
from fastsocks.bench.params import Endpoint
from fastsocks.bench.proctree import process_cpu_seconds, reap
from fastsocks.rlimit import raise_fd_limit

LOOPBACK = "127.0.0.1"
BACKLOG = 4096
LISTEN_PORTS = (10000, 32768)  # below Linux's default ephemeral range (32768-60999)


def lift_fd_limit() -> int:
    """As far as the hard limit allows (idle runs hold many sockets); the limit now."""
    with contextlib.suppress(ValueError, OSError):
        raise_fd_limit()
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def listening_socket(endpoint: Endpoint) -> socket.socket:
    family = socket.AF_INET6 if endpoint.is_ipv6 else socket.AF_INET
    sock = socket.create_server((endpoint.host, endpoint.port), family=family, backlog=BACKLOG)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class TargetProcess:
    """The target server in a child process, listening on 127.0.0.1 only."""

    def __init__(self, pattern: Pattern) -> None:
        self.pattern = pattern
        self.pid: int | None = None
        self.stop_fd: int | None = None  # our end of the stop pipe; children must close it
        self.endpoint: Endpoint | None = None

    def start(self) -> Endpoint:
        sock, udp = listening_pair(Endpoint(LOOPBACK, 0))
        with sock, udp:
            stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
            pid = os.fork()
            if pid == 0:
                os.close(stop_w)
                _serve_in_child(sock, stop_r, self.pattern, udp)
            os.close(stop_r)
            self.pid, self.stop_fd = pid, stop_w
            self.endpoint = Endpoint(LOOPBACK, sock.getsockname()[1])
        return self.endpoint

    def cpu_s(self) -> float | None:
        return None if self.pid is None else process_cpu_seconds(self.pid)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the stop pipe, reap the child; SIGKILL it if it does not go. Idempotent."""
        if self.stop_fd is not None:
            os.close(self.stop_fd)
            self.stop_fd = None
        if self.pid is not None:
            reap(self.pid, timeout_s)
            self.pid = None

    def __enter__(self) -> TargetProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def udp_socket(endpoint: Endpoint) -> socket.socket:
    """The UDP echo's socket (bound, non-blocking, large buffers for bursts)."""
    sock = socket.socket(socket.AF_INET6 if endpoint.is_ipv6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
        sock.bind((endpoint.host, endpoint.port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def listening_pair(endpoint: Endpoint, tries: int = 64) -> tuple[socket.socket, socket.socket]:
    """A TCP listener and a UDP echo socket on the same port.

    Port 0 means any free one, chosen below the ephemeral range: after a connection-rate
    run the ephemeral ports can all be held by sockets in TIME_WAIT, and then bind(port 0)
    fails with EADDRINUSE (as a bind-first proxy's outbound connects do), while a listener
    may reuse a port whose only other sockets are TIME_WAIT ones (SO_REUSEADDR)."""
    if endpoint.port:
        sock = listening_socket(endpoint)
        try:
            return sock, udp_socket(endpoint)
        except OSError:
            sock.close()
            raise
    low, high = LISTEN_PORTS
    for port in random.sample(range(low, high), tries):
        try:
            sock = listening_socket(Endpoint(endpoint.host, port))
        except OSError:
            continue
        try:
            return sock, udp_socket(Endpoint(endpoint.host, port))
        except OSError:
            sock.close()
    raise OSError(f"no port in {low}-{high} free for both TCP and UDP on {endpoint.host}")


def _serve_in_child(sock: socket.socket, stop_fd: int, pattern: Pattern, udp: socket.socket) -> None:
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        lift_fd_limit()
        server = TargetServer(sock.fileno(), pattern, udp_fd=udp.fileno())
        server.serve(stop_fd)
        server.close()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def serve_forever(endpoint: Endpoint, announce: Callable[[str], None]) -> None:
    """Serve in the foreground until SIGINT or SIGTERM (``fastsocks bench serve``)."""
    lift_fd_limit()
    pattern = Pattern()
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    # A signal writes a byte to wake_w: the C loop sees wake_r readable and returns, and
    # Python then runs the handler (SIGINT raises KeyboardInterrupt).
    previous_wakeup = signal.set_wakeup_fd(wake_w)
    previous_term = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        sock, udp = listening_pair(endpoint)
        with sock, udp:
            host, port = sock.getsockname()[:2]
            announce(f"fastsocks bench serve: echo, bulk source, sink and UDP echo on "
                     f"{Endpoint(host, port)} (Ctrl-C to stop)")
            sys.stdout.flush()
            server = TargetServer(sock.fileno(), pattern, udp_fd=udp.fileno())
            try:
                server.serve(wake_r)
            finally:
                server.close()
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        signal.signal(signal.SIGTERM, previous_term)
        os.close(wake_r)
        os.close(wake_w)
        pattern.close()
