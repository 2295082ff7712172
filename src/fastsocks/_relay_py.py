"""The relay engine in plain Python: the reference for fastsocks._relay.

Same API and the same observable behaviour (bytes delivered, half-close, backpressure,
end reasons, counters), written for clarity rather than speed: level-triggered epoll with
the interest of each fd recomputed after every event, copy mode only, and Python bytes
objects for whatever the destination would not take.
"""

from __future__ import annotations

import select
import socket
import time

REASONS = ("eof", "error", "idle", "shutdown")
_EOF, _ERROR, _IDLE, _SHUTDOWN = REASONS


class _Direction:
    __slots__ = ("src", "dst", "pending", "eof", "done", "nbytes")

    def __init__(self, src: socket.socket, dst: socket.socket, pending: bytes) -> None:
        self.src, self.dst = src, dst
        self.pending = pending
        self.eof = self.done = False
        self.nbytes = 0


class _Session:
    __slots__ = ("tag", "socks", "dirs", "last_active_s", "registered")

    def __init__(self, tag: int, client: socket.socket, upstream: socket.socket, initial: bytes) -> None:
        self.tag = tag
        self.socks = (client, upstream)
        self.dirs = (_Direction(client, upstream, initial), _Direction(upstream, client, b""))
        self.last_active_s = time.monotonic()
        self.registered = {client.fileno(): 0, upstream.fileno(): 0}


