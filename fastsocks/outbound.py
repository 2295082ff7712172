"""Opening an outbound TCP connection without blocking, for every path that makes one (the
session's address race, a parent proxy's chain, the reference engine's front door)."""

from __future__ import annotations

import errno
import socket

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux <linux/in.h>


def bind_source(sock: socket.socket, address: str) -> int:
    """Bind to an egress address, leaving the port to connect(), which picks one unique
    per destination (so churn cannot exhaust the ephemeral range as bind-first servers
    do); SOL_IP serves IPv6 sockets too. 0, or the errno that fails it."""
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((address, 0))
    except OSError as exc:
        return exc.errno or errno.EADDRNOTAVAIL
    return 0


def connect_nonblocking(family: int, sockaddr: tuple, prepare=None) -> tuple[socket.socket | None, int]:
    """A non-blocking, TCP_NODELAY socket whose connect() to ``sockaddr`` is under way (or
    done): (socket, 0); or (None, the errno that failed it at once). ``prepare(sock)``
    runs before connect() and returns 0 or an errno (egress: bind_source)."""
    try:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    except OSError as exc:  # EMFILE/ENFILE, or no IPv6 on this host (EAFNOSUPPORT)
        return None, exc.errno or errno.EIO
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    err = (prepare(sock) if prepare is not None else 0) or sock.connect_ex(sockaddr)
    if err not in (0, errno.EINPROGRESS):
        sock.close()
        return None, err
    return sock, 0
