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

The datagram loop is compiled: ``UdpRelay`` (_udp_relay.pxi), one per worker, holds every
association's UDP sockets in an epoll set, which the worker's loop watches, and the batch
buffers they share; an association's own state is a ``UdpFlow``. Each readiness reads one
``recvmmsg`` batch of at most BATCH datagrams per socket, a few batches per wake-up at
most, so one flood cannot starve the loop. Python is called back only for what C does not
decide (the hooks below): never per datagram.

Up (client -> remote). Datagrams from any source but the client's are dropped and
counted, and the first one is logged. ``udp_parse`` reads the header; malformed
headers and FRAG != 0 are dropped (fragmentation is optional, §7). The destination is
checked by ``_allowed``, once per destination: the verdict is cached per (ip, port), at
most MAX_VERDICTS of them, and ``forget_verdicts()`` empties the cache when the rules
change. The payload leaves, in place, from a remote-facing socket of the destination's
family, opened on first use on an ephemeral port, in one ``sendmmsg`` per family (runs of
datagrams of one length to one address as one UDP GSO message); an IPv4-mapped IPv6
destination goes out as IPv4. A domain name comes back to Python
(``_send_to_name``: names are the slow path) and is resolved through the worker's Resolver
(cached, off the loop); while it resolves, up to HOLD_PER_NAME datagrams wait for it and
at most MAX_NAMES_RESOLVING names resolve at once: past that, datagrams are dropped.

Down (remote -> client). A datagram on a remote-facing socket is relayed only from an IP
the client has sent to (a restricted cone: a stranger cannot inject datagrams, while a
server that answers from another port, as TFTP does, still gets through; at most
MAX_PEERS IPs are remembered, the least recently used forgotten first), with the header
naming its real source written in front of it in the batch buffer, so that a datagram is
never copied in user space; one ``sendmmsg`` per batch.

A socket that cannot take a datagram now (EAGAIN) loses it: UDP promises no delivery,
and a queue would have to be unbounded or drop anyway.

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
from dataclasses import replace
from typing import TYPE_CHECKING

from fastsocks._relay import UdpRelay
from fastsocks.policy import forbidden_destination, normal_name, unmapped
from fastsocks.protocol.socks5 import AddressType, Reply

if TYPE_CHECKING:
    from fastsocks.session import Session
    from fastsocks.worker import Worker

log = logging.getLogger(__name__)

BATCH = 64                 # datagrams per socket per readiness, so one flood cannot starve the loop
HOLD_PER_NAME = 4          # datagrams waiting for one name to resolve
MAX_NAMES_RESOLVING = 16   # names of one association resolving at once
MAX_PEERS = 4096           # remote IPs the client has sent to; the least recently used is forgotten first
MAX_VERDICTS = 4096        # cached _allowed() verdicts per association, by destination (ip, port)
CONTROL_RECV_BYTES = 4096
SOCKET_FLAGS = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


def new_buffer() -> UdpRelay:
    """The datagram relay a worker shares among its associations (one loop thread): its
    batch buffers, made once, on the first association."""
    return UdpRelay(batch=BATCH, max_verdicts=MAX_VERDICTS, max_peers=MAX_PEERS)


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


def _flow_counter(name: str) -> property:
    """A counter the access line reports, kept by the association's UdpFlow."""
    return property(lambda self: getattr(self.flow, name) if self.flow is not None else 0,
                    doc=f"{name} of this association (0 before it started)")


