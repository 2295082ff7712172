"""A session's direct connect: its destination's addresses raced as RFC 8305 (Happy
Eyeballs v2) says.

Theory of operation
-------------------
The addresses come in the resolver's order (or are the one literal the client sent).
``order()`` interleaves the families, IPv6 first (§4): A6, A4, A6', A4', ... Each address
goes through the rules when its turn comes (a denied one is skipped, and remembered as
the reason if none is left). An attempt starts; if it has not connected within
ATTEMPT_DELAY_S (the Connection Attempt Delay, §5: 250 ms), or as soon as it fails, the
next one starts beside it; the first to connect wins and the others are closed. So one
broken family costs a quarter second, not the connect timeout. All of it runs within the
session's one connect deadline; when every attempt has failed or the deadline passes,
the last error is the client's reply.

A part of its session (it connects and screens through the session, and ends through
it), as BindWait and Chain are.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import TYPE_CHECKING

from fastsocks.host import entry_point
from fastsocks.outbound import connect_nonblocking
from fastsocks.protocol.socks5 import Reply

if TYPE_CHECKING:
    from fastsocks.session import Session

ATTEMPT_DELAY_S = 0.25  # RFC 8305 §5: the recommended Connection Attempt Delay


def order(addresses: list) -> list:
    """RFC 8305 §4: alternate the families, starting with IPv6, keeping each family's
    own order."""
    v6 = [a for a in addresses if a[0] == socket.AF_INET6]
    v4 = [a for a in addresses if a[0] != socket.AF_INET6]
    out = []
    for pair in zip(v6, v4):
        out.extend(pair)
    longer = v6 if len(v6) > len(v4) else v4
    return out + longer[min(len(v6), len(v4)):]


class AddressRace:
    __slots__ = ("session", "candidates", "attempts", "stagger", "deadline_timer", "last_errno", "denial")

    def __init__(self, session: Session, addresses: list) -> None:
        self.session = session
        self.candidates = order(addresses)
        self.attempts: dict[socket.socket, int] = {}  # running attempts, and the rule each was let in by
        self.stagger = None          # the timer that starts the next attempt
        self.deadline_timer = None
        self.last_errno = 0
        self.denial: str | None = None  # why the last refused address was refused

    def start(self) -> None:
        left_s = self.session.deadline_s - time.monotonic()
        self.deadline_timer = self.session.loop.call_later(max(left_s, 0.0), self.on_deadline)
        self.next_attempt()

    def next_attempt(self) -> None:
        """Start the next address the rules allow; end the race if none is left to try
        and none is running."""
        session = self.session
        if self.stagger is not None:
            self.stagger.cancel()
            self.stagger = None
        while self.candidates:
            family, sockaddr = self.candidates.pop(0)
            denial = session.screen(sockaddr[0], sockaddr[1])
            if denial is not None:
                self.denial = denial
                continue
            if session.leave_via_parents(sockaddr[0]):  # this address's rule names parents
                self.close()
                return
            if time.monotonic() >= session.deadline_s:
                self.last_errno = errno.ETIMEDOUT
                break
            if self.attempt(family, sockaddr):
                if self.candidates:
                    self.stagger = session.loop.call_later(ATTEMPT_DELAY_S, self.on_stagger)
                return
        if not self.attempts:
            self.lost()

    def attempt(self, family: int, sockaddr: tuple) -> bool:
        """One connect, begun; False when it failed at once (last_errno says why)."""
        session = self.session
        if not session.connecting_s:
            session.connecting_s = time.monotonic()
        sock, err = connect_nonblocking(family, sockaddr, lambda s: session.bind_egress(s, family))
        if sock is None:
            self.last_errno = err
            return False
        self.attempts[sock] = session.rule
        session.loop.add_writer(sock, lambda: self.on_writable(sock))
        return True

    @entry_point
    def on_writable(self, sock: socket.socket) -> None:
        if self.session.over or sock not in self.attempts:
            return
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        rule = self.attempts.pop(sock)
        self.session.loop.remove(sock)
        if err:
            sock.close()
            self.last_errno = err
            self.next_attempt()  # at once: the next one need not wait its delay (§5)
            return
        self.close()
        self.session.rule = rule
        self.session.connected(sock)

    @entry_point
    def on_stagger(self) -> None:
        self.stagger = None
        if not self.session.over:
            self.next_attempt()

    @entry_point
    def on_deadline(self) -> None:
        self.deadline_timer = None
        if self.session.over:
            return
        self.candidates = []
        if self.attempts:
            self.last_errno = errno.ETIMEDOUT
        self.close()
        self.lost()

    def lost(self) -> None:
        """No address connected: the client's reply says why."""
        session = self.session
        self.close()
        if self.denial is not None and not self.last_errno:
            session.fail(Reply.CONNECTION_NOT_ALLOWED, self.denial)  # every address was refused
            return
        session.connect_done()
        err = self.last_errno or errno.EHOSTUNREACH
        session.fail(Reply.for_errno(err), f"connect failed: {os.strerror(err)}")

    def close(self) -> None:
        """Stop the timers and every attempt still running (idempotent)."""
        for timer in (self.stagger, self.deadline_timer):
            if timer is not None:
                timer.cancel()
        self.stagger = self.deadline_timer = None
        for sock in self.attempts:
            self.session.loop.remove(sock)
            sock.close()
        self.attempts.clear()
