"""The relay engine in plain Python: the reference for fastsocks._relay.

Same API and the same observable behaviour (bytes delivered, half-close, backpressure,
end reasons, counters, the front door's answers and callbacks), written for clarity rather
than speed: level-triggered epoll with the interest of each fd recomputed after every
event, copy mode only, and Python bytes objects for whatever the destination would not take.

Theory of operation
-------------------
A relayed session is two sockets and two directions (client -> upstream, upstream ->
client). Each direction reads only while nothing it read is pending, so at most one buffer
per direction is in flight (backpressure); EOF on a source becomes ``shutdown(SHUT_WR)``
on the destination once everything read is written (half-close). A session ends when both
directions have forwarded EOF (eof), on the first error (error), after ``idle_timeout_s``
without an event (idle, by expire_idle) or at close_all (shutdown).

A direction with a rate limit reads through a token bucket, as the compiled engine does
(its "Rates", the numbers in _relay_types): each recv asks for at most the tokens there
are; an empty bucket throttles it until enough has accrued, and meanwhile its source is
not watched for reading (level-triggered: it would be reported again and again) and the
poll sleeps no longer than the earliest resume.

The front door (``front()``, ``listen()``) adds the steps before that, for the common case
only::

    accept ──judge_accept: gate.accepted() False──> closed, nothing said, no Ended
      │
    HANDSHAKE: read (512 bytes at most), front_parse() all of it, send the method
      │        selection's unsent part; each read again
      │──"python", EOF, a read error, 512 bytes still "more", a method selection the
      │   client did not take whole──> gate.hand_off() (at the end of run())
      │──"connect" to 0.x.x.x, ::/80, or a port in own_ports──> gate.hand_off()
      │──judge_request: gate.request() refuses──> failure reply, Ended "failed"
      │   (the answers that let a client through are remembered until the next front():
      │   per address at accept, per client/destination/port at the request; see _front.pxi)
      │──past handshake_timeout_s (expire_idle)──> closed unanswered, Ended "failed", reply -1
    CONNECTING: a non-blocking connect, from an egress address if front() gave some (bound
      │         first, the port left to connect(); see _front.pxi); the client is not
      │         watched meanwhile
      │──no egress address of the destination's family (ENETUNREACH), bind() fails, the
      │   connect fails, or past connect_timeout_s──> failure reply, Ended "failed"
    RELAY: the success reply, then the session above, the payload read with the request
           going upstream first; it ends like any other, its Ended described.

``front_parse()`` is the one place that reads the client's bytes. Each check is made as
soon as the byte it needs has arrived, in wire order, so a verdict never changes once
given. What the engine runs is read by the sans-I/O reference parsers (protocol/socks5.py,
protocol/socks4.py), which the session uses for everything else. Hand-offs and
``accept_failed()`` are called at the end of ``run()``, with the batch's other work done;
a gate's exception refuses that session (general failure) and is raised by ``run()`` then,
the batch's Ended values kept for the next call that returns some. Every client that never
relays is closed gently (FIN, then what it queued is read), so that a reply is not lost
under a reset.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import select
import socket
import time

from fastsocks import access, errors
# The shared accounts live in shared memory and need atomic instructions: one table, the
# compiled one (_accounts.pxi), which this engine reads through as the compiled engine does.
from fastsocks._relay import ACCOUNT_CLIENT, ACCOUNT_NAME_MAX, ACCOUNT_USER, Accounts
from fastsocks._relay_types import NO_REPLY, REASONS, Ended
from fastsocks._relay_types import RULE_DEFAULT as _RULE_DEFAULT, RULE_NONE as _RULE_NONE
from fastsocks._relay_types import bucket_bytes as _bucket_bytes, rate_checked as _rate_checked
from fastsocks._relay_types import egress_index as _egress_index
from fastsocks._relay_types import gate_answer as _gate_answer
from fastsocks.outbound import bind_source as _bind_source
from fastsocks.protocol import socks4 as socks4_wire
from fastsocks.protocol import socks5

# Only modules and the stub's names are imported: the twin's public names are the stub's.

_EOF, _ERROR, _IDLE, _SHUTDOWN, _FAILED, _QUOTA = REASONS

# ====================================================================== front_parse
# What the engine makes of a client's first bytes: "more", "connect" or "python".

_MORE, _CONNECT, _PYTHON = "more", "connect", "python"
_SELECTED = b"\x05\x00"  # the method selection the engine sends: "no authentication"

_FRONT_MAX_BYTES = 512  # what a client may send before its request is complete (> 257 + 22)
_MAX_METHODS = 8        # the server's methods the engine takes (there are two)
_MAX_LISTENERS = 64
_ACCEPT_BATCH = 64      # accepts per listener per run(): a flood cannot starve the relays
_FRONT_CACHE_SIZE = 4096  # answers of the gate remembered, per kind; all forgotten when full
_DRAIN_READS = 4        # reads after a failure reply, before close (see _close_gently)
_MAX_EGRESS = 64        # front(egress=...): source addresses per family

# Each rule: (bytes needed, the test they must pass to stay on the engine's path). A byte
# is judged as soon as it arrives, in wire order; a request that passes every rule is one
# the reference parser reads without error.
_SOCKS5_REQUEST_RULES = (  # RFC 1928 §4: VER CMD RSV ATYP DST.ADDR DST.PORT
    (1, lambda r: r[0] == socks5.SOCKS_VERSION),
    (2, lambda r: r[1] == socks5.Command.CONNECT),
    (3, lambda r: r[2] == 0x00),
    (4, lambda r: r[3] in (socks5.AddressType.IPV4, socks5.AddressType.IPV6)),  # a name is the session's
)
_SOCKS4_REQUEST_RULES = (  # SOCKS4: VN CD DSTPORT DSTIP USERID NUL
    (2, lambda r: r[1] == socks5.Command.CONNECT),
    (8, lambda r: not (r[4:7] == b"\0\0\0" and r[7] != 0)),  # 0.0.0.x, x != 0: SOCKS4a
    (9, lambda r: r[8] == 0x00),                             # an empty USERID
)


def front_parse(data, methods: bytes, socks4: bool) -> tuple[str, int, int, str, int, int, bytes]:
    """(verdict, proto, family, host, port, consumed, sent) of what a client sent so far,
    from its first byte; see _relay.pyi. For "more" and "python" only ``proto`` and
    ``sent`` mean something (family, port and consumed are 0, host "")."""
    data = bytes(memoryview(data))
    if not data:
        return _undecided(_MORE, 0)
    if data[0] == socks5.SOCKS_VERSION:
        return _parse_socks5(data, bytes(methods))
    if data[0] == socks4_wire.SOCKS4_VERSION:
        return _parse_socks4(data) if socks4 else _undecided(_PYTHON, socks4_wire.SOCKS4_VERSION)
    return _undecided(_PYTHON, 0)


def _undecided(verdict: str, proto: int, sent: bytes = b""):
    return (verdict, proto, 0, "", 0, 0, sent)


def _judge(data: bytes, rules) -> str | None:
    """MORE or PYTHON as soon as the rules say so; None once every rule has passed."""
    for needed, passes in rules:
        if len(data) < needed:
            return _MORE
        if not passes(data):
            return _PYTHON
    return None


def _parse_socks5(data: bytes, methods: bytes):
    conn = socks5.ServerConnection()
    conn.receive_data(data)
    try:
        greeting = conn.next_event()
    except errors.ProtocolError:  # NMETHODS 0: the session answers it
        return _undecided(_PYTHON, socks5.SOCKS_VERSION)
    if greeting is socks5.NEED_DATA:
        return _undecided(_MORE, socks5.SOCKS_VERSION)
    # §3: the server picks; its first method the client offers, as the session does.
    chosen = next((m for m in methods if m in greeting.methods), None)
    if chosen != socks5.Method.NO_AUTH:
        return _undecided(_PYTHON, socks5.SOCKS_VERSION)
    sent = conn.send(socks5.MethodSelection(socks5.Method.NO_AUTH))
    verdict = _judge(conn.trailing_data[0], _SOCKS5_REQUEST_RULES)
    if verdict is not None:
        return _undecided(verdict, socks5.SOCKS_VERSION, sent)
    request = conn.next_event()  # cannot raise: every byte it checks has passed the rules
    if request is socks5.NEED_DATA:
        return _undecided(_MORE, socks5.SOCKS_VERSION, sent)
    return _connect(socks5.SOCKS_VERSION, request, data, conn.trailing_data[0], sent)


def _parse_socks4(data: bytes):
    verdict = _judge(data, _SOCKS4_REQUEST_RULES)
    if verdict is not None:
        return _undecided(verdict, socks4_wire.SOCKS4_VERSION)
    conn = socks4_wire.ServerConnection()
    conn.receive_data(data)
    request = conn.next_event()  # the USERID's NUL is here: a whole IPv4 CONNECT
    return _connect(socks4_wire.SOCKS4_VERSION, request, data, conn.trailing_data[0], b"")


def _connect(proto: int, request, data: bytes, trailing: bytes, sent: bytes):
    family = socket.AF_INET if request.address_type == socks5.AddressType.IPV4 else socket.AF_INET6
    # As inet_ntop writes it, like the C engine (ipaddress writes ::ffff:1.2.3.4 otherwise).
    host = socket.inet_ntop(family, ipaddress.ip_address(request.host).packed)
    return (_CONNECT, proto, int(family), host, request.port, len(data) - len(trailing), sent)


# ====================================================================== the relay


class _Direction:
    __slots__ = ("src", "dst", "pending", "eof", "done", "nbytes", "limit")

    def __init__(self, src: socket.socket, dst: socket.socket, pending: bytes, rate_bytes_per_s: int,
                 limits: _Limits | None = None) -> None:
        self.src, self.dst = src, dst
        self.pending = pending
        self.eof = self.done = False
        self.nbytes = 0
        self.limit = limits if limits is not None else _TokenBucket(rate_bytes_per_s) if rate_bytes_per_s else None


class _OverQuota(Exception):
    """A direction's session used up its quota (the session ends "quota")."""


