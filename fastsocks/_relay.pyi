"""What Python sees of the Cython relay engine (fastsocks/_relay.pyx).

The pure-Python twin fastsocks._relay_py.RelayEngine has the same surface and is the
reference the tests check the fast engine against.
"""

import socket
import sys

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:
    from typing_extensions import Buffer
from typing import Protocol, type_check_only

from typing_extensions import disjoint_base

from fastsocks._relay_types import REASONS as REASONS, Ended as Ended

@disjoint_base
class RelayEngine:
    def __init__(
        self,
        *,
        buffer_size: int = 65536,
        splice: bool = True,
        pipe_size: int = 1 << 20,
        max_pipes: int = 1024,
        pipe_pool: int = 64,
        pipe_reserve: int = 2,
        pipe_idle_s: float = 2.0,
        idle_timeout_s: float = 300.0,
        max_events: int = 256,
    ) -> None: ...
    def fileno(self) -> int: ...
    @property
    def active(self) -> int: ...
    @property
    def pending(self) -> bool: ...
    def counters(self) -> tuple[int, int, int, int, int]:
        """(bytes_up, bytes_down, sessions_total, splice_switches, pipes_open)"""
    def add(self, client_fd: int, upstream_fd: int, tag: int, initial_up: Buffer | None = None) -> None:
        """Relay a session; the engine owns both (non-blocking) fds from now on, also on failure."""
    def run(self) -> list[Ended]: ...
    def expire_idle(self) -> list[Ended]:
        """End the sessions idle for idle_timeout_s; and close the pooled splice pipes that no
        session took for pipe_idle_s, but pipe_reserve of them (at most every pipe_idle_s)."""
    def close_all(self) -> list[Ended]: ...
    def close(self) -> list[Ended]: ...

# ---------------------------------------------------------------------- SOCKS5 UDP header
# RFC 1928 §7: RSV(2) FRAG(1) ATYP(1) DST.ADDR DST.PORT(2) DATA. Also in _relay_py.

def udp_unpack(data: Buffer) -> tuple[int, str, int, int] | None:
    """(atyp, host, port, header_len) of a client datagram's header, or None to drop it:
    truncated, RSV != 0, FRAG != 0 (fragmentation unsupported), unknown ATYP, or a domain
    name that is empty or not printable ASCII. ``host``: dotted IPv4, IPv6 as inet_ntop
    writes it, or the name. The payload is ``data[header_len:]``."""

def udp_pack(host: str, port: int) -> bytes:
    """The header for a datagram from ``host:port``: IPv4 or IPv6 text (IPv4-mapped is
    sent as IPv4); ValueError for anything else or a port outside 0-65535."""

# ---------------------------------------------------------------------- UDP relay
# The datagram loop of UDP ASSOCIATE (RFC 1928 §7); udp.py keeps sockets, timers, names and
# logging. Also in _relay_py, without recvmmsg/sendmmsg/GSO. Theory: _udp_relay.pxi.

@type_check_only
class UdpOwner(Protocol):
    """What a UdpFlow calls back (the UdpAssociation); never per datagram of a known
    destination. In run() or a pump an exception here drops that datagram, the work goes
    on, and the first one is raised at the end; a hook must not run() or pump again."""
    def allowed(self, family: int, sockaddr: tuple[str, int]) -> bool:
        """May the client send to this IP destination (unmapped: an IPv4-mapped one comes as
        AF_INET)? Asked once per (ip, port): the verdict is cached until forget_verdicts()."""
    def remote_socket(self, family: int) -> socket.socket | None:
        """The non-blocking remote-facing socket of ``family``, opened on first use (the
        relay watches it), or None if it cannot be opened."""
    def send_to_name(self, name: str, port: int, payload: bytes) -> None:
        """A datagram for a domain name: resolve it, then UdpFlow.send() (the slow path)."""
    def warn_foreign(self, source: tuple[str, int]) -> None:
        """The first datagram from a source that is not the client's (dropped, counted)."""

@disjoint_base
class UdpRelay:
    """The epoll set and batch buffers of one worker's associations (one thread: not
    re-entrant)."""
    def __init__(self, *, batch: int = 64, max_verdicts: int = 4096, max_peers: int = 4096) -> None:
        """``batch``: datagrams read from one socket at a time; ``max_verdicts``/``max_peers``:
        the bound of each flow's caches (the least recently used half is forgotten when full)."""
    def fileno(self) -> int:
        """The epoll fd of every flow's sockets (-1 once closed): watch it for reading."""
    def run(self) -> None:
        """The fd is readable: relay a batch from each ready socket, again while some are
        ready, up to 4 batches' worth; then raise the first exception a hook raised."""
    def close(self) -> None:
        """Close the epoll fd; idempotent."""
    def new_flow(
        self, owner: UdpOwner, relay_sock: socket.socket, client_ip: str, client_port: int
    ) -> UdpFlow:
        """One association: ``relay_sock`` is its client-facing socket; only datagrams from
        ``client_ip`` (and ``client_port``, or the port of the first one when 0) are let in.
        The flow never closes a socket: its owner does, after flow.close()."""

@disjoint_base
class UdpFlow:
    datagrams_up: int
    datagrams_down: int
    bytes_up: int      # payload bytes, headers not counted
    bytes_down: int
    dropped: int       # foreign, malformed, FRAG != 0, denied, strangers', refused by the kernel
    @property
    def last_active_s(self) -> float:
        """time.monotonic() when a datagram last left (or when the flow was made)."""
    @property
    def client_addr(self) -> tuple[str, int] | None:
        """Where datagrams for the client go, once known."""
    def pump_up(self) -> int:
        """What run() does for the client-facing socket: one batch up; the datagrams that left."""
    def pump_down(self, family: int) -> int:
        """What run() does for the remote-facing socket of ``family``: one batch down to the
        client, only from IPs the client has sent to; the datagrams that left."""
    def send(self, sockaddr: tuple, payload: Buffer, checked: bool = False) -> int:
        """One datagram to a resolved address, checked like a batch's (unless ``checked``:
        the owner judged it already): 1 if it left, else 0. Hooks' exceptions propagate. A
        hook may call it (it uses no batch buffer)."""
    def forget_verdicts(self) -> None:
        """Ask allowed() again for every destination (the rules changed)."""
    def close(self) -> None:
        """Leave the relay, forget the owner and the sockets (call it before closing them);
        counters stay. Idempotent."""
