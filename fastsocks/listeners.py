"""Listening sockets, opened by the master before it forks and kept for its whole life.

``reuseport``: per address, one SO_REUSEPORT socket per worker slot; slot i always gets
socket i, also after a respawn, so the kernel's hashing never sends a connection to a
socket nobody accepts on. ``shared``: one socket per address for all workers.
"""

from __future__ import annotations

import socket

from fastsocks.settings import ListenAddress, Settings

TCP_DEFER_ACCEPT_S = 1  # SOCKS clients speak first: wake us only when bytes are there


def open_listener(address: ListenAddress, backlog: int, reuseport: bool) -> socket.socket:
    family = socket.AF_INET6 if address.family_is_ipv6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Accepted sockets inherit these on Linux: no per-connection setsockopt.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, TCP_DEFER_ACCEPT_S)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class ListenerSet:
    """The master's listening sockets: ``for_slot(i)`` are the ones worker slot i accepts on."""

    def __init__(self, settings: Settings, inherited: list[list[socket.socket]] | None = None,
                 activated: bool = False) -> None:
        """``inherited``: rows bound already, one per address of ``settings.listen``: systemd's
        (socket activation, ``activated``: one socket per address) or an old master's
        (upgrade.py: one per worker slot in reuseport mode)."""
        self.reuseport = settings.accept_mode == "reuseport"
        self.activated = activated
        # Per row (address): its connections open with a PROXY header.
        self._proxied = [address.proxy_protocol for address in settings.listen]
        if inherited:
            self._socks = [list(row) for row in inherited]
            return
        per_address = settings.workers if self.reuseport else 1
        self._socks: list[list[socket.socket]] = []
        try:
            for address in settings.listen:
                # The first bind of a port 0 address picks the port; the others share it.
                first = open_listener(address, settings.backlog, self.reuseport)
                bound = ListenAddress(address.host, first.getsockname()[1], address.proxy_protocol)
                row = [first] + [open_listener(bound, settings.backlog, True) for _ in range(per_address - 1)]
                self._socks.append(row)
        except OSError:
            self.close()
            raise

    @property
    def addresses(self) -> list[ListenAddress]:
        return [ListenAddress(*row[0].getsockname()[:2], proxied)
                for row, proxied in zip(self._socks, self._proxied)]

    def for_slot(self, slot: int) -> list[socket.socket]:
        return [row[slot if self.reuseport else 0] for row in self._socks]

    @property
    def proxied(self) -> list[bool]:
        """For each socket of a for_slot() list: whether its clients open with a PROXY header."""
        return list(self._proxied)

    def rows(self) -> list[list[socket.socket]]:
        """Per address, its sockets (one per slot in reuseport mode): what an upgrade hands over."""
        return [list(row) for row in self._socks]

    def all(self) -> list[socket.socket]:
        return [sock for row in self._socks for sock in row]

    def close(self) -> None:
        for sock in self.all():
            sock.close()
        self._socks = []
        self._proxied = []
