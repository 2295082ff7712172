"""SOCKS5 UDP ASSOCIATE (RFC 1928 §7): one association per accepted request.

Theory of operation
-------------------
The session reads the request, binds the client-facing UDP socket on the address the
client reached us on over TCP (port 0), answers SUCCEEDED with that address and port, and
ends with a ``StartUdp`` (host.py); the worker builds a ``UdpAssociation`` of it, which
owns the client's TCP socket from then on. It only watches that socket (bytes the client
sends there mean nothing and are discarded): "a UDP association terminates when the TCP
connection that the UDP ASSOCIATE request arrived on terminates" (§6).

Who may use it. §7: the relay "MUST drop any datagrams arriving from any source IP
address other than the one recorded for the particular association". The request's
DST.ADDR and DST.PORT are the address the client will send from, or zeros (§6). A given
IP is recorded as is, a zero (or a domain name) means the IP of the TCP connection; a
given port is recorded as is, a zero one is fixed by the first datagram from that IP (the
session records them: ``Session.udp_source``). Datagrams from any other source are dropped
and counted, never relayed.

The datagram loop is compiled: ``UdpRelay`` (_udp_relay.pxi), one per worker, holds every
association's UDP sockets in an epoll set, which the worker's loop watches, and the batch
buffers they share; an association's own state is a ``UdpFlow``. Each readiness reads one
``recvmmsg`` batch of at most BATCH datagrams per socket, a few batches per wake-up at
most, so one flood cannot starve the loop. Python is called back only for what C does not
decide (the hooks below): never per datagram.

Up (client -> remote). Datagrams from any source but the client's are dropped and
counted, and the first one is logged. ``udp_parse`` reads the header; malformed
headers and FRAG != 0 are dropped (fragmentation is optional, §7). The destination is
checked by ``allowed``, once per destination: the verdict is cached per (ip, port), at
most MAX_VERDICTS of them, and ``forget_verdicts()`` empties the cache when the rules
change. The payload leaves, in place, from a remote-facing socket of the destination's
family, opened on first use on an ephemeral port, in one ``sendmmsg`` per family (runs of
datagrams of one length to one address as one UDP GSO message); an IPv4-mapped IPv6
destination goes out as IPv4. A domain name comes back to Python
(``send_to_name``: names are the slow path) and is resolved through the worker's Resolver
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
the idempotent ``close()``) and tells its owner (``on_end``), which writes the one
access-log line. An association gets only what it uses: the loop, the resolver, the
worker's ``UdpRelay``, the settings (replaced by ``reload``) and what the rules see of its
datagrams.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from fastsocks._relay import UdpRelay
from fastsocks.access import format_peer
from fastsocks.policy import Query, forbidden_destination, normal_name, unmapped

if TYPE_CHECKING:
    from fastsocks.host import StartUdp
    from fastsocks.loop import Loop
    from fastsocks.resolver import Resolver
    from fastsocks.settings import Settings

log = logging.getLogger(__name__)

BATCH = 64                 # datagrams per socket per readiness, so one flood cannot starve the loop
HOLD_PER_NAME = 4          # datagrams waiting for one name to resolve
MAX_NAMES_RESOLVING = 16   # names of one association resolving at once
MAX_PEERS = 4096           # remote IPs the client has sent to; the least recently used is forgotten first
MAX_VERDICTS = 4096        # cached allowed() verdicts per association, by destination (ip, port)
CONTROL_RECV_BYTES = 4096
SOCKET_FLAGS = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


def new_relay() -> UdpRelay:
    """The datagram relay a worker shares among its associations (one loop thread): its
    batch buffers, made once, on the first association."""
    return UdpRelay(batch=BATCH, max_verdicts=MAX_VERDICTS, max_peers=MAX_PEERS)


def _flow_counter(name: str) -> property:
    """A counter the access line reports, kept by the association's UdpFlow."""
    return property(lambda self: getattr(self.flow, name) if self.flow is not None else 0,
                    doc=f"{name} of this association (0 before it started)")


