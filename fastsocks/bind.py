"""BIND (RFC 1928 §4, SOCKS4 "2) BIND") once its request is read: the wait for the peer.

Theory of operation
-------------------
``open(peer_ip)`` opens a listening socket on the address the expected peer can reach (the
local address outbound traffic to it would leave from; the address the client reached us
on when the request names no peer), and the session answers with it. Then a bounded wait
for one inbound connection: from the expected peer address only (others are closed and
logged), or, with no peer named or ``bind_any_peer``, from whoever the rules let in. The
second reply names the peer that connected, and the session hands the client and the
peer to the relay. Meanwhile the client may only wait: its leaving ends the session, and
bytes it sends early stay queued in the kernel for the relay.

A part of its session (it answers through the session's protocol object and ends through
the session), so that the session class holds the handshake and this the service.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from typing import TYPE_CHECKING

from fastsocks.access import format_peer
from fastsocks.host import entry_point
from fastsocks.policy import unmapped
from fastsocks.protocol.socks5 import Reply

if TYPE_CHECKING:
    from fastsocks.session import Session

log = logging.getLogger(__name__)


class BindWait:
    __slots__ = ("session", "listener", "expected_peer", "timer")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.listener: socket.socket | None = None
        self.expected_peer: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None  # None: any peer
        self.timer = None

    def open(self, peer_ip: str) -> None:
        session = self.session
        settings = session.env.settings
        expected = unmapped(ipaddress.ip_address(peer_ip))
        # A request with no peer (0.0.0.0 / ::) accepts whoever connects first.
        any_peer = expected.is_unspecified or settings.bind_any_peer
        if not expected.is_unspecified:
            verdict = settings.policy.decide(session.query(), expected)
            session.decided(verdict)
            if not verdict.allowed:
                session.deny(verdict)
                return
        self.expected_peer = None if any_peer else expected
        family = socket.AF_INET6 if expected.version == 6 else socket.AF_INET
        try:
            self.listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            self.listener.bind((self.reachable_address(family, str(expected)), 0))
            self.listener.listen(1)
        except OSError as exc:
            session.fail(Reply.for_errno(exc.errno or errno.EIO), f"BIND listener: {exc.strerror or exc}")
            return
        host, port = self.listener.getsockname()[:2]
        host = settings.advertise or host
        if not session.send(session.conn.send(session.reply_event(Reply.SUCCEEDED, host, port))):
            return
        loop = session.loop
        loop.add_reader(self.listener, self.on_peer)
        loop.add_reader(session.client, self.on_client)
        self.timer = loop.call_later(settings.bind_timeout_s, self.on_timeout)

    def reachable_address(self, family: int, peer_ip: str) -> str:
        """The local address the peer can reach: never 0.0.0.0 (RFC 1928 §6, BND.ADDR)."""
        if self.expected_peer is None or ipaddress.ip_address(peer_ip).is_loopback:
            here = self.session.client.getsockname()[0]
            if (":" in here) == (family == socket.AF_INET6):
                return here
        # connect() on a UDP socket picks the outbound route and sends nothing.
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((peer_ip, 9))
            return probe.getsockname()[0]

    @entry_point
    def on_peer(self) -> None:
        session = self.session
        if session.over:
            return
        try:
            peer, address = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            session.fail(Reply.GENERAL_FAILURE, f"BIND accept: {exc.strerror or exc}")
            return
        if not self.welcome(peer, address):
            return
        self.close()
        session.loop.remove(session.client)
        peer.setblocking(False)
        peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session.upstream = peer
        if session.send(session.conn.send(session.reply_event(Reply.SUCCEEDED, address[0], address[1]))):
            session.hand_off()

    def welcome(self, peer: socket.socket, address) -> bool:
        """The expected peer, or with any peer allowed one the rules let in; else closed."""
        session = self.session
        source = unmapped(ipaddress.ip_address(address[0]))
        if self.expected_peer is not None and source != self.expected_peer:
            peer.close()
            log.warning("%s BIND: closed a connection from %s, expecting %s", session.describe(),
                        format_peer(address), self.expected_peer)
            return False
        if self.expected_peer is None:  # any peer: the rules judge who came
            verdict = session.env.settings.policy.decide(session.query(), source)
            if not verdict.allowed:
                peer.close()
                log.warning("%s BIND: closed a connection from %s: %s", session.describe(),
                            format_peer(address), verdict)
                return False
        return True

    @entry_point
    def on_client(self) -> None:
        """The client may only wait; notice if it leaves (peeking leaves its bytes queued)."""
        session = self.session
        if session.over:
            return
        try:
            data = session.client.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            session.finish(None, f"client error while waiting for the BIND peer: {exc.strerror or exc}")
            return
        if not data:
            session.finish(None, "client closed while waiting for the BIND peer")
        else:
            session.loop.remove(session.client)  # early bytes wait in the kernel for the relay

    @entry_point
    def on_timeout(self) -> None:
        self.session.fail(Reply.TTL_EXPIRED, "no peer connected to the BIND address in time")

    def close(self) -> None:
        """Stop waiting: the listening socket closes. Idempotent."""
        if self.timer is not None:
            self.timer.cancel()
        if self.listener is not None:
            self.session.loop.remove(self.listener)
            self.listener.close()
            self.listener = None