class _Limits:
    """What a direction reads through besides, or as well as, its own bucket: the shared
    accounts' buckets (add(shared=)) and its session's quota (add(quota=)), as the compiled
    engine's _allowance() and _charge() do them."""

    __slots__ = ("own", "accounts", "d", "shared", "quota", "granted", "resume_s")

    def __init__(self, own: _TokenBucket | None, accounts, d: int, shared: list, quota) -> None:
        self.own, self.accounts, self.d = own, accounts, d
        self.shared = shared   # [(entry, rate)]
        self.quota = quota     # (entry, bytes) or None
        self.granted: list[tuple[int, int]] = []
        self.resume_s = 0.0

    def allowance(self, size: int, now: float) -> int:
        if now < self.resume_s:
            return 0
        self.resume_s = 0.0
        if self.quota is not None:
            left = self.quota[1] - self.accounts.used(self.quota[0])
            if left <= 0:
                raise _OverQuota
            size = min(size, left)
        if self.own is not None:
            size = self.own.allowance(size, now)
            if not size:
                self.resume_s = self.own.resume_s
                return 0
        self.granted = []
        for entry, rate in self.shared:
            got, wait_s = self.accounts.take(entry, self.d, rate, size)
            if not got:
                for taken_entry, taken in self.granted:
                    self.accounts.refund(taken_entry, self.d, taken)
                self.granted = []
                self.resume_s = now + wait_s
                return 0
            self.granted.append((entry, got))
            size = got
        return size

    def charge(self, n: int) -> None:
        if self.own is not None:
            self.own.tokens -= n
        for entry, got in self.granted:
            if got > n:
                self.accounts.refund(entry, self.d, got - n)
        self.granted = []
        if self.quota is not None and n:
            self.accounts.add_used(self.quota[0], n)


class _TokenBucket:
    """A limited direction's token bucket (_relay.pyx, "Rates"), full at the start."""

    __slots__ = ("rate_bytes_per_s", "burst_bytes", "resume_bytes", "tokens", "refilled_s", "resume_s")

    def __init__(self, rate_bytes_per_s: int) -> None:
        self.rate_bytes_per_s = float(rate_bytes_per_s)
        self.burst_bytes, self.resume_bytes = _bucket_bytes(self.rate_bytes_per_s)
        self.tokens = self.burst_bytes
        self.refilled_s = time.monotonic()
        self.resume_s = 0.0  # throttled until then (0: not throttled)

    def allowance(self, size: int, now: float) -> int:
        """What may be read now, at most ``size``; 0: throttled until resume_s."""
        if now < self.resume_s:
            return 0
        self.resume_s = 0.0
        self.tokens = min(self.burst_bytes, self.tokens + (now - self.refilled_s) * self.rate_bytes_per_s)
        self.refilled_s = now
        if self.tokens >= 1:
            return min(size, int(self.tokens))
        self.resume_s = now + (self.resume_bytes - self.tokens) / self.rate_bytes_per_s
        return 0

    def charge(self, n: int) -> None:
        """A read moved ``n`` bytes."""
        self.tokens -= n


class _Session:
    __slots__ = ("tag", "socks", "dirs", "last_active_s", "registered", "described", "started_s", "bucket",
                 "marks", "held")

    def __init__(self, tag: int, client: socket.socket, upstream: socket.socket, initial: bytes,
                 described: str = "", started_s: float = 0.0, bucket: tuple | None = None,
                 marks: tuple = (_RULE_NONE, None, None), rates: tuple = (0, 0), limits: tuple = (None, None)) -> None:
        self.tag = tag
        self.socks = (client, upstream)
        self.dirs = (_Direction(client, upstream, initial, rates[0], limits[0]),
                     _Direction(upstream, client, b"", rates[1], limits[1]))
        self.last_active_s = time.monotonic()
        self.registered = {client.fileno(): 0, upstream.fileno(): 0}
        self.described, self.started_s = described, started_s
        self.bucket = bucket  # counted in the shared counts (front's counts) in these buckets
        self.marks = marks    # a front-door session's rule and phases (_Front.marks)
        self.held = None      # a front-door session's client entry in the shared accounts, if any


class _Counts:
    """The shared session counts (limits.SharedLimits, front(counts=...)) as the engine
    counts in them: this worker's row, read as the sum over all rows."""

    def __init__(self, given: tuple) -> None:
        self.given = given
        words, self.slot, self.workers, self.row, self.open, self.clients, self.blocked, self.buckets = given
        self.words = memoryview(words).cast("B").cast("q")
        if not (0 <= self.slot < self.workers and 0 <= self.open < self.row and 0 <= self.clients
                and self.clients + self.buckets <= self.row and 0 <= self.blocked
                and self.blocked + self.buckets <= self.row and 0 < self.buckets <= 0x10000):
            raise ValueError(f"counts: a layout that does not fit its rows: {given[1:]}")
        if len(self.words) < self.workers * self.row:
            raise ValueError(f"counts: {len(self.words)} words, {self.workers} rows of {self.row} need more")

    def tally(self, bucket: tuple, delta: int) -> None:
        base = self.slot * self.row
        self.words[base + self.open] += delta
        for b in bucket:
            self.words[base + self.clients + b] += delta

    def _sum(self, offset: int) -> int:
        return sum(self.words[w * self.row + offset] for w in range(self.workers))

    def over_caps(self, bucket: tuple, caps: tuple) -> bool:
        total, worker, client = caps
        return bool((worker and self.words[self.slot * self.row + self.open] > worker)
                    or (total and self._sum(self.open) > total)
                    or (client and min(self._sum(self.clients + b) for b in bucket) > client))

    def is_blocked(self, bucket: tuple) -> bool:
        now_ms = int(time.monotonic() * 1000)
        return all(max(self.words[w * self.row + self.blocked + b] for w in range(self.workers)) > now_ms
                   for b in bucket)


