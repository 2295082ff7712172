"""A CONNECT that leaves through parent proxies (a rule's ``via``), once the rules let it.

Theory of operation
-------------------
``Chain(session, upstreams, host, port).start()`` tries each parent in the rule's order
(``balance = "round-robin"`` starts each session at the next one): resolve the parent's
name if it has one, connect to it, speak its handshake (protocol/client.py: SOCKS5 with
RFC 1929, SOCKS4/4a, HTTP CONNECT) for ``host:port``. ``host`` is the client's name as it
asked (the parent resolves it) or the address the rules judged. A parent that cannot be
reached, closes or stays silent is logged and the next one is tried, within the
session's one connect deadline (each attempt gets an equal share of what is left); a
``direct`` entry hands the session back to its own connect. A parent's *answer* is final:
its refusal (a destination refused, unreachable, or not allowed there) is the client's
reply, since another parent would be asked the same. On success the session answers its
client and hands both sockets to the relay, with the bytes the parent sent past its
answer (the destination's first ones) for the client.

A part of its session, as BindWait is: it ends only through the session.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from fastsocks.host import entry_point
from fastsocks.outbound import connect_nonblocking
from fastsocks.policy import DIRECT
from fastsocks.protocol.client import handshake_for
from fastsocks.protocol.socks5 import Reply

if TYPE_CHECKING:
    from fastsocks.session import Session
    from fastsocks.settings import Upstream

log = logging.getLogger(__name__)

RECV_BYTES = 16384


class Chain:
    __slots__ = ("session", "hops", "host", "port", "hop", "sock", "handshake", "timer", "failures")

    def __init__(self, session: Session, hops: list[Upstream | str], host: str, port: int) -> None:
        self.session = session
        self.hops = hops          # what is left to try: parents, or DIRECT
        self.host, self.port = host, port
        self.hop: Upstream | None = None
        self.sock: socket.socket | None = None
        self.handshake = None
        self.timer = None
        self.failures: list[str] = []

    def start(self) -> None:
        self.next_hop()

    def next_hop(self) -> None:
        session = self.session
        if not self.hops:
            session.connect_done()
            session.fail(Reply.GENERAL_FAILURE, f"no parent proxy answered: {'; '.join(self.failures)}")
            return
        hop = self.hops.pop(0)
        if hop == DIRECT:
            session.go_direct(self.host)
            return
        self.hop = hop
        try:
            self.handshake = handshake_for(hop.scheme, self.host, self.port, hop.username, hop.password)
        except ValueError as exc:
            self.hop_failed(str(exc))
            return
        try:
            ip = ipaddress.ip_address(hop.host)
        except ValueError:
            session.host.resolver.resolve(hop.host, hop.port, self.on_resolved)
            return
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        self.connect((family, (hop.host, hop.port) if ip.version == 4 else (hop.host, hop.port, 0, 0)))

    @entry_point
    def on_resolved(self, addresses, error: OSError | None) -> None:
        if self.session.over:
            return
        if error is not None or not addresses:
            self.hop_failed(f"cannot resolve {self.hop.host!r}: {error}")
            return
        self.connect(addresses[0])

    def connect(self, address) -> None:
        family, sockaddr = address
        session = self.session
        if not session.connecting_s:
            session.connecting_s = time.monotonic()
        left_s = session.deadline_s - time.monotonic()
        if left_s <= 0:
            self.hop_failed("no time left before the connect deadline")
            return
        sock, err = connect_nonblocking(family, sockaddr)
        if sock is None:
            self.hop_failed(os.strerror(err))
            return
        self.sock = sock
        session.loop.add_writer(sock, self.on_connected)
        self.timer = session.loop.call_later(left_s / (1 + sum(1 for h in self.hops if h != DIRECT)),
                                             self.on_timeout)

    @entry_point
    def on_connected(self) -> None:
        if self.session.over:
            return
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.hop_failed(os.strerror(err))
            return
        loop = self.session.loop
        loop.remove(self.sock)
        if not self.send(self.handshake.start()):
            return
        loop.add_reader(self.sock, self.on_readable)

    @entry_point
    def on_readable(self) -> None:
        if self.session.over:
            return
        try:
            data = self.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.hop_failed(f"{exc.strerror or exc} during its handshake")
            return
        if not data:
            self.hop_failed("it closed the connection during its handshake")
            return
        step = self.handshake.receive(data)
        if step.send and not self.send(step.send):
            return
        if step.reply is not None:  # the parent's answer: final (see the docstring)
            self.session.connect_done()
            self.session.fail(step.reply, f"via {self.hop}: {step.why}")
            return
        if step.done:
            self.timer.cancel()
            self.session.loop.remove(self.sock)
            sock, self.sock = self.sock, None
            self.session.chained(sock, step.leftover, self.hop)

    @entry_point
    def on_timeout(self) -> None:
        if self.session.over:
            return
        self.hop_failed("no answer in time")

    def send(self, data: bytes) -> bool:
        """Handshake messages are a few bytes on a fresh connection: they fit, or it is broken."""
        try:
            sent = self.sock.send(data)
        except OSError as exc:
            self.hop_failed(f"{exc.strerror or exc} during its handshake")
            return False
        if sent != len(data):
            self.hop_failed("it does not read its handshake")
            return False
        return True

    def hop_failed(self, why: str) -> None:
        """This parent is out of the running: logged, and the next one is tried."""
        self.close()
        failure = f"{self.hop}: {why}"
        self.failures.append(failure)
        log.warning("%s: parent proxy %s", self.session.describe(), failure)
        self.next_hop()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sock is not None:
            self.session.loop.remove(self.sock)
            self.sock.close()
            self.sock = None