class UdpAssociation:
    __slots__ = ("loop", "resolver", "relay", "settings", "on_end", "sid", "described", "started_s",
                 "client", "relay_sock", "remote_socks", "client_ip", "client_port", "flow", "resolving",
                 "timer", "closed", "query", "warned_denied")

    datagrams_up = _flow_counter("datagrams_up")
    datagrams_down = _flow_counter("datagrams_down")
    bytes_up = _flow_counter("bytes_up")
    bytes_down = _flow_counter("bytes_down")
    dropped = _flow_counter("dropped")

    def __init__(self, start: StartUdp, *, sid: int, described: str, started_s: float, loop: Loop,
                 resolver: Resolver, relay: UdpRelay, settings: Settings,
                 on_end: Callable[[UdpAssociation, str], None]) -> None:
        self.loop = loop
        self.resolver = resolver
        self.relay = relay
        self.settings = settings
        self.on_end = on_end
        self.sid = sid
        self.described = described
        self.started_s = started_s
        self.client = start.client                       # the TCP control connection: ours
        self.relay_sock = start.relay_sock               # client-facing UDP, bound
        self.remote_socks: dict[int, socket.socket] = {}  # remote-facing UDP, by family
        self.client_ip = start.client_ip                 # §7: the only source let in
        self.client_port = start.client_port             # 0: fixed by the first datagram from client_ip
        self.flow = None                                 # the relay's state for us, once started
        self.resolving: dict[tuple[str, int], list[bytes]] = {}
        self.timer = None
        self.closed = False
        self.query: Query = start.query  # what the rules see of every datagram: the TCP session's
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

    def start(self) -> None:
        """Relay from now on; OSError (the relay could not watch the socket) closes it all."""
        try:
            self.flow = self.relay.new_flow(self, self.relay_sock, self.client_ip, self.client_port)
        except OSError:
            self.close()
            raise
        self.loop.add_reader(self.client, self.on_control_readable)
        self._arm_idle_timer(self.settings.udp_idle_timeout_s)

    def end(self, how: str) -> None:
        """End a started association: close everything, then the worker logs it."""
        if self.closed:
            return
        self.close()
        self.on_end(self, how)

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
            self.loop.remove(self.client)
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
            self.timer = self.loop.call_later(delay_s, self._on_idle_timer)

    def _on_idle_timer(self) -> None:
        if self.closed:
            return
        timeout_s = self.settings.udp_idle_timeout_s
        idle_s = time.monotonic() - self.last_active_s
        if idle_s >= timeout_s:
            self.end("idle")
        else:
            self._arm_idle_timer(timeout_s - idle_s)

    def reload(self, settings: Settings) -> None:
        """New rules (and idle timeout): ``allowed`` is asked again for every destination."""
        self.settings = settings
        if self.flow is not None:
            self.flow.forget_verdicts()

    # ------------------------------------------------------------------ hooks of the relay
    # UdpRelay calls these (see _relay.pyi, UdpOwner) for what is not decided in C.

    def allowed(self, family: int, sockaddr: tuple) -> bool:
        """Whether the client may send to this address (the relay caches the answer per
        destination; names go through ``_judge`` with the name, see _on_resolved)."""
        return self._judge(None, sockaddr[0], sockaddr[1])

    def _judge(self, name: str | None, host: str, port: int) -> bool:
        """The rules for one destination (DESIGN §4: every UDP destination is checked);
        the first denial of the association is logged, the rest are counted."""
        ip = unmapped(ipaddress.ip_address(host.partition("%")[0]))
        why = forbidden_destination(ip)
        if why is None:
            verdict = self.settings.policy.decide(replace(self.query, port=port, name=name), ip)
            why = None if verdict.allowed else str(verdict)
        if why is not None:
            self._log_denied(f"{name} ({format_peer((str(ip), port))})" if name else format_peer((str(ip), port)), why)
        return why is None

    def _log_denied(self, destination: str, why: str) -> None:
        if not self.warned_denied:  # once per association; the access line counts the rest
            self.warned_denied = True
            log.info("%s UDP: dropped datagrams to %s: %s", self.described, destination, why)

    def remote_socket(self, family: int) -> socket.socket | None:
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

    def warn_foreign(self, source: tuple) -> None:
        """The first datagram from a source other than the client's (dropped and counted)."""
        expected = self.client_addr or (self.client_ip, self.client_port)
        log.warning("%s UDP: dropped a datagram from %s, the association is for %s", self.described,
                    format_peer(source), format_peer(expected))

    def send_to_name(self, name: str, port: int, payload: bytes) -> None:
        key = (name, port)
        verdict = self.settings.policy.before_resolve(replace(self.query, port=port, name=normal_name(name)))
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
        self.resolver.resolve(name, port, lambda addresses, error: self._on_resolved(key, addresses, error))

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

