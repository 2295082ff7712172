# Reviewed header of the relay engine (see _relay.pyx for the theory of operation).

from libc.stdint cimport uint32_t, uint64_t, int64_t


from fastsocks._system cimport *


# Direction flags.
cdef enum:
    DIR_EOF = 1        # the source returned EOF
    DIR_DONE = 2       # EOF forwarded: shutdown(SHUT_WR) sent to the destination
    DIR_SPLICE = 4     # data goes source -> pipe -> destination

# Readiness bits of a session: readable/writable for side 0 (client) and side 1 (upstream).
cdef enum:
    READABLE0 = 1
    WRITABLE0 = 2
    READABLE1 = 4
    WRITABLE1 = 8

# Session slot states.
cdef enum:
    SLOT_FREE = 0
    SLOT_ACTIVE = 1
    SLOT_FINISHED = 2

# Why a session ended (see REASONS in _relay.pyx).
cdef enum:
    END_EOF = 0
    END_ERROR = 1
    END_IDLE = 2
    END_SHUTDOWN = 3


ctypedef struct Direction:
    char *pending          # bytes read but not yet written (copy mode), malloc'd lazily
    int pending_off
    int pending_len
    int pipe_r             # -1 unless splicing
    int pipe_w
    ssize_t in_pipe        # bytes sitting in the pipe
    int streak             # consecutive full reads (copy) or short reads (splice)
    int flags
    uint64_t nbytes        # bytes delivered to the destination


ctypedef struct Session:
    int fd[2]              # 0: client, 1: upstream
    int state
    int ready              # READABLE*/WRITABLE* bits, edge-triggered bookkeeping
    int queued             # on the run queue (budget ran out while still ready)
    int next               # free-list / finished-list link
    uint32_t gen           # bumped when the slot is freed: stale run-queue entries are skipped
    int end_reason
    int end_errno
    int64_t tag
    double last_active_s
    Direction dir[2]       # 0: client -> upstream, 1: upstream -> client


cdef class RelayEngine:
    cdef int epfd
    cdef Session *slots
    cdef int capacity
    cdef int free_head
    cdef uint64_t *runq          # (gen << 32 | idx) of sessions that ran out of budget
    cdef uint64_t *runq_work
    cdef int runq_len
    cdef int finished_head
    cdef int n_active
    cdef char *buf
    cdef size_t buf_size
    cdef bint use_splice
    cdef int pipe_size
    cdef size_t splice_len
    cdef int max_pipes
    cdef int pipes_open
    cdef int *pipe_pool
    cdef int pool_len
    cdef int pool_max
    cdef double idle_timeout_s
    cdef double now_s
    cdef epoll_event *events
    cdef int max_events
    cdef uint64_t total_up
    cdef uint64_t total_down
    cdef uint64_t total_sessions
    cdef uint64_t splice_switches

    cdef int _grow(self) except -1
    cdef int _process(self) noexcept nogil
    cdef void _pump(self, int idx) noexcept nogil
    cdef int _pump_dir(self, Session *s, int d) noexcept nogil
    cdef int _flush(self, Session *s, int d) noexcept nogil
    cdef int _read(self, Session *s, int d) noexcept nogil
    cdef int _start_splice(self, Direction *dr) noexcept nogil
    cdef void _stop_splice(self, Direction *dr) noexcept nogil
    cdef int _read_end(self, Session *s, int d, ssize_t n) noexcept nogil
    cdef int _write_error(self, Session *s, int d) noexcept nogil
    cdef void _count(self, Session *s, int d, ssize_t n) noexcept nogil
    cdef void _finish(self, int idx, int reason, int err) noexcept nogil
    cdef list _collect(self)


# ---------------------------------------------------------------------- SOCKS5 UDP header
# RFC 1928 §7: RSV(2) FRAG(1) ATYP(1) DST.ADDR DST.PORT(2), then the payload. The nogil
# core below reads and writes raw memory, so that a batched (recvmmsg) path can use it
# without Python objects; udp_unpack()/udp_pack() in _relay.pyx are its Python face.

# What udp_parse() returns: UDP_OK or why the datagram is dropped.
cdef enum:
    UDP_OK = 0
    UDP_TRUNCATED = -1      # the datagram ends inside the header
    UDP_BAD_RSV = -2        # RSV is not X'0000'
    UDP_FRAGMENTED = -3     # FRAG != 0: fragmentation is optional (§7) and not supported
    UDP_BAD_ATYP = -4       # not X'01', X'03' or X'04'
    UDP_BAD_DOMAIN = -5     # empty, or a byte outside printable ASCII: refused, never cut

cdef enum:
    UDP_ATYP_IPV4 = 1
    UDP_ATYP_DOMAIN = 3
    UDP_ATYP_IPV6 = 4
    UDP_HEADER_MAX_IP = 22  # the longest header for an IP address: 4 + 16 + 2


ctypedef struct UdpDest:
    int atyp                    # UDP_ATYP_*
    const unsigned char *addr   # 4 or 16 address bytes, or the name's bytes, inside the datagram
    int addr_len
    int port
    int header_len              # where the payload starts


cdef int udp_parse(const unsigned char *p, Py_ssize_t n, UdpDest *dest) noexcept nogil
cdef int udp_header_write(unsigned char *out, int family, const unsigned char *addr, int port) noexcept nogil
