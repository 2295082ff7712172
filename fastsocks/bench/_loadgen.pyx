# cython: language_level=3
"""The compiled half of ``fastsocks bench``: a load generator and its target servers.

Theory of operation
-------------------
``LoadGen`` drives many non-blocking TCP connections from one epoll set, each a small C
state machine, and never calls into Python per event: ``run(max_s)`` spins its loop with
the GIL released until the phase is over or ``max_s`` has passed, then returns so that
Python can draw progress, enforce its deadlines and read the counters.

A connection goes::

    CONNECTING ──(SO_ERROR 0)──> METHOD ──> [AUTH] ──> REPLY ──> established
                └── direct: established at once

SOCKS5 messages (RFC 1928 §3, §4, §6 and RFC 1929 §2) are built in Python and handed in as
bytes; here we only send them and check the answers. What "established" leads to depends
on the mode:

    cps    EXCHANGE (S-byte request, S-byte echo), then close and open again
    rr     PARKED until go(), then EXCHANGE after EXCHANGE until the count or the deadline
    idle   PARKED until go(), then one EXCHANGE (the ping), then PARKED again
    bulk   PARKED until go(), then BULK (header, then payload both ways as asked), then
           RESULT (the sink's count and verdict) when uploading, then close
    udp    associations instead of connections: _udp_load.pxi (included below)

Two phases: ``establish()`` opens every connection (``open_limit`` handshakes at a time)
and parks them; ``go()`` starts the measured work at one instant for all of them (cps has
no establish phase). Latencies go into a preallocated C array of nanoseconds; once it
holds ``max_samples`` every other sample is dropped and only every other one is recorded
from then on (unbiased for a steady run, bounded memory for long ones); the maximum,
count and sum stay exact. Percentiles are computed afterwards, in Python.

Clients close first, so their side of every connection ends in TIME_WAIT; with tens of
thousands of those from one address, each connect() searches long for a free port (on
this project's VM that doubled the CPU per cps connection). With ``source_addresses=N``
and an IPv4 loopback peer, client k binds to 127.0.0.(1 + k mod N) with
IP_BIND_ADDRESS_NO_PORT, which makes the 4-tuple space N times larger.

Every fd is registered once, edge-triggered, for IN|OUT|RDHUP; a connection remembers
which side last said EAGAIN (``blocked``) and waits for an edge there. A connection that
moves ``BUDGET`` chunks in one go is put on a run queue instead of starving the others.

Payload is a deterministic pseudo-random byte stream with a period of PATTERN_BYTES, kept
twice in a memfd so that any chunk up to one period is contiguous: bulk uploads go out
with ``sendfile()`` from it, bulk downloads go to /dev/null through a pipe with
``splice()`` (or are read and compared when verifying), and echoes are always compared.
Each connection starts at its own offset, so bytes crossing connections are caught too.

``TargetServer`` is the other end, run in a child process: one epoll loop that accepts
and, by the first byte of each connection, either echoes (any byte but BULK_MAGIC) or
serves a bulk header: a source that ``sendfile()``s the pattern, a sink that splices to
/dev/null (or reads and verifies) and then answers RESULT_BYTES: count and verdict.

Nothing here logs or reads configuration; errors are counted by kind (ERROR_KINDS).
SIGPIPE is ignored by the Python interpreter, which sendfile() and splice() rely on.
"""

from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, UINT32_MAX
from libc.stdlib cimport malloc, free, realloc, qsort
from libc.string cimport memcpy, memset, memcmp
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from cpython.bytes cimport PyBytes_FromStringAndSize

ERROR_KINDS = ("connect", "socks_method", "socks_auth", "socks_reply", "eof", "reset",
               "timeout", "mismatch", "aborted", "other")
MODES = ("bulk", "cps", "rr", "idle", "udp")
UDP_TAG_SIZE = UDP_TAG_BYTES

PATTERN_PERIOD = PATTERN_BYTES
MAGIC = BULK_MAGIC
VERSION = BULK_VERSION
HEADER_SIZE = HEADER_BYTES
RESULT_SIZE = RESULT_BYTES
FLAG_DOWNLOAD = BULK_DOWNLOAD
FLAG_UPLOAD = BULK_UPLOAD
FLAG_VERIFY = BULK_VERIFY
RESULT_UNCHECKED = STATUS_UNCHECKED
RESULT_INTACT = STATUS_INTACT
RESULT_CORRUPT = STATUS_CORRUPT

cdef enum:
    BUDGET = 32                 # chunks per connection per pump before yielding to others
    SCAN_INTERVAL_NS = 50000000 # timeout scan every 50 ms
    MAX_WAIT_MS = 20            # epoll_wait never sleeps longer: run(max_s) stays prompt

cdef uint32_t EV_FLAGS = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
cdef uint32_t EV_WRITABLE = EPOLLOUT | EPOLLERR | EPOLLHUP
cdef uint32_t EV_READABLE = EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP
cdef uint32_t LISTEN_TAG = 0xFFFFFFFFU
cdef uint32_t STOP_TAG = 0xFFFFFFFEU
cdef uint32_t UDP_TAG = 0xFFFFFFFDU
cdef uint64_t UDP_SCAN_NS = 10000000  # udp: lost datagrams found (and replaced) every 10 ms


# --------------------------------------------------------------------- helpers


cdef inline uint64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


cdef inline uint64_t _min(uint64_t a, uint64_t b) noexcept nogil:
    return a if a < b else b


