"""What a session may use of the worker that accepted it, and the values it ends with.

hev-socks5-server's split: a core that knows the protocol, a session that does the handshake
and then hands its sockets on, a relay that sees only fds. A session (session.py, and
bind.py while a BIND waits for its peer) talks to its worker through ``SessionHost`` alone:
the loop, the resolver, the authenticator, the frozen ``Environment`` it was accepted
under, ``admit()`` for the caps once the user is known, and one call at its end,
``session_over(session, outcome)``, with one of the outcomes below. The session sends
every reply itself; the host relays, starts the UDP association, or writes the failure's
access line.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fastsocks.auth import Authenticator
    from fastsocks.loop import Loop
    from fastsocks.policy import Query
    from fastsocks.protocol.socks5 import Reply
    from fastsocks.resolver import Resolver
    from fastsocks.settings import Settings


@dataclass(frozen=True, slots=True)
class Environment:
    """The worker's settings and addresses when a session was accepted: a reload makes a
    new one for the sessions after it, so a session sees one set of rules from start to end."""
    settings: Settings
    own_addresses: frozenset[tuple[str, int]]
    is_own_listener: Callable[[object, int], bool]  # (ip, port) -> it reaches this proxy


@dataclass(frozen=True, slots=True)
class Relay:
    """Both sockets, detached, for the relay engine, and what the client pipelined."""
    client_fd: int
    upstream_fd: int
    initial: bytes


@dataclass(frozen=True, slots=True)
class StartUdp:
    """UDP ASSOCIATE answered (RFC 1928 §7): the TCP connection the association lives as long
    as, its bound client-facing socket, the only source it admits (port 0: the first
    datagram's), and what the rules see of every datagram."""
    client: socket.socket
    relay_sock: socket.socket
    client_ip: str
    client_port: int
    query: Query


@dataclass(frozen=True, slots=True)
class Failed:
    """The session answered ``reply`` (None: nothing could be) and closed its sockets."""
    reply: Reply | None
    why: str
    failed_login: bytes | None = None  # the user name of a refused RFC 1929 login


Outcome = Relay | StartUdp | Failed


class SessionHost(Protocol):
    loop: Loop
    resolver: Resolver

    @property
    def auth(self) -> Authenticator | None: ...

    def admit(self, sid: int, user: bytes, command: str, udp_client: str) -> str | None:
        """Why this request is over a cap, or None; ``command`` as the rules name it, and for
        UDP ASSOCIATE the client's IP, by which the association caps count."""

    def over_quota(self, user: bytes) -> str | None:
        """Why ``user`` may start no session (its quota is used up: accounts.py), or None."""

    def next_turn(self, key: Hashable) -> int:
        """0, 1, 2, ... per key: where a round robin (a rule's via, egress addresses) is
        for the next session."""

    def session_over(self, session, outcome: Outcome) -> None:
        """The session's one last call: what became of it."""


def entry_point(method):
    """Wrap what the loop, the resolver or the authenticator calls back: a bug in a session
    ends that session (logged once, with its client) instead of leaving its sockets open.
    For a session's helper (``self.session``) as for the session itself."""

    @functools.wraps(method)
    def guarded(self, *args):
        try:
            return method(self, *args)
        except Exception:
            getattr(self, "session", self).internal_error(method.__name__)
        return None

    return guarded
