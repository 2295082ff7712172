"""systemd integration without libsystemd: readiness notification and socket activation.

Theory of operation
-------------------
Notification (``sd_notify(3)``): a unit of ``Type=notify`` gets ``$NOTIFY_SOCKET``, the
address of an AF_UNIX datagram socket of the service manager: a filesystem path, or a name
in the abstract namespace written ``@name`` (sent as ``\\0name``). One message is one
datagram of newline-separated ``KEY=VALUE`` assignments (``READY=1``, ``RELOADING=1``,
``STOPPING=1``, ``STATUS=...``, ``MAINPID=...``, ``WATCHDOG=1``). Nothing comes back.
``Notifier.from_environ()`` reads the address once; the notifier opens one non-blocking,
close-on-exec socket at its first send and reuses it until ``close()``. A send never
blocks the caller and never raises for an I/O failure: it answers False (the first
failure is logged as a warning, later ones at debug level). ``reloading()`` sends
``MONOTONIC_USEC`` (CLOCK_MONOTONIC, in µs) in the same datagram as ``RELOADING=1``, as
``Type=notify-reload`` (systemd 253 and later) requires. Only the main process should
notify (``NotifyAccess=main``): build the notifier first, then ``clear_environ()`` so that
nothing started later inherits the address.

Socket activation (``sd_listen_fds(3)``): with a ``.socket`` unit the manager binds the
sockets itself and passes them already open as fds 3, 4, ... (``SD_LISTEN_FDS_START``),
setting ``LISTEN_PID`` (the process they are meant for), ``LISTEN_FDS`` (how many) and
``LISTEN_FDNAMES`` (their names, colon-separated). ``listen_fds()`` reads them, checks that
they are meant for this process and marks each fd close-on-exec; ``activated_sockets()``
wraps them as socket objects and checks that each is a listening TCP socket. Neither
touches the environment: ``unset_listen_environ()`` does, when the caller wants it. The
module keeps no state of its own; every function takes the environment it reads.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import Self

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3  # <systemd/sd-daemon.h>
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
UNNAMED_FD = "unknown"  # the name sd_listen_fds_with_names() gives without LISTEN_FDNAMES


class Notifier:
    """Sends state changes to the service manager at one $NOTIFY_SOCKET address."""

    def __init__(self, address: str) -> None:
        """``address``: as in $NOTIFY_SOCKET, an absolute path or ``@name`` (abstract)."""
        self.environ_value = address  # what a process started for an upgrade is given
        if address.startswith("@") and len(address) > 1:
            self.address = b"\0" + os.fsencode(address[1:])
        elif address.startswith("/"):
            self.address = os.fsencode(address)
        else:
            raise ValueError(f"NOTIFY_SOCKET={address!r}: expected an absolute path or an abstract "
                             f"name (@name); other kinds (vsock:...) are not supported")
        self._sock: socket.socket | None = None
        self._closed = False
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier | None:
        """The notifier for $NOTIFY_SOCKET; None when it is unset or empty (not under a
        ``Type=notify`` unit). Raises ValueError for an address it cannot reach."""
        address = environ.get("NOTIFY_SOCKET", "")
        return cls(address) if address else None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True when it went out.

        Raises ValueError for no assignment, one without ``=`` or one with a newline."""
        if not assignments:
            raise ValueError("send() needs at least one KEY=VALUE assignment")
        for assignment in assignments:
            if "=" not in assignment or "\n" in assignment:
                raise ValueError(f"not one KEY=VALUE assignment: {assignment!r}")
        if self._closed:
            return False
        message = "".join(f"{assignment}\n" for assignment in assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "cannot notify the service manager at %r: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """Start-up (or a reload) is complete."""
        return self.send("READY=1", *_status(status))

    def reloading(self, status: str = "") -> bool:
        """A reload begins; ``ready()`` ends it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str = "") -> bool:
        """Shutdown begins."""
        return self.send("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status`` (newlines become spaces)."""
        return self.send(*_status(text, always=True))

    def mainpid(self, pid: int) -> bool:
        """The main process is now ``pid``."""
        return self.send(f"MAINPID={int(pid)}")

    def watchdog(self) -> bool:
        """Alive: resets the ``WatchdogSec=`` timer."""
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket; later sends answer False. Idempotent."""
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Notifier({self.address!r})"


def _status(text: str, always: bool = False) -> list[str]:
    if not text and not always:
        return []
    return [f"STATUS={' '.join(text.splitlines())}"]


def clear_environ(environ: MutableMapping[str, str]) -> None:
    """Remove NOTIFY_SOCKET, so that processes started from ``environ`` do not notify."""
    environ.pop("NOTIFY_SOCKET", None)


def listen_fds(environ: Mapping[str, str] = os.environ, pid: int | None = None,
               start: int = SD_LISTEN_FDS_START) -> list[tuple[int, str]]:
    """The fds passed by socket activation, as ``[(fd, name), ...]`` from ``start`` on.

    [] when LISTEN_PID is unset or names another process than ``pid`` (this one by
    default). Each fd is made close-on-exec. Raises ValueError for a malformed LISTEN_PID
    or LISTEN_FDS, a LISTEN_FDNAMES that names another number of fds, or an fd not open.
    """
    listen_pid = environ.get("LISTEN_PID", "")
    if not listen_pid:
        return []
    if _number(listen_pid) is None:
        raise ValueError(f"LISTEN_PID={listen_pid!r} is not a process id")
    if int(listen_pid) != (os.getpid() if pid is None else pid):
        return []
    count_text = environ.get("LISTEN_FDS", "")
    if not count_text:
        return []
    count = _number(count_text)
    if count is None:
        raise ValueError(f"LISTEN_FDS={count_text!r} is not a number of file descriptors")
    if count == 0:
        return []
    names_text = environ.get("LISTEN_FDNAMES")
    names = names_text.split(":") if names_text is not None else [UNNAMED_FD] * count
    if len(names) != count:
        raise ValueError(f"LISTEN_FDNAMES={names_text!r} names {len(names)} fds, LISTEN_FDS={count}")
    fds = list(range(start, start + count))
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise ValueError(f"LISTEN_FDS={count}: fd {fd} is not usable: {exc.strerror}") from None
    return list(zip(fds, names))


def _number(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None


def unset_listen_environ(environ: MutableMapping[str, str]) -> None:
    """Remove LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES from ``environ``."""
    for name in LISTEN_VARIABLES:
        environ.pop(name, None)


def activated_sockets(environ: Mapping[str, str] = os.environ, pid: int | None = None,
                      start: int = SD_LISTEN_FDS_START) -> list[socket.socket]:
    """The sockets of ``listen_fds()``, in its order, each checked to be a listening TCP
    socket (IPv4 or IPv6). Raises ValueError naming the first fd that is not, and then
    leaves every fd open (the socket objects made so far are detached, not closed)."""
    socks: list[socket.socket] = []
    try:
        for fd, name in listen_fds(environ, pid, start):
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                raise ValueError(f"passed fd {fd} ({name}) is not a socket: {exc.strerror}") from None
            socks.append(sock)
            problem = _not_a_tcp_listener(sock)
            if problem:
                raise ValueError(f"passed fd {fd} ({name}) {problem}: expected a listening TCP "
                                 f"socket (ListenStream= in the .socket unit)")
    except ValueError:
        for sock in socks:
            sock.detach()
        raise
    return socks


def _not_a_tcp_listener(sock: socket.socket) -> str:
    kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    if kind != socket.SOCK_STREAM:
        return f"is a {_name(socket.SocketKind, kind)} socket"
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return f"is an {_name(socket.AddressFamily, sock.family)} socket"
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "is a TCP socket that is not listening"
    return ""


def _name(kinds: type[socket.SocketKind | socket.AddressFamily], value: int) -> str:
    try:
        return kinds(value).name
    except ValueError:
        return f"{kinds.__name__} {value}"
