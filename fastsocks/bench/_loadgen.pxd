# Reviewed header of the load generator and its target servers (see _loadgen.pyx for the
# theory of operation).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t


from fastsocks._system cimport *


cdef extern from "<sys/socket.h>" nogil:
    ssize_t recvfrom(int fd, void *buf, size_t length, int flags, sockaddr *addr, socklen_t *addrlen)
    ssize_t sendto(int fd, const void *buf, size_t length, int flags, const sockaddr *addr,
                   socklen_t addrlen)
    enum:
        MSG_DONTWAIT


cdef extern from "<errno.h>" nogil:
    enum:
        ECONNREFUSED
        ENOBUFS
        ENOSYS


cdef extern from "<sys/epoll.h>" nogil:
    # Linux 5.11, glibc 2.35: a timeout in nanoseconds (udp --rate paces with it).
    int epoll_pwait2(int epfd, epoll_event *events, int maxevents, const timespec *timeout, const void *sigmask)


# --------------------------------------------------------------------- wire constants

cdef enum:
    PATTERN_BYTES = 1 << 20   # period of the payload pattern; the memfd holds it twice
    BULK_MAGIC = 0xFB         # first byte of a bulk header; never a pattern byte
    BULK_VERSION = 1
    HEADER_BYTES = 16         # MAGIC VERSION FLAGS 0 | OFFSET(4) | NBYTES(8), big-endian
    RESULT_BYTES = 9          # RECEIVED(8) STATUS(1), big-endian
    BULK_DOWNLOAD = 1         # header flags
    BULK_UPLOAD = 2
    BULK_VERIFY = 4
    STATUS_UNCHECKED = 0      # result status
    STATUS_INTACT = 1
    STATUS_CORRUPT = 2


# --------------------------------------------------------------------- load generator

cdef enum:
    MODE_BULK = 0
    MODE_CPS = 1
    MODE_RR = 2
    MODE_IDLE = 3
    MODE_UDP = 4

cdef enum:
    UDP_TAG_BYTES = 12      # a udp datagram's payload starts SLOT(4) SEQ(8), big-endian

# Connection states, in the order a connection goes through them.
cdef enum:
    C_FREE = 0
    C_CONNECTING = 1    # connect() in progress
    C_METHOD = 2        # greeting sent; awaiting the method selection (RFC 1928 §3)
    C_AUTH = 3          # username/password sent; awaiting its status (RFC 1929 §2)
    C_REPLY = 4         # CONNECT sent; awaiting the reply (RFC 1928 §6)
    C_PARKED = 5        # established, waiting for go() or for the end
    C_EXCHANGE = 6      # a request is out; awaiting its echo (cps, rr, idle ping)
    C_BULK = 7          # bulk transfer in progress
    C_RESULT = 8        # bulk upload done; awaiting the sink's result
    C_DONE = 9          # closed

# Error kinds (see ERROR_KINDS in _loadgen.pyx).
cdef enum:
    E_CONNECT = 0
    E_METHOD = 1
    E_AUTH = 2
    E_REPLY = 3
    E_EOF = 4
    E_RESET = 5
    E_TIMEOUT = 6
    E_MISMATCH = 7
    E_ABORTED = 8
    E_OTHER = 9
    N_ERROR_KINDS = 10

# Phases.
cdef enum:
    PH_NONE = 0
    PH_ESTABLISH = 1
    PH_RUN = 2

cdef enum:
    BLOCKED_SEND = 1
    BLOCKED_RECV = 2

cdef enum:
    RX_MAX = 288   # the longest control message is a CONNECT reply: 4 + 1 + 255 + 2


ctypedef struct Conn:
    int fd
    int state
    int queued             # on the run queue (its budget ran out while still ready)
    int blocked            # BLOCKED_SEND / BLOCKED_RECV: the kernel said EAGAIN, await an edge
    uint32_t gen           # bumped on every (re)open: stale events are skipped
    uint64_t t_start_ns    # cps: before socket(); rr/idle: request sent; bulk: go()
    uint64_t t_end_ns      # bulk: stream finished
    uint64_t t_active_ns   # last progress, for the per-operation timeout
    const unsigned char *tx  # unsent rest of a control message (NULL: none)
    int tx_len
    int rx_len
    unsigned char rx[RX_MAX]
    unsigned char header[HEADER_BYTES]
    uint64_t up_left       # payload still to send
    uint64_t up_pos        # its offset in the pattern stream
    uint64_t down_left     # payload still to receive
    uint64_t down_pos
    int pipe_r             # bulk download without verification: socket -> pipe -> /dev/null
    int pipe_w


