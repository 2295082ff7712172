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
from collections.abc import Sequence
from typing import Protocol, type_check_only

from typing_extensions import disjoint_base

from fastsocks._relay_types import NO_REPLY as NO_REPLY, REASONS as REASONS, Ended as Ended

# ---------------------------------------------------------------------- the front door
# The engine's own handshake for the common case (RelayEngine.front, _front.pxi): accept,
# a SOCKS5 greeting answered "no authentication", a CONNECT to an IPv4/IPv6 address (or a
# SOCKS4 CONNECT without USERID), the connect, the reply, then the relay; everything else
# is handed to the Python session (session.py), which replays what was read.

@type_check_only
class FrontGate(Protocol):
    """What the engine's handshake calls back (the worker's front.py), inside run(); a gate
    must not call the engine. An exception refuses that session (general failure) and is
    raised by run() once the batch is done; the sessions that ended in that batch come with
    the next run()."""
    def accepted(self, tag: int, host: str, port: int) -> bool | tuple[()] | tuple[int, int]:
        """Only with judge_accept: let this client in? False closes it unanswered; True lets
        it in. A tuple lets it in and is remembered for its address until the next front():
        the engine lets it in again without asking. ``(b0, b1)`` also counts its sessions
        (front's counts: +1 in the row's open count and in these two client buckets, -1
        when the session ends or is handed off, when the gate counts it); with
        check_blocked, a client blocked in both buckets is asked about again."""
    def request(self, tag: int, proto: int, client: str, host: str, port: int
                ) -> int | tuple[int, str] | tuple[int, str, int] | None:
        """Only with judge_request: a CONNECT the engine would run (proto 4 or 5; ``client``
        the client's IP, ``host`` the destination's, as inet_ntop writes them): to go on, the
        index of the rule that lets it through, or None or RULE_DEFAULT for the default
        action; to refuse, (SOCKS5 reply code, why) or (code, why, rule), ``rule`` an index,
        RULE_DEFAULT or RULE_NONE (not the rules: a cap). The session's Ended carries that
        rule (RULE_DEFAULT without judge_request). A go-on is remembered, with its rule, for
        (client, host, port) until the next front(): the answer may depend on these and on
        the caps alone, which the engine checks itself for the sessions it counted (over
        one, or with caps and a session not counted, it asks)."""
    def hand_off(self, fd: int, tag: int, peer: tuple[str, int], data: bytes, sent: bytes, started_s: float) -> None:
        """A client the engine does not serve itself: ``fd`` (non-blocking, out of the
        engine's epoll set) is the gate's now; ``data`` is everything the client sent,
        ``sent`` what the engine answered already (a prefix of what the session will send;
        nothing when the client's first read already showed it is not the engine's),
        ``started_s`` when it was accepted (time.monotonic())."""
    def accept_failed(self, errno: int) -> None:
        """accept() failed (not EAGAIN, EINTR or ECONNABORTED). For want of fds or memory
        (EMFILE, ENFILE, ENOBUFS, ENOMEM) the engine stopped listening: call listen() again
        later; otherwise it goes on."""

