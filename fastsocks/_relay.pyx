# cython: language_level=3
"""The relay engine: moves bytes between the two sockets of every established session.

Theory of operation
-------------------
The worker's control loop (selectors, Python) hands each established session to the
engine as two file descriptors: the client's and the upstream's. The engine owns them
from then on and closes them when the session ends.

The engine has its own epoll set; its fd sits in the worker's selector. When that fd is
readable the worker calls ``run()`` once, and the engine does ``epoll_wait(0)`` and moves
the data of every ready session in C, with the GIL released and no Python object per
chunk (EAGAIN is a return value here, not an exception).

Both fds are registered once, edge-triggered, for IN|OUT|RDHUP, so the engine never calls
``epoll_ctl`` again for a session: it keeps a readable/writable bit per side and clears a
bit when a syscall says the side is drained (EAGAIN, a short read, a partial write). A new
edge arrives whenever the kernel queues data or frees send space, which sets it again.

Each direction (client->upstream, upstream->client) starts in copy mode: ``recv`` into one
buffer shared by the whole engine, ``send`` to the other side. Only bytes the destination
would not take are kept, in a per-direction allocation freed as soon as it drains, so an
idle session costs no user-space buffer. A direction that fills the buffer three reads in
a row is streaming: it switches to ``splice()`` socket -> pipe -> socket with a pipe from a
capped pool (1 MiB where F_SETPIPE_SZ allows), and goes back to copy mode, returning the
pipe, once it turns chatty again. The pool gives back what a burst left: every
``pipe_idle_s``, the pooled pipes no session took in that time (the pool never fell below
them) are closed, down to ``pipe_reserve``; the kernel charges every pipe's pages to the
user whether it holds data or not.

Backpressure: a direction reads only while its destination is writable and nothing is
pending, so at most one buffer (or one pipe) per direction is in flight. Half-close: EOF
on a source is forwarded as ``shutdown(SHUT_WR)`` once everything read has been written;
the other direction keeps running. A session ends when both directions have forwarded
EOF, on the first error, on idle timeout, or when the engine is shut down.

splice() has no MSG_NOSIGNAL: the engine relies on SIGPIPE being ignored, which the
Python interpreter does at start-up (and forked workers inherit).

Fairness: a direction moves at most BUDGET chunks per call; a session that is still ready
goes on a run queue served first by the next ``run()``, and ``pending`` tells the worker
to poll again at once instead of sleeping.

Rates: a direction given a limit (add() or front() ``rate_*_bytes_per_s``) reads through a
token bucket of its own, refilled from the monotonic clock at the rate and holding
max(100 ms of it, 16 KiB): enough that a resume woken a few ms late loses nothing of the
rate (the bucket keeps what accrued meanwhile), small enough that a session idle for a
while gets only a tenth of a second at full speed before the limit holds again, and never
so small that a slow limit moves bytes in syscalls of a few dozen. Each recv() and each
splice() from the source asks for at most the tokens there are, so spliced directions
obey too, and bytes are charged when read (what is pending or in the pipe is paid for).
An empty bucket throttles the direction until max(10 ms of the rate, 16 KiB) has accrued,
so that a fast limit wakes at most ~100 times a second and a slow one moves 16 KiB at a
time. Its socket stays readable but, edge-triggered, brings no new event: a throttled
direction sits in a min-heap of resume times (``timers``, two entries per slot at most,
removed when the session ends), every pass resumes the due ones, and epoll_wait never
sleeps past the earliest. An unlimited direction pays one branch per read.

UDP ASSOCIATE has a relay of its own, with its own epoll set: UdpRelay and UdpFlow, in
_udp_relay.pxi (included at the end), over the SOCKS5 UDP header codec below.
"""

import os

from libc.errno cimport errno, EAGAIN, EINTR, EIO
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, free, realloc
from libc.string cimport memcpy, memmove, memset, memcmp
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef enum:
    BUDGET = 16            # chunks per direction per pump before yielding to others
    STREAK_TO_SPLICE = 3   # full buffer reads in a row that make a direction "streaming"
    STREAK_TO_COPY = 3     # short splice reads in a row that make it "chatty" again
    SHORT_SPLICE = 4096

cdef uint32_t EV_FLAGS = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET

from fastsocks._relay_types import NO_REPLY, REASONS, Ended  # REPLY_NONE is REPLY_NONE
from fastsocks._relay_types import gate_answer as _gate_answer
from fastsocks._relay_types import rate_checked as _rate_checked
from fastsocks import _relay_types

cdef double RATE_BURST_S = _relay_types.RATE_BURST_S
cdef double RATE_MIN_BURST_BYTES = _relay_types.RATE_MIN_BURST_BYTES
cdef double RATE_RESUME_S = _relay_types.RATE_RESUME_S
cdef double RATE_MIN_RESUME_BYTES = _relay_types.RATE_MIN_RESUME_BYTES

cdef uint64_t LISTENER_BIT = (<uint64_t>1) << 63  # epoll data of a listening socket: the bit | its index
cdef uint64_t WAKE_TAG = (<uint64_t>1) << 62      # epoll data of the fd watch() names
cdef uint64_t UDP_TAG = (<uint64_t>1) << 61       # ... and of the UDP relay run_udp() names

# Bits that record "the peer has shut down its write side" per fd: after that the
# short-read shortcut is off and we read until EOF.
cdef enum:
    HUP0 = 16
    HUP1 = 32


cdef inline int _rbit(int side) noexcept nogil:
    return READABLE0 if side == 0 else READABLE1


cdef inline int _wbit(int side) noexcept nogil:
    return WRITABLE0 if side == 0 else WRITABLE1


cdef inline int _hbit(int side) noexcept nogil:
    return HUP0 if side == 0 else HUP1


cdef inline double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline void _limit(Direction *dr, double rate_bytes_per_s, double now_s) noexcept nogil:
    """Give a direction its bucket (rate 0: none), full: a session starts with its burst."""
    dr.rate_bytes_per_s = rate_bytes_per_s
    dr.burst_bytes = _burst_bytes(rate_bytes_per_s)
    dr.tokens = dr.burst_bytes
    dr.refilled_s = now_s
    dr.limits |= LIM_RATE


cdef inline double _burst_bytes(double rate_bytes_per_s) noexcept nogil:
    """What a bucket holds at this rate (bucket_bytes() in _relay_types)."""
    cdef double n = rate_bytes_per_s * RATE_BURST_S
    return n if n > RATE_MIN_BURST_BYTES else RATE_MIN_BURST_BYTES


cdef inline double _resume_bytes(double rate_bytes_per_s) noexcept nogil:
    """What an empty bucket waits for (bucket_bytes() in _relay_types)."""
    cdef double n = rate_bytes_per_s * RATE_RESUME_S
    return n if n > RATE_MIN_RESUME_BYTES else RATE_MIN_RESUME_BYTES


cdef inline object _span(double since_s, double until_s):
    """Seconds from one phase mark to the next; None when the later one never came."""
    return until_s - since_s if until_s != 0 else None