@dataclasses.dataclass(frozen=True)
class _FrontRules:
    """What front() set: how every client is answered from its next step on (a client
    keeps only the handshake deadline it was accepted with)."""

    gate: object
    methods: bytes
    socks4: bool
    judge_accept: bool
    judge_request: bool
    own_ports: frozenset
    handshake_timeout_s: float
    connect_timeout_s: float
    caps: tuple = (0, 0, 0)     # max sessions in all, per worker, per client (0: none)
    check_blocked: bool = False
    egress: dict = dataclasses.field(default_factory=dict)  # family -> source addresses, as text
    egress_sticky: bool = False
    rates: tuple = (0, 0)       # each session's limits, bytes/s up and down (0: none)
    client_rates: tuple = (0, 0)  # its client's, shared (use_accounts' table), likewise


class _Front:
    """A client at the front door, from accept until it relays, fails or is handed off."""

    __slots__ = ("tag", "client", "peer", "rules", "started_s", "deadline_s", "data", "answered",
                 "proto", "dest", "consumed", "upstream", "bucket", "requested_s", "connected_s", "rule")

    def __init__(self, tag: int, client: socket.socket, peer: tuple[str, int], rules: _FrontRules) -> None:
        self.tag, self.client, self.peer, self.rules = tag, client, peer, rules
        self.started_s = time.monotonic()
        self.deadline_s = self.started_s + rules.handshake_timeout_s
        self.data = b""       # everything read from the client
        self.answered = b""   # what was sent to it (a prefix of the method selection)
        self.proto = 0        # 4 or 5 once the first byte says so
        self.dest: tuple[int, str, int] | None = None  # (family, host, port) of its CONNECT
        self.consumed = 0     # bytes of greeting and request; the rest is payload
        self.upstream: socket.socket | None = None     # while connecting
        self.bucket: tuple | None = None  # counted in the shared counts in these buckets
        self.requested_s = 0.0  # the request was read (0: not yet)
        self.connected_s = 0.0  # the connect was done, or failed (0: not tried)
        self.rule = _RULE_NONE  # what decided its CONNECT (Ended.rule)

    @property
    def described(self) -> str:
        """The access line's opening, as access.describe writes it."""
        proto = {5: "socks5", 4: "socks4"}.get(self.proto, "-")
        who = f"client={access.format_peer(self.peer)} proto={proto}"
        if self.dest is None:
            return f"{who} cmd=- dest=-"
        _family, host, port = self.dest
        return f"{who} cmd=connect dest={access.format_host(host)}:{port}"

    def ended(self, reply: int, err: int, why: str) -> Ended:
        return Ended(self.tag, 0, 0, _FAILED, err, self.described, self.started_s, reply, why, *self.marks())

    def marks(self) -> tuple:
        """Ended's rule, handshake_s and connect_s."""
        return (self.rule, _span(self.started_s, self.requested_s), _span(self.requested_s, self.connected_s))