cdef inline uint64_t _get_be64(const unsigned char *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v


cdef inline void _put_be64(unsigned char *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(7, -1, -1):
        p[i] = <unsigned char>(v & 0xFF)
        v >>= 8


cdef inline int _io_kind(int err) noexcept nogil:
    return E_RESET if err == ECONNRESET or err == EPIPE else E_OTHER


cdef inline uint64_t _tag(uint32_t gen, uint32_t idx) noexcept nogil:
    return (<uint64_t>gen << 32) | idx


cdef int _cmp_u32(const void *a, const void *b) noexcept nogil:
    cdef uint32_t x = (<const uint32_t *>a)[0]
    cdef uint32_t y = (<const uint32_t *>b)[0]
    return (x > y) - (x < y)


cdef void _fill_pattern(unsigned char *p, size_t n) noexcept nogil:
    # xorshift64: the same bytes on every machine, so a remote `bench serve` agrees.
    cdef uint64_t x = 0x9E3779B97F4A7C15ULL
    cdef size_t i
    cdef unsigned char b
    for i in range(n):
        x ^= x << 13
        x ^= x >> 7
        x ^= x << 17
        b = <unsigned char>(x >> 56)
        # BULK_MAGIC never occurs, so an echo connection can never look like bulk.
        p[i] = 0x5A if b == BULK_MAGIC else b


cdef int _drain_pipe(int pipe_r, int devnull_fd, ssize_t n) noexcept nogil:
    """Move n bytes from a pipe to /dev/null (it takes everything). -1 on error."""
    cdef ssize_t m
    while n > 0:
        m = splice(pipe_r, NULL, devnull_fd, NULL, n, SPLICE_F_MOVE)
        if m <= 0:
            if m < 0 and errno == EINTR:
                continue
            return -1
        n -= m
    return 0


cdef int _make_pipe(int *read_fd, int *write_fd, int size) noexcept nogil:
    cdef int fds[2]
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        return -1
    fcntl(fds[1], F_SETPIPE_SZ, size)  # past the user's pipe budget: keep the default
    read_fd[0] = fds[0]
    write_fd[0] = fds[1]
    return 0


def pattern_bytes(uint64_t offset, size_t n):
    """``n`` bytes of the payload stream from ``offset`` (the stream repeats every
    PATTERN_PERIOD bytes)."""
    cdef unsigned char *period = <unsigned char *>malloc(PATTERN_BYTES)
    cdef bytearray out = bytearray(n)
    cdef unsigned char *dst = out
    cdef size_t i, start = offset % PATTERN_BYTES
    if period == NULL:
        raise MemoryError()
    _fill_pattern(period, PATTERN_BYTES)
    for i in range(n):
        dst[i] = period[(start + i) % PATTERN_BYTES]
    free(period)
    return bytes(out)


def sort_samples(uint32_t[::1] values not None):
    """Sort latency samples in place (qsort; used to merge several processes' samples)."""
    if values.shape[0] > 1:
        with nogil:
            qsort(&values[0], values.shape[0], sizeof(uint32_t), _cmp_u32)


def monotonic_ns():
    """The clock the engine stamps with (CLOCK_MONOTONIC, as time.monotonic_ns())."""
    return _now_ns()


# --------------------------------------------------------------------- the pattern


cdef class Pattern:
    """The payload stream: one period twice in a read-only memfd mapping."""

    def __cinit__(self):
        self.fd = -1
        self.data = NULL
        self.size = 0

    def __init__(self):
        cdef unsigned char *period = <unsigned char *>malloc(PATTERN_BYTES)
        cdef size_t done
        cdef ssize_t n
        cdef int copy
        cdef void *mapped
        if period == NULL:
            raise MemoryError()
        _fill_pattern(period, PATTERN_BYTES)
        self.fd = memfd_create(b"fastsocks-bench-pattern", MFD_CLOEXEC)
        if self.fd < 0:
            free(period)
            raise OSError(errno, "memfd_create failed")
        for copy in range(2):
            done = 0
            while done < PATTERN_BYTES:
                n = write(self.fd, period + done, PATTERN_BYTES - done)
                if n < 0:
                    if errno == EINTR:
                        continue
                    free(period)
                    raise OSError(errno, "write to the pattern memfd failed")
                done += n
        free(period)
        mapped = mmap(NULL, 2 * PATTERN_BYTES, PROT_READ, MAP_SHARED, self.fd, 0)
        if mapped == MAP_FAILED:
            raise OSError(errno, "mmap of the pattern memfd failed")
        self.data = <const unsigned char *>mapped
        self.size = 2 * PATTERN_BYTES

    def __dealloc__(self):
        self.close()

    def fileno(self):
        return self.fd

    def close(self):
        """Unmap and close. Idempotent; engines that use the pattern must be closed first."""
        if self.data != NULL:
            munmap(<void *>self.data, self.size)
            self.data = NULL
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1


# --------------------------------------------------------------------- the load generator


cdef inline int _category(int state) noexcept nogil:
    """0 idle/closed, 1 handshaking, 2 parked, 3 busy (measured work in flight)."""
    if C_CONNECTING <= state <= C_REPLY:
        return 1
    if state == C_PARKED:
        return 2
    if C_EXCHANGE <= state <= C_RESULT:
        return 3
    return 0


cdef class LoadGen:
    """Many SOCKS5 (or direct) connections driven in C; see the module docstring."""

    def __cinit__(self):
        self.epfd = -1
        self.devnull_fd = -1
        self.conns = NULL
        self.n_conns = 0
        self.runq = self.runq_work = NULL
        self.reopen = self.reopen_work = NULL
        self.events = NULL
        self.buf = NULL
        self.samples = NULL
        self.slots = NULL
        self.udp_control = []

    def __init__(self, Pattern pattern not None, *, str mode, int connections, int family,
                 str host, int port, bytes greeting=None, bytes auth=None, bytes request=None,
                 uint64_t size=64, uint64_t bulk_bytes=0, bint download=True, bint upload=False,
                 bint verify=False, uint64_t limit=0, double timeout_s=10.0, int open_limit=128,
                 size_t buffer_size=1 << 20, size_t max_samples=1 << 24, int pipe_size=1 << 20,
                 int max_events=512, int source_addresses=1, int inflight=32,
                 bytes udp_header=None, double loss_timeout_s=1.0, double rate=0.0):
        cdef sockaddr_in *sin
        cdef sockaddr_in6 *sin6
        cdef int i
        cdef bytes host_b = host.encode()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if connections < 1 or open_limit < 1 or max_events < 1:
            raise ValueError("connections, open_limit and max_events must be >= 1")
        if not 4096 <= buffer_size <= PATTERN_BYTES:
            raise ValueError(f"buffer_size must be 4096..{PATTERN_BYTES}")
        if (greeting is None) != (request is None):
            raise ValueError("greeting and request come together (SOCKS5) or not at all (direct)")
        self.mode = MODES.index(mode)
        if self.mode == MODE_UDP:
            if not 1 <= inflight <= 65536:
                raise ValueError("inflight must be 1..65536")
            if udp_header is None:
                udp_header = b""
            if (len(udp_header) > 0) != (greeting is not None):
                raise ValueError("udp: a header comes with the SOCKS5 messages (proxy) or neither (direct)")
            if not UDP_TAG_BYTES <= size <= 65507 - len(udp_header) or size + len(udp_header) > buffer_size:
                raise ValueError(f"udp: size must be {UDP_TAG_BYTES}..{65507 - len(udp_header)} bytes")
            if not 0 < loss_timeout_s <= 600:
                raise ValueError("loss_timeout_s must be in (0, 600]")
            if not 0 <= rate <= 1e7:
                raise ValueError("rate must be 0 (closed loop) .. 10,000,000 datagrams/s")
            self.pace_ns = <uint64_t>(1e9 / rate) if rate > 0 else 0
            self.inflight = inflight
            self.udp_header = udp_header
            self.udp_header_p = <const unsigned char *><char *>udp_header
            self.udp_header_len = len(udp_header)
            self.loss_ns = <uint64_t>(loss_timeout_s * 1e9)
            self.slots = <USlot *>malloc(sizeof(USlot) * connections * inflight)
            if self.slots == NULL:
                raise MemoryError()
            memset(self.slots, 0, sizeof(USlot) * connections * inflight)
        self.pattern = pattern
        memset(&self.peer, 0, sizeof(self.peer))
        if family == AF_INET:
            sin = <sockaddr_in *>&self.peer
            sin.sin_family = AF_INET
            sin.sin_port = htons(port)
            ok = inet_pton(AF_INET, host_b, &sin.sin_addr)
            self.peer_len = sizeof(sockaddr_in)
        elif family == AF_INET6:
            sin6 = <sockaddr_in6 *>&self.peer
            sin6.sin6_family = AF_INET6
            sin6.sin6_port = htons(port)
            ok = inet_pton(AF_INET6, host_b, &sin6.sin6_addr)
            self.peer_len = sizeof(sockaddr_in6)
        else:
            raise ValueError("family must be AF_INET or AF_INET6")
        if ok != 1:
            raise ValueError(f"not an IP address: {host!r}")
        if not 1 <= source_addresses <= 254:
            raise ValueError("source_addresses must be 1..254")
        self.family = family
        self.n_sources = source_addresses if family == AF_INET and host.startswith("127.") else 1
        if auth is not None and not greeting:
            raise ValueError("auth needs a greeting")
        self.greeting, self.auth, self.request = greeting, auth, request
        self.via_proxy = greeting is not None
        if self.via_proxy:
            self.greeting_p = <const unsigned char *><char *>greeting
            self.greeting_len = len(greeting)
            self.request_p = <const unsigned char *><char *>request
            self.request_len = len(request)
        if auth is not None:
            self.auth_p = <const unsigned char *><char *>auth
            self.auth_len = len(auth)
        self.pat = pattern.data
        self.pat_fd = pattern.fd
        self.size = size
        self.bulk_bytes = bulk_bytes
        self.bulk_flags = (BULK_DOWNLOAD if download else 0) | (BULK_UPLOAD if upload else 0)
        self.bulk_flags |= BULK_VERIFY if verify else 0
        self.verify = verify
        self.limit = limit
        self.timeout_ns = <uint64_t>(timeout_s * 1e9)
        self.open_limit = open_limit
        self.buf_size = buffer_size
        self.pipe_size = pipe_size
        self.max_events = max_events
        self.max_samples = max_samples if max_samples >= 2 else 2
        self.cap_samples = <size_t>_min(self.max_samples, limit if 0 < limit else 1 << 16)
        self.cap_samples = self.cap_samples if self.cap_samples >= 2 else 2
        self.stride = 1
        self.n_conns = connections
        self.conns = <Conn *>malloc(sizeof(Conn) * connections)
        self.runq = <uint64_t *>malloc(sizeof(uint64_t) * connections)
        self.runq_work = <uint64_t *>malloc(sizeof(uint64_t) * connections)
        self.reopen = <uint32_t *>malloc(sizeof(uint32_t) * connections)
        self.reopen_work = <uint32_t *>malloc(sizeof(uint32_t) * connections)
        self.events = <epoll_event *>malloc(sizeof(epoll_event) * max_events)
        self.buf = <unsigned char *>malloc(buffer_size)
        self.samples = <uint32_t *>malloc(sizeof(uint32_t) * self.cap_samples)
        if (self.conns == NULL or self.runq == NULL or self.runq_work == NULL or self.reopen == NULL
                or self.reopen_work == NULL or self.events == NULL or self.buf == NULL
                or self.samples == NULL):
            raise MemoryError()
        memset(self.conns, 0, sizeof(Conn) * connections)
        for i in range(connections):
            self.conns[i].fd = self.conns[i].pipe_r = self.conns[i].pipe_w = -1
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.devnull_fd = open(b"/dev/null", O_WRONLY | O_CLOEXEC)
        if self.devnull_fd < 0:
            raise OSError(errno, "cannot open /dev/null")
        self.now_ns = _now_ns()

    def __dealloc__(self):
        self._release()

    # ------------------------------------------------------------------ Python API

    def establish(self):
        """Start opening every connection; run() until it returns True, then go()."""
        if self.mode == MODE_CPS:
            raise ValueError("cps has no establish phase: call go()")
        self._require_open()
        self.phase = PH_ESTABLISH
        self.now_ns = _now_ns()
        if self.mode == MODE_UDP:
            _udp_establish(self)  # synchronous: run() then returns True at once

    def go(self, double duration_s=0.0):
        """Start the measured work now; with duration_s > 0 nothing new starts after it."""
        cdef int i, k
        self._require_open()
        self.now_ns = self.t_go_ns = self.t_last_ns = _now_ns()
        self.stop_at_ns = self.t_go_ns + <uint64_t>(duration_s * 1e9) if duration_s > 0 else 0
        self.ok_at_go = self.ok
        self.errors_at_go = self._error_total()
        self.phase = PH_RUN
        for i in range(self.n_conns):
            if self.mode == MODE_CPS:
                self.reopen[self.reopen_len] = i
                self.reopen_len += 1
            elif self.conns[i].state == C_PARKED:
                if self.mode == MODE_UDP and self.pace_ns:
                    self.next_send_ns = self.now_ns  # paced: _udp_loop sends, one at a time
                elif self.mode == MODE_UDP:
                    for k in range(self.inflight):
                        if _udp_send(self, i, k) < 0:
                            break
                elif self.mode == MODE_BULK:
                    self._start_bulk(i)
                elif self.mode == MODE_IDLE or self._can_start():
                    self._start_exchange(i)

    def run(self, double max_s):
        """Drive the connections for at most max_s seconds; True once the phase is over."""
        cdef uint64_t until
        cdef int done
        if self.epfd < 0 or self.phase == PH_NONE:
            return True
        until = _now_ns() + <uint64_t>(max_s * 1e9)
        with nogil:
            done = self._loop(until)
        return bool(done)

    def abort(self):
        """Stop starting work and end everything in flight (counted as "aborted")."""
        cdef int i
        self.stopping = True
        if self.mode == MODE_UDP and self.slots != NULL:
            for i in range(self.n_conns * self.inflight):
                if self.slots[i].busy:
                    self.slots[i].busy = 0
                    self.errors[E_ABORTED] += 1
            self.udp_busy = 0
            return
        for i in range(self.n_conns):
            if _category(self.conns[i].state) in (1, 3):
                self._fail(i, E_ABORTED, 0)
        self.reopen_len = 0

    def progress(self):
        """(established, ok, errors, bytes moved, started): cheap, for progress bars."""
        return (self.n_parked + self.n_busy + (self.ok if self.mode == MODE_BULK else 0),
                self.ok, self._error_total(), self.bytes_up + self.bytes_down, self.started)

    def result(self):
        """Counters of the run so far, as a dict (times in CLOCK_MONOTONIC nanoseconds)."""
        return {
            "mode": MODES[self.mode],
            "connections": self.n_conns,
            "ok": self.ok,
            "ok_at_go": self.ok_at_go,
            "started": self.started,
            "errors": {ERROR_KINDS[k]: self.errors[k] for k in range(N_ERROR_KINDS) if self.errors[k]},
            "errors_at_go": self.errors_at_go,
            "last_error": ERROR_KINDS[self.last_kind] if self._error_total() else None,
            "last_errno": self.last_errno,
            "last_reply": self.last_reply,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "t_go_ns": self.t_go_ns,
            "t_last_ns": self.t_last_ns,
            "parked": self.n_parked,
            "latency_count": self.lat_n,
            "latency_sum_ns": self.lat_sum_ns,
            "latency_max_ns": self.lat_max_ns,
            "latency_samples": self.n_samples,
            "latency_stride": self.stride,
            "udp_timeouts": self.udp_timeouts,
            "udp_late": self.udp_late,
            "udp_compared": self.udp_compared,
            "udp_unsent": self.udp_unsent,
        }

    def stream_seconds(self):
        """Bulk: each finished stream's time from go() to its last byte, in seconds."""
        cdef int i
        return [(self.conns[i].t_end_ns - self.t_go_ns) / 1e9 for i in range(self.n_conns)
                if self.conns[i].t_end_ns > self.t_go_ns]

    def latencies(self):
        """The latency samples in nanoseconds, sorted, as bytes of native uint32."""
        if self.n_samples > 1:
            with nogil:
                qsort(self.samples, self.n_samples, sizeof(uint32_t), _cmp_u32)
        return PyBytes_FromStringAndSize(<char *>self.samples, self.n_samples * sizeof(uint32_t))

    def close(self):
        """Close every connection and the engine's fds. Idempotent."""
        self._release()
        for sock in self.udp_control:
            sock.close()
        self.udp_control = []

    # ------------------------------------------------------------------ internals

    def _require_open(self):
        if self.epfd < 0:
            raise ValueError("the load generator is closed")

    cdef uint64_t _error_total(self) noexcept nogil:
        cdef uint64_t total = 0
        cdef int k
        for k in range(N_ERROR_KINDS):
            total += self.errors[k]
        return total

    cdef void _release(self) noexcept:
        cdef int i
        if self.conns != NULL:
            for i in range(self.n_conns):
                self._close_conn(&self.conns[i])
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1
        if self.devnull_fd >= 0:
            close(self.devnull_fd)
            self.devnull_fd = -1
        free(self.conns)
        free(self.runq)
        free(self.runq_work)
        free(self.reopen)
        free(self.reopen_work)
        free(self.events)
        free(self.buf)
        free(self.samples)
        free(self.slots)
        self.slots = NULL
        self.udp_busy = 0
        self.conns = NULL
        self.n_conns = 0  # every later call sees no connections, never the freed array
        self.runq = self.runq_work = NULL
        self.reopen = self.reopen_work = NULL
        self.events = NULL
        self.buf = NULL
        self.samples = NULL
        self.n_samples = 0
        self.phase = PH_NONE

    cdef int _loop(self, uint64_t until_ns) noexcept nogil:
        cdef int i, n, idx, nq, wait_ms
        cdef uint64_t tag
        cdef uint64_t *work
        cdef Conn *c
        if self.mode == MODE_UDP:
            return _udp_loop(self, until_ns)
        while True:
            self.now_ns = _now_ns()
            self._refill()
            if self._phase_done():
                return 1
            if self.now_ns >= until_ns:
                return 0
            if self.now_ns >= self.next_scan_ns:
                self._scan_timeouts()
                self.next_scan_ns = self.now_ns + SCAN_INTERVAL_NS
            wait_ms = 0
            if self.runq_len == 0 and self.reopen_len == 0:
                wait_ms = <int>_min(MAX_WAIT_MS, (until_ns - self.now_ns) // 1000000 + 1)
            n = epoll_wait(self.epfd, self.events, self.max_events, wait_ms)
            self.now_ns = _now_ns()
            for i in range(n):
                tag = self.events[i].data.u64
                idx = <int>(tag & 0xFFFFFFFFU)
                c = &self.conns[idx]
                if c.gen != <uint32_t>(tag >> 32) or c.fd < 0:
                    continue  # closed or reopened earlier in this batch
                self._pump(idx, self.events[i].events)
            nq = self.runq_len
            if nq:
                work = self.runq
                self.runq = self.runq_work
                self.runq_work = work
                self.runq_len = 0
                for i in range(nq):
                    idx = <int>(work[i] & 0xFFFFFFFFU)
                    c = &self.conns[idx]
                    if c.queued and c.gen == <uint32_t>(work[i] >> 32) and c.fd >= 0:
                        c.queued = 0
                        self._pump(idx, 0)

    cdef void _refill(self) noexcept nogil:
        """Open what the phase wants open: the next handshakes, or cps slots to reuse."""
        cdef int i, n
        if self.phase == PH_ESTABLISH:
            while self.n_handshaking < self.open_limit and self.next_open < self.n_conns and not self.stopping:
                self.next_open += 1
                self._open(self.next_open - 1)
        elif self.phase == PH_RUN and self.mode == MODE_CPS and self.reopen_len:
            n = self.reopen_len
            memcpy(self.reopen_work, self.reopen, sizeof(uint32_t) * n)
            self.reopen_len = 0
            for i in range(n):
                if self._can_start():
                    self._open(self.reopen_work[i])
                else:
                    self.reopen[self.reopen_len] = self.reopen_work[i]
                    self.reopen_len += 1

    cdef bint _phase_done(self) noexcept nogil:
        if self.phase == PH_ESTABLISH:
            return (self.next_open >= self.n_conns or self.stopping) and self.n_handshaking == 0
        if self.n_handshaking or self.n_busy:
            return False
        if self.mode == MODE_CPS:
            return self.reopen_len == 0 or not self._can_start()
        return True

    cdef bint _can_start(self) noexcept nogil:
        if self.stopping or (self.limit and self.started >= self.limit):
            return False
        return not (self.stop_at_ns and self.now_ns >= self.stop_at_ns)

    cdef void _set_state(self, Conn *c, int state) noexcept nogil:
        cdef int old = _category(c.state)
        cdef int new = _category(state)
        if old != new:
            if old == 1:
                self.n_handshaking -= 1
            elif old == 2:
                self.n_parked -= 1
            elif old == 3:
                self.n_busy -= 1
            if new == 1:
                self.n_handshaking += 1
            elif new == 2:
                self.n_parked += 1
            elif new == 3:
                self.n_busy += 1
        c.state = state

    cdef void _open(self, int idx) noexcept nogil:
        cdef Conn *c = &self.conns[idx]
        cdef epoll_event ev
        cdef int one = 1, r
        c.gen += 1
        c.queued = c.blocked = 0
        c.tx = NULL
        c.tx_len = c.rx_len = 0
        c.up_left = c.down_left = 0
        # Each connection starts at its own place in the stream: crossed bytes show.
        c.up_pos = c.down_pos = (self.serial * 4099) % PATTERN_BYTES
        self.serial += 1
        c.t_end_ns = 0
        c.t_start_ns = c.t_active_ns = _now_ns()
        if self.mode == MODE_CPS:
            self.started += 1
        self._set_state(c, C_CONNECTING)
        c.fd = socket(self.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if c.fd < 0:
            self.stopping = True  # out of fds or memory here: stop, do not spin
            self._fail(idx, E_OTHER, errno)
            return
        setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        if self.n_sources > 1 and self._bind_source(c.fd) < 0:
            self._fail(idx, E_CONNECT, errno)
            return
        ev.events = EV_FLAGS
        ev.data.u64 = _tag(c.gen, idx)
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, c.fd, &ev) < 0:
            self.stopping = True
            self._fail(idx, E_OTHER, errno)
            return
        r = connect(c.fd, <sockaddr *>&self.peer, self.peer_len)
        if r < 0 and errno != EINPROGRESS:
            self._fail(idx, E_CONNECT, errno)
        # Done or not, connect() completion comes as an EPOLLOUT edge (epoll_ctl ADD on a
        # connected socket queues one at once).

    cdef int _bind_source(self, int fd) noexcept nogil:
        """Bind to the next loopback source address; the port is picked by connect()."""
        cdef sockaddr_in source
        cdef int one = 1
        memset(&source, 0, sizeof(source))
        source.sin_family = AF_INET
        source.sin_addr.s_addr = htonl(0x7F000001U + <uint32_t>(self.serial % self.n_sources))
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one))
        return bind(fd, <sockaddr *>&source, sizeof(source))

    cdef void _pump(self, int idx, uint32_t evs) noexcept nogil:
        cdef Conn *c = &self.conns[idx]
        cdef int st = c.state
        if evs & EV_WRITABLE:
            c.blocked &= ~BLOCKED_SEND
        if evs & EV_READABLE:
            c.blocked &= ~BLOCKED_RECV
        if st == C_CONNECTING:
            if evs & EV_WRITABLE:
                self._connected(idx)
        elif st == C_METHOD or st == C_AUTH or st == C_REPLY or st == C_RESULT:
            if c.tx != NULL:
                self._send_ctl(idx, c.tx, c.tx_len)
                return  # the answer comes with a new edge
            while self._recv_ctl(idx) > 0:
                if self._parse_ctl(idx) != 0:
                    return
        elif st == C_EXCHANGE or st == C_BULK:
            if c.tx != NULL and self._send_ctl(idx, c.tx, c.tx_len) <= 0:
                return
            self._pump_payload(idx)
        elif st == C_PARKED:
            self._check_parked(idx)

    cdef void _connected(self, int idx) noexcept nogil:
        cdef Conn *c = &self.conns[idx]
        cdef int err = 0
        cdef socklen_t err_len = sizeof(err)
        if getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &err_len) < 0:
            err = errno
        if err:
            self._fail(idx, E_CONNECT, err)
            return
        c.t_active_ns = self.now_ns
        if not self.via_proxy:
            self._established(idx)
            return
        self._set_state(c, C_METHOD)
        self._send_ctl(idx, self.greeting_p, self.greeting_len)

    cdef int _send_ctl(self, int idx, const unsigned char *data, int length) noexcept nogil:
        """Send a control message (or its rest). -1 failed, 0 some left for later, 1 sent."""
        cdef Conn *c = &self.conns[idx]
        cdef ssize_t n = send(c.fd, data, length, MSG_NOSIGNAL)
        if n < 0:
            if errno != EAGAIN and errno != EINTR:
                self._fail(idx, _io_kind(errno), errno)
                return -1
            n = 0
        c.t_active_ns = self.now_ns
        if n == length:
            c.tx = NULL
            c.tx_len = 0
            return 1
        c.tx = data + n
        c.tx_len = length - <int>n
        c.blocked |= BLOCKED_SEND
        return 0

    cdef int _recv_ctl(self, int idx) noexcept nogil:
        """Read what the peer sent into rx. -1 failed, 0 nothing yet, 1 got bytes."""
        cdef Conn *c = &self.conns[idx]
        cdef ssize_t n = recv(c.fd, c.rx + c.rx_len, RX_MAX - c.rx_len, 0)
        if n > 0:
            c.rx_len += <int>n
            c.t_active_ns = self.now_ns
            return 1
        if n == 0:
            self._fail(idx, E_EOF, 0)
            return -1
        if errno == EAGAIN or errno == EINTR:
            return 0
        self._fail(idx, _io_kind(errno), errno)
        return -1

    cdef int _parse_ctl(self, int idx) noexcept nogil:
        """Act on a complete control message in rx. -1 failed, 0 incomplete, 1 acted."""
        cdef Conn *c = &self.conns[idx]
        cdef int st = c.state, need
        cdef uint64_t received
        if st == C_METHOD or st == C_AUTH:
            if c.rx_len < 2:
                return 0
            if c.rx_len > 2:
                self._fail(idx, E_MISMATCH, 0)
                return -1
            if st == C_METHOD and c.rx[0] != 5:
                self._fail(idx, E_METHOD, 0)
                return -1
            if st == C_METHOD and c.rx[1] == 2 and self.auth_len:
                c.rx_len = 0
                self._set_state(c, C_AUTH)
                return -1 if self._send_ctl(idx, self.auth_p, self.auth_len) < 0 else 1
            if c.rx[1] != 0:  # no acceptable method (0xFF), or auth failed (RFC 1929 §2)
                self.last_reply = c.rx[1]
                self._fail(idx, E_METHOD if st == C_METHOD else E_AUTH, 0)
                return -1
            c.rx_len = 0
            self._set_state(c, C_REPLY)
            return -1 if self._send_ctl(idx, self.request_p, self.request_len) < 0 else 1
        if st == C_REPLY:
            if c.rx_len < 5:
                return 0
            if c.rx[0] != 5 or c.rx[1] != 0:
                self.last_reply = c.rx[1]
                self._fail(idx, E_REPLY, 0)
                return -1
            if c.rx[3] == 1:
                need = 10
            elif c.rx[3] == 4:
                need = 22
            elif c.rx[3] == 3:
                need = 7 + c.rx[4]
            else:
                self._fail(idx, E_REPLY, 0)
                return -1
            if c.rx_len < need:
                return 0
            if c.rx_len > need:  # data before we sent anything
                self._fail(idx, E_MISMATCH, 0)
                return -1
            c.rx_len = 0
            self._established(idx)
            return 1
        # C_RESULT: the sink's count and verdict.
        if c.rx_len < RESULT_BYTES:
            return 0
        received = _get_be64(c.rx)
        if c.rx_len > RESULT_BYTES or received != self.bulk_bytes or c.rx[8] == STATUS_CORRUPT:
            self._fail(idx, E_MISMATCH, 0)
            return -1
        c.t_end_ns = _now_ns()
        self.ok += 1
        self.t_last_ns = c.t_end_ns
        self._close_conn(c)
        self._set_state(c, C_DONE)
        return 1

    cdef void _established(self, int idx) noexcept nogil:
        cdef Conn *c = &self.conns[idx]
        if self.mode == MODE_CPS:
            self._start_exchange(idx)
        else:
            self._set_state(c, C_PARKED)

    cdef void _start_exchange(self, int idx) noexcept nogil:
        cdef Conn *c = &self.conns[idx]
        if self.mode != MODE_CPS:
            self.started += 1
            c.t_start_ns = _now_ns()
        c.t_active_ns = self.now_ns
        c.up_left = c.down_left = self.size
        self._set_state(c, C_EXCHANGE)
        # One send; the echo cannot be there yet, so wait for its edge instead of a recv.
        self._send_payload(idx)

    cdef void _start_bulk(self, int idx) noexcept nogil:
        cdef Conn *c = &self.conns[idx]
        c.header[0] = BULK_MAGIC
        c.header[1] = BULK_VERSION
        c.header[2] = self.bulk_flags
        c.header[3] = 0
        c.header[4] = <unsigned char>(c.down_pos >> 24)
        c.header[5] = <unsigned char>(c.down_pos >> 16)
        c.header[6] = <unsigned char>(c.down_pos >> 8)
        c.header[7] = <unsigned char>c.down_pos
        _put_be64(c.header + 8, self.bulk_bytes)
        c.up_left = self.bulk_bytes if self.bulk_flags & BULK_UPLOAD else 0
        c.down_left = self.bulk_bytes if self.bulk_flags & BULK_DOWNLOAD else 0
        if c.down_left and not self.verify:
            _make_pipe(&c.pipe_r, &c.pipe_w, self.pipe_size)  # on failure, plain recv() below
        c.t_start_ns = c.t_active_ns = self.now_ns
        self._set_state(c, C_BULK)
        if self._send_ctl(idx, c.header, HEADER_BYTES) == 1:
            self._pump_payload(idx)

    cdef void _pump_payload(self, int idx) noexcept nogil:
        cdef Conn *c = &self.conns[idx]
        cdef int i, r, moved
        for i in range(BUDGET):
            moved = 0
            if c.up_left and not (c.blocked & BLOCKED_SEND):
                r = self._send_payload(idx)
                if r < 0:
                    return
                moved = r
            if c.down_left and not (c.blocked & BLOCKED_RECV):
                r = self._recv_payload(idx)
                if r < 0:
                    return
                moved |= r
            if c.up_left == 0 and c.down_left == 0:
                self._payload_done(idx)
                return
            if not moved:
                return
        if not c.queued:
            c.queued = 1
            self.runq[self.runq_len] = _tag(c.gen, idx)
            self.runq_len += 1

    cdef int _send_payload(self, int idx) noexcept nogil:
        """Send the next chunk of the pattern. -1 failed, 0 EAGAIN, 1 progress."""
        cdef Conn *c = &self.conns[idx]
        cdef loff_t offset = c.up_pos % PATTERN_BYTES
        cdef size_t length = _min(c.up_left, PATTERN_BYTES)
        cdef ssize_t n
        if self.mode == MODE_BULK:
            n = sendfile(c.fd, self.pat_fd, &offset, length)
        else:
            n = send(c.fd, self.pat + offset, length, MSG_NOSIGNAL)
        if n <= 0:
            if n < 0 and errno != EAGAIN and errno != EINTR:
                self._fail(idx, _io_kind(errno), errno)
                return -1
            c.blocked |= BLOCKED_SEND
            return 0
        c.up_left -= n
        c.up_pos += n
        self.bytes_up += n
        c.t_active_ns = self.now_ns
        return 1

    cdef int _recv_payload(self, int idx) noexcept nogil:
        """Take the next chunk of the expected stream. -1 failed, 0 EAGAIN, 1 progress."""
        cdef Conn *c = &self.conns[idx]
        cdef ssize_t n
        if c.pipe_w >= 0:
            n = splice(c.fd, NULL, c.pipe_w, NULL, _min(c.down_left, self.pipe_size),
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n > 0 and _drain_pipe(c.pipe_r, self.devnull_fd, n) < 0:
                self._fail(idx, E_OTHER, errno)
                return -1
        else:
            n = recv(c.fd, self.buf, _min(c.down_left, self.buf_size), 0)
            if n > 0 and (self.verify or self.mode != MODE_BULK):
                if memcmp(self.buf, self.pat + c.down_pos % PATTERN_BYTES, n) != 0:
                    self._fail(idx, E_MISMATCH, 0)
                    return -1
        if n == 0:
            self._fail(idx, E_EOF, 0)
            return -1
        if n < 0:
            if errno != EAGAIN and errno != EINTR:
                self._fail(idx, _io_kind(errno), errno)
                return -1
            c.blocked |= BLOCKED_RECV
            return 0
        c.down_left -= n
        c.down_pos += n
        self.bytes_down += n
        c.t_active_ns = self.now_ns
        return 1

    cdef void _payload_done(self, int idx) noexcept nogil:
        cdef Conn *c = &self.conns[idx]
        cdef uint64_t now = _now_ns()
        if self.mode == MODE_BULK:
            if self.bulk_flags & BULK_UPLOAD:
                c.rx_len = 0
                self._set_state(c, C_RESULT)
                self._pump(idx, EPOLLIN)  # the verdict may be here already
                return
            c.t_end_ns = now
            self.ok += 1
            self.t_last_ns = now
            self._close_conn(c)
            self._set_state(c, C_DONE)
            return
        self._record(now - c.t_start_ns)
        self.ok += 1
        self.t_last_ns = now
        if self.mode == MODE_CPS:
            self._close_conn(c)
            self._set_state(c, C_DONE)
            self.reopen[self.reopen_len] = idx
            self.reopen_len += 1
        elif self.mode == MODE_RR and self._can_start():
            self._start_exchange(idx)
        else:
            self._set_state(c, C_PARKED)

    cdef void _check_parked(self, int idx) noexcept nogil:
        """An edge on a parked connection: the proxy closed it, or sent what nobody asked."""
        cdef Conn *c = &self.conns[idx]
        cdef ssize_t n = recv(c.fd, self.buf, self.buf_size, 0)
        if n > 0:
            self._fail(idx, E_MISMATCH, 0)
        elif n == 0:
            self._fail(idx, E_EOF, 0)
        elif errno != EAGAIN and errno != EINTR:
            self._fail(idx, _io_kind(errno), errno)

    cdef void _fail(self, int idx, int kind, int err) noexcept nogil:
        cdef Conn *c = &self.conns[idx]
        self.errors[kind] += 1
        self.last_kind = kind
        self.last_errno = err
        self._close_conn(c)
        self._set_state(c, C_DONE)
        if self.mode == MODE_CPS and self.phase == PH_RUN:
            self.reopen[self.reopen_len] = idx
            self.reopen_len += 1

    cdef void _close_conn(self, Conn *c) noexcept nogil:
        if c.fd >= 0:
            close(c.fd)  # also leaves the epoll set: the fd is never dup'ed
            c.fd = -1
        if c.pipe_r >= 0:
            close(c.pipe_r)
            close(c.pipe_w)
            c.pipe_r = c.pipe_w = -1
        c.tx = NULL
        c.queued = 0

    cdef void _record(self, uint64_t latency_ns) noexcept nogil:
        cdef size_t i, cap
        cdef uint32_t *grown
        self.lat_n += 1
        self.lat_sum_ns += latency_ns
        if latency_ns > self.lat_max_ns:
            self.lat_max_ns = latency_ns
        self.stride_count += 1
        if self.stride_count < self.stride:
            return
        self.stride_count = 0
        if self.n_samples == self.cap_samples:
            cap = <size_t>_min(self.cap_samples * 2, self.max_samples)
            grown = NULL
            if cap > self.cap_samples:
                grown = <uint32_t *>realloc(self.samples, sizeof(uint32_t) * cap)
            if grown != NULL:
                self.samples = grown
                self.cap_samples = cap
            else:
                # Full: keep every other sample and record every other one from now on.
                for i in range(self.n_samples // 2):
                    self.samples[i] = self.samples[2 * i]
                self.n_samples //= 2
                self.stride *= 2
        self.samples[self.n_samples] = <uint32_t>_min(latency_ns, UINT32_MAX)
        self.n_samples += 1

    cdef void _scan_timeouts(self) noexcept nogil:
        cdef int i, cat
        cdef Conn *c
        for i in range(self.n_conns):
            c = &self.conns[i]
            cat = _category(c.state)
            # t_active_ns may be a little newer than now_ns (stamped mid-iteration).
            if (cat == 1 or cat == 3) and self.now_ns > c.t_active_ns + self.timeout_ns:
                self._fail(i, E_TIMEOUT, 0)


include "_udp_load.pxi"
include "_target.pxi"