ctypedef struct USlot:
    uint64_t seq           # the datagram in flight in this slot (busy) or the last one
    uint64_t t_sent_ns
    int busy


cdef class Pattern:
    cdef int fd
    cdef const unsigned char *data   # PATTERN_BYTES * 2, read-only mapping of fd
    cdef size_t size


cdef class LoadGen:
    cdef int mode
    cdef int epfd
    cdef int devnull_fd
    cdef Pattern pattern
    cdef sockaddr_storage peer
    cdef socklen_t peer_len
    cdef int family
    cdef int n_sources             # > 1: spread clients over 127.0.0.1 .. 127.0.0.n_sources
    cdef bytes greeting            # SOCKS5 messages built in Python, kept alive here ...
    cdef bytes auth
    cdef bytes request
    cdef const unsigned char *greeting_p   # ... and read through these in nogil code
    cdef const unsigned char *auth_p
    cdef const unsigned char *request_p
    cdef int greeting_len
    cdef int auth_len              # 0: no credentials
    cdef int request_len
    cdef bint via_proxy
    cdef const unsigned char *pat  # the pattern's mapping and memfd
    cdef int pat_fd
    cdef Conn *conns
    cdef int n_conns
    cdef uint64_t *runq            # (gen << 32 | idx) of connections whose budget ran out
    cdef uint64_t *runq_work
    cdef int runq_len
    cdef uint32_t *reopen          # cps: slots to open again (never inline: no recursion)
    cdef uint32_t *reopen_work
    cdef int reopen_len
    cdef epoll_event *events
    cdef int max_events
    cdef unsigned char *buf
    cdef size_t buf_size
    cdef int pipe_size
    cdef uint64_t size             # cps/rr/idle message size
    cdef uint64_t bulk_bytes
    cdef int bulk_flags
    cdef bint verify
    cdef uint64_t limit            # 0: unlimited (cps connections, rr transactions)
    cdef uint64_t stop_at_ns       # 0: none; no new exchange starts after it
    cdef uint64_t timeout_ns
    cdef int open_limit
    cdef int phase
    cdef bint stopping
    cdef uint64_t now_ns
    cdef uint64_t next_scan_ns
    # counters
    cdef int next_open
    cdef int n_handshaking
    cdef int n_busy
    cdef int n_parked
    cdef uint64_t started
    cdef uint64_t ok
    cdef uint64_t ok_at_go
    cdef uint64_t errors[N_ERROR_KINDS]
    cdef uint64_t errors_at_go
    cdef int last_errno
    cdef int last_reply
    cdef int last_kind
    cdef uint64_t bytes_up
    cdef uint64_t bytes_down
    cdef uint64_t t_go_ns
    cdef uint64_t t_last_ns
    cdef uint64_t serial
    # latency samples (ns), decimated by `stride` once `max_samples` is reached
    cdef uint32_t *samples
    cdef size_t n_samples
    cdef size_t cap_samples
    cdef size_t max_samples
    cdef uint64_t stride
    cdef uint64_t stride_count
    cdef uint64_t lat_max_ns
    cdef uint64_t lat_sum_ns
    cdef uint64_t lat_n
    # udp: each association (a Conn: its connected UDP socket) keeps `inflight` slots
    cdef USlot *slots
    cdef int inflight
    cdef int udp_busy              # datagrams in flight, all associations
    cdef uint64_t loss_ns          # a datagram unanswered this long is lost
    cdef bytes udp_header          # RFC 1928 §7 header before every payload (b"": direct)
    cdef const unsigned char *udp_header_p
    cdef int udp_header_len
    cdef list udp_control          # the associations' TCP connections, held open
    cdef uint64_t udp_timeouts     # datagrams given up as lost
    cdef uint64_t udp_late         # echoes that came after their timeout (or twice)
    cdef uint64_t udp_compared     # payload bytes compared, echoes intact or not
    cdef uint64_t pace_ns          # udp --rate: one datagram every pace_ns (0: closed loop)
    cdef uint64_t next_send_ns     # when the next paced datagram is due
    cdef int pace_conn             # the association the next paced datagram goes on
    cdef uint64_t udp_unsent       # paced datagrams not sent: every slot was in flight

    cdef uint64_t _error_total(self) noexcept nogil
    cdef void _release(self) noexcept
    cdef int _loop(self, uint64_t until_ns) noexcept nogil
    cdef void _refill(self) noexcept nogil
    cdef bint _phase_done(self) noexcept nogil
    cdef bint _can_start(self) noexcept nogil
    cdef void _open(self, int idx) noexcept nogil
    cdef int _bind_source(self, int fd) noexcept nogil
    cdef void _set_state(self, Conn *c, int state) noexcept nogil
    cdef void _pump(self, int idx, uint32_t evs) noexcept nogil
    cdef void _connected(self, int idx) noexcept nogil
    cdef int _send_ctl(self, int idx, const unsigned char *data, int length) noexcept nogil
    cdef int _recv_ctl(self, int idx) noexcept nogil
    cdef int _parse_ctl(self, int idx) noexcept nogil
    cdef void _established(self, int idx) noexcept nogil
    cdef void _start_exchange(self, int idx) noexcept nogil
    cdef void _start_bulk(self, int idx) noexcept nogil
    cdef void _pump_payload(self, int idx) noexcept nogil
    cdef int _send_payload(self, int idx) noexcept nogil
    cdef int _recv_payload(self, int idx) noexcept nogil
    cdef void _payload_done(self, int idx) noexcept nogil
    cdef void _check_parked(self, int idx) noexcept nogil
    cdef void _fail(self, int idx, int kind, int err) noexcept nogil
    cdef void _close_conn(self, Conn *c) noexcept nogil
    cdef void _record(self, uint64_t latency_ns) noexcept nogil
    cdef void _scan_timeouts(self) noexcept nogil