class _Batch:
    """What one run() owes the gate once its work is done, and what it returns."""

    def __init__(self, ended: list) -> None:
        self.ended = ended
        self.handoffs: list[tuple[_FrontRules, tuple]] = []
        self.accept_errno = 0
        self.error: BaseException | None = None

    def gate_failed(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc


_ACCEPT_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class RelayEngine:
    def __init__(self, *, buffer_size: int = 65536, splice: bool = True, pipe_size: int = 1 << 20,
                 max_pipes: int = 1024, pipe_pool: int = 64, pipe_reserve: int = 2, pipe_idle_s: float = 2.0,
                 idle_timeout_s: float = 300.0, max_events: int = 256) -> None:
        # Copies only: the splice and pipe arguments are accepted, and checked, for the same API.
        if buffer_size < 1024 or max_events < 1 or max_pipes < 0 or pipe_pool < 0 or pipe_reserve < 0:
            raise ValueError("buffer_size >= 1024, max_events >= 1, max_pipes/pipe_pool/pipe_reserve >= 0")
        self._epoll: select.epoll | None = select.epoll()
        self._buf_size = buffer_size
        self._idle_timeout_s = idle_timeout_s
        self._max_events = max_events
        self._by_fd: dict[int, _Session] = {}
        self._sessions: set[_Session] = set()
        self._throttled: set[_Session] = set()  # with a direction waiting for its bucket
        self._accounts = None  # use_accounts(): the shared accounts add(shared=, quota=) name entries of
        self._total = [0, 0, 0]
        # The front door.
        self._rules: _FrontRules | None = None
        self._wake_fd = -1                  # wait(): the Python loop's epoll fd
        self._woke = False
        self._udp: UdpRelay | None = None   # the UDP relay wait() runs
        self._udp_ready = False
        self._listen_fds: list[int] = []
        self._fronts: set[_Front] = set()
        self._front_by_fd: dict[int, _Front] = {}
        self._n_accepted = 0
        self._unreported: list = []  # Ended values of a run() that raised a gate's exception
        # The gate's answers that let a client in, remembered until the next front().
        self._accept_cache: dict[bytes, tuple] = {}             # client IP -> buckets or ()
        self._verdict_cache: dict[tuple[bytes, bytes, int], int] = {}  # (client, dest, port) let through: its rule
        self._counts: _Counts | None = None  # kept without counts: what is counted is uncounted there
        self._count_new = False
        self._n_counted = 0
        self._egress_turns = {socket.AF_INET: 0, socket.AF_INET6: 0}  # round robin, kept across front()

    def fileno(self) -> int:
        return self._epoll.fileno() if self._epoll else -1

    @property
    def active(self) -> int:
        return len(self._sessions)

    @property
    def handshaking(self) -> int:
        return len(self._fronts)

    @property
    def accepted(self) -> int:
        return self._n_accepted

    @property
    def pending(self) -> bool:
        return False  # level-triggered: the kernel reports what is still ready

    def counters(self) -> tuple[int, int, int, int, int]:
        return (self._total[0], self._total[1], self._total[2], 0, 0)

    def front(self, gate, *, methods: bytes = b"\x00", socks4: bool = True, judge_accept: bool = False,
              judge_request: bool = False, own_ports: frozenset = frozenset(), handshake_timeout_s: float = 10.0,
              connect_timeout_s: float = 10.0, counts=None, caps: tuple = (0, 0, 0),
              check_blocked: bool = False, egress=(), egress_sticky: bool = False, rate_up_bytes_per_s: int = 0,
              rate_down_bytes_per_s: int = 0, client_rate_up_bytes_per_s: int = 0,
              client_rate_down_bytes_per_s: int = 0) -> None:
        methods, own_ports = bytes(methods), frozenset(own_ports)
        rates = (_rate_checked("rate_up_bytes_per_s", rate_up_bytes_per_s),
                 _rate_checked("rate_down_bytes_per_s", rate_down_bytes_per_s))
        client_rates = (_rate_checked("client_rate_up_bytes_per_s", client_rate_up_bytes_per_s),
                        _rate_checked("client_rate_down_bytes_per_s", client_rate_down_bytes_per_s))
        if any(client_rates) and self._accounts is None:
            raise ValueError("front(client_rate_*): needs use_accounts() first")
        egress = _egress_by_family(egress)
        if len(methods) > _MAX_METHODS:
            raise ValueError(f"at most {_MAX_METHODS} methods, got {len(methods)}")
        if not all(0 <= port <= 0xFFFF for port in own_ports):
            raise ValueError("own_ports: each 0-65535")
        caps = tuple(int(cap) for cap in caps)
        if min(caps) < 0:
            raise ValueError("caps: each 0 (none) or more")
        if counts is not None:
            given = tuple(counts)
            before = self._counts.given if self._counts is not None else None
            if self._n_counted and (given[0] is not before[0] or given[1:] != before[1:]):
                raise ValueError("sessions are counted in another map: the counts cannot change now")
            self._counts = _Counts(given)
        self._count_new = counts is not None
        self._rules = _FrontRules(gate, methods, bool(socks4), bool(judge_accept), bool(judge_request),
                                  own_ports, float(handshake_timeout_s), float(connect_timeout_s),
                                  caps, bool(check_blocked) and counts is not None, egress, bool(egress_sticky),
                                  rates, client_rates)
        self._accept_cache, self._verdict_cache = {}, {}

    def listen(self, fd: int, exclusive: bool = False) -> None:
        if self._epoll is None:
            raise ValueError("engine is closed")
        if self._rules is None:
            raise ValueError("front() first: the engine needs a gate to hand clients to")
        if len(self._listen_fds) >= _MAX_LISTENERS:
            raise ValueError(f"at most {_MAX_LISTENERS} listening sockets")
        self._epoll.register(fd, select.EPOLLIN | (select.EPOLLEXCLUSIVE if exclusive else 0))
        self._listen_fds.append(fd)

    def unlisten(self) -> None:
        if self._epoll is not None:
            for fd in self._listen_fds:
                self._epoll.unregister(fd)
        self._listen_fds = []

    def use_accounts(self, accounts) -> None:
        if self._accounts is not None and self._accounts is not accounts:
            raise ValueError("the engine already uses other accounts")
        self._accounts = accounts

    def add(self, client_fd: int, upstream_fd: int, tag: int, initial_up=None, *, rate_up_bytes_per_s: int = 0,
            rate_down_bytes_per_s: int = 0, shared=(), quota=None) -> None:
        client = socket.socket(fileno=client_fd)
        upstream = socket.socket(fileno=upstream_fd)
        try:
            if self._epoll is None:
                raise ValueError("engine is closed")
            rates = (_rate_checked("rate_up_bytes_per_s", rate_up_bytes_per_s),
                     _rate_checked("rate_down_bytes_per_s", rate_down_bytes_per_s))
            limits = self._limits_of(rates, shared, quota)
        except (ValueError, TypeError, IndexError):
            client.close()
            upstream.close()
            raise
        self._relay(_Session(tag, client, upstream, bytes(initial_up or b""), rates=rates, limits=limits))

    def _limits_of(self, rates: tuple, shared, quota) -> tuple:
        """add()'s shared and quota, checked, as each direction's _Limits (None: its own
        rate alone, as without them)."""
        if not shared and quota is None:
            return None, None
        if self._accounts is None:
            raise ValueError("add(shared=, quota=) needs use_accounts() first")
        shared = list(shared)
        if len(shared) > 2:
            raise ValueError("add(shared=): two entries at most")
        for entry, up, down in shared:
            self._accounts.used(entry)  # IndexError: no such entry
            _rate_checked("shared up rate", up)
            _rate_checked("shared down rate", down)
        if quota is not None:
            entry, limit = quota
            self._accounts.used(entry)
            if not isinstance(limit, int) or limit <= 0:
                raise ValueError(f"add(quota=): bytes > 0, not {limit!r}")
        return tuple(_Limits(_TokenBucket(rates[d]) if rates[d] else None, self._accounts, d,
                             [(entry, float(rate)) for entry, *pair in shared if (rate := pair[d])], quota)
                     for d in (0, 1))

    def run(self) -> list:
        return self._run_once(0.0)

    @property
    def woke(self) -> bool:
        return self._woke

    def watch(self, fd: int) -> None:
        if self._wake_fd >= 0:
            self._epoll.unregister(self._wake_fd)
            self._wake_fd = -1
        if fd >= 0:
            self._epoll.register(fd, select.EPOLLIN)
            self._wake_fd = fd

    def run_udp(self, relay) -> None:
        if self._udp is not None:
            self._epoll.unregister(self._udp.fileno())
            self._udp = None
        if relay is not None:
            if not isinstance(relay, UdpRelay):
                raise TypeError(f"expected a UdpRelay, got {relay!r}")
            self._epoll.register(relay.fileno(), select.EPOLLIN)
            self._udp = relay

    def wait(self, timeout_s: float) -> list:
        """run() with a timeout, and the UDP relay run when its fd is ready; one pass (the
        compiled engine loops until Python has work: the same results, fewer returns)."""
        self._woke = False
        ended = self._run_once(max(timeout_s, 0.0))
        if self._udp_ready:
            self._udp_ready = False
            self._udp.run()
        return ended

    def _run_once(self, timeout_s: float) -> list:
        if self._epoll is None:
            return self._report([])
        batch = _Batch(self._report([]))
        touched = {}
        if self._throttled:  # sleep no longer than the earliest resume
            timeout_s = min(timeout_s, max(0.0, min(_resume_s(s) for s in self._throttled) - time.monotonic()))
        for fd, _events in self._epoll.poll(timeout_s, self._max_events):
            if fd == self._wake_fd:
                self._woke = True
            elif self._udp is not None and fd == self._udp.fileno():
                self._udp_ready = True
            elif fd in self._listen_fds:
                self._accept_from(fd, batch)
            elif (front := self._front_by_fd.get(fd)) is not None:
                self._front_ready(front, fd, batch)
            elif (session := self._by_fd.get(fd)) is not None:
                touched[id(session)] = session
        now = time.monotonic()
        for session in [s for s in self._throttled if _resume_s(s) <= now]:
            self._throttled.discard(session)
            for direction in session.dirs:
                if direction.limit is not None and direction.limit.resume_s <= now:
                    direction.limit.resume_s = 0.0  # due: it reads again once it may write
            touched[id(session)] = session
        for session in touched.values():
            session.last_active_s = now
            reason, err = self._pump(session)
            if reason is not None:
                batch.ended.append(self._finish(session, reason, err))
            else:
                if _resume_s(session) < float("inf"):
                    self._throttled.add(session)
                self._update_interest(session)
        self._serve_gate(batch)
        return self._report_batch(batch)

    def expire_idle(self) -> list:
        now = time.monotonic()
        ended = self._report([])
        for front in [f for f in self._fronts if f.deadline_s <= now]:
            if front.upstream is None:
                ended.append(self._front_end(front, NO_REPLY, 0, "handshake timed out"))
            else:
                ended.append(self._connect_failed(front, errno.ETIMEDOUT))
        if self._idle_timeout_s > 0:
            limit = now - self._idle_timeout_s
            ended += [self._finish(s, _IDLE, 0) for s in list(self._sessions) if s.last_active_s < limit]
        return ended

    def close_all(self) -> list:
        ended = self._report([self._finish(s, _SHUTDOWN, 0) for s in list(self._sessions)])
        ended += [self._front_end(f, NO_REPLY, 0, "worker shutting down") for f in list(self._fronts)]
        return ended

    def close(self) -> list:
        ended = self.close_all()
        self.unlisten()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        return ended

    # ------------------------------------------------------------------ the relay

    def _relay(self, session: _Session) -> None:
        self._sessions.add(session)
        self._total[2] += 1
        for sock in session.socks:
            self._by_fd[sock.fileno()] = session
            self._epoll.register(sock.fileno(), 0)
        self._update_interest(session)

    def _pump(self, session: _Session):
        """Move what can be moved without blocking; (reason, errno) once the session ends."""
        try:
            for d, direction in enumerate(session.dirs):
                self._pump_dir(d, direction)
        except OSError as exc:
            return _ERROR, exc.errno or 0
        except _OverQuota:
            return _QUOTA, 0
        if all(direction.done for direction in session.dirs):
            return _EOF, 0
        return None, 0

    def _pump_dir(self, d: int, direction: _Direction) -> None:
        while not direction.done:
            if direction.pending:
                if not self._write(d, direction):
                    return
            if direction.eof:
                direction.dst.shutdown(socket.SHUT_WR)
                direction.done = True
                return
            size = self._buf_size
            if direction.limit is not None:
                size = direction.limit.allowance(size, time.monotonic())
                if not size:
                    return  # throttled: _run_once resumes it
            try:
                data = direction.src.recv(size)
            except (BlockingIOError, InterruptedError):
                if direction.limit is not None:
                    direction.limit.charge(0)
                return
            except OSError:
                if direction.limit is not None:
                    direction.limit.charge(0)
                raise
            if not data:
                direction.eof = True
            if direction.limit is not None:
                direction.limit.charge(len(data))
            direction.pending = data

    def _write(self, d: int, direction: _Direction) -> bool:
        """Write pending bytes; True when all were written."""
        try:
            n = direction.dst.send(direction.pending, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return False
        direction.nbytes += n
        self._total[d] += n
        direction.pending = direction.pending[n:]
        return not direction.pending

    def _update_interest(self, session: _Session) -> None:
        wanted = {sock.fileno(): 0 for sock in session.socks}
        for direction in session.dirs:
            if direction.done:
                continue
            if direction.pending:
                wanted[direction.dst.fileno()] |= select.EPOLLOUT  # backpressure: no reads
            elif not direction.eof and not (direction.limit is not None and direction.limit.resume_s):
                wanted[direction.src.fileno()] |= select.EPOLLIN | select.EPOLLRDHUP
        for fd, mask in wanted.items():
            if session.registered[fd] != mask:
                self._epoll.modify(fd, mask)
                session.registered[fd] = mask

    def _finish(self, session: _Session, reason: str, err: int):
        self._sessions.discard(session)
        self._throttled.discard(session)
        self._uncount(session)
        if session.held is not None:
            self._accounts.close(session.held)
        for sock in session.socks:
            self._by_fd.pop(sock.fileno(), None)
            sock.close()  # closing removes it from the epoll set
        up, down = (direction.nbytes for direction in session.dirs)
        if not session.described:  # add()ed: its worker knows who it was
            return Ended(session.tag, up, down, reason, err)
        return Ended(session.tag, up, down, reason, err, session.described, session.started_s, 0, "",
                     *session.marks)

    # ------------------------------------------------------------------ the front door

    def _accept_from(self, listen_fd: int, batch: _Batch) -> None:
        listener = socket.socket(fileno=listen_fd)  # a view: the engine does not own it
        try:
            for _ in range(_ACCEPT_BATCH):
                try:
                    client, address = listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except ConnectionAbortedError:
                    continue
                except OSError as exc:
                    if exc.errno in _ACCEPT_EXHAUSTED:
                        self.unlisten()
                    batch.accept_errno = exc.errno or errno.EIO
                    return
                self._n_accepted += 1
                self._front_open(client, address, batch)
        finally:
            listener.detach()

    def _front_open(self, client: socket.socket, address: tuple, batch: _Batch) -> None:
        client.setblocking(False)
        rules, tag = self._rules, self._n_accepted
        peer = (address[0].partition("%")[0], address[1])  # inet_ntop's text: no scope id
        front = _Front(tag, client, peer, rules)
        if rules.judge_accept and not self._ask_gate(batch, False, self._admit, front):
            client.close()  # SOCKS has no reply before the client's first message
            return
        self._fronts.add(front)
        self._watch(front, client, select.EPOLLIN | select.EPOLLRDHUP)
        self._front_read(front, batch)  # the greeting is often here already

    def _front_ready(self, front: _Front, fd: int, batch: _Batch) -> None:
        if front.upstream is not None and fd == front.upstream.fileno():
            err = front.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                batch.ended.append(self._connect_failed(front, err))
            else:
                self._front_connected(front, batch)
        elif front.upstream is None:
            self._front_read(front, batch)

    def _front_read(self, front: _Front, batch: _Batch) -> None:
        """Read and answer the handshake until it is decided or the client has no more."""
        while True:
            room = _FRONT_MAX_BYTES - len(front.data)
            if room == 0:
                self._hand_off(front, batch)  # more than any greeting and request we run
                return
            try:
                chunk = front.client.recv(room)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._hand_off(front, batch)  # the session reads the EOF or error again
                return
            front.data += chunk
            # Answered "no authentication" already: a reload since does not take that back.
            methods = b"\x00" if front.answered == _SELECTED else self._rules.methods
            verdict, front.proto, family, host, port, consumed, sent = front_parse(
                front.data, methods, self._rules.socks4)
            if verdict == _PYTHON or (verdict != _CONNECT and len(front.data) == _FRONT_MAX_BYTES):
                self._hand_off(front, batch)  # the session answers it all
                return
            self._answer(front, sent)
            if front.answered != sent:
                self._hand_off(front, batch)  # the session sends the rest, or finds the client gone
                return
            if verdict == _CONNECT:
                front.dest, front.consumed = (family, host, port), consumed
                self._front_request(front, batch)
                return

    def _answer(self, front: _Front, sent: bytes) -> None:
        """Send the part of the method selection not sent yet; the client may take less."""
        rest = sent[len(front.answered):]
        if not rest:
            return
        try:
            n = front.client.send(rest, socket.MSG_NOSIGNAL)
        except OSError:
            return  # gone or full: the next read says which, and the session goes on from here
        front.answered += rest[:n]

    def _front_request(self, front: _Front, batch: _Batch) -> None:
        front.requested_s = time.monotonic()
        family, host, port = front.dest
        rules = self._rules  # front() again applies from a client's next step
        ip = socket.inet_pton(family, host)
        unusual = ip[0] == 0 if family == socket.AF_INET else ip[:10] == bytes(10)
        # The session judges these: 0.x.x.x, ::, ::1, ::a.b.c.d and ::ffff:a.b.c.d (what
        # they reach depends on the host, policy.forbidden_destination) and a destination
        # that may be this proxy (a loop).
        if unusual or port in rules.own_ports:
            self._hand_off(front, batch)
            return
        # Without judge_request there are no rules to ask: the default action lets it through.
        front.rule = _RULE_NONE if rules.judge_request else _RULE_DEFAULT
        if rules.judge_request:
            refusal = self._ask_gate(batch, (socks5.Reply.GENERAL_FAILURE, "internal error in the gate"),
                                     self._judge, front, ip, port)
            if refusal is not None:
                code, why = refusal
                batch.ended.append(self._front_end(front, code, 0, why))
                return
        self._front_connect(front, batch)

    def _front_connect(self, front: _Front, batch: _Batch) -> None:
        family, host, port = front.dest
        try:
            upstream = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            batch.ended.append(self._connect_failed(front, exc.errno or errno.EIO))
            return
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        front.upstream = upstream
        self._unwatch(front, front.client)  # its payload waits in the kernel until we relay
        err = self._bind_egress(front, upstream) or upstream.connect_ex(
            (host, port) if family == socket.AF_INET else (host, port, 0, 0))
        if err == 0:
            self._front_connected(front, batch)
        elif err == errno.EINPROGRESS:
            front.deadline_s = time.monotonic() + self._rules.connect_timeout_s
            self._watch(front, upstream, select.EPOLLOUT)
        else:
            batch.ended.append(self._connect_failed(front, err))

    def _bind_egress(self, front: _Front, upstream: socket.socket) -> int:
        """Bind to the egress address this session takes (none given: no bind): 0, or the
        errno that fails its connect. See _front.pxi."""
        rules = self._rules
        if not rules.egress:
            return 0
        family = front.dest[0]
        same = rules.egress.get(family, ())
        if not same:
            return errno.ENETUNREACH  # egress addresses of the other family only: no way out from here
        if rules.egress_sticky:
            mapped = _mapped(front.peer[0].partition("%")[0])  # a link-local client's scope is no part of it
            index = _egress_index(mapped[12:] if mapped[:12] == _V4_MAPPED else mapped, len(same))
        else:
            index = self._egress_turns[family] % len(same)
            self._egress_turns[family] += 1
        return _bind_source(upstream, same[index])

    def _front_connected(self, front: _Front, batch: _Batch) -> None:
        front.connected_s = time.monotonic()
        rules, held = self._rules, None
        if any(rules.client_rates):  # its client's shared entry, held until the session ends
            mapped = _mapped(front.peer[0].partition("%")[0])
            held = self._accounts.open(ACCOUNT_CLIENT, mapped[12:] if mapped[:12] == _V4_MAPPED else mapped)
            if held < 0:
                batch.ended.append(self._front_end(front, socks5.Reply.GENERAL_FAILURE, 0,
                                                   "no room in the shared accounts table for its client's limit"))
                return
        reply = _success_reply(front.proto, front.upstream.getsockname())
        try:
            n = front.client.send(reply, socket.MSG_NOSIGNAL)
        except OSError as exc:
            n, err = 0, exc.errno or errno.EIO
        else:
            err = 0 if n == len(reply) else errno.EPIPE  # a fresh socket takes a whole reply
        if err:
            if held is not None:
                self._accounts.close(held)
            batch.ended.append(self._front_end(front, NO_REPLY, err, f"client error: {os.strerror(err)}"))
            return
        client, upstream = front.client, front.upstream
        self._forget(front)
        limits = (None, None) if held is None else self._limits_of(
            rules.rates, ((held, *rules.client_rates),), None)
        session = _Session(front.tag, client, upstream, front.data[front.consumed:],
                           front.described, front.started_s, front.bucket, front.marks(), rules.rates, limits)
        session.held = held
        self._relay(session)

    def _connect_failed(self, front: _Front, err: int) -> Ended:
        front.connected_s = time.monotonic()  # how long the connect took to fail
        return self._front_end(front, socks5.Reply.for_errno(err), err, f"connect failed: {os.strerror(err)}")

    def _front_end(self, front: _Front, reply: int, err: int, why: str) -> Ended:
        """End a client that never relayed: the failure reply (none for NO_REPLY), close."""
        client, upstream = front.client, front.upstream
        self._forget(front)
        self._uncount(front)
        if upstream is not None:
            upstream.close()
        if reply != NO_REPLY:
            try:
                client.send(_failure_reply(front.proto, reply), socket.MSG_NOSIGNAL)
            except OSError:
                pass  # the client is gone: nothing to tell
        _close_gently(client)
        return front.ended(int(reply), err, why)

    def _hand_off(self, front: _Front, batch: _Batch) -> None:
        self._forget(front)
        self._uncount(front)  # the gate counts it from here
        call = (front.client.detach(), front.tag, front.peer, front.data, front.answered, front.started_s)
        batch.handoffs.append((self._rules, call))

    # ------------------------------------------------------------------ the gate's answers, remembered

    def _admit(self, front: _Front) -> bool:
        """judge_accept: let the client in, counted where its gate said; a tuple answer is
        remembered for the address (see _front.pxi), a refusal is asked again each time."""
        key = _mapped(front.peer[0])
        bucket = self._accept_cache.get(key)
        counts = self._counts
        if bucket == () or (bucket and self._count_new and not (self._rules.check_blocked and counts.is_blocked(bucket))):
            self._count(front, bucket)
            return True
        answer = self._rules.gate.accepted(front.tag, *front.peer)
        if not isinstance(answer, tuple):
            return bool(answer)
        if len(answer) not in (0, 2):
            raise ValueError(f"gate.accepted(): True, False, () or (bucket, bucket), not {answer!r}")
        if answer:
            if counts is None or not self._count_new:
                raise ValueError("gate.accepted() named buckets, but front() gave no counts")
            if not all(isinstance(b, int) and 0 <= b < counts.buckets for b in answer):
                raise ValueError(f"gate.accepted(): buckets 0-{counts.buckets - 1}, not {answer!r}")
        if len(self._accept_cache) >= _FRONT_CACHE_SIZE:
            self._accept_cache.clear()
        self._accept_cache[key] = answer
        self._count(front, answer)
        return True

    def _judge(self, front: _Front, ip: bytes, port: int) -> tuple[int, str] | None:
        """judge_request: None goes on (and is remembered, with the rule that let it
        through), or (reply code, why); either way front.rule says what decided."""
        rules = self._rules
        key = (_mapped(front.peer[0]), _mapped_ip(ip), port)
        over = any(rules.caps) and (front.bucket is None or self._counts.over_caps(front.bucket, rules.caps))
        if not over and key in self._verdict_cache:
            front.rule = self._verdict_cache[key]
            return None
        host = front.dest[1]
        code, why, front.rule = _gate_answer(rules.gate.request(front.tag, front.proto, front.peer[0], host, port))
        if code:
            return code, why
        if len(self._verdict_cache) >= _FRONT_CACHE_SIZE:
            self._verdict_cache.clear()
        self._verdict_cache[key] = front.rule
        return None

    def _count(self, front: _Front, bucket: tuple) -> None:
        if bucket:
            self._counts.tally(bucket, 1)
            self._n_counted += 1
            front.bucket = bucket

    def _uncount(self, holder) -> None:
        """A front or session that ends (or is handed off) counts no more."""
        if holder.bucket is not None:
            self._counts.tally(holder.bucket, -1)
            self._n_counted -= 1
            holder.bucket = None

    def _watch(self, front: _Front, sock: socket.socket, mask: int) -> None:
        self._epoll.register(sock.fileno(), mask)
        self._front_by_fd[sock.fileno()] = front

    def _unwatch(self, front: _Front, sock: socket.socket) -> None:
        if self._front_by_fd.pop(sock.fileno(), None) is not None:
            self._epoll.unregister(sock.fileno())

    def _forget(self, front: _Front) -> None:
        """Out of the front door's sets and the epoll set; its sockets are the caller's."""
        self._fronts.discard(front)
        for sock in (front.client, front.upstream):
            if sock is not None and sock.fileno() >= 0:
                self._unwatch(front, sock)

    def _ask_gate(self, batch: _Batch, on_error, call, *args):
        """call(*args), a gate's hook; ``on_error``, and the exception kept, if it raises."""
        try:
            return call(*args)
        except Exception as exc:  # noqa: BLE001 (a bug in the gate): raised at the end of run()
            batch.gate_failed(exc)
            return on_error

    def _serve_gate(self, batch: _Batch) -> None:
        for rules, call in batch.handoffs:
            self._ask_gate(batch, None, rules.gate.hand_off, *call)
        if batch.accept_errno:
            self._ask_gate(batch, None, self._rules.gate.accept_failed, batch.accept_errno)

    def _report(self, ended: list) -> list:
        """``ended``, after what a run() that raised could not return."""
        unreported, self._unreported = self._unreported, []
        return unreported + ended

    def _report_batch(self, batch: _Batch) -> list:
        if batch.error is None:
            return batch.ended
        self._unreported = batch.ended
        raise batch.error


def _resume_s(session: _Session) -> float:
    """When the session's earliest throttled direction may read again (inf: none is)."""
    return min((d.limit.resume_s for d in session.dirs if d.limit is not None and d.limit.resume_s),
               default=float("inf"))


def _span(since_s: float, until_s: float) -> float | None:
    """Seconds from one phase mark to the next; None when the later one never came."""
    return until_s - since_s if until_s else None


def _success_reply(proto: int, bound: tuple) -> bytes:
    """RFC 1928 §6 (or SOCKS4's 90): where the proxy connects from."""
    host, port = bound[0].partition("%")[0], bound[1]
    if proto == socks4_wire.SOCKS4_VERSION:
        ip = socket.inet_pton(socket.AF_INET, host) if ":" not in host else bytes(4)
        return bytes([socks4_wire.REPLY_VERSION, socks4_wire.Reply.GRANTED]) + port.to_bytes(2, "big") + ip
    if ":" in host:
        atyp, ip = socks5.AddressType.IPV6, socket.inet_pton(socket.AF_INET6, host)
    else:
        atyp, ip = socks5.AddressType.IPV4, socket.inet_pton(socket.AF_INET, host)
    return bytes([socks5.SOCKS_VERSION, socks5.Reply.SUCCEEDED, 0x00, atyp]) + ip + port.to_bytes(2, "big")


def _failure_reply(proto: int, code: int) -> bytes:
    """A refusal with no address (SOCKS4 has one code for every failure: 91)."""
    if proto == socks4_wire.SOCKS4_VERSION:
        return bytes([socks4_wire.REPLY_VERSION, socks4_wire.Reply.REJECTED]) + bytes(6)
    return bytes([socks5.SOCKS_VERSION, code, 0x00, socks5.AddressType.IPV4]) + bytes(6)


def _close_gently(sock: socket.socket) -> None:
    """FIN, then drain what the client queued: closing with unread bytes would make the
    kernel send RST, and the client could lose the reply (as session.close_gently)."""
    try:
        sock.shutdown(socket.SHUT_WR)
        for _ in range(_DRAIN_READS):
            if not sock.recv(65536):
                break
    except OSError:
        pass
    sock.close()


__all__ = ["NO_REPLY", "REASONS", "Ended", "RelayEngine", "front_parse",
           "ACCOUNT_CLIENT", "ACCOUNT_NAME_MAX", "ACCOUNT_USER", "Accounts"]


# ====================================================================== SOCKS5 UDP header
# RFC 1928 §7: RSV(2) FRAG(1) ATYP(1) DST.ADDR DST.PORT(2) DATA. The reference for
# udp_unpack()/udp_pack() in _relay.pyx: same results on every input.

_UDP_ATYP_IPV4, _UDP_ATYP_DOMAIN, _UDP_ATYP_IPV6 = 1, 3, 4
_UDP_MAX_HEADER = 4 + 1 + 255 + 2


def udp_unpack(data) -> tuple[int, str, int, int] | None:
    """(atyp, host, port, header_len) of a client datagram's header, or None to drop it
    (truncated, RSV != 0, FRAG != 0, unknown ATYP, empty or non-printable domain name)."""
    head = bytes(memoryview(data)[:_UDP_MAX_HEADER])
    if len(head) < 4 or head[0] or head[1] or head[2]:
        return None
    atyp = head[3]
    if atyp == _UDP_ATYP_IPV4:
        start, size = 4, 4
    elif atyp == _UDP_ATYP_IPV6:
        start, size = 4, 16
    elif atyp == _UDP_ATYP_DOMAIN and len(head) >= 5:
        start, size = 5, head[4]
    else:
        return None
    end = start + size
    if len(head) < end + 2:
        return None
    raw = head[start:end]
    if atyp == _UDP_ATYP_DOMAIN:
        if not raw or not all(0x21 <= b <= 0x7E for b in raw):  # refused, never cut at a NUL
            return None
        host = raw.decode("ascii")
    else:
        host = socket.inet_ntop(socket.AF_INET if atyp == _UDP_ATYP_IPV4 else socket.AF_INET6, raw)
    return atyp, host, int.from_bytes(head[end:end + 2], "big"), end + 2


def udp_pack(host: str, port: int) -> bytes:
    """The header for a datagram from ``host:port`` (IPv4 or IPv6 text; IPv4-mapped IPv6
    is sent as IPv4); ValueError for anything else or a port outside 0-65535."""
    if not isinstance(host, str):
        raise TypeError(f"host must be a str, got {host!r}")
    if not (isinstance(port, int) and 0 <= port <= 0xFFFF):
        raise ValueError(f"port must be 0-65535, got {port!r}")
    for family, atyp in ((socket.AF_INET, _UDP_ATYP_IPV4), (socket.AF_INET6, _UDP_ATYP_IPV6)):
        try:
            addr = socket.inet_pton(family, host)
        except (OSError, ValueError, TypeError):
            continue
        if atyp == _UDP_ATYP_IPV6 and addr[:12] == b"\0" * 10 + b"\xff\xff":
            atyp, addr = _UDP_ATYP_IPV4, addr[12:]
        return bytes([0, 0, 0, atyp]) + addr + port.to_bytes(2, "big")
    raise ValueError(f"not an IP address: {host!r}")


__all__ += ["udp_pack", "udp_unpack"]


# ====================================================================== UDP relay
# The reference for UdpRelay/UdpFlow in _relay.pyx: the same decisions, counters and
# hooks, one recvfrom_into/sendto per datagram (no recvmmsg, no GSO), dicts for caches.

_UDP_HEADROOM = 22
_UDP_MAX_DATAGRAM = 65536
_V4_MAPPED = bytes(10) + b"\xff\xff"


def _ip16(host: str) -> tuple[int, bytes] | None:
    """(family it leaves by, 16-byte form with IPv4 mapped) of IP text, or None."""
    host = host.partition("%")[0]
    try:
        return socket.AF_INET, _V4_MAPPED + socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):
        pass
    try:
        ip = socket.inet_pton(socket.AF_INET6, host)
    except (OSError, ValueError):
        return None
    return (socket.AF_INET if ip[:12] == _V4_MAPPED else socket.AF_INET6), ip


def _egress_by_family(egress) -> dict:
    """front()'s egress, checked: {family: the addresses as text}, for the families given."""
    addresses = tuple(egress)
    for a in addresses:
        if not isinstance(a, bytes) or len(a) not in (4, 16):
            raise ValueError(f"egress: packed IPv4 (4 bytes) or IPv6 (16 bytes) addresses, not {a!r}")
    by_family = {}
    for family, size in ((socket.AF_INET, 4), (socket.AF_INET6, 16)):
        same = tuple(socket.inet_ntop(family, a) for a in addresses if len(a) == size)
        if len(same) > _MAX_EGRESS:
            raise ValueError(f"egress: at most {_MAX_EGRESS} addresses of each family")
        if same:
            by_family[family] = same
    return by_family


def _mapped(host: str) -> bytes:
    """An IP's 16 bytes, IPv4 as ::ffff:a.b.c.d (the compiled engine's keys)."""
    return _mapped_ip(socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host))