cdef class RelayEngine:
    """Relay of established sessions; see the module docstring and _relay.pyi."""

    def __cinit__(self):
        self.epfd = -1
        self.slots = NULL
        self.buf = NULL
        self.pipe_pool = NULL
        self.events = NULL
        self.runq = NULL
        self.runq_work = NULL
        self.timers = NULL
        self.handoffq = NULL
        self.n_listen = 0
        self.wake_fd = -1
        self.accept_cache.entries = self.verdict_cache.entries = NULL
        self.counts = NULL

    def __init__(self, *, int buffer_size=65536, bint splice=True, int pipe_size=1 << 20,
                 int max_pipes=1024, int pipe_pool=64, int pipe_reserve=2, double pipe_idle_s=2.0,
                 double idle_timeout_s=300.0, int max_events=256):
        if buffer_size < 1024 or max_events < 1 or max_pipes < 0 or pipe_pool < 0 or pipe_reserve < 0:
            raise ValueError("buffer_size >= 1024, max_events >= 1, max_pipes/pipe_pool/pipe_reserve >= 0")
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.buf_size = buffer_size
        self.buf = <char *>malloc(buffer_size)
        self.max_events = max_events
        self.events = <epoll_event *>malloc(sizeof(epoll_event) * max_events)
        self.pool_max = pipe_pool
        self.pipe_pool = <int *>malloc(sizeof(int) * 2 * (pipe_pool + 1))
        if self.buf == NULL or self.events == NULL or self.pipe_pool == NULL:
            raise MemoryError()
        self.use_splice = splice
        self.pipe_size = pipe_size
        self.splice_len = pipe_size if pipe_size > 65536 else 65536
        self.max_pipes = max_pipes
        self.idle_timeout_s = idle_timeout_s
        self.pool_reserve = pipe_reserve
        self.pool_idle_s = pipe_idle_s
        self.free_head = -1
        self.finished_head = -1
        self.now_s = self.pool_checked_s = _monotonic()
        self.whys = {}
        self.methods[0] = 0
        self.nmethods = 1
        self.socks4 = True
        self.handshake_timeout_s = self.connect_timeout_s = 10.0
        self.accept_cache.seed = int.from_bytes(os.urandom(8), "little")  # no client aims at a slot
        self.verdict_cache.seed = int.from_bytes(os.urandom(8), "little")

    def __dealloc__(self):
        cdef int i
        if self.slots != NULL:
            for i in range(self.capacity):
                if self.slots[i].state == SLOT_ACTIVE:
                    self._end(i, END_SHUTDOWN, 0)
                if self.slots[i].front != NULL:
                    free(self.slots[i].front)
            free(self.slots)
        for i in range(self.pool_len * 2):
            close(self.pipe_pool[i])
        if self.epfd >= 0:
            close(self.epfd)
        free(self.buf)
        free(self.events)
        free(self.pipe_pool)
        free(self.runq)
        free(self.runq_work)
        free(self.timers)
        free(self.handoffq)
        front_cache_clear(&self.accept_cache)
        front_cache_clear(&self.verdict_cache)

    # ------------------------------------------------------------------ Python API

    def fileno(self):
        """The engine's epoll fd: register it for reading in the worker's selector."""
        return self.epfd

    @property
    def active(self):
        """Sessions currently relayed."""
        return self.n_active

    @property
    def handshaking(self):
        """Clients in the engine's own handshake."""
        return self.n_handshaking

    @property
    def accepted(self):
        """Connections accepted from the listening sockets."""
        return self.n_accepted

    def front(self, gate, *, bytes methods=b"\x00", bint socks4=True, bint judge_accept=False,
              bint judge_request=False, own_ports=frozenset(), double handshake_timeout_s=10.0,
              double connect_timeout_s=10.0, counts=None, caps=(0, 0, 0), bint check_blocked=False,
              egress=(), bint egress_sticky=False, rate_up_bytes_per_s=0, rate_down_bytes_per_s=0,
              client_rate_up_bytes_per_s=0, client_rate_down_bytes_per_s=0):
        """How the front door answers the clients accepted from now on (_relay.pyi)."""
        cdef int i
        cdef int64_t[::1] view
        cdef bytes address
        ports = sorted(own_ports)
        addresses = tuple(egress)
        for a in addresses:
            if not isinstance(a, bytes) or len(a) not in (4, 16):
                raise ValueError(f"egress: packed IPv4 (4 bytes) or IPv6 (16 bytes) addresses, not {a!r}")
        v4 = [a for a in addresses if len(a) == 4]
        v6 = [a for a in addresses if len(a) == 16]
        if len(v4) > MAX_EGRESS or len(v6) > MAX_EGRESS:
            raise ValueError(f"egress: at most {MAX_EGRESS} addresses of each family")
        if len(methods) > 8:
            raise ValueError("at most 8 methods")
        if ports and not (0 <= min(ports) and max(ports) <= 0xFFFF):  # no [-1]: wraparound is off
            raise ValueError("own_ports: each 0-65535")
        rates = (_rate_checked("rate_up_bytes_per_s", rate_up_bytes_per_s),
                 _rate_checked("rate_down_bytes_per_s", rate_down_bytes_per_s))
        client_rates = (_rate_checked("client_rate_up_bytes_per_s", client_rate_up_bytes_per_s),
                        _rate_checked("client_rate_down_bytes_per_s", client_rate_down_bytes_per_s))
        if any(client_rates) and self.accounts is None:
            raise ValueError("front(client_rate_*): needs use_accounts() first")
        cap_total, cap_worker, cap_client = caps
        if min(cap_total, cap_worker, cap_client) < 0:
            raise ValueError("caps: each 0 (none) or more")
        if counts is not None:
            given = tuple(counts)
            words, slot, workers, row, open_, clients, blocked, buckets = given
            if self.n_counted and (given[0] is not self.counts_given[0] or given[1:] != self.counts_given[1:]):
                raise ValueError("sessions are counted in another map: the counts cannot change now")
            if not (0 <= slot < workers and 0 <= open_ < row and 0 <= clients and clients + buckets <= row
                    and 0 <= blocked and blocked + buckets <= row and 0 < buckets <= 0x10000):
                raise ValueError(f"counts: a layout that does not fit its rows: {given[1:]}")
            view = words
            if view.shape[0] < <Py_ssize_t>workers * row:
                raise ValueError(f"counts: {view.shape[0]} words, {workers} rows of {row} need more")
            self.counts_view = view
            self.counts = &view[0]
            self.counts_given = given
            self.count_slot, self.count_workers, self.count_row = slot, workers, row
            self.count_open, self.count_clients, self.count_blocked = open_, clients, blocked
            self.count_buckets = buckets
        # Without counts the map is kept: the sessions counted so far are uncounted in it.
        self.count_new = counts is not None
        self.cap_total, self.cap_worker, self.cap_client = cap_total, cap_worker, cap_client
        self.check_blocked = check_blocked and counts is not None
        self.gate = gate
        self.nmethods = len(methods)
        for i in range(self.nmethods):
            self.methods[i] = methods[i]
        self.socks4 = socks4
        self.judge_accept = judge_accept
        self.judge_request = judge_request
        memset(self.own_port_bits, 0, sizeof(self.own_port_bits))
        for port in ports:
            self.own_port_bits[port >> 3] |= 1 << (port & 7)
        self.handshake_timeout_s = handshake_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.front_rate_bytes_per_s[0], self.front_rate_bytes_per_s[1] = rates
        self.front_client_rate[0], self.front_client_rate[1] = client_rates
        # The round robins go on where they were: a reload does not send everyone to the first.
        for i, address in enumerate(v4):
            memcpy(self.egress4.addr + 16 * i, <const unsigned char *>address, 4)
        for i, address in enumerate(v6):
            memcpy(self.egress6.addr + 16 * i, <const unsigned char *>address, 16)
        self.egress4.count = len(v4)
        self.egress6.count = len(v6)
        self.egress_on = bool(addresses)
        self.egress_sticky = egress_sticky
        front_cache_clear(&self.accept_cache)  # new rules, new answers
        front_cache_clear(&self.verdict_cache)

    def listen(self, int fd, bint exclusive=False):
        """Accept from this listening socket in run() (_relay.pyi).

        Level-triggered, so a backlog longer than one batch wakes the engine again. With
        ``exclusive`` (workers sharing one socket) EPOLLEXCLUSIVE wakes one waiter per
        connection, and the registration is renewed every REARM_EVERY accepts, which puts
        this engine at the back of the socket's wait queue: without it, wake-ups are LIFO
        and one worker takes nearly everything (nginx re-arms the same way)."""
        cdef epoll_event ev
        if self.gate is None:
            raise ValueError("front() first: the engine needs a gate to hand clients to")
        if self.n_listen >= MAX_LISTENERS:
            raise ValueError(f"at most {MAX_LISTENERS} listening sockets")
        ev.events = EPOLLIN | (EPOLLEXCLUSIVE if exclusive else 0)
        ev.data.u64 = LISTENER_BIT | <uint64_t>self.n_listen
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl(ADD) of a listening socket failed")
        self.listen_fd[self.n_listen] = fd
        self.listen_excl[self.n_listen] = exclusive
        self.listen_since[self.n_listen] = 0
        self.n_listen += 1

    def unlisten(self):
        """Stop accepting from every listening socket."""
        self._unlisten()

    # ------------------------------------------------------------------ wait(): one epoll for all

    @property
    def woke(self):
        """The fd that watch() named was ready in the last wait(): the Python loop has work."""
        return self.woke

    def watch(self, int fd):
        """wait() returns as soon as this fd is readable (-1: none). The worker names its
        selector's own epoll fd, so a ready Python socket, timer-less wake-up or signal
        (set_wakeup_fd) brings it back to Python; the fd is the caller's."""
        cdef epoll_event ev
        if self.wake_fd >= 0:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.wake_fd, NULL)
            self.wake_fd = -1
        if fd < 0:
            return
        ev.events = EPOLLIN
        ev.data.u64 = WAKE_TAG
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl(ADD) of the wake-up fd failed")
        self.wake_fd = fd

    def run_udp(self, UdpRelay relay):
        """wait() runs this UDP relay itself (relay.run()) whenever its fd is ready, without
        going back to Python in between (None: no more). Close the relay only after
        run_udp(None)."""
        cdef epoll_event ev
        if self.udp is not None:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, (<UdpRelay>self.udp).epfd, NULL)
            self.udp = None
            self.udp_ready = False
        if relay is None:
            return
        ev.events = EPOLLIN
        ev.data.u64 = UDP_TAG
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, relay.epfd, &ev) < 0:
            raise OSError(errno, "epoll_ctl(ADD) of the UDP relay failed")
        self.udp = relay

    def wait(self, double timeout_s):
        """Wait up to ``timeout_s`` for work and do it: what run() does, and the UDP relay's
        run(), in a loop that goes back to Python only when Python has work: the watched fd is
        ready (``woke``), sessions ended (returned, like run()), a client was handed to the
        gate, a signal arrived, or the time is up. Relaying and datagrams alone never leave C. Exceptions as in run() (and the UDP
        relay's, after its batch)."""
        cdef double deadline_s = _monotonic() + (timeout_s if timeout_s > 0 else 0)
        cdef double left_s
        cdef int timeout_ms, n
        self.woke = False
        if self.epfd < 0:
            return []
        while True:
            left_s = deadline_s - _monotonic()
            timeout_ms = 0 if left_s <= 0 else <int>(left_s * 1000) + 1  # never wake early and spin
            with nogil:
                n = self._process(timeout_ms)
            handed_off = self.handoffq_len > 0
            self._serve_python()
            # A hand-off made a Python session, which may have set a timer sooner than
            # this wait's deadline: let the loop see it.
            if self.woke or self.finished_head >= 0 or handed_off or n < 0 or left_s <= 0:
                break
        if self.finished_head < 0:
            return []
        return self._collect()

    @property
    def pending(self):
        """True when some session still has work: call run() again without waiting."""
        return self.runq_len > 0

    def counters(self):
        """(bytes_up, bytes_down, sessions_total, splice_switches, pipes_open)."""
        return (self.total_up, self.total_down, self.total_sessions,
                self.splice_switches, self.pipes_open)

    def use_accounts(self, Accounts accounts):
        """The shared accounts (_accounts.pxi) that add()'s ``shared`` and ``quota`` name
        entries of; once, before the first such add()."""
        if self.accounts is not None and self.accounts is not accounts:
            raise ValueError("the engine already uses other accounts")
        self.accounts = accounts

    def add(self, int client_fd, int upstream_fd, int64_t tag, const unsigned char[:] initial_up=None,
            *, rate_up_bytes_per_s=0, rate_down_bytes_per_s=0, shared=(), quota=None):
        """Relay a session. The engine owns both fds from here on (also on failure).

        ``initial_up`` is data the client sent before the session was established
        (pipelined after its request); it goes upstream first. The rates limit each
        direction (0: no limit; see "Rates" in the module docstring). ``shared``: up to
        two (entry, up bytes/s, down bytes/s) of use_accounts()' table whose buckets the
        session also reads through, with every other session naming them (0: not that
        way). ``quota``: (entry, bytes): every byte it moves counts in the entry, and it
        ends ("quota") once the count reaches the bytes.
        """
        cdef int idx, side, err, k
        cdef uint32_t gen
        cdef Session *s
        cdef epoll_event ev
        cdef Py_ssize_t n = 0 if initial_up is None else initial_up.shape[0]
        cdef double up_bytes_per_s, down_bytes_per_s
        try:
            if self.epfd < 0:
                raise ValueError("engine is closed")
            up_bytes_per_s = _rate_checked("rate_up_bytes_per_s", rate_up_bytes_per_s)
            down_bytes_per_s = _rate_checked("rate_down_bytes_per_s", rate_down_bytes_per_s)
            shares = self._shares_checked(shared, quota)
        except (ValueError, TypeError, IndexError):
            close(client_fd)
            close(upstream_fd)
            raise
        if self.free_head < 0:
            self._grow()
        idx = self.free_head
        s = &self.slots[idx]
        self.free_head = s.next
        gen = s.gen
        memset(s, 0, sizeof(Session))  # phase PHASE_RELAY, no front, proto 0
        s.gen = gen
        s.fd[0] = client_fd
        s.fd[1] = upstream_fd
        s.tag = tag
        s.next = -1
        s.last_active_s = _monotonic()
        s.dir[0].pipe_r = s.dir[0].pipe_w = -1
        s.dir[1].pipe_r = s.dir[1].pipe_w = -1
        if up_bytes_per_s:
            _limit(&s.dir[0], up_bytes_per_s, s.last_active_s)
        if down_bytes_per_s:
            _limit(&s.dir[1], down_bytes_per_s, s.last_active_s)
        if shares is not None:
            entries, quota_entry, quota_bytes = shares
            for entry, up, down in entries:
                for side, rate in ((0, up), (1, down)):
                    if rate:
                        k = 1 if s.dir[side].limits & LIM_SHARED else 0
                        s.dir[side].shared[k] = entry
                        s.dir[side].shared_rate[k] = rate
                        if not k:
                            s.dir[side].shared[1] = -1
                        s.dir[side].limits |= LIM_SHARED
            if quota_entry >= 0:
                s.quota_entry = quota_entry
                s.quota_bytes = quota_bytes
                s.dir[0].limits |= LIM_QUOTA
                s.dir[1].limits |= LIM_QUOTA
        s.state = SLOT_ACTIVE
        self.n_active += 1
        self.total_sessions += 1
        if n > 0:
            s.dir[0].pending = <char *>malloc(n)
            if s.dir[0].pending == NULL:
                self._finish(idx, END_ERROR, 12)
                self._collect()
                raise MemoryError()
            memcpy(s.dir[0].pending, &initial_up[0], n)
            s.dir[0].pending_len = n
        for side in range(2):
            ev.events = EV_FLAGS
            ev.data.u64 = (<uint64_t>idx << 1) | side
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, s.fd[side], &ev) < 0:
                err = errno
                self._finish(idx, END_ERROR, err)
                self._collect()
                raise OSError(err, "epoll_ctl(ADD) failed")

    cdef object _shares_checked(self, shared, quota):
        """add()'s shared and quota, checked: None (neither), or (entries, quota entry or
        -1, quota bytes)."""
        if not shared and quota is None:
            return None
        if self.accounts is None:
            raise ValueError("add(shared=, quota=) needs use_accounts() first")
        entries = []
        for entry, up, down in shared:
            self.accounts._entry(entry)
            entries.append((entry, _rate_checked("shared up rate", up), _rate_checked("shared down rate", down)))
        if len(entries) > 2:
            raise ValueError("add(shared=): two entries at most")
        if quota is None:
            return entries, -1, 0
        entry, limit = quota
        self.accounts._entry(entry)
        if not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"add(quota=): bytes > 0, not {limit!r}")
        return entries, entry, limit

    def run(self):
        """Move the data of every ready session; return the sessions that ended.

        Each ended session is an ``Ended(tag, bytes_up, bytes_down, reason, errno)``
        with reason one of "eof", "error", "idle", "shutdown".
        """
        if self.epfd < 0:
            return []
        with nogil:
            self._process(0)
        self._serve_python()
        if self.finished_head < 0:
            return []
        return self._collect()

    def expire_idle(self):
        """End sessions idle for longer than idle_timeout_s; return them like run(). Also
        close the pooled pipes left unused for pipe_idle_s, but pipe_reserve of them."""
        cdef int i
        cdef Session *s
        cdef double now = _monotonic()
        cdef double limit = now - self.idle_timeout_s
        self._trim_pool()
        for i in range(self.capacity):
            s = &self.slots[i]
            if s.state != SLOT_ACTIVE:
                continue
            if s.phase == PHASE_RELAY:
                if self.idle_timeout_s > 0 and s.last_active_s < limit:
                    self._finish(i, END_IDLE, 0)
            elif s.phase == PHASE_HANDSHAKE and s.front.deadline_s <= now:
                self._front_fail(i, REPLY_NONE, FAIL_HANDSHAKE_TIMEOUT, 0)
            elif s.phase == PHASE_CONNECTING and s.front.deadline_s <= now:
                self._front_fail(i, 6, FAIL_CONNECT, ETIMEDOUT)  # TTL expired, as session.py answers
        return self._collect()

    def close_all(self):
        """End every session now (reason "shutdown"); return them like run()."""
        cdef int i
        for i in range(self.capacity):
            if self.slots[i].state == SLOT_ACTIVE:
                self._end(i, END_SHUTDOWN, 0)
        return self._collect()

    def close(self):
        """End every session and release the epoll fd and the pipe pool. Idempotent."""
        cdef int i
        ended = self.close_all()
        for i in range(self.pool_len * 2):
            close(self.pipe_pool[i])
        self.pipes_open -= self.pool_len
        self.pool_len = 0
        self.n_listen = 0
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1
        return ended

    # ------------------------------------------------------------------ internals

    cdef int _grow(self) except -1:
        cdef int old = self.capacity
        cdef int new = old * 2 if old else 64
        cdef int i
        cdef Session *slots = <Session *>realloc(self.slots, sizeof(Session) * new)
        if slots == NULL:
            raise MemoryError()
        self.slots = slots
        cdef uint64_t *q = <uint64_t *>realloc(self.runq, sizeof(uint64_t) * new)
        if q == NULL:
            raise MemoryError()
        self.runq = q
        q = <uint64_t *>realloc(self.runq_work, sizeof(uint64_t) * new)
        if q == NULL:
            raise MemoryError()
        self.runq_work = q
        cdef Timer *t = <Timer *>realloc(self.timers, sizeof(Timer) * 2 * new)
        if t == NULL:
            raise MemoryError()
        self.timers = t
        cdef int *h = <int *>realloc(self.handoffq, sizeof(int) * new)
        if h == NULL:
            raise MemoryError()
        self.handoffq = h
        for i in range(new - 1, old - 1, -1):
            memset(&self.slots[i], 0, sizeof(Session))
            self.slots[i].state = SLOT_FREE
            self.slots[i].next = self.free_head
            self.free_head = i
        self.capacity = new
        return 0

    cdef int _process(self, int timeout_ms) noexcept nogil:
        """Serve the run queue, then wait up to timeout_ms (0 when the queue had work) and
        serve the events; -1 when a signal interrupted the wait."""
        cdef int i, n, idx, side
        cdef uint32_t evs
        cdef Session *s
        cdef uint64_t *work
        cdef int nq = self.runq_len
        self.now_s = _monotonic()
        if nq:
            # Serve sessions that ran out of budget last time, before new events.
            work = self.runq
            self.runq = self.runq_work
            self.runq_work = work
            self.runq_len = 0
            for i in range(nq):
                idx = <int>(work[i] & <uint64_t>0xFFFFFFFFU)
                s = &self.slots[idx]
                if s.state == SLOT_ACTIVE and s.gen == <uint32_t>(work[i] >> 32):
                    s.queued = 0
                    self._pump(idx)
        if self.n_timers:
            self._resume_due()
        if nq or self.runq_len or self.finished_head >= 0:  # a resumed session may have ended
            timeout_ms = 0
        elif self.n_timers and (timeout_ms < 0 or timeout_ms > self._resume_in_ms()):
            timeout_ms = self._resume_in_ms()  # nothing throttled is left stranded
        n = epoll_wait(self.epfd, self.events, self.max_events, timeout_ms)
        if n < 0:
            return -1  # EINTR: back to Python, which runs the signal's handler
        for i in range(n):
            if self.events[i].data.u64 & LISTENER_BIT:
                self._accept(<int>(self.events[i].data.u64 & 0xFF))
                continue
            if self.events[i].data.u64 == WAKE_TAG:
                self.woke = True
                continue
            if self.events[i].data.u64 == UDP_TAG:
                self.udp_ready = True
                continue
            idx = <int>(self.events[i].data.u64 >> 1)
            side = <int>(self.events[i].data.u64 & 1)
            s = &self.slots[idx]
            if s.state != SLOT_ACTIVE:
                continue  # ended earlier in this batch
            evs = self.events[i].events
            if evs & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                s.ready |= _rbit(side)
            if evs & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                s.ready |= _hbit(side)
            if evs & (EPOLLOUT | EPOLLHUP | EPOLLERR):
                s.ready |= _wbit(side)
            if s.phase == PHASE_RELAY:
                self._pump(idx)
            elif s.phase == PHASE_HANDSHAKE:
                if side == 0 and s.ready & READABLE0:
                    self._front_read(idx)
            elif s.phase == PHASE_CONNECTING:
                if side == 1 and s.ready & WRITABLE1:
                    self._front_connected(idx)
            # PHASE_HANDOFF: the gate gets it at the end of run(), events and all.
        return n

    cdef void _pump(self, int idx) noexcept nogil:
        cdef Session *s = &self.slots[idx]
        cdef int up = self._pump_dir(s, 0)
        if up < 0:
            self._finish(idx, END_QUOTA if s.over_quota else END_ERROR, s.end_errno)
            return
        cdef int down = self._pump_dir(s, 1)
        if down < 0:
            self._finish(idx, END_QUOTA if s.over_quota else END_ERROR, s.end_errno)
            return
        if up == 2 and down == 2:
            self._finish(idx, END_EOF, 0)
            return
        if (up == 1 or down == 1) and not s.queued:
            s.queued = 1
            self.runq[self.runq_len] = (<uint64_t>s.gen << 32) | <uint64_t>idx
            self.runq_len += 1

    cdef int _pump_dir(self, Session *s, int d) noexcept nogil:
        """-1 error, 0 waiting for the kernel, 1 budget used up, 2 direction done."""
        cdef Direction *dr = &s.dir[d]
        cdef int rbit = _rbit(d)
        cdef int wbit = _wbit(1 - d)
        cdef int i, r
        if dr.flags & DIR_DONE:
            return 2
        for i in range(BUDGET):
            if dr.pending_len or dr.in_pipe:
                if not (s.ready & wbit):
                    return 0
                r = self._flush(s, d)
                if r <= 0:
                    return r
                if dr.streak >= STREAK_TO_COPY and dr.flags & DIR_SPLICE:
                    self._stop_splice(dr)
            if dr.flags & DIR_EOF:
                # Everything read has been written: forward the half-close.
                shutdown(s.fd[1 - d], SHUT_WR)
                dr.flags |= DIR_DONE
                if dr.flags & DIR_SPLICE:
                    self._stop_splice(dr)
                return 2
            if (s.ready & (rbit | wbit)) != (rbit | wbit):
                return 0
            r = self._read(s, d)
            if r <= 0:
                return r
        return 1

    cdef int _flush(self, Session *s, int d) noexcept nogil:
        """Write pending bytes. -1 error, 0 destination full, 1 all written."""
        cdef Direction *dr = &s.dir[d]
        cdef int dst = s.fd[1 - d]
        cdef ssize_t n
        if dr.pending_len:
            n = send(dst, dr.pending + dr.pending_off, dr.pending_len, MSG_NOSIGNAL)
            while n < 0 and errno == EINTR:
                n = send(dst, dr.pending + dr.pending_off, dr.pending_len, MSG_NOSIGNAL)
            if n < 0:
                return self._write_error(s, d)
            self._count(s, d, n)
            dr.pending_off += n
            dr.pending_len -= n
            if dr.pending_len:
                s.ready &= ~_wbit(1 - d)
                return 0
            free(dr.pending)
            dr.pending = NULL
            dr.pending_off = 0
        if dr.in_pipe:
            n = splice(dr.pipe_r, NULL, dst, NULL, dr.in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            while n < 0 and errno == EINTR:
                n = splice(dr.pipe_r, NULL, dst, NULL, dr.in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n < 0:
                return self._write_error(s, d)
            self._count(s, d, n)
            dr.in_pipe -= n
            if dr.in_pipe:
                s.ready &= ~_wbit(1 - d)
                return 0
        return 1

    cdef int _read(self, Session *s, int d) noexcept nogil:
        """Read from the source and write on. -1 error, 0 source drained, 1 progress."""
        cdef Direction *dr = &s.dir[d]
        cdef int src = s.fd[d]
        cdef int dst = s.fd[1 - d]
        cdef ssize_t n, w
        cdef ssize_t want = self.splice_len if dr.flags & DIR_SPLICE else self.buf_size
        if dr.limits:
            want = self._allowance(s, d, want)
            if want <= 0:
                return <int>want  # 0: throttled (the timer heap resumes it); -1: over quota
        if dr.flags & DIR_SPLICE:
            n = splice(src, NULL, dr.pipe_w, NULL, want, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if dr.limits:
                self._charge(s, d, n)
            if n <= 0:
                return self._read_end(s, d, n)
            dr.in_pipe = n
            dr.streak = dr.streak + 1 if n < SHORT_SPLICE and n < want else 0
            # A short splice read does not prove the socket drained (the pipe may be
            # out of slots), so the readable bit stays until EAGAIN.
            return -1 if self._flush(s, d) < 0 else 1
        n = recv(src, self.buf, want, 0)
        if dr.limits:
            self._charge(s, d, n)
        if n <= 0:
            return self._read_end(s, d, n)
        w = send(dst, self.buf, n, MSG_NOSIGNAL)
        if w < 0:
            if errno != EAGAIN and errno != EINTR:
                s.end_errno = errno
                return -1
            if errno == EAGAIN:
                s.ready &= ~_wbit(1 - d)
            w = 0
        elif w < n:
            s.ready &= ~_wbit(1 - d)
        self._count(s, d, w)
        if w < n:
            # Keep only what the destination refused; no more reads until it drains.
            dr.pending = <char *>malloc(n - w)
            if dr.pending == NULL:
                s.end_errno = 12  # ENOMEM
                return -1
            memcpy(dr.pending, self.buf + w, n - w)
            dr.pending_len = n - w
        if n == want:  # a full read (of the bucket's allowance, for a limited direction)
            dr.streak += 1
            if dr.streak >= STREAK_TO_SPLICE and self.use_splice and not dr.pending_len:
                if self._start_splice(dr):
                    dr.streak = 0
        else:
            dr.streak = 0
            # A short read drained the receive queue; new data brings a new edge.
            # Not after the peer's FIN was signalled: then read on until EOF.
            if not (s.ready & _hbit(d)):
                s.ready &= ~_rbit(d)
        return 1

    cdef ssize_t _allowance(self, Session *s, int d, ssize_t size) noexcept nogil:
        """What a limited direction may read now, at most ``size``: its quota's rest, its
        own bucket's tokens, then what each shared bucket grants (taken now, settled by
        _charge() after the read). 0: it is throttled and on the timer heap; -1: its
        quota is used up (over_quota set)."""
        cdef Direction *dr = &s.dir[d]
        cdef double now = self.now_s
        cdef double wait_s = 0, got
        cdef int64_t left
        cdef int k
        if now < dr.resume_s:
            return 0  # woken by another event before its time: the heap has it
        if dr.timer_at:
            self._timer_remove(dr.timer_at - 1)  # due, and pumped before the heap got to it
        dr.resume_s = 0
        if dr.limits & LIM_QUOTA:
            left = s.quota_bytes - fs_load(&self.accounts.table[s.quota_entry].used)
            if left <= 0:
                s.over_quota = 1
                return -1
            if size > left:
                size = <ssize_t>left
        if dr.limits & LIM_RATE:
            dr.tokens += (now - dr.refilled_s) * dr.rate_bytes_per_s
            if dr.tokens > dr.burst_bytes:
                dr.tokens = dr.burst_bytes
            dr.refilled_s = now
            if dr.tokens < 1:
                dr.resume_s = now + (_resume_bytes(dr.rate_bytes_per_s) - dr.tokens) / dr.rate_bytes_per_s
                self._timer_push(<int>(s - self.slots), d)
                return 0
            if size > dr.tokens:
                size = <ssize_t>dr.tokens
        if dr.limits & LIM_SHARED:
            dr.granted[0] = dr.granted[1] = 0
            for k in range(2):
                if k == 1 and dr.shared[1] < 0:
                    break
                got = _account_take(&self.accounts.table[dr.shared[k]], self.accounts.me, d,
                                    dr.shared_rate[k], <double>size, now, &wait_s)
                if got == 0:
                    if k == 1:  # the first one granted: it gets that back
                        _account_refund(&self.accounts.table[dr.shared[0]], self.accounts.me, d, dr.granted[0])
                        dr.granted[0] = 0
                    dr.resume_s = now + wait_s
                    self._timer_push(<int>(s - self.slots), d)
                    return 0
                dr.granted[k] = got
                size = <ssize_t>got
        return size

    cdef void _charge(self, Session *s, int d, ssize_t n) noexcept nogil:
        """A limited direction read ``n`` bytes (<= 0: none): its own bucket pays, the
        shared ones get back what they granted beyond that, its quota counts them."""
        cdef Direction *dr = &s.dir[d]
        cdef double moved = n if n > 0 else 0
        cdef int k
        if dr.limits & LIM_RATE:
            dr.tokens -= moved
        if dr.limits & LIM_SHARED:
            for k in range(2):
                if dr.granted[k] > moved:
                    _account_refund(&self.accounts.table[dr.shared[k]], self.accounts.me, d,
                                    dr.granted[k] - moved)
                dr.granted[k] = 0
        if dr.limits & LIM_QUOTA and n > 0:
            fs_add(&self.accounts.table[s.quota_entry].used, n)

    cdef void _resume_due(self) noexcept nogil:
        """Pump the sessions whose throttled directions may read again."""
        cdef int idx
        while self.n_timers and self.timers[0].resume_s <= self.now_s:
            idx = self.timers[0].idx
            self._timer_remove(0)
            self._pump(idx)  # throttled again: back on the heap, for later than now

    cdef int _resume_in_ms(self) noexcept nogil:
        """Milliseconds until the earliest resume, rounded up: epoll_wait never wakes early
        and spins."""
        cdef double left_s = self.timers[0].resume_s - self.now_s
        return 0 if left_s <= 0 else <int>(left_s * 1000) + 1

    cdef void _timer_push(self, int idx, int d) noexcept nogil:
        cdef Timer t
        t.resume_s = self.slots[idx].dir[d].resume_s
        t.idx = idx
        t.d = d
        self._timer_place(self.n_timers, t)
        self.n_timers += 1
        self._timer_sift(self.n_timers - 1)

    cdef void _timer_remove(self, int pos) noexcept nogil:
        cdef Timer *gone = &self.timers[pos]
        self.slots[gone.idx].dir[gone.d].timer_at = 0
        self.n_timers -= 1
        if pos < self.n_timers:
            self._timer_place(pos, self.timers[self.n_timers])
            self._timer_sift(pos)

    cdef void _timer_place(self, int pos, Timer t) noexcept nogil:
        self.timers[pos] = t
        self.slots[t.idx].dir[t.d].timer_at = pos + 1

    cdef void _timer_sift(self, int pos) noexcept nogil:
        """Move the entry at ``pos`` up or down to where the heap order wants it."""
        cdef Timer t = self.timers[pos]
        cdef int child
        while pos > 0 and self.timers[(pos - 1) >> 1].resume_s > t.resume_s:
            self._timer_place(pos, self.timers[(pos - 1) >> 1])
            pos = (pos - 1) >> 1
        while True:
            child = 2 * pos + 1
            if child >= self.n_timers:
                break
            if child + 1 < self.n_timers and self.timers[child + 1].resume_s < self.timers[child].resume_s:
                child += 1
            if self.timers[child].resume_s >= t.resume_s:
                break
            self._timer_place(pos, self.timers[child])
            pos = child
        self._timer_place(pos, t)

    cdef int _read_end(self, Session *s, int d, ssize_t n) noexcept nogil:
        if n == 0:
            s.last_active_s = self.now_s
            s.dir[d].flags |= DIR_EOF
            s.ready &= ~_rbit(d)
            return 1
        if errno == EAGAIN:
            s.ready &= ~_rbit(d)
            return 0
        if errno == EINTR:
            return 1
        s.end_errno = errno
        return -1

    cdef int _write_error(self, Session *s, int d) noexcept nogil:
        if errno == EAGAIN:
            s.ready &= ~_wbit(1 - d)
            return 0
        s.end_errno = errno
        return -1

    cdef void _count(self, Session *s, int d, ssize_t n) noexcept nogil:
        # Moving bytes is what counts as activity for the idle timeout.
        s.last_active_s = self.now_s
        s.dir[d].nbytes += n
        if d == 0:
            self.total_up += n
        else:
            self.total_down += n

    cdef int _start_splice(self, Direction *dr) noexcept nogil:
        cdef int fds[2]
        if self.pool_len:
            self.pool_len -= 1
            if self.pool_len < self.pool_low:
                self.pool_low = self.pool_len
            dr.pipe_r = self.pipe_pool[2 * self.pool_len]
            dr.pipe_w = self.pipe_pool[2 * self.pool_len + 1]
        elif self.pipes_open < self.max_pipes:
            if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
                return 0  # stay in copy mode; splice is an optimisation
            if self.pipe_size > 65536:
                fcntl(fds[1], F_SETPIPE_SZ, self.pipe_size)  # EPERM over the user's budget: keep 64 KiB
            self.pipes_open += 1
            dr.pipe_r = fds[0]
            dr.pipe_w = fds[1]
        else:
            return 0
        dr.flags |= DIR_SPLICE
        dr.in_pipe = 0
        self.splice_switches += 1
        return 1

    cdef void _stop_splice(self, Direction *dr) noexcept nogil:
        if dr.in_pipe == 0 and self.pool_len < self.pool_max:
            self.pipe_pool[2 * self.pool_len] = dr.pipe_r
            self.pipe_pool[2 * self.pool_len + 1] = dr.pipe_w
            self.pool_len += 1
        else:
            # A pipe that still holds data is never reused.
            close(dr.pipe_r)
            close(dr.pipe_w)
            self.pipes_open -= 1
        dr.pipe_r = dr.pipe_w = -1
        dr.in_pipe = 0
        dr.streak = 0
        dr.flags &= ~DIR_SPLICE

    cdef void _trim_pool(self) noexcept nogil:
        """Every pool_idle_s: close the pooled pipes below the pool's low mark since the
        last time (the bottom of the stack: no session took them all that time), down to
        pool_reserve."""
        cdef double now = _monotonic()
        cdef int surplus, i
        if now - self.pool_checked_s < self.pool_idle_s:
            return
        surplus = self.pool_low - self.pool_reserve
        if surplus > 0:
            for i in range(2 * surplus):
                close(self.pipe_pool[i])
            memmove(self.pipe_pool, self.pipe_pool + 2 * surplus, sizeof(int) * 2 * (self.pool_len - surplus))
            self.pool_len -= surplus
            self.pipes_open -= surplus
        self.pool_low = self.pool_len
        self.pool_checked_s = now

    cdef void _finish(self, int idx, int reason, int err) noexcept nogil:
        cdef Session *s = &self.slots[idx]
        cdef int d
        close(s.fd[0])
        close(s.fd[1])
        for d in range(2):
            if s.dir[d].timer_at:
                self._timer_remove(s.dir[d].timer_at - 1)
            free(s.dir[d].pending)
            s.dir[d].pending = NULL
            if s.dir[d].flags & DIR_SPLICE:
                self._stop_splice(&s.dir[d])
        s.state = SLOT_FINISHED
        s.end_reason = reason
        s.end_errno = err
        s.next = self.finished_head
        self.finished_head = idx
        self.n_active -= 1

    cdef list _collect(self):
        cdef list ended = []
        cdef int idx = self.finished_head
        cdef Session *s
        while idx >= 0:
            s = &self.slots[idx]
            if s.proto == 0 and s.started_s == 0:  # add()ed: its worker knows who it was
                ended.append(Ended(s.tag, s.dir[0].nbytes, s.dir[1].nbytes,
                                   REASONS[s.end_reason], s.end_errno))
            else:
                ended.append(Ended(s.tag, s.dir[0].nbytes, s.dir[1].nbytes, REASONS[s.end_reason],
                                   s.end_errno, self._described(s), s.started_s,
                                   s.reply if s.end_reason == END_FAILED else 0, self._why(idx, s),
                                   s.rule, _span(s.started_s, s.requested_s),
                                   _span(s.requested_s, s.connected_s)))
            self.finished_head = s.next
            self._release(idx)
            idx = self.finished_head
        return ended

    cdef int _serve_python(self) except -1:
        """What a batch left for Python: the hand-offs, an accept error, the UDP relay (when
        run_udp() named one and its fd was ready); then the first exception a gate or the
        relay raised. The sessions that ended meanwhile stay listed for the next call."""
        cdef int err
        if self.handoffq_len:
            self._serve_handoffs()
        if self.accept_errno:
            err, self.accept_errno = self.accept_errno, 0
            try:
                self.gate.accept_failed(err)
            except BaseException as exc:
                if self.hook_error is None:
                    self.hook_error = exc
        if self.udp_ready:
            self.udp_ready = False
            try:
                (<UdpRelay>self.udp).run()
            except BaseException as exc:
                if self.hook_error is None:
                    self.hook_error = exc
        if self.hook_error is not None:
            error, self.hook_error = self.hook_error, None
            raise error
        return 0

    cdef void _release(self, int idx) noexcept nogil:
        """Back to the free list; stale run-queue entries and events see a new generation."""
        cdef Session *s = &self.slots[idx]
        if s.counted:
            self._tally(s, -1)
        if s.held:
            _account_release(self.accounts, s.held_entry)
            s.held = 0
        s.state = SLOT_FREE
        s.gen += 1
        s.next = self.free_head
        self.free_head = idx

    cdef void _end(self, int idx, int reason, int err) noexcept nogil:
        """End a session wherever it is: a relay with ``reason``, a front-door one as shut down."""
        if self.slots[idx].phase == PHASE_RELAY:
            self._finish(idx, reason, err)
        else:
            self._front_fail(idx, REPLY_NONE, FAIL_SHUTDOWN, 0)

    # ------------------------------------------------------------------ front door: accept

    cdef void _unlisten(self) noexcept nogil:
        cdef int i
        for i in range(self.n_listen):
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.listen_fd[i], NULL)
        self.n_listen = 0

    cdef void _accept(self, int li) noexcept nogil:
        cdef int i, fd
        cdef sockaddr_in6 peer
        cdef socklen_t length
        cdef epoll_event ev
        if li >= self.n_listen:
            return  # unlistened earlier in this batch
        for i in range(ACCEPT_BATCH):
            length = sizeof(peer)
            fd = accept4(self.listen_fd[li], <sockaddr *>&peer, &length, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno == EINTR or errno == ECONNABORTED:
                    continue
                if errno != EAGAIN:
                    self.accept_errno = errno  # the gate hears of it at the end of run()
                    if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                        self._unlisten()
                return
            self.n_accepted += 1
            if self.listen_excl[li]:
                self.listen_since[li] += 1
                if self.listen_since[li] >= REARM_EVERY:
                    self.listen_since[li] = 0
                    ev.events = EPOLLIN | EPOLLEXCLUSIVE
                    ev.data.u64 = LISTENER_BIT | <uint64_t>li
                    epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.listen_fd[li], NULL)
                    epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.listen_fd[li], &ev)
            self._front_open(fd, &peer)
            if self.n_listen == 0:
                return

    cdef void _front_open(self, int fd, const sockaddr_in6 *peer) noexcept nogil:
        cdef int idx
        cdef uint32_t gen
        cdef Session *s
        cdef Front *f
        cdef epoll_event ev
        cdef ssize_t n
        if self.free_head < 0:
            with gil:
                try:
                    self._grow()
                except MemoryError:
                    close(fd)
                    return
        f = <Front *>malloc(sizeof(Front))
        if f == NULL:
            close(fd)
            return
        idx = self.free_head
        s = &self.slots[idx]
        self.free_head = s.next
        gen = s.gen
        memset(s, 0, sizeof(Session))
        s.gen = gen
        s.fd[0] = fd
        s.fd[1] = -1
        self.next_tag += 1
        s.tag = self.next_tag
        s.next = -1
        s.dir[0].pipe_r = s.dir[0].pipe_w = -1
        s.dir[1].pipe_r = s.dir[1].pipe_w = -1
        s.state = SLOT_ACTIVE
        s.phase = PHASE_HANDSHAKE
        s.front = f
        s.reply = REPLY_NONE
        s.rule = RULE_NONE
        s.started_s = s.last_active_s = _monotonic()
        memcpy(&s.peer, peer, sizeof(sockaddr_in6))
        f.len = 0
        f.sent = 0
        f.deadline_s = s.started_s + self.handshake_timeout_s
        self.n_handshaking += 1
        if self.judge_accept and not self._front_admit(idx):
            close(fd)
            free(f)
            s.front = NULL
            self.n_handshaking -= 1
            self._release(idx)
            return
        # TCP_DEFER_ACCEPT: the greeting is usually here already. Read it before the epoll
        # registration, whose first event then reports only that the socket is writable.
        s.ready = READABLE0
        self._front_read(idx)
        if s.state != SLOT_ACTIVE or s.gen != gen or s.phase == PHASE_HANDOFF:
            return  # failed or queued for the gate: not watched
        ev.events = EV_FLAGS
        ev.data.u64 = (<uint64_t>idx << 1)
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            self._front_fail(idx, REPLY_NONE, FAIL_CLIENT, errno)

    # ------------------------------------------------------------------ front door: handshake

    cdef void _front_read(self, int idx) noexcept nogil:
        cdef Session *s = &self.slots[idx]
        cdef Front *f = s.front
        cdef int space = FRONT_BUF - f.len
        cdef int r
        cdef ssize_t n = recv(s.fd[0], f.buf + f.len, space, 0)
        if n < 0 and errno == EINTR:
            n = recv(s.fd[0], f.buf + f.len, space, 0)
        if n < 0 and errno == EAGAIN:
            s.ready &= ~READABLE0
            return
        if n <= 0:
            self._hand_off(idx)  # EOF or an error: the session says so, in its words
            return
        if n < space and not (s.ready & HUP0):
            s.ready &= ~READABLE0
        f.len += <int>n
        if f.sent == 2:
            # Answered "no authentication" already: a reload since does not take that back.
            r = front_parse_c(f.buf, f.len, <const unsigned char *>b"\x00", 1, self.socks4, &f.req)
        else:
            r = front_parse_c(f.buf, f.len, self.methods, self.nmethods, self.socks4, &f.req)
        s.proto = f.req.proto
        if r == FRONT_PYTHON or (r == FRONT_MORE and f.len == FRONT_BUF):
            self._hand_off(idx)
            return
        if f.req.sent > f.sent:
            n = send(s.fd[0], (<const char *>b"\x05\x00") + f.sent, f.req.sent - f.sent, MSG_NOSIGNAL)
            if n > 0:
                f.sent += <int>n
            if f.sent < f.req.sent:
                self._hand_off(idx)  # the session sends it again, and finds the client gone
                return
        if r == FRONT_CONNECT:
            self._front_request(idx)

    cdef void _front_request(self, int idx) noexcept nogil:
        cdef Session *s = &self.slots[idx]
        cdef Front *f = s.front
        cdef FrontRequest *req = &f.req
        cdef int i, fd, err, one = 1
        cdef sockaddr_in6 sa
        cdef sockaddr_in *v4 = <sockaddr_in *>&sa
        cdef socklen_t length
        cdef epoll_event ev
        # One clock read for the end of the handshake and the start of the connect deadline.
        cdef double now = _monotonic()
        s.requested_s = now
        s.has_dest = True
        s.dest_family = req.family
        memcpy(s.dest_ip, req.ip, 16 if req.family == AF_INET6 else 4)
        s.dest_port = req.port
        # What needs the session's full checks (policy.forbidden_destination, a loop through
        # this proxy) or its text for an address (::a.b.c.d): hand it over.
        if req.family == AF_INET and req.ip[0] == 0:
            self._hand_off(idx)
            return
        if req.family == AF_INET6:
            for i in range(10):
                if req.ip[i] != 0:
                    break
            else:
                self._hand_off(idx)
                return
        if self.own_port_bits[req.port >> 3] & (1 << (req.port & 7)):
            self._hand_off(idx)
            return
        # Without judge_request there are no rules to ask: the default action lets it through.
        s.rule = RULE_NONE if self.judge_request else RULE_DEFAULT
        if self.judge_request and not self._front_judge(idx):
            return  # refused: answered and ended
        fd = socket(req.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            err = errno
            self._front_fail(idx, front_reply_for_errno(err), FAIL_CONNECT, err)
            return
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        memset(&sa, 0, sizeof(sa))
        if req.family == AF_INET:
            v4.sin_family = AF_INET
            v4.sin_port = htons(<uint16_t>req.port)
            memcpy(&v4.sin_addr, req.ip, 4)
            length = sizeof(sockaddr_in)
        else:
            sa.sin6_family = AF_INET6
            sa.sin6_port = htons(<uint16_t>req.port)
            memcpy(&sa.sin6_addr, req.ip, 16)
            length = sizeof(sockaddr_in6)
        if self.egress_on:
            err = self._front_egress(idx, fd)
            if err:
                close(fd)
                self._front_fail(idx, front_reply_for_errno(err), FAIL_CONNECT, err)
                return
        # The port is the kernel's, picked at connect() unique per destination (session.py).
        if connect(fd, <sockaddr *>&sa, length) < 0 and errno != EINPROGRESS:
            err = errno
            close(fd)
            self._front_fail(idx, front_reply_for_errno(err), FAIL_CONNECT, err)
            return
        s.fd[1] = fd
        ev.events = EV_FLAGS
        ev.data.u64 = (<uint64_t>idx << 1) | 1
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            err = errno
            self._front_fail(idx, 1, FAIL_CONNECT, err)
            return
        s.phase = PHASE_CONNECTING
        f.deadline_s = now + self.connect_timeout_s

    cdef int _front_egress(self, int idx, int fd) noexcept nogil:
        """Bind the upstream socket to the egress address this session takes: 0, or the
        errno that fails its connect."""
        cdef Session *s = &self.slots[idx]
        cdef Egress *e = &self.egress6 if s.dest_family == AF_INET6 else &self.egress4
        cdef unsigned char key[16]
        cdef uint32_t i
        if e.count == 0:
            return ENETUNREACH  # egress addresses of the other family only: no way out from here
        if self.egress_sticky:
            i = front_fnv1a32(key, front_client_key(&s.peer, key)) % <uint32_t>e.count
        else:
            i = <uint32_t>(e.turn % <uint64_t>e.count)
            e.turn += 1
        return front_bind(fd, s.dest_family, e.addr + 16 * i)

    cdef void _front_connected(self, int idx) noexcept nogil:
        cdef Session *s = &self.slots[idx]
        cdef Front *f = s.front
        cdef int err = 0, extra
        cdef socklen_t length = sizeof(err)
        cdef sockaddr_in6 bound
        cdef unsigned char reply[22]
        cdef unsigned char key[16]
        cdef int n, d
        # EPOLLOUT alone means connected; a failure comes with EPOLLERR/EPOLLHUP (HUP1).
        if s.ready & HUP1 and getsockopt(s.fd[1], SOL_SOCKET, SO_ERROR, &err, &length) < 0:
            err = errno
        if err:
            self._front_fail(idx, front_reply_for_errno(err), FAIL_CONNECT, err)
            return
        s.connected_s = _monotonic()
        length = sizeof(bound)
        memset(&bound, 0, sizeof(bound))
        if getsockname(s.fd[1], <sockaddr *>&bound, &length) < 0:
            bound.sin6_family = AF_INET  # 0.0.0.0:0: the client learns nothing, loses nothing
        if self.front_client_rate[0] or self.front_client_rate[1]:
            s.held_entry = _account_open(self.accounts, KIND_CLIENT, key, front_client_key(&s.peer, key))
            if s.held_entry < 0:
                self._front_fail(idx, 1, FAIL_ACCOUNTS, 0)
                return
            s.held = 1
        n = front_reply(reply, s.proto, 0, &bound)
        if send(s.fd[0], reply, n, MSG_NOSIGNAL) != n:
            self._front_fail(idx, REPLY_NONE, FAIL_CLIENT, errno if errno else EPIPE)
            return
        extra = f.len - f.req.consumed
        if extra > 0:  # pipelined behind the request: it goes upstream first
            s.dir[0].pending = <char *>malloc(extra)
            if s.dir[0].pending == NULL:
                self._front_fail(idx, REPLY_NONE, FAIL_CLIENT, ENOMEM)
                return
            memcpy(s.dir[0].pending, f.buf + f.req.consumed, extra)
            s.dir[0].pending_len = extra
        free(f)
        s.front = NULL
        s.phase = PHASE_RELAY
        self.n_handshaking -= 1
        self.n_active += 1
        self.total_sessions += 1
        s.last_active_s = self.now_s
        if self.front_rate_bytes_per_s[0]:
            _limit(&s.dir[0], self.front_rate_bytes_per_s[0], self.now_s)
        if self.front_rate_bytes_per_s[1]:
            _limit(&s.dir[1], self.front_rate_bytes_per_s[1], self.now_s)
        if s.held:
            for d in range(2):
                if self.front_client_rate[d]:
                    s.dir[d].shared[0] = s.held_entry
                    s.dir[d].shared[1] = -1
                    s.dir[d].shared_rate[0] = self.front_client_rate[d]
                    s.dir[d].limits |= LIM_SHARED
        self._pump(idx)

    cdef void _front_fail(self, int idx, int reply, int kind, int err) noexcept nogil:
        """Answer ``reply`` (a SOCKS5 code, sent as SOCKS4's 91 to a SOCKS4 client; REPLY_NONE:
        nothing), close without losing it (session.close_gently) and end as END_FAILED."""
        cdef Session *s = &self.slots[idx]
        cdef unsigned char out[22]
        cdef int i, n
        if reply != REPLY_NONE and s.proto:
            n = front_reply(out, s.proto, reply, NULL)
            send(s.fd[0], out, n, MSG_NOSIGNAL)
        # FIN first, then read what is queued: closing over unread bytes sends RST, and the
        # client could lose the reply.
        shutdown(s.fd[0], SHUT_WR)
        for i in range(4):
            if recv(s.fd[0], self.buf, self.buf_size, 0) <= 0:
                break
        close(s.fd[0])
        if s.fd[1] >= 0:
            close(s.fd[1])
        free(s.front)
        s.front = NULL
        self.n_handshaking -= 1
        if kind == FAIL_CONNECT:
            s.connected_s = _monotonic()  # how long the connect took to fail
        s.state = SLOT_FINISHED
        s.end_reason = END_FAILED
        s.end_errno = err
        s.reply = reply
        s.fail = kind
        s.next = self.finished_head
        self.finished_head = idx

    cdef void _hand_off(self, int idx) noexcept nogil:
        self.slots[idx].phase = PHASE_HANDOFF
        self.handoffq[self.handoffq_len] = idx
        self.handoffq_len += 1

    cdef void _serve_handoffs(self):
        """Give the gate what the engine does not finish: the client's fd, out of the
        epoll set, everything it sent and what was answered."""
        cdef int i, idx, fd
        cdef Session *s
        cdef Front *f
        i = 0
        while i < self.handoffq_len:
            idx = self.handoffq[i]
            i += 1
            s = &self.slots[idx]
            f = s.front
            fd = s.fd[0]
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)  # ENOENT when it never was in it
            if s.fd[1] >= 0:
                close(s.fd[1])
            data = (<char *>f.buf)[:f.len]
            sent = b"\x05\x00"[:f.sent]
            peer = (_sa_host(&s.peer), _sa_port(&s.peer))
            tag = s.tag
            started_s = s.started_s
            free(f)
            s.front = NULL
            self.n_handshaking -= 1
            self._release(idx)
            try:
                self.gate.hand_off(fd, tag, peer, data, sent, started_s)
            except BaseException as exc:
                if self.hook_error is None:
                    self.hook_error = exc
        self.handoffq_len = 0

    cdef int _front_admit(self, int idx) noexcept nogil:
        """judge_accept: 1 lets the client in (counted where its gate said), 0 closes it."""
        cdef Session *s = &self.slots[idx]
        cdef unsigned char client[16]
        cdef unsigned char dest[16]
        cdef FrontEntry *e
        _front_keys(s, client, dest)
        e = front_cache_find(&self.accept_cache, client, dest, 0)
        if e != NULL:
            if not e.counted:
                return 1
            if self.count_new and not (self.check_blocked and self._blocked(e.bucket)):
                s.bucket[0], s.bucket[1] = e.bucket[0], e.bucket[1]
                self._tally(s, 1)
                return 1
        return self._gate_accepted(idx)  # a block to look at, or a client not seen yet

    cdef int _front_judge(self, int idx) noexcept nogil:
        """judge_request: 1 goes on; 0: refused, answered and ended."""
        cdef Session *s = &self.slots[idx]
        cdef unsigned char client[16]
        cdef unsigned char dest[16]
        cdef bint caps = self.cap_total or self.cap_worker or self.cap_client
        cdef FrontEntry *e
        if caps and (not s.counted or self._over_caps(s)):
            return self._gate_request(idx)  # its words for the refusal, or a count it knows of
        _front_keys(s, client, dest)
        e = front_cache_find(&self.verdict_cache, client, dest, <uint16_t>s.dest_port)
        if e != NULL:
            s.rule = e.rule
            return 1
        return self._gate_request(idx)

    cdef void _tally(self, Session *s, int delta) noexcept nogil:
        """One session more (delta 1) or less (-1) in this worker's row: its open count and
        its client's two buckets (limits.SharedLimits.open_session/close_session)."""
        cdef int64_t *row = self.counts + <Py_ssize_t>self.count_slot * self.count_row
        row[self.count_open] += delta
        row[self.count_clients + s.bucket[0]] += delta
        row[self.count_clients + s.bucket[1]] += delta
        s.counted = delta > 0
        self.n_counted += delta

    cdef bint _over_caps(self, Session *s) noexcept nogil:
        """Whether a session counted here is over a cap (Admission._over_session_cap, for a
        session without a user): the count includes it."""
        cdef int64_t total = 0, least = -1, n
        cdef int w, b
        if self.cap_worker and self.counts[self.count_slot * self.count_row + self.count_open] > self.cap_worker:
            return True
        if self.cap_total:
            for w in range(self.count_workers):
                total += self.counts[w * self.count_row + self.count_open]
            if total > self.cap_total:
                return True
        if self.cap_client:
            for b in range(2):
                n = 0
                for w in range(self.count_workers):
                    n += self.counts[w * self.count_row + self.count_clients + s.bucket[b]]
                if least < 0 or n < least:
                    least = n
            if least > self.cap_client:
                return True
        return False

    cdef bint _blocked(self, const uint16_t *bucket) noexcept nogil:
        """limits.SharedLimits.blocked_until() > now: both buckets blocked by some worker."""
        cdef int64_t now = _now_ms(), until
        cdef int w, b
        for b in range(2):
            until = 0
            for w in range(self.count_workers):
                if self.counts[w * self.count_row + self.count_blocked + bucket[b]] > until:
                    until = self.counts[w * self.count_row + self.count_blocked + bucket[b]]
            if until <= now:
                return False
        return True

    cdef int _gate_accepted(self, int idx) noexcept nogil:
        cdef unsigned char client[16]
        cdef unsigned char dest[16]
        cdef FrontEntry *e
        cdef int b0 = 0, b1 = 0
        cdef bint counted = False
        with gil:
            s = &self.slots[idx]
            try:
                answer = self.gate.accepted(s.tag, _sa_host(&s.peer), _sa_port(&s.peer))
                if not isinstance(answer, tuple):
                    return 1 if answer else 0
                if len(answer) not in (0, 2):
                    raise ValueError(f"gate.accepted(): True, False, () or (bucket, bucket), not {answer!r}")
                if answer:
                    b0, b1 = answer
                    counted = True
                    if self.counts == NULL or not self.count_new:
                        raise ValueError("gate.accepted() named buckets, but front() gave no counts")
                    if not (0 <= b0 < self.count_buckets and 0 <= b1 < self.count_buckets):
                        raise ValueError(f"gate.accepted(): buckets 0-{self.count_buckets - 1}, not {answer!r}")
            except BaseException as exc:
                if self.hook_error is None:
                    self.hook_error = exc
                return 0
        _front_keys(s, client, dest)
        e = front_cache_put(&self.accept_cache, client, dest, 0)
        if counted:
            s.bucket[0], s.bucket[1] = b0, b1
            self._tally(s, 1)
            if e != NULL:
                e.counted = 1
                e.bucket[0], e.bucket[1] = b0, b1
        return 1

    cdef int _gate_request(self, int idx) noexcept nogil:
        """1: go on (and remembered, with the rule that let it through); 0: refused,
        answered and ended."""
        cdef int code = 1
        cdef int rule = RULE_NONE
        cdef unsigned char client[16]
        cdef unsigned char dest[16]
        cdef FrontEntry *e
        with gil:
            s = &self.slots[idx]
            try:
                code, why, rule = _gate_answer(self.gate.request(s.tag, s.proto, _sa_host(&s.peer),
                                                                 _front_host(s.dest_family, s.dest_ip),
                                                                 s.dest_port))
            except BaseException as exc:
                if self.hook_error is None:
                    self.hook_error = exc
                code, why, rule = 1, "internal error in the gate", RULE_NONE
            if code:
                self.whys[idx] = why
        s.rule = rule
        if code == 0:
            _front_keys(s, client, dest)
            e = front_cache_put(&self.verdict_cache, client, dest, <uint16_t>s.dest_port)
            if e != NULL:
                e.rule = rule
            return 1
        self._front_fail(idx, code, FAIL_REFUSED, 0)
        return 0

    cdef str _described(self, Session *s):
        """access.describe() for a front-door session."""
        peer = _front_peer(&s.peer)
        proto = "socks5" if s.proto == 5 else "socks4" if s.proto == 4 else "-"
        if not s.has_dest:
            return f"client={peer} proto={proto} cmd=- dest=-"
        host = _front_host(s.dest_family, s.dest_ip)
        if s.dest_family == AF_INET6:
            host = f"[{host}]"
        return f"client={peer} proto={proto} cmd=connect dest={host}:{s.dest_port}"

    cdef str _why(self, int idx, Session *s):
        if s.end_reason != END_FAILED:
            return ""
        if s.fail == FAIL_CONNECT:
            return f"connect failed: {os.strerror(s.end_errno)}"
        if s.fail == FAIL_HANDSHAKE_TIMEOUT:
            return "handshake timed out"
        if s.fail == FAIL_REFUSED:
            return self.whys.pop(idx, "refused")
        if s.fail == FAIL_SHUTDOWN:
            return "worker shutting down"
        if s.fail == FAIL_ACCOUNTS:
            return "no room in the shared accounts table for its client's limit"
        return f"client error: {os.strerror(s.end_errno)}"


# ====================================================================== SOCKS5 UDP header
# RFC 1928 §7. Every datagram between the client and the relay carries
#     RSV(2) FRAG(1) ATYP(1) DST.ADDR DST.PORT(2) DATA
# udp_parse() reads the header of a client's datagram, udp_header_write() builds the one
# put before a datagram coming back from a remote. Both are nogil and allocate nothing;
# udp_unpack() and udp_pack() are their Python face (the twin is in _relay_py.py).


cdef int udp_parse(const unsigned char *p, Py_ssize_t n, UdpDest *dest) noexcept nogil:
    """UDP_OK and ``dest`` filled in, or the UDP_* reason to drop the datagram."""
    cdef Py_ssize_t i, addr_off, size
    if n < 4:
        return UDP_TRUNCATED
    if p[0] != 0 or p[1] != 0:
        return UDP_BAD_RSV
    if p[2] != 0:
        return UDP_FRAGMENTED
    dest.atyp = p[3]
    if p[3] == UDP_ATYP_IPV4:
        addr_off, size = 4, 4
    elif p[3] == UDP_ATYP_IPV6:
        addr_off, size = 4, 16
    elif p[3] == UDP_ATYP_DOMAIN:
        if n < 5:
            return UDP_TRUNCATED
        addr_off, size = 5, p[4]
    else:
        return UDP_BAD_ATYP
    if n < addr_off + size + 2:
        return UDP_TRUNCATED
    if p[3] == UDP_ATYP_DOMAIN:
        # The same rule as protocol/socks5.domain_problem: a resolver that stops at a
        # NUL would resolve less than what policy saw.
        if size == 0:
            return UDP_BAD_DOMAIN
        for i in range(addr_off, addr_off + size):
            if p[i] < 0x21 or p[i] > 0x7E:
                return UDP_BAD_DOMAIN
    dest.addr = p + addr_off
    dest.addr_len = <int>size
    dest.port = (p[addr_off + size] << 8) | p[addr_off + size + 1]
    dest.header_len = <int>(addr_off + size + 2)
    return UDP_OK


cdef inline bint _is_v4_mapped(const unsigned char *a) noexcept nogil:
    cdef int i
    for i in range(10):
        if a[i] != 0:
            return False
    return a[10] == 0xFF and a[11] == 0xFF


cdef int udp_header_write(unsigned char *out, int family, const unsigned char *addr, int port) noexcept nogil:
    """Write the header for a datagram from ``addr`` (in_addr or in6_addr bytes) and
    ``port`` into ``out`` (UDP_HEADER_MAX_IP bytes); return its length. An IPv4-mapped
    IPv6 address is written as the IPv4 address it is."""
    cdef int size = 4
    out[0] = out[1] = out[2] = 0
    out[3] = UDP_ATYP_IPV4
    if family == AF_INET6:
        if _is_v4_mapped(addr):
            addr = addr + 12
        else:
            out[3] = UDP_ATYP_IPV6
            size = 16
    memcpy(out + 4, addr, size)
    out[4 + size] = (port >> 8) & 0xFF
    out[5 + size] = port & 0xFF
    return 6 + size


cdef str _udp_host(const UdpDest *dest):
    cdef char text[INET6_ADDRSTRLEN]
    if dest.atyp == UDP_ATYP_DOMAIN:
        return (<const char *>dest.addr)[:dest.addr_len].decode("ascii")
    inet_ntop(AF_INET if dest.atyp == UDP_ATYP_IPV4 else AF_INET6, dest.addr, text, sizeof(text))
    return text.decode("ascii")


def udp_unpack(const unsigned char[::1] data not None):
    """(atyp, host, port, header_len) of a client datagram's SOCKS5 UDP header, or None.

    None means "drop it": truncated, RSV != 0, FRAG != 0 (no reassembly, which §7 allows),
    an unknown ATYP, or a domain name that is empty or not printable ASCII. ``host`` is
    dotted IPv4, compressed IPv6 as inet_ntop writes it, or the domain name; the payload
    is ``data[header_len:]``.
    """
    cdef UdpDest dest
    if data.shape[0] < 4 or udp_parse(&data[0], data.shape[0], &dest) != UDP_OK:
        return None
    return (dest.atyp, _udp_host(&dest), dest.port, dest.header_len)


def udp_pack(str host not None, port):
    """The SOCKS5 UDP header for a datagram that came from ``host:port``.

    ``host`` is IPv4 or IPv6 text (IPv4-mapped IPv6 is sent as IPv4); anything else, or a
    port outside 0-65535, raises ValueError.
    """
    cdef unsigned char addr[16]
    cdef unsigned char out[UDP_HEADER_MAX_IP]
    cdef int family, n
    if not (isinstance(port, int) and 0 <= port <= 0xFFFF):
        raise ValueError(f"port must be 0-65535, got {port!r}")
    raw = host.encode("ascii", "replace")  # non-ASCII becomes "?", in no address
    if b"\0" in raw:  # inet_pton reads a C string: it would stop at the NUL
        raise ValueError(f"not an IP address: {host!r}")
    if inet_pton(AF_INET, raw, addr) == 1:
        family = AF_INET
    elif inet_pton(AF_INET6, raw, addr) == 1:
        family = AF_INET6
    else:
        raise ValueError(f"not an IP address: {host!r}")
    n = udp_header_write(out, family, addr, <int>port)
    return (<char *>out)[:n]


# ====================================================================== UDP relay
# UdpRelay and UdpFlow: the datagram loop of UDP ASSOCIATE, with its theory of operation.

include "_udp_relay.pxi"


# ====================================================================== front door
# front_parse_c() and the replies: the pure parts of RelayEngine's own handshake.

include "_front.pxi"
include "_accounts.pxi"