# --------------------------------------------------------------------- target server

cdef enum:
    T_FREE = 0
    T_SNIFF = 1     # nothing read yet: the first byte says echo or bulk
    T_HEADER = 2    # reading the rest of a bulk header
    T_ECHO = 3
    T_BULK = 4
    T_DRAIN = 5     # bulk done: read until the client closes


ctypedef struct TConn:
    int fd
    int state
    int queued
    int next_free
    uint32_t gen
    int header_len
    unsigned char header[HEADER_BYTES]
    char *pending          # echo bytes the client has not taken yet (malloc'd)
    int pending_len
    int pending_off
    int flags
    uint64_t down_left
    uint64_t down_pos
    uint64_t up_left
    uint64_t up_pos
    uint64_t up_total
    int corrupt
    int result_off         # RESULT_BYTES: sent (or none due)
    unsigned char result[RESULT_BYTES]
    int pipe_r
    int pipe_w


cdef class TargetServer:
    cdef int epfd
    cdef int listen_fd
    cdef int devnull_fd
    cdef Pattern pattern
    cdef const unsigned char *pat
    cdef int pat_fd
    cdef TConn *conns
    cdef int capacity
    cdef int free_head
    cdef uint64_t *runq
    cdef uint64_t *runq_work
    cdef int runq_len
    cdef epoll_event *events
    cdef int max_events
    cdef unsigned char *buf
    cdef size_t buf_size
    cdef int pipe_size
    cdef bint accept_paused
    cdef uint64_t resume_accept_ns
    cdef uint64_t accepted
    cdef uint64_t echoed
    cdef uint64_t sent
    cdef uint64_t received
    cdef int udp_fd                # -1: no UDP echo
    cdef uint64_t udp_echoed       # datagrams echoed

    cdef int _loop(self, int stop_fd) noexcept nogil
    cdef void _udp_echo(self) noexcept nogil
    cdef int _grow(self) noexcept nogil
    cdef void _accept(self) noexcept nogil
    cdef void _pump(self, int idx) noexcept nogil
    cdef int _sniff(self, TConn *c) noexcept nogil
    cdef int _read_header(self, TConn *c) noexcept nogil
    cdef int _begin_bulk(self, TConn *c, const unsigned char *extra, size_t n) noexcept nogil
    cdef int _pump_echo(self, TConn *c) noexcept nogil
    cdef int _echo(self, TConn *c, const unsigned char *data, size_t n) noexcept nogil
    cdef int _pump_bulk(self, TConn *c) noexcept nogil
    cdef int _take_upload(self, TConn *c, const unsigned char *data, size_t n) noexcept nogil
    cdef int _pump_drain(self, TConn *c) noexcept nogil
    cdef void _close_conn(self, int idx) noexcept nogil