class RelayEngine:
    def __init__(self, *, buffer_size: int = 65536, splice: bool = True, pipe_size: int = 1 << 20,
                 max_pipes: int = 1024, pipe_pool: int = 64, idle_timeout_s: float = 300.0,
                 max_events: int = 256) -> None:
        if buffer_size < 1024 or max_events < 1 or max_pipes < 0 or pipe_pool < 0:
            raise ValueError("buffer_size >= 1024, max_events >= 1, max_pipes/pipe_pool >= 0")
        self._epoll: select.epoll | None = select.epoll()
        self._buf_size = buffer_size
        self._idle_timeout_s = idle_timeout_s
        self._max_events = max_events
        self._by_fd: dict[int, _Session] = {}
        self._sessions: set[_Session] = set()
        self._total = [0, 0, 0]

    def fileno(self) -> int:
        return self._epoll.fileno() if self._epoll else -1

    @property
    def active(self) -> int:
        return len(self._sessions)

    @property
    def pending(self) -> bool:
        return False  # level-triggered: the kernel reports what is still ready

    def counters(self) -> tuple[int, int, int, int, int]:
        return (self._total[0], self._total[1], self._total[2], 0, 0)

    def add(self, client_fd: int, upstream_fd: int, tag: int, initial_up=None) -> None:
        client = socket.socket(fileno=client_fd)
        upstream = socket.socket(fileno=upstream_fd)
        if self._epoll is None:
            client.close()
            upstream.close()
            raise ValueError("engine is closed")
        session = _Session(tag, client, upstream, bytes(initial_up or b""))
        self._sessions.add(session)
        self._total[2] += 1
        for sock in session.socks:
            self._by_fd[sock.fileno()] = session
            self._epoll.register(sock.fileno(), 0)
        self._update_interest(session)

    def run(self) -> list:
        if self._epoll is None:
            return []
        ended = []
        touched = {}
        for fd, _events in self._epoll.poll(0, self._max_events):
            session = self._by_fd.get(fd)
            if session is not None:
                touched[id(session)] = session
        now = time.monotonic()
        for session in touched.values():
            session.last_active_s = now
            reason, err = self._pump(session)
            if reason is not None:
                ended.append(self._finish(session, reason, err))
            else:
                self._update_interest(session)
        return ended

    def expire_idle(self) -> list:
        if self._idle_timeout_s <= 0:
            return []
        limit = time.monotonic() - self._idle_timeout_s
        return [self._finish(s, _IDLE, 0) for s in list(self._sessions) if s.last_active_s < limit]

    def close_all(self) -> list:
        return [self._finish(s, _SHUTDOWN, 0) for s in list(self._sessions)]

    def close(self) -> list:
        ended = self.close_all()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        return ended

    # ------------------------------------------------------------------ internals

    def _pump(self, session: _Session):
        """Move what can be moved without blocking; (reason, errno) once the session ends."""
        try:
            for d, direction in enumerate(session.dirs):
                self._pump_dir(d, direction)
        except OSError as exc:
            return _ERROR, exc.errno or 0
        if all(direction.done for direction in session.dirs):
            return _EOF, 0
        return None, 0

    def _pump_dir(self, d: int, direction: _Direction) -> None:
        while not direction.done:
            if direction.pending:
                if not self._write(d, direction):
                    return
            if direction.eof:
                direction.dst.shutdown(socket.SHUT_WR)
                direction.done = True
                return
            try:
                data = direction.src.recv(self._buf_size)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                direction.eof = True
            direction.pending = data

    def _write(self, d: int, direction: _Direction) -> bool:
        """Write pending bytes; True when all were written."""
        try:
            n = direction.dst.send(direction.pending, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return False
        direction.nbytes += n
        self._total[d] += n
        direction.pending = direction.pending[n:]
        return not direction.pending

    def _update_interest(self, session: _Session) -> None:
        wanted = {sock.fileno(): 0 for sock in session.socks}
        for direction in session.dirs:
            if direction.done:
                continue
            if direction.pending:
                wanted[direction.dst.fileno()] |= select.EPOLLOUT  # backpressure: no reads
            elif not direction.eof:
                wanted[direction.src.fileno()] |= select.EPOLLIN | select.EPOLLRDHUP
        for fd, mask in wanted.items():
            if session.registered[fd] != mask:
                self._epoll.modify(fd, mask)
                session.registered[fd] = mask

    def _finish(self, session: _Session, reason: str, err: int):
        self._sessions.discard(session)
        for sock in session.socks:
            self._by_fd.pop(sock.fileno(), None)
            sock.close()  # closing removes it from the epoll set
        up, down = (direction.nbytes for direction in session.dirs)
        return (session.tag, up, down, reason, err)


__all__ = ["RelayEngine", "REASONS"]


# ====================================================================== SOCKS5 UDP header
# RFC 1928 §7: RSV(2) FRAG(1) ATYP(1) DST.ADDR DST.PORT(2) DATA. The reference for
# udp_unpack()/udp_pack() in _relay.pyx: same results on every input.

_UDP_ATYP_IPV4, _UDP_ATYP_DOMAIN, _UDP_ATYP_IPV6 = 1, 3, 4
_UDP_MAX_HEADER = 4 + 1 + 255 + 2


def udp_unpack(data) -> tuple[int, str, int, int] | None:
    """(atyp, host, port, header_len) of a client datagram's header, or None to drop it
    (truncated, RSV != 0, FRAG != 0, unknown ATYP, empty or non-printable domain name)."""
    head = bytes(memoryview(data)[:_UDP_MAX_HEADER])
    if len(head) < 4 or head[0] or head[1] or head[2]:
        return None
    atyp = head[3]
    if atyp == _UDP_ATYP_IPV4:
        start, size = 4, 4
    elif atyp == _UDP_ATYP_IPV6:
        start, size = 4, 16
    elif atyp == _UDP_ATYP_DOMAIN and len(head) >= 5:
        start, size = 5, head[4]
    else:
        return None
    end = start + size
    if len(head) < end + 2:
        return None
    raw = head[start:end]
    if atyp == _UDP_ATYP_DOMAIN:
        if not raw or not all(0x21 <= b <= 0x7E for b in raw):  # refused, never cut at a NUL
            return None
        host = raw.decode("ascii")
    else:
        host = socket.inet_ntop(socket.AF_INET if atyp == _UDP_ATYP_IPV4 else socket.AF_INET6, raw)
    return atyp, host, int.from_bytes(head[end:end + 2], "big"), end + 2


def udp_pack(host: str, port: int) -> bytes:
    """The header for a datagram from ``host:port`` (IPv4 or IPv6 text; IPv4-mapped IPv6
    is sent as IPv4); ValueError for anything else or a port outside 0-65535."""
    if not isinstance(host, str):
        raise TypeError(f"host must be a str, got {host!r}")
    if not (isinstance(port, int) and 0 <= port <= 0xFFFF):
        raise ValueError(f"port must be 0-65535, got {port!r}")
    for family, atyp in ((socket.AF_INET, _UDP_ATYP_IPV4), (socket.AF_INET6, _UDP_ATYP_IPV6)):
        try:
            addr = socket.inet_pton(family, host)
        except (OSError, ValueError, TypeError):
            continue
        if atyp == _UDP_ATYP_IPV6 and addr[:12] == b"\0" * 10 + b"\xff\xff":
            atyp, addr = _UDP_ATYP_IPV4, addr[12:]
        return bytes([0, 0, 0, atyp]) + addr + port.to_bytes(2, "big")
    raise ValueError(f"not an IP address: {host!r}")


__all__ += ["udp_pack", "udp_unpack"]