class UdpAssociation:
    __slots__ = ("worker", "sid", "described", "started_s", "client", "relay_sock", "remote_socks",
                 "client_ip", "client_port", "flow", "resolving", "timer", "closed", "query",
                 "warned_denied")

    datagrams_up = _flow_counter("datagrams_up")
    datagrams_down = _flow_counter("datagrams_down")
    bytes_up = _flow_counter("bytes_up")
    bytes_down = _flow_counter("bytes_down")
    dropped = _flow_counter("dropped")

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
        self.flow = None                                 # the relay's state for us, once the socket is bound
        self.resolving: dict[tuple[str, int], list[bytes]] = {}
        self.timer = None
        self.closed = False
        # What the rules see of every datagram: the client and user of the TCP session.
        query = getattr(session, "query", None)  # (a test's stand-in session may have none)
        self.query = replace(query(), name=None) if query is not None else None
        self.warned_denied = False

    @property
    def client_addr(self) -> tuple | None:
        """Where datagrams for the client go, once known (a zero port: after its first one)."""
        return self.flow.client_addr if self.flow is not None else None

    @property
    def last_active_s(self) -> float:
        """time.monotonic() when a datagram was last relayed, or when the association started."""
        return self.flow.last_active_s if self.flow is not None else self.started_s

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
        self._watch_relay()
        self.worker.loop.add_reader(self.client, self.on_control_readable)
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
            self.flow = self.worker.udp_buffer.new_flow(self, self.relay_sock, self.client_ip, self.client_port)
        except OSError as exc:
            return f"UDP ASSOCIATE: cannot open the relay socket: {exc.strerror or exc}"
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

    def _open_relay_socket(self, local_ip: str) -> None:
        """Bind where the client reached us over TCP: it can reach that address (§6 BND.ADDR)."""
        family, here = kernel_text(local_ip)
        self.relay_sock = socket.socket(family, SOCKET_FLAGS)
        self.relay_sock.bind((here, 0))

    def _watch_relay(self) -> None:
        """The worker's loop watches the relay (every association's datagram sockets) from
        its first association on."""
        relay = self.worker.udp_buffer
        try:
            self.worker.loop.add_reader(relay, relay.run)
        except KeyError:
            pass  # watched already

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
        if self.flow is not None:
            self.flow.close()  # first: the relay must not watch or use the fds once closed
        if self.client is not None:
            self.worker.loop.remove(self.client)
        for sock in (self.client, self.relay_sock, *self.remote_socks.values()):
            if sock is not None:
                sock.close()
        self.remote_socks.clear()
        self.resolving.clear()

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

    def forget_verdicts(self) -> None:
        """Ask ``_allowed`` again for every destination: the rules were reloaded."""
        if self.flow is not None:
            self.flow.forget_verdicts()

    # ------------------------------------------------------------------ hooks of the relay
    # UdpRelay calls these (see _relay.pyi, UdpOwner) for what is not decided in C.

    def _allowed(self, family: int, sockaddr: tuple) -> bool:
        """Whether the client may send to this address (the relay caches the answer per
        destination; names go through ``_judge`` with the name, see _on_resolved)."""
        return self._judge(None, sockaddr[0], sockaddr[1])

    def _judge(self, name: str | None, host: str, port: int) -> bool:
        """The rules for one destination (DESIGN §4: every UDP destination is checked);
        the first denial of the association is logged, the rest are counted."""
        ip = unmapped(ipaddress.ip_address(host.partition("%")[0]))
        why = forbidden_destination(ip)
        if why is None and self.query is not None:
            verdict = self.worker.settings.policy.decide(replace(self.query, port=port, name=name), ip)
            why = None if verdict.allowed else str(verdict)
        if why is not None:
            self._log_denied(f"{name} ({_format((str(ip), port))})" if name else _format((str(ip), port)), why)
        return why is None

    def _log_denied(self, destination: str, why: str) -> None:
        if not self.warned_denied:  # once per association; the access line counts the rest
            self.warned_denied = True
            log.info("%s UDP: dropped datagrams to %s: %s", self.described, destination, why)

    def _remote_socket(self, family: int) -> socket.socket | None:
        """The remote-facing socket of ``family``, opened on first use (the relay watches
        it); None if it cannot be."""
        sock = self.remote_socks.get(family)
        if sock is not None:
            return sock
        try:
            sock = socket.socket(family, SOCKET_FLAGS)
        except OSError as exc:
            log.debug("%s UDP: cannot open a remote socket: %s", self.described, exc)
            return None
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # IPv4 has its own socket
            sock.bind(("0.0.0.0" if family == socket.AF_INET else "::", 0))
        except OSError as exc:
            sock.close()
            log.debug("%s UDP: cannot open a remote socket: %s", self.described, exc)
            return None
        self.remote_socks[family] = sock
        return sock

    def _warn_foreign(self, source: tuple) -> None:
        """The first datagram from a source other than the client's (dropped and counted)."""
        expected = self.client_addr or (self.client_ip, self.client_port)
        log.warning("%s UDP: dropped a datagram from %s, the association is for %s", self.described,
                    _format(source), _format(expected))

    def _send_to_name(self, name: str, port: int, payload: bytes) -> None:
        key = (name, port)
        if self.query is not None:
            verdict = self.worker.settings.policy.before_resolve(
                replace(self.query, port=port, name=normal_name(name)))
            if verdict is not None and not verdict.allowed:  # a denied name is not looked up
                self.flow.dropped += 1
                self._log_denied(f"{name}:{port}", str(verdict))
                return
        held = self.resolving.get(key)
        if held is not None:
            if len(held) < HOLD_PER_NAME:
                held.append(payload)
            else:
                self.flow.dropped += 1
            return
        if len(self.resolving) >= MAX_NAMES_RESOLVING:
            self.flow.dropped += 1
            return
        self.resolving[key] = [payload]
        # A cached name calls back at once, before resolve() returns.
        self.worker.resolver.resolve(name, port, lambda addresses, error: self._on_resolved(key, addresses, error))

    def _on_resolved(self, key: tuple[str, int], addresses, error: OSError | None) -> None:
        held = self.resolving.pop(key, [])
        if self.closed:
            return
        if error is not None or not addresses:
            self.flow.dropped += len(held)
            log.debug("%s UDP: cannot resolve %r: %s", self.described, key[0], error)
            return
        _, sockaddr = addresses[0]  # the flow unmaps an IPv4-mapped address, as for a header's
        if not self._judge(normal_name(key[0]), sockaddr[0], key[1]):
            self.flow.dropped += len(held)
            return
        for payload in held:
            self.flow.send(sockaddr, payload, checked=True)  # judged with its name just now


def _format(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
