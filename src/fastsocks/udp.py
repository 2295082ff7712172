"""SOCKS5 UDP ASSOCIATE (RFC 1928 §7): one association per accepted request.

Theory of operation
-------------------
The session reads the request; the worker builds a ``UdpAssociation`` and calls
``start(session)``. It binds the client-facing UDP socket on the address the client
reached us on over TCP (port 0), has the session answer SUCCEEDED with that address and
port, and from then on owns the client's TCP socket. It only watches that socket (bytes
the client sends there mean nothing and are discarded): "a UDP association terminates
when the TCP connection that the UDP ASSOCIATE request arrived on terminates" (§6).

Who may use it. §7: the relay "MUST drop any datagrams arriving from any source IP
address other than the one recorded for the particular association". The request's
DST.ADDR and DST.PORT are the address the client will send from, or zeros (§6). A given
IP is recorded as is, a zero (or a domain name) means the IP of the TCP connection; a
given port is recorded as is, a zero one is fixed by the first datagram from that IP.
Datagrams from any other source are dropped and counted, never relayed.

Up (client -> remote). ``udp_unpack`` (Cython, _relay.pyx) parses the header; malformed
headers and FRAG != 0 are dropped (fragmentation is optional, §7). ``_allowed`` checks
the destination, and the payload leaves from a remote-facing socket of the destination's
family, opened on first use on an ephemeral port; an IPv4-mapped IPv6 destination goes
out as IPv4. A domain name is resolved through the worker's Resolver (cached, off the
loop); while it resolves, up to HOLD_PER_NAME datagrams wait for it and at most
MAX_NAMES_RESOLVING names resolve at once: past that, datagrams are dropped.

Down (remote -> client). A datagram on a remote-facing socket is relayed only from an IP
the client has sent to (a restricted cone: a stranger cannot inject datagrams, while a
server that answers from another port, as TFTP does, still gets through), with
``udp_pack(source)`` before it, so the client sees the remote's real address.

Every socket is drained in batches of at most BATCH datagrams per readiness with
``recvfrom_into`` into one buffer the worker shares among its associations; the header
for the client is written in front of the payload in that buffer, so a datagram is never
copied in user space. A socket that cannot take a datagram now (EAGAIN) loses it: UDP
promises no delivery, and a queue would have to be unbounded or drop anyway.

It ends on EOF or an error on the TCP connection, after ``udp_idle_timeout_s`` without a
relayed datagram, or when the worker shuts down. ``end()`` closes every socket (through
the idempotent ``close()``) and has the worker write the one access-log line.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import time
from typing import TYPE_CHECKING

from fastsocks._relay import udp_pack, udp_unpack
from fastsocks.protocol.socks5 import AddressType, Reply

if TYPE_CHECKING:
    from fastsocks.session import Session
    from fastsocks.worker import Worker

log = logging.getLogger(__name__)

BATCH = 64                 # datagrams per socket per readiness, so one flood cannot starve the loop
HEADROOM = 22              # the longest header udp_pack writes (IPv6), kept free before a payload
BUFFER_BYTES = HEADROOM + 65536  # any UDP payload fits (65527 bytes at most over IPv6)
HOLD_PER_NAME = 4          # datagrams waiting for one name to resolve
MAX_NAMES_RESOLVING = 16   # names of one association resolving at once
MAX_PEERS = 4096           # remote IPs the client has sent to; the oldest is forgotten first
CONTROL_RECV_BYTES = 4096
SOCKET_FLAGS = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


def new_buffer() -> memoryview:
    """The datagram buffer a worker shares among its associations (one loop thread)."""
    return memoryview(bytearray(BUFFER_BYTES))


def kernel_text(host: str) -> tuple[int, str]:
    """(family, text) of an IP address, unmapped and written as recvfrom() reports it."""
    ip = ipaddress.ip_address(host.partition("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return family, socket.inet_ntop(family, ip.packed)


def over_cap(worker: Worker, client_ip: str) -> str | None:
    """Why one more association for ``client_ip`` is refused, or None."""
    settings, live = worker.settings, worker.udp_associations
    if len(live) >= settings.max_udp_per_worker:
        return f"UDP ASSOCIATE refused: {len(live)} associations in this worker (--max-udp-per-worker)"
    mine = sum(1 for association in live.values() if association.client_ip == client_ip)
    if mine >= settings.max_udp_per_client:
        return f"UDP ASSOCIATE refused: {mine} associations for {client_ip} (--max-udp-per-client)"
    return None


class UdpAssociation:
    __slots__ = ("worker", "sid", "described", "started_s", "client", "relay_sock", "remote_socks",
                 "client_ip", "client_port", "client_addr", "peers", "resolving", "timer",
                 "last_active_s", "datagrams_up", "datagrams_down", "bytes_up", "bytes_down",
                 "dropped", "warned_foreign", "closed")

    def __init__(self, worker: Worker, session: Session) -> None:
        self.worker = worker
        self.sid = session.sid
        self.described = session.describe()
        self.started_s = session.started_s
        self.client: socket.socket | None = None        # the TCP control connection, once ours
        self.relay_sock: socket.socket | None = None    # client-facing UDP
        self.remote_socks: dict[int, socket.socket] = {}  # remote-facing UDP, by family
        self.client_ip = ""                              # §7: the only source let in, set by start()
        self.client_port = 0                             # 0: fixed by the first datagram from client_ip
        self.client_addr: tuple | None = None           # where datagrams for the client go, once known
        self.peers: dict[str, None] = {}                # insertion-ordered set of remote IPs
        self.resolving: dict[tuple[str, int], list[bytes]] = {}
        self.timer = None
        self.last_active_s = time.monotonic()
        self.datagrams_up = self.datagrams_down = self.bytes_up = self.bytes_down = self.dropped = 0
        self.warned_foreign = False
        self.closed = False

    # ------------------------------------------------------------------ set-up and endings

    def start(self, session: Session) -> bool:
        """Answer the request. True once this association owns the session's client socket;
        False when the session answered a failure (and logged and closed it) instead."""
        refusal = self._prepare(session)
        if refusal is not None:
            self.close()
            session.fail(Reply.GENERAL_FAILURE, refusal)
            return False
        host, port = self.relay_sock.getsockname()[:2]
        host = session.worker.settings.advertise or host  # behind NAT: what clients must use
        if not session.send(session.conn.send(session.reply_event(Reply.SUCCEEDED, host, port))):
            self.close()  # the session logged and closed; nothing of ours was in use
            return False
        self.client = session.client
        loop = self.worker.loop
        loop.add_reader(self.client, self.on_control_readable)
        loop.add_reader(self.relay_sock, self.on_client_datagrams)
        self.last_active_s = time.monotonic()
        self._arm_idle_timer(self.worker.settings.udp_idle_timeout_s)
        return True

    def _prepare(self, session: Session) -> str | None:
        """Record who may send and bind the relay socket; or say why not."""
        try:
            self._expect_source(session.request, session.client.getpeername()[0])
        except OSError as exc:  # the client left already (ENOTCONN)
            return f"UDP ASSOCIATE: client gone: {exc.strerror or exc}"
        refusal = over_cap(self.worker, self.client_ip)
        if refusal is not None:
            return refusal
        try:
            self._open_relay_socket(session.client.getsockname()[0])
        except OSError as exc:
            return f"UDP ASSOCIATE: cannot bind the relay socket: {exc.strerror or exc}"
        return None

    def _expect_source(self, request, tcp_peer_ip: str) -> None:
        """Record the address the client will send from: the request's DST, where it is
        not zero, else the TCP connection's IP and the port of the first datagram (§6, §7)."""
        _, self.client_ip = kernel_text(tcp_peer_ip)
        self.client_port = request.port
        if request.address_type != AddressType.DOMAIN:  # a name is no address (PySocks sends "0")
            _, ip = kernel_text(request.host)
            if not ipaddress.ip_address(ip).is_unspecified:
                self.client_ip = ip
        if self.client_port:
            self.client_addr = (self.client_ip, self.client_port)

    def _open_relay_socket(self, local_ip: str) -> None:
        """Bind where the client reached us over TCP: it can reach that address (§6 BND.ADDR)."""
        family, here = kernel_text(local_ip)
        self.relay_sock = socket.socket(family, SOCKET_FLAGS)
        self.relay_sock.bind((here, 0))

    def end(self, how: str) -> None:
        """End a started association: close everything, then the worker logs it."""
        if self.closed:
            return
        self.close()
        self.worker.udp_ended(self, how)

    def close(self) -> None:
        """Close every socket this association owns. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        loop = self.worker.loop
        for sock in (self.client, self.relay_sock, *self.remote_socks.values()):
            if sock is not None:
                loop.remove(sock)
                sock.close()
        self.remote_socks.clear()
        self.resolving.clear()
        self.peers.clear()

    def on_control_readable(self) -> None:
        if self.closed:
            return
        try:
            data = self.client.recv(CONTROL_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.end(f"error:{errno.errorcode.get(exc.errno, exc.errno)}")
            return
        if not data:
            self.end("eof")

    def _arm_idle_timer(self, delay_s: float) -> None:
        if delay_s > 0:
            self.timer = self.worker.loop.call_later(delay_s, self._on_idle_timer)

    def _on_idle_timer(self) -> None:
        if self.closed:
            return
        timeout_s = self.worker.settings.udp_idle_timeout_s
        idle_s = time.monotonic() - self.last_active_s
        if idle_s >= timeout_s:
            self.end("idle")
        else:
            self._arm_idle_timer(timeout_s - idle_s)

    # ------------------------------------------------------------------ up: client -> remote

    def on_client_datagrams(self) -> None:
        if self.closed:
            return
        buf = self.worker.udp_buffer
        relayed = 0
        for _ in range(BATCH):
            try:
                n, source = self.relay_sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("%s UDP relay socket: %s", self.described, exc)
                break
            if not self._from_client(source):
                self._drop_foreign(source)
                continue
            relayed += self._relay_up(buf, n)
        if relayed:
            self.last_active_s = time.monotonic()

    def _from_client(self, source: tuple) -> bool:
        if self.client_addr is not None:
            return source[1] == self.client_addr[1] and source[0] == self.client_addr[0]
        if source[0] != self.client_ip:
            return False
        self.client_addr = source  # a zero DST.PORT (§6): the first datagram fixes the port
        return True

    def _drop_foreign(self, source: tuple) -> None:
        self.dropped += 1
        if not self.warned_foreign:  # once per association: a flood must not flood the log
            self.warned_foreign = True
            expected = self.client_addr or (self.client_ip, self.client_port)
            log.warning("%s UDP: dropped a datagram from %s, the association is for %s", self.described,
                        _format(source), _format(expected))

    def _relay_up(self, buf: memoryview, n: int) -> int:
        """Send one client datagram on; 1 if it left now, else 0."""
        parsed = udp_unpack(buf[:n])
        if parsed is None:
            self.dropped += 1  # malformed, or FRAG != 0
            return 0
        atyp, host, port, header_len = parsed
        if atyp == AddressType.DOMAIN:
            self._send_to_name(host, port, buf[header_len:n])
            return 0
        if atyp == AddressType.IPV4:
            return self._send(socket.AF_INET, (host, port), buf[header_len:n])
        if host.startswith("::ffff:") and "." in host:  # IPv4-mapped, as inet_ntop writes it
            return self._send(socket.AF_INET, (host[7:], port), buf[header_len:n])
        return self._send(socket.AF_INET6, (host, port), buf[header_len:n])

    def _send(self, family: int, sockaddr: tuple, payload) -> int:
        if not self._allowed(family, sockaddr):
            self.dropped += 1
            return 0
        try:
            sock = self.remote_socks.get(family) or self._open_remote_socket(family)
            sock.sendto(payload, sockaddr)
        except OSError:  # EAGAIN, unreachable, EMSGSIZE, port 0, broadcast...: UDP may lose it
            self.dropped += 1
            return 0
        self._remember_peer(sockaddr[0].partition("%")[0])
        self.datagrams_up += 1
        self.bytes_up += len(payload)
        return 1

    def _allowed(self, family: int, sockaddr: tuple) -> bool:
        """Whether the client may send to this destination (a resolved IP, never a name).

        Issue 5 puts the access rules here: every UDP destination is checked (DESIGN §4),
        with the decision cached per destination so that a datagram stays cheap (DESIGN §2).
        """
        return True

    def _open_remote_socket(self, family: int) -> socket.socket:
        sock = socket.socket(family, SOCKET_FLAGS)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # IPv4 has its own socket
            sock.bind(("0.0.0.0" if family == socket.AF_INET else "::", 0))
            self.worker.loop.add_reader(sock, lambda: self.on_remote_datagrams(sock))
        except OSError:
            sock.close()
            raise
        self.remote_socks[family] = sock
        return sock

    def _remember_peer(self, ip: str) -> None:
        if ip in self.peers:
            return
        if len(self.peers) >= MAX_PEERS:
            del self.peers[next(iter(self.peers))]
        self.peers[ip] = None

    def _send_to_name(self, name: str, port: int, payload: memoryview) -> None:
        key = (name, port)
        held = self.resolving.get(key)
        if held is not None:
            if len(held) < HOLD_PER_NAME:
                held.append(bytes(payload))  # the shared buffer is reused by the next datagram
            else:
                self.dropped += 1
            return
        if len(self.resolving) >= MAX_NAMES_RESOLVING:
            self.dropped += 1
            return
        self.resolving[key] = [bytes(payload)]
        # A cached name calls back at once, before resolve() returns.
        self.worker.resolver.resolve(name, port, lambda addresses, error: self._on_resolved(key, addresses, error))

    def _on_resolved(self, key: tuple[str, int], addresses, error: OSError | None) -> None:
        held = self.resolving.pop(key, [])
        if self.closed:
            return
        if error is not None or not addresses:
            self.dropped += len(held)
            log.debug("%s UDP: cannot resolve %r: %s", self.described, key[0], error)
            return
        family, sockaddr = addresses[0]
        if family == socket.AF_INET6:
            family, ip = kernel_text(sockaddr[0])
            sockaddr = (ip, sockaddr[1]) if family == socket.AF_INET else sockaddr
        if sum(self._send(family, sockaddr, payload) for payload in held):
            self.last_active_s = time.monotonic()

    # ------------------------------------------------------------------ down: remote -> client

    def on_remote_datagrams(self, sock: socket.socket) -> None:
        if self.closed:
            return
        buf = self.worker.udp_buffer
        payload_area = buf[HEADROOM:]
        relayed = 0
        for _ in range(BATCH):
            try:
                n, source = sock.recvfrom_into(payload_area)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("%s UDP remote socket: %s", self.described, exc)
                break
            if source[0] not in self.peers or self.client_addr is None:
                self.dropped += 1  # a stranger: the client never sent to this IP
                continue
            header = udp_pack(source[0], source[1])
            start = HEADROOM - len(header)
            buf[start:HEADROOM] = header
            try:
                self.relay_sock.sendto(buf[start:HEADROOM + n], self.client_addr)
            except OSError:
                self.dropped += 1
                continue
            self.datagrams_down += 1
            self.bytes_down += n
            relayed += 1
        if relayed:
            self.last_active_s = time.monotonic()


def _format(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
