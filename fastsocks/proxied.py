"""Listeners behind a load balancer: each connection opens with a PROXY protocol header.

Theory of operation
-------------------
A listener with ``proxy_protocol`` is not given to the relay engine: the worker's own loop
accepts on it (``ProxiedListener``), in bounded batches. A connection from an address
outside ``trusted_proxies`` is closed at once, whatever it would send: a header from
anyone else would let any client choose the address the rules, the caps, the failed-login
block and the logs see (gost's mistake). From a trusted balancer, ``HeaderWait`` reads
until the header (v1 or v2, protocol/proxy.py) is whole; a malformed or missing header,
EOF, or no header within the handshake timeout closes the connection, logged once with
the balancer's address. The header's source address then becomes the client's: the
worker's ``proxied_client`` runs the door and starts an ordinary ``Session``, which
replays what followed the header in the same read. A LOCAL header (the balancer's own
health check) keeps the balancer's address. The header and the SOCKS handshake share
one deadline: the session's starts at accept.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable

from fastsocks import access
from fastsocks.errors import ProtocolError
from fastsocks.loop import Loop
from fastsocks.policy import unmapped
from fastsocks.protocol.common import NEED_DATA
from fastsocks.protocol.proxy import HeaderReader, ProxyHeader

log = logging.getLogger(__name__)

ACCEPT_BATCH = 64
RECV_BYTES = 4096


class HeaderWait:
    """One connection from a trusted balancer until its PROXY header is in."""

    def __init__(self, sock: socket.socket, address: tuple, loop: Loop, timeout_s: float,
                 on_header: Callable[[HeaderWait, ProxyHeader, bytes], None],
                 on_over: Callable[[HeaderWait], None]) -> None:
        self.sock = sock
        self.address = address[:2]  # the balancer's
        self.peer = access.format_peer(address)
        self.loop = loop
        self.started_s = time.monotonic()
        self.reader = HeaderReader()
        self.on_header = on_header
        self.on_over = on_over
        self.timer = loop.call_later(timeout_s, self.on_timeout)
        self.over = False

    def start(self) -> None:
        self.loop.add_reader(self.sock, self.on_readable)
        self.on_readable()  # TCP_DEFER_ACCEPT: the header is usually here already

    def on_readable(self) -> None:
        if self.over:
            return
        try:
            data = self.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.fail(f"connection error before the PROXY header: {exc.strerror}")
            return
        if not data:
            self.fail("closed before its PROXY header was whole")
            return
        self.reader.receive_data(data)
        try:
            header = self.reader.next_event()
        except ProtocolError as exc:
            self.fail(f"bad PROXY header: {exc}")
            return
        if header is NEED_DATA:
            return
        self.end()
        self.on_header(self, header, self.reader.trailing)

    def on_timeout(self) -> None:
        if not self.over:
            self.fail("no PROXY header within the handshake timeout")

    def fail(self, why: str) -> None:
        log.warning("client=%s (a balancer) %s: closed", self.peer, why)
        self.end()
        self.sock.close()

    def end(self) -> None:
        """Stop watching; the socket is the caller's from now on (or closed by fail())."""
        if self.over:
            return
        self.over = True
        self.timer.cancel()
        self.loop.remove(self.sock)
        self.on_over(self)

    def close(self) -> None:
        if not self.over:
            self.end()
            self.sock.close()


class ProxiedListener:
    """Accepts on one proxy_protocol listening socket, on the worker's loop."""

    def __init__(self, sock: socket.socket, loop: Loop, trusted: tuple, on_trusted: Callable,
                 on_error: Callable[[OSError], None]) -> None:
        self.sock = sock
        self.loop = loop
        self.trusted = trusted  # networks, Settings.trusted_proxies
        self.on_trusted = on_trusted  # (socket, its address) -> None
        self.on_error = on_error  # accept() failed (EMFILE: the worker pauses accepting)
        self.accepted = 0
        self.watching = False

    def start(self) -> None:
        if not self.watching:
            self.loop.add_reader(self.sock, self.on_readable)
            self.watching = True

    def stop(self) -> None:
        if self.watching:
            self.loop.remove(self.sock)
            self.watching = False

    def on_readable(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self.on_error(exc)
                return
            self.accepted += 1
            sock.setblocking(False)
            if not self.is_trusted(address[0]):
                log.warning("client=%s connected to a PROXY protocol listener from outside trusted_proxies: closed",
                            access.format_peer(address))
                sock.close()
                continue
            self.on_trusted(sock, address)

    def is_trusted(self, host: str) -> bool:
        ip = unmapped(ipaddress.ip_address(host.partition("%")[0]))
        return any(ip in network for network in self.trusted)
