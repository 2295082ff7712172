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

from fastsocks._relay_types import REASONS, Ended

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
                 max_pipes: int = 1024, pipe_pool: int = 64, pipe_reserve: int = 2, pipe_idle_s: float = 2.0,
                 idle_timeout_s: float = 300.0, max_events: int = 256) -> None:
        # Copies only: the splice and pipe arguments are accepted, and checked, for the same API.
        if buffer_size < 1024 or max_events < 1 or max_pipes < 0 or pipe_pool < 0 or pipe_reserve < 0:
            raise ValueError("buffer_size >= 1024, max_events >= 1, max_pipes/pipe_pool/pipe_reserve >= 0")
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
        return Ended(session.tag, up, down, reason, err)


__all__ = ["RelayEngine", "REASONS", "Ended"]


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


# ====================================================================== UDP relay
# The reference for UdpRelay/UdpFlow in _relay.pyx: the same decisions, counters and
# hooks, one recvfrom_into/sendto per datagram (no recvmmsg, no GSO), dicts for caches.

_UDP_HEADROOM = 22
_UDP_MAX_DATAGRAM = 65536
_V4_MAPPED = bytes(10) + b"\xff\xff"


def _ip16(host: str) -> tuple[int, bytes] | None:
    """(family it leaves by, 16-byte form with IPv4 mapped) of IP text, or None."""
    host = host.partition("%")[0]
    try:
        return socket.AF_INET, _V4_MAPPED + socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):
        pass
    try:
        ip = socket.inet_pton(socket.AF_INET6, host)
    except (OSError, ValueError):
        return None
    return (socket.AF_INET if ip[:12] == _V4_MAPPED else socket.AF_INET6), ip


def _ip_text(ip: bytes) -> str:
    if ip[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, ip[12:])
    return socket.inet_ntop(socket.AF_INET6, ip)


class _Cache:
    """At most 2 * half entries: a full young generation replaces the old one; a hit in the
    old generation moves the entry to the young one."""

    __slots__ = ("half", "old", "young")

    def __init__(self, half: int) -> None:
        self.half = half
        self.young: dict = {}
        self.old: dict = {}

    def get(self, key):
        value = self.young.get(key)
        if value is None and key in self.old:
            value = self.old[key]
            self.put(key, value)
        return value

    def put(self, key, value) -> None:
        if key not in self.young and len(self.young) >= self.half:
            self.old, self.young = self.young, {}
        self.young[key] = value

    def clear(self) -> None:
        self.young, self.old = {}, {}


class UdpRelay:
    def __init__(self, *, batch: int = 64, max_verdicts: int = 4096, max_peers: int = 4096) -> None:
        if not 1 <= batch <= 1024 or max_verdicts < 2 or max_peers < 2:
            raise ValueError("batch 1-1024, max_verdicts >= 2, max_peers >= 2")
        self._batch = batch
        self._max_verdicts = max_verdicts
        self._max_peers = max_peers
        self._buf = memoryview(bytearray(_UDP_HEADROOM + _UDP_MAX_DATAGRAM))
        self._busy = False
        self._error: BaseException | None = None
        self._epoll: select.epoll | None = select.epoll()
        self._watched: dict[int, tuple[UdpFlow, int]] = {}  # fd -> (flow, 0 or a remote family)

    def new_flow(self, owner, relay_sock, client_ip: str, client_port: int) -> UdpFlow:
        return UdpFlow(self, owner, relay_sock, client_ip, client_port)

    def fileno(self) -> int:
        return self._epoll.fileno() if self._epoll is not None else -1

    def run(self) -> None:
        if self._epoll is None:
            return
        self._enter()
        try:
            received = 0
            while received < 4 * self._batch:
                events = self._epoll.poll(0, 64)
                if not events:
                    break
                for fd, _ in events:
                    watched = self._watched.get(fd)
                    if watched is not None:
                        flow, family = watched
                        received += flow._up_batch() if family == 0 else flow._down_batch(family)
        finally:
            self._leave()

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None

    def _watch(self, flow: UdpFlow, sock: socket.socket, family: int) -> None:
        if self._epoll is None:
            raise ValueError("the UdpRelay is closed")
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        self._watched[sock.fileno()] = (flow, family)

    def _unwatch(self, sock: socket.socket) -> None:
        if self._watched.pop(sock.fileno(), None) is not None and self._epoll is not None:
            self._epoll.unregister(sock.fileno())

    def _enter(self) -> None:
        if self._busy:
            raise RuntimeError("a hook of the UDP relay may not make it relay again")
        self._busy = True
        self._error = None

    def _leave(self) -> None:
        self._busy = False
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _hook(self, flow: UdpFlow, call):
        """call(owner), a hook of the flow's owner; None, and the exception kept for leave(),
        if it raises."""
        if flow._owner is None:
            return None
        try:
            return call(flow._owner)
        except Exception as exc:  # noqa: BLE001 (a bug in a hook): raised by leave()
            if self._error is None:
                self._error = exc
            return None


