"""What Python sees of the Cython relay engine (fastsocks/_relay.pyx).

The pure-Python twin fastsocks._relay_py.RelayEngine has the same surface and is the
reference the tests check the fast engine against.
"""

from collections.abc import Buffer

REASONS: tuple[str, str, str, str]

# (tag, bytes_up, bytes_down, reason, errno); reason is one of REASONS.
Ended = tuple[int, int, int, str, int]

class RelayEngine:
    def __init__(
        self,
        *,
        buffer_size: int = 65536,
        splice: bool = True,
        pipe_size: int = 1 << 20,
        max_pipes: int = 1024,
        pipe_pool: int = 64,
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
    def expire_idle(self) -> list[Ended]: ...
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