def _mapped_ip(ip: bytes) -> bytes:
    return _V4_MAPPED + ip if len(ip) == 4 else ip


def _ip_text(ip: bytes) -> str:
    if ip[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, ip[12:])
    return socket.inet_ntop(socket.AF_INET6, ip)


class _Cache:
    """At most 2 * half entries: a full young generation replaces the old one; a hit in the
    old generation moves the entry to the young one."""

    __slots__ = ("half", "old", "young")

    def __init__(self, half: int) -> None:
        self.half = half
        self.young: dict = {}
        self.old: dict = {}

    def get(self, key):
        value = self.young.get(key)
        if value is None and key in self.old:
            value = self.old[key]
            self.put(key, value)
        return value

    def put(self, key, value) -> None:
        if key not in self.young and len(self.young) >= self.half:
            self.old, self.young = self.young, {}
        self.young[key] = value

    def clear(self) -> None:
        self.young, self.old = {}, {}


class UdpRelay:
    def __init__(self, *, batch: int = 64, max_verdicts: int = 4096, max_peers: int = 4096) -> None:
        if not 1 <= batch <= 1024 or max_verdicts < 2 or max_peers < 2:
            raise ValueError("batch 1-1024, max_verdicts >= 2, max_peers >= 2")
        self._batch = batch
        self._max_verdicts = max_verdicts
        self._max_peers = max_peers
        self._buf = memoryview(bytearray(_UDP_HEADROOM + _UDP_MAX_DATAGRAM))
        self._busy = False
        self._error: BaseException | None = None
        self._epoll: select.epoll | None = select.epoll()
        self._watched: dict[int, tuple[UdpFlow, int]] = {}  # fd -> (flow, 0 or a remote family)

    def new_flow(self, owner, relay_sock, client_ip: str, client_port: int) -> UdpFlow:
        return UdpFlow(self, owner, relay_sock, client_ip, client_port)

    def fileno(self) -> int:
        return self._epoll.fileno() if self._epoll is not None else -1

    def run(self) -> None:
        if self._epoll is None:
            return
        self._enter()
        try:
            received = 0
            while received < 4 * self._batch:
                events = self._epoll.poll(0, 64)
                if not events:
                    break
                for fd, _ in events:
                    watched = self._watched.get(fd)
                    if watched is not None:
                        flow, family = watched
                        received += flow._up_batch() if family == 0 else flow._down_batch(family)
        finally:
            self._leave()

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None

    def _watch(self, flow: UdpFlow, sock: socket.socket, family: int) -> None:
        if self._epoll is None:
            raise ValueError("the UdpRelay is closed")
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        self._watched[sock.fileno()] = (flow, family)

    def _unwatch(self, sock: socket.socket) -> None:
        if self._watched.pop(sock.fileno(), None) is not None and self._epoll is not None:
            self._epoll.unregister(sock.fileno())

    def _enter(self) -> None:
        if self._busy:
            raise RuntimeError("a hook of the UDP relay may not make it relay again")
        self._busy = True
        self._error = None

    def _leave(self) -> None:
        self._busy = False
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _hook(self, flow: UdpFlow, call):
        """call(owner), a hook of the flow's owner; None, and the exception kept for leave(),
        if it raises."""
        if flow._owner is None:
            return None
        try:
            return call(flow._owner)
        except Exception as exc:  # noqa: BLE001 (a bug in a hook): raised by leave()
            if self._error is None:
                self._error = exc
            return None