class UdpFlow:
    def __init__(self, relay: UdpRelay, owner, relay_sock, client_ip: str, client_port: int) -> None:
        if not (isinstance(client_port, int) and 0 <= client_port <= 0xFFFF):
            raise ValueError(f"port must be 0-65535, got {client_port!r}")
        parsed = _ip16(client_ip)
        if parsed is None:
            raise ValueError(f"not an IP address: {client_ip!r}")
        self._relay, self._owner, self._relay_sock = relay, owner, relay_sock
        self._remote_socks: dict[int, socket.socket] = {}
        self._client_ip = parsed[1]
        self._client_port = client_port
        self._client_to: tuple | None = (_ip_text(self._client_ip), client_port) if client_port else None
        self._client_seen = False
        self._warned_foreign = False
        self._verdicts = _Cache(max(1, relay._max_verdicts // 2))
        self._peers = _Cache(max(1, relay._max_peers // 2))
        self.datagrams_up = self.datagrams_down = self.bytes_up = self.bytes_down = self.dropped = 0
        self.last_active_s = time.monotonic()
        relay._watch(self, relay_sock, 0)

    def pump_up(self) -> int:
        before = self.datagrams_up
        self._relay._enter()
        try:
            self._up_batch()
        finally:
            self._relay._leave()
        return self.datagrams_up - before

    def pump_down(self, family: int) -> int:
        before = self.datagrams_down
        self._relay._enter()
        try:
            self._down_batch(family)
        finally:
            self._relay._leave()
        return self.datagrams_down - before

    def _up_batch(self) -> int:
        """One batch from the client; how many datagrams were read."""
        relay, received, sent = self._relay, 0, 0
        if self._relay_sock is None:
            return 0
        for received in range(relay._batch):
            try:
                n, source = self._relay_sock.recvfrom_into(relay._buf)
            except OSError:  # EAGAIN, or an error the next readiness will tell again
                break
            sent += self._up_one(relay._buf[:n], source)
        else:
            received = relay._batch
        if sent:
            self.last_active_s = time.monotonic()
        return received

    def _up_one(self, datagram: memoryview, source: tuple) -> int:
        relay = self._relay
        if not self._from_client(source):
            self.dropped += 1
            if not self._warned_foreign:
                self._warned_foreign = True
                stranger = (_ip_text(_ip16(source[0])[1]), source[1])
                relay._hook(self, lambda owner: owner.warn_foreign(stranger))
            return 0
        parsed = udp_unpack(datagram)
        if parsed is None:
            self.dropped += 1
            return 0
        atyp, host, port, header_len = parsed
        if atyp == _UDP_ATYP_DOMAIN:
            payload = bytes(datagram[header_len:])
            relay._hook(self, lambda owner: owner.send_to_name(host, port, payload))
            return 0
        family, ip = _ip16(host)
        try:
            allowed = self._verdict(family, ip, port)
        except Exception as exc:  # noqa: BLE001 (a bug in the rules): denied, raised by leave()
            relay._error = relay._error or exc
            allowed = False
        return self._send_to(family, ip, port, 0, datagram[header_len:], allowed, guarded=True)

    def _from_client(self, source: tuple) -> bool:
        parsed = _ip16(source[0])
        if parsed is None or parsed[1] != self._client_ip:
            return False
        if self._client_port and source[1] != self._client_port:
            return False
        if not self._client_seen:
            self._client_seen = True
            self._client_port = source[1]
            self._client_to = source  # where datagrams for the client go, scope id and all
        return True

    @property
    def client_addr(self) -> tuple | None:
        return (_ip_text(self._client_ip), self._client_port) if self._client_to is not None else None

    def _verdict(self, family: int, ip: bytes, port: int) -> bool:
        allowed = self._verdicts.get((ip, port))
        if allowed is None:
            if self._owner is None:
                return False
            allowed = bool(self._owner.allowed(family, (_ip_text(ip), port)))
            self._verdicts.put((ip, port), allowed)
        return allowed

    def _remote(self, family: int):
        sock = self._remote_socks.get(family)
        if sock is None and self._owner is not None:
            sock = self._owner.remote_socket(family)
            if sock is not None:
                self._relay._watch(self, sock, family)
                self._remote_socks[family] = sock
        return sock

    def _send_to(self, family: int, ip: bytes, port: int, scope_id: int, payload, allowed: bool,
                 guarded: bool) -> int:
        if not allowed:
            self.dropped += 1
            return 0
        if guarded:
            try:
                sock = self._remote(family)
            except Exception as exc:  # noqa: BLE001 (a bug in a hook): raised by leave()
                self._relay._error = self._relay._error or exc
                sock = None
        else:
            sock = self._remote(family)
        if sock is None:
            self.dropped += 1
            return 0
        sockaddr = (_ip_text(ip), port) if family == socket.AF_INET else (_ip_text(ip), port, 0, scope_id)
        try:
            sock.sendto(payload, sockaddr)
        except OSError:  # EAGAIN, unreachable, EMSGSIZE, port 0...: UDP may lose it
            self.dropped += 1
            return 0
        if self._peers.get(ip) is None:
            self._peers.put(ip, True)
        self.datagrams_up += 1
        self.bytes_up += len(payload)
        return 1

    def _down_batch(self, family: int) -> int:
        """One batch from the remote socket of ``family``; how many datagrams were read."""
        relay, received, sent = self._relay, 0, 0
        sock = self._remote_socks.get(family)
        if sock is None or self._relay_sock is None:
            return 0
        payload_area = relay._buf[_UDP_HEADROOM:]
        for received in range(relay._batch):
            try:
                n, source = sock.recvfrom_into(payload_area)
            except OSError:
                break
            sent += self._down_one(n, source)
        else:
            received = relay._batch
        if sent:
            self.last_active_s = time.monotonic()
        return received

    def _down_one(self, n: int, source: tuple) -> int:
        parsed = _ip16(source[0])
        if self._client_to is None or parsed is None or self._peers.get(parsed[1]) is None:
            self.dropped += 1  # a stranger, or nowhere to send it yet
            return 0
        header = udp_pack(_ip_text(parsed[1]), source[1])
        start = _UDP_HEADROOM - len(header)
        buf = self._relay._buf
        buf[start:_UDP_HEADROOM] = header
        try:
            self._relay_sock.sendto(buf[start:_UDP_HEADROOM + n], self._client_to)
        except OSError:
            self.dropped += 1
            return 0
        self.datagrams_down += 1
        self.bytes_down += n
        return 1

    def send(self, sockaddr: tuple, payload, checked: bool = False) -> int:
        if not isinstance(sockaddr[0], str):
            raise TypeError(f"not an IP address: {sockaddr[0]!r}")
        parsed = _ip16(sockaddr[0])
        port = sockaddr[1]
        if parsed is None or not (isinstance(port, int) and 0 <= port <= 0xFFFF):
            raise ValueError(f"not an IP address and port: {sockaddr!r}")
        family, ip = parsed
        scope_id = sockaddr[3] if family == socket.AF_INET6 and len(sockaddr) >= 4 else 0
        allowed = checked or self._verdict(family, ip, port)
        sent = self._send_to(family, ip, port, scope_id, payload, allowed, guarded=False)
        if sent:
            self.last_active_s = time.monotonic()
        return sent

    def forget_verdicts(self) -> None:
        self._verdicts.clear()

    def close(self) -> None:
        for sock in (self._relay_sock, *self._remote_socks.values()):
            if sock is not None:
                self._relay._unwatch(sock)
        self._owner = self._relay_sock = None
        self._remote_socks = {}
        self._client_to = None
        self._verdicts.clear()
        self._peers.clear()


__all__ += ["UdpFlow", "UdpRelay"]