def front_parse(data: Buffer, methods: bytes, socks4: bool) -> tuple[str, int, int, str, int, int, bytes]:
    """How the engine reads what a client sent so far, from its first byte:
    (verdict, proto, family, host, port, consumed, sent). verdict "more": not enough yet;
    "connect": a CONNECT the engine runs (proto 4/5, family AF_INET/AF_INET6, host as
    inet_ntop writes it, consumed: the bytes of greeting and request, the rest is payload);
    "python": the session's reference code takes it. ``sent``: what the server has answered
    by then (the method selection). ``methods``: the server's methods in its order of
    preference (0x00 none, 0x02 username/password); ``socks4``: SOCKS4 is allowed."""

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
    def active(self) -> int:
        """Sessions being relayed."""
    @property
    def handshaking(self) -> int:
        """Clients in the engine's own handshake (accepted, not yet relayed or handed off)."""
    @property
    def accepted(self) -> int:
        """Connections accepted from the listening sockets, in all."""
    def front(
        self,
        gate: FrontGate,
        *,
        methods: bytes = b"\x00",
        socks4: bool = True,
        judge_accept: bool = False,
        judge_request: bool = False,
        own_ports: frozenset[int] = ...,
        handshake_timeout_s: float = 10.0,
        connect_timeout_s: float = 10.0,
        counts: tuple[Buffer, int, int, int, int, int, int, int] | None = None,
        caps: tuple[int, int, int] = (0, 0, 0),
        check_blocked: bool = False,
        egress: Sequence[bytes] = (),
        egress_sticky: bool = False,
        rate_up_bytes_per_s: int = 0,
        rate_down_bytes_per_s: int = 0,
        client_rate_up_bytes_per_s: int = 0,
        client_rate_down_bytes_per_s: int = 0,
    ) -> None:
        """Set (again, on reload) how the engine's handshake answers: every client from its
        next step on (its next read, request or connect; a client keeps the handshake deadline
        it was accepted with), so a reload that asks for passwords also catches the clients
        that have not greeted yet; one answered "no authentication" keeps it. ``own_ports``: destinations on these ports go to the gate's hand_off (the
        session checks for a loop through the proxy). Timeouts are checked by expire_idle().
        ``counts``: (int64 words, slot, workers, row words, open, clients, blocked, buckets),
        limits.SharedLimits.for_engine(): where the sessions of clients the gate answered
        with buckets are counted (None: no new ones; those counted are uncounted in the map
        given before, which cannot change while any is). ``caps``: (max sessions in all, per
        worker, per client; 0 none), judged over those counts as limits.py does.
        ``check_blocked``: a remembered client's buckets are checked for a failed-login block.
        ``egress``: source addresses for the engine's own connects, packed (socket.inet_pton:
        4 bytes IPv4, 16 IPv6), at most 64 of each family, else ValueError; none (the
        default): no bind, the kernel picks the source. With some, each connect binds first
        (IP_BIND_ADDRESS_NO_PORT, port 0: the port is still picked at connect(), per
        destination) to one of the destination's family: the next in turn (a counter per
        family, kept across front()), or with ``egress_sticky`` the client's,
        _relay_types.egress_index(its packed IP: 4 bytes for IPv4 and IPv4-mapped, else 16),
        as the session picks. No address of that family, or a bind() error, fails the
        connect with ENETUNREACH, or the bind's errno (EADDRNOTAVAIL for an address not
        local), answered as any connect failure with that errno (SOCKS5 0x03 network
        unreachable for those two, SOCKS4 91; Ended "failed", "connect failed: ...").
        ``rate_up_bytes_per_s``/``rate_down_bytes_per_s``: the limit of each of the sessions
        it relays from their connect on, as add()'s (0: none; ValueError unless an int >= 0).
        ``client_rate_up_bytes_per_s``/``client_rate_down_bytes_per_s``: the limits all
        sessions of one client address share (needs use_accounts()): each session holds its
        client's entry (ACCOUNT_CLIENT, the address packed, 4 bytes for IPv4 and mapped
        IPv4) from its connect until it ends; no room in the table fails it with a general
        failure before the reply. The gate's remembered answers are forgotten here."""
    def listen(self, fd: int, exclusive: bool = False) -> None:
        """Accept from this listening socket in run() (after front()); the engine does not own
        it. ``exclusive``: one waiter woken per connection among processes (EPOLLEXCLUSIVE)."""
    def unlisten(self) -> None:
        """Stop accepting from every listening socket."""
    @property
    def woke(self) -> bool:
        """The fd watch() names was ready in the last wait(): the Python loop has work."""
    def watch(self, fd: int) -> None:
        """wait() returns as soon as this fd is readable (-1: none); the fd stays the caller's.
        The worker names its selector's epoll fd: one epoll set holds everything."""
    def run_udp(self, relay: UdpRelay | None) -> None:
        """wait() runs this UDP relay (relay.run()) whenever its fd is ready (None: no more);
        close the relay only after run_udp(None)."""
    def wait(self, timeout_s: float) -> list[Ended]:
        """Wait up to ``timeout_s`` and do what run() does, and the UDP relay's run(); the
        compiled engine goes on in C until Python has work (``woke``, sessions ended, a hand-off,
        a signal, the time is up), the twin returns after one pass. Exceptions as run()'s, and the UDP
        relay's after its batch."""
    @property
    def pending(self) -> bool: ...
    def counters(self) -> tuple[int, int, int, int, int]:
        """(bytes_up, bytes_down, sessions_total, splice_switches, pipes_open)"""
    def use_accounts(self, accounts: Accounts) -> None:
        """The shared accounts add()'s ``shared`` and ``quota`` name entries of (once; the
        same object again is fine, another is ValueError)."""
    def add(
        self,
        client_fd: int,
        upstream_fd: int,
        tag: int,
        initial_up: Buffer | None = None,
        *,
        rate_up_bytes_per_s: int = 0,
        rate_down_bytes_per_s: int = 0,
        shared: Sequence[tuple[int, int, int]] = (),
        quota: tuple[int, int] | None = None,
    ) -> None:
        """Relay a session; the engine owns both (non-blocking) fds from now on, also on failure.
        ``shared``: up to two (entry, up bytes/s, down bytes/s) of use_accounts()' table: the
        session also reads through those entries' buckets (0: not that way), which every
        session naming them shares, in every process. ``quota``: (entry, bytes): each byte
        moved counts in the entry's count, and the session ends ("quota") once the count
        reaches the bytes; a read asks for no more than is left.
        ``rate_up_bytes_per_s`` (client -> upstream) and ``rate_down_bytes_per_s``: each
        direction's limit, 0 none (ValueError unless an int >= 0). A limited direction reads
        through a token bucket: max(0.1 s of the rate, 16 KiB), full at the start; once empty
        it waits until max(0.01 s of the rate, 16 KiB) has accrued (_relay_types.bucket_bytes);
        wait() sleeps no longer than the earliest such resume, run() resumes what is due."""
    def run(self) -> list[Ended]: ...
    def expire_idle(self) -> list[Ended]:
        """End the sessions idle for idle_timeout_s and the handshakes and connects past their
        timeout; and close the pooled splice pipes that no
        session took for pipe_idle_s, but pipe_reserve of them (at most every pipe_idle_s)."""
    def close_all(self) -> list[Ended]: ...
    def close(self) -> list[Ended]: ...