class UdpFlow:
    def __init__(self, relay: UdpRelay, owner, relay_sock, client_ip: str, client_port: int) -> None:
        if not (isinstance(client_port, int) and 0 <= client_port <= 0xFFFF):
            raise ValueError(f"port must be 0-65535, got {client_port!r}")
        parsed = _ip16(client_ip)
        if parsed is None:
            raise ValueError(f"not an IP address: {client_ip!r}")
        self._relay, self._owner, self._relay_sock = relay, owner, relay_sock
        self._remote_socks: dict[int, socket.socket] = {}
        self._client_ip = parsed[1]
        self._client_port = client_port
        self._client_to: tuple | None = (_ip_text(self._client_ip), client_port) if client_port else None
        self._client_seen = False
        self._warned_foreign = False
        self._verdicts = _Cache(max(1, relay._max_verdicts // 2))
        self._peers = _Cache(max(1, relay._max_peers // 2))
        self.datagrams_up = self.datagrams_down = self.bytes_up = self.bytes_down = self.dropped = 0
        self.last_active_s = time.monotonic()
        relay._watch(self, relay_sock, 0)

    def pump_up(self) -> int:
        before = self.datagrams_up
        self._relay._enter()
        try:
            self._up_batch()
        finally:
            self._relay._leave()
        return self.datagrams_up - before

    def pump_down(self, family: int) -> int:
        before = self.datagrams_down
        self._relay._enter()
        try:
            self._down_batch(family)
        finally:
            self._relay._leave()
        return self.datagrams_down - before

    def _up_batch(self) -> int:
        """One batch from the client; how many datagrams were read."""
        relay, received, sent = self._relay, 0, 0
        if self._relay_sock is None:
            return 0
        for received in range(relay._batch):
            try:
                n, source = self._relay_sock.recvfrom_into(relay._buf)
            except OSError:  # EAGAIN, or an error the next readiness will tell again
                break
            sent += self._up_one(relay._buf[:n], source)
        else:
            received = relay._batch
        if sent:
            self.last_active_s = time.monotonic()
        return received

    def _up_one(self, datagram: memoryview, source: tuple) -> int:
        relay = self._relay
        if not self._from_client(source):
            self.dropped += 1
            if not self._warned_foreign:
                self._warned_foreign = True
                stranger = (_ip_text(_ip16(source[0])[1]), source[1])
                relay._hook(self, lambda owner: owner.warn_foreign(stranger))
            return 0
        parsed = udp_unpack(datagram)
        if parsed is None:
            self.dropped += 1
            return 0
        atyp, host, port, header_len = parsed
        if atyp == _UDP_ATYP_DOMAIN:
            payload = bytes(datagram[header_len:])
            relay._hook(self, lambda owner: owner.send_to_name(host, port, payload))
            return 0
        family, ip = _ip16(host)
        try:
            allowed = self._verdict(family, ip, port)
        except Exception as exc:  # noqa: BLE001 (a bug in the rules): denied, raised by leave()
            relay._error = relay._error or exc
            allowed = False
        return self._send_to(family, ip, port, 0, datagram[header_len:], allowed, guarded=True)

    def _from_client(self, source: tuple) -> bool:
        parsed = _ip16(source[0])
        if parsed is None or parsed[1] != self._client_ip:
            return False
        if self._client_port and source[1] != self._client_port:
            return False
        if not self._client_seen:
            self._client_seen = True
            self._client_port = source[1]
            self._client_to = source  # where datagrams for the client go, scope id and all
        return True

    @property
    def client_addr(self) -> tuple | None:
        return (_ip_text(self._client_ip), self._client_port) if self._client_to is not None else None

    def _verdict(self, family: int, ip: bytes, port: int) -> bool:
        allowed = self._verdicts.get((ip, port))
        if allowed is None:
            if self._owner is None:
                return False
            allowed = bool(self._owner.allowed(family, (_ip_text(ip), port)))
            self._verdicts.put((ip, port), allowed)
        return allowed

    def _remote(self, family: int):
        sock = self._remote_socks.get(family)
        if sock is None and self._owner is not None:
            sock = self._owner.remote_socket(family)
            if sock is not None:
                self._relay._watch(self, sock, family)
                self._remote_socks[family] = sock
        return sock

    def _send_to(self, family: int, ip: bytes, port: int, scope_id: int, payload, allowed: bool,
                 guarded: bool) -> int:
        if not allowed:
            self.dropped += 1
            return 0
        if guarded:
            try:
                sock = self._remote(family)
            except Exception as exc:  # noqa: BLE001 (a bug in a hook): raised by leave()
                self._relay._error = self._relay._error or exc
                sock = None
        else:
            sock = self._remote(family)
        if sock is None:
            self.dropped += 1
            return 0
        sockaddr = (_ip_text(ip), port) if family == socket.AF_INET else (_ip_text(ip), port, 0, scope_id)
        try:
            sock.sendto(payload, sockaddr)
        except OSError:  # EAGAIN, unreachable, EMSGSIZE, port 0...: UDP may lose it
            self.dropped += 1
            return 0
        if self._peers.get(ip) is None:
            self._peers.put(ip, True)
        self.datagrams_up += 1
        self.bytes_up += len(payload)
        return 1

    def _down_batch(self, family: int) -> int:
        """One batch from the remote socket of ``family``; how many datagrams were read."""
        relay, received, sent = self._relay, 0, 0
        sock = self._remote_socks.get(family)
        if sock is None or self._relay_sock is None:
            return 0
        payload_area = relay._buf[_UDP_HEADROOM:]
        for received in range(relay._batch):
            try:
                n, source = sock.recvfrom_into(payload_area)
            except OSError:
                break
            sent += self._down_one(n, source)
        else:
            received = relay._batch
        if sent:
            self.last_active_s = time.monotonic()
        return received

    def _down_one(self, n: int, source: tuple) -> int:
        parsed = _ip16(source[0])
        if self._client_to is None or parsed is None or self._peers.get(parsed[1]) is None:
            self.dropped += 1  # a stranger, or nowhere to send it yet
            return 0
        header = udp_pack(_ip_text(parsed[1]), source[1])
        start = _UDP_HEADROOM - len(header)
        buf = self._relay._buf
        buf[start:_UDP_HEADROOM] = header
        try:
            self._relay_sock.sendto(buf[start:_UDP_HEADROOM + n], self._client_to)
        except OSError:
            self.dropped += 1
            return 0
        self.datagrams_down += 1
        self.bytes_down += n
        return 1

    def send(self, sockaddr: tuple, payload, checked: bool = False) -> int:
        if not isinstance(sockaddr[0], str):
            raise TypeError(f"not an IP address: {sockaddr[0]!r}")
        parsed = _ip16(sockaddr[0])
        port = sockaddr[1]
        if parsed is None or not (isinstance(port, int) and 0 <= port <= 0xFFFF):
            raise ValueError(f"not an IP address and port: {sockaddr!r}")
        family, ip = parsed
        scope_id = sockaddr[3] if family == socket.AF_INET6 and len(sockaddr) >= 4 else 0
        allowed = checked or self._verdict(family, ip, port)
        sent = self._send_to(family, ip, port, scope_id, payload, allowed, guarded=False)
        if sent:
            self.last_active_s = time.monotonic()
        return sent

    def forget_verdicts(self) -> None:
        self._verdicts.clear()

    def close(self) -> None:
        for sock in (self._relay_sock, *self._remote_socks.values()):
            if sock is not None:
                self._relay._unwatch(sock)
        self._owner = self._relay_sock = None
        self._remote_socks = {}
        self._client_to = None
        self._verdicts.clear()
        self._peers.clear()


__all__ += ["UdpFlow", "UdpRelay"]