# ---------------------------------------------------------------------- shared accounts
# _accounts.pxi: a table in shared memory (made before the fork) of entries per user or
# client address: token buckets that sessions in every worker share, and a quota count.

ACCOUNT_USER: int
ACCOUNT_CLIENT: int
ACCOUNT_NAME_MAX: int  # bytes of a name

@disjoint_base
class Accounts:
    def __init__(self, entries: int = 16384, workers: int = 1) -> None: ...
    def forked(self, slot: int = -1) -> None:
        """In a forked process: its pid is what its locks hold (unlock_dead frees them), and
        ``slot`` its row of holds (release_slot takes them back; -1: none)."""
    @property
    def capacity(self) -> int: ...
    @property
    def in_use(self) -> int:
        """Entries claimed now."""
    def open(self, kind: int, name: Buffer) -> int:
        """The entry of (kind, name), claimed if new, one more session holding it; -1: full."""
    def close(self, index: int) -> None: ...
    def used(self, index: int) -> int:
        """The entry's quota count (IndexError: no such entry)."""
    def add_used(self, index: int, delta: int) -> int: ...
    def swap_used(self, index: int, value: int) -> int: ...
    def take(self, index: int, d: int, rate: float, want: float) -> tuple[int, float]:
        """(bytes granted, seconds to wait when none) from the entry's bucket of direction d."""
    def refund(self, index: int, d: int, n: float) -> None: ...
    def claimed(self) -> list[tuple[int, int, bytes, int, int]]:
        """(index, kind, name, sessions holding it, count) of every claimed entry."""
    def reclaim(self, keep_used: bool) -> int:
        """Free the entries no session holds (with keep_used, only those counting 0)."""
    def release_slot(self, slot: int) -> int:
        """A dead worker's holds, taken back from the entries' refs; how many."""
    def unlock_dead(self, pid: int) -> int:
        """Release the locks a dead process held; how many."""

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
