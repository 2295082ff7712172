# Reviewed header of the relay engine (see _relay.pyx for the theory of operation).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t


from fastsocks._system cimport *


# Direction flags.
cdef enum:
    DIR_EOF = 1        # the source returned EOF
    DIR_DONE = 2       # EOF forwarded: shutdown(SHUT_WR) sent to the destination
    DIR_SPLICE = 4     # data goes source -> pipe -> destination

# What limits a direction's reads (Direction.limits).
cdef enum:
    LIM_RATE = 1       # its own bucket (rate_bytes_per_s)
    LIM_SHARED = 2     # shared buckets (shared[])
    LIM_QUOTA = 4      # its session's quota (Session.quota_entry)

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
    END_FAILED = 4        # an accepted client that never relayed (see _front.pxi)
    END_QUOTA = 5         # its user's quota was used up (add(quota=...))

# Where a session slot is (Session.phase): relaying, or still at the engine's front door.
cdef enum:
    PHASE_RELAY = 0
    PHASE_HANDSHAKE = 1   # reading the greeting and the request
    PHASE_CONNECTING = 2  # the upstream connect is under way
    PHASE_HANDOFF = 3     # queued for the gate's hand_off at the end of run()

# front_parse_c() verdicts, and why a front-door session failed (Session.fail).
cdef enum:
    FRONT_MORE = 0
    FRONT_CONNECT = 1
    FRONT_PYTHON = 2
    FRONT_BUF = 512       # bytes a client may send before its request is complete
    REPLY_NONE = -1       # _relay_types.NO_REPLY: nothing could be answered
    FAIL_CONNECT = 1
    FAIL_HANDSHAKE_TIMEOUT = 2
    FAIL_REFUSED = 3      # the gate refused it (its words are in RelayEngine.whys)
    FAIL_CLIENT = 4       # the client was gone before its reply
    FAIL_SHUTDOWN = 5
    FAIL_ACCOUNTS = 6     # no room in the shared accounts for its client's limit
    RULE_DEFAULT = -1     # _relay_types.RULE_DEFAULT: the default action decided
    RULE_NONE = -2        # _relay_types.RULE_NONE: nothing judged the request
    MAX_LISTENERS = 64
    ACCEPT_BATCH = 64     # accepts per listener wake-up: a flood cannot starve the relays
    REARM_EVERY = 16      # EPOLLEXCLUSIVE: re-register after this many accepts (see listen())
    MAX_EGRESS = 64       # front(egress=...): source addresses per family

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
    # A rate limit (add()/front() rate_*_bytes_per_s; 0: none): a token bucket, _relay.pyx "Rates".
    double rate_bytes_per_s
    double burst_bytes     # the bucket's size
    double tokens          # bytes it may read now, as of refilled_s
    double refilled_s
    double resume_s        # throttled: it reads again from this time on (0: not throttled)
    int timer_at           # 1 + its place in RelayEngine.timers while throttled, else 0
    int limits             # LIM_* bits: what _allowance() asks before a read (0: nothing)
    # Shared buckets (add(shared=...); _accounts.pxi): the entries it also reads through,
    # at these rates, and what the last allowance took from each (settled by _charge()).
    int shared[2]          # -1: none
    double shared_rate[2]
    double granted[2]


ctypedef struct Timer:         # a throttled direction, in the engine's min-heap by resume_s
    double resume_s
    int idx                # its session's slot
    int d                  # its direction


ctypedef struct FrontRequest:   # what front_parse_c() read
    int proto              # 5 or 4 once the first byte says so, else 0
    int family             # AF_INET or AF_INET6 ("connect" only)
    unsigned char ip[16]
    int port
    int consumed           # bytes of greeting and request; the rest is payload
    int sent               # bytes of the method selection (05 00) the server has sent by now


ctypedef struct Front:          # a session at the front door; freed once it relays
    unsigned char buf[FRONT_BUF]  # everything the client sent, from its first byte
    int len
    int sent               # bytes of 05 00 actually sent
    double deadline_s      # handshake, then connect, timeout
    FrontRequest req


ctypedef struct Egress:         # the source addresses of one family the front door connects from
    unsigned char addr[MAX_EGRESS * 16]  # each in 16 bytes, an IPv4 one in the first 4
    int count
    uint64_t turn          # round robin: connects that took one so far (never wraps)


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
    # The front door's (all 0 for a session add()ed by Python):
    int phase              # PHASE_*
    Front *front           # while not PHASE_RELAY
    int proto              # 0: nothing parsed (or add()ed), 4, 5
    int reply              # END_FAILED: the SOCKS5 reply code sent, or -1
    int fail               # END_FAILED: FAIL_*
    bint has_dest
    double started_s
    double requested_s     # the request was read (0: not yet): Ended.handshake_s
    double connected_s     # the connect was done, or failed (0: not tried): Ended.connect_s
    int rule               # what decided the CONNECT: a rule's index, RULE_DEFAULT or RULE_NONE
    sockaddr_in6 peer      # the client, as accept() gave it (a sockaddr_in for IPv4)
    int dest_family
    unsigned char dest_ip[16]
    int dest_port
    bint counted           # in the shared counts (bucket[]) until the slot is released
    uint16_t bucket[2]
    int quota_entry        # add(quota=...): the account its bytes count in (-1: none)...
    int64_t quota_bytes    # ...up to this many
    bint over_quota        # the count reached it: the session ends as END_QUOTA
    int held_entry         # the front door's: the client's account it holds (-1 or 0 unused: see held)
    bint held              # ...until the slot is released


# The accounts all workers share (_accounts.pxi): fixed-size entries after a head.
cdef enum:
    KIND_USER = 1          # Account.kind: _relay.ACCOUNT_USER
    KIND_CLIENT = 2        # _relay.ACCOUNT_CLIENT
ctypedef struct AccountsHead:
    int64_t lock           # claiming and freeing entries: the holder's pid, else 0
    int64_t claimed
    int64_t pad[6]

ctypedef struct Account:
    int64_t lock           # its buckets: the holder's pid, else 0
    uint64_t key           # FNV-1a of (kind, name)
    int64_t refs           # sessions holding it, in all workers
    int64_t used           # bytes counted against a quota this period
    double tokens[2]       # the shared buckets, up and down
    double refilled_s[2]   # 0: not yet used (full)
    int32_t kind           # ACCOUNT_USER, ACCOUNT_CLIENT; 0: free
    int32_t name_len
    unsigned char name[256]


cdef class Accounts:
    cdef AccountsHead *head
    cdef Account *table
    cdef int32_t *holds           # [workers][entries]: each worker slot's holds (release_slot)
    cdef int entries
    cdef int workers
    cdef int slot                 # this process's row in holds (forked()); -1: none, the master
    cdef size_t size
    cdef int64_t me               # this process's pid: what its locks hold
    cdef Account *_entry(self, int index) except NULL


# The front door's memory of its gate's answers (_front.pxi): direct-mapped, a colliding
# key evicts the older one; calloc'd at the first remembered answer, forgotten by front().
cdef enum:
    FRONT_CACHE_SIZE = 4096    # entries, a power of two

ctypedef struct FrontEntry:
    unsigned char client[16]   # IPv6, or IPv4 as ::ffff:a.b.c.d
    unsigned char dest[16]     # the same (zero in the accept cache)
    uint16_t port
    uint8_t used
    uint8_t counted            # accept cache: the client's sessions are counted in bucket[]
    uint16_t bucket[2]
    int32_t rule               # verdict cache: the rule that let it through (Session.rule)

ctypedef struct FrontCache:
    FrontEntry *entries
    uint64_t seed


cdef class RelayEngine:
    cdef int epfd
    cdef Session *slots
    cdef int capacity
    cdef int free_head
    cdef uint64_t *runq          # (gen << 32 | idx) of sessions that ran out of budget
    cdef uint64_t *runq_work
    cdef int runq_len
    cdef Timer *timers            # min-heap of the throttled directions: 2 per slot at most
    cdef int n_timers
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
    cdef int pool_reserve         # pooled pipes kept however long they are unused
    cdef int pool_low             # the fewest pooled pipes since pool_checked_s
    cdef double pool_idle_s
    cdef double pool_checked_s
    cdef double idle_timeout_s
    cdef double now_s
    cdef epoll_event *events
    cdef int max_events
    cdef uint64_t total_up
    cdef uint64_t total_down
    cdef uint64_t total_sessions
    cdef uint64_t splice_switches
    # The front door (_front.pxi).
    cdef object gate
    cdef dict whys                # slot -> the gate's words for a refusal, until collected
    cdef object hook_error        # the first exception a gate raised in run()
    cdef unsigned char methods[8]
    cdef int nmethods
    cdef bint socks4
    cdef bint judge_accept
    cdef bint judge_request
    cdef unsigned char own_port_bits[8192]  # a bit per port: a CONNECT there goes to the session
    cdef double handshake_timeout_s
    cdef double connect_timeout_s
    cdef double front_rate_bytes_per_s[2]  # the front door's sessions' limits, up and down
    cdef double front_client_rate[2]       # ...and their client's, shared (accounts): 0 none
    cdef FrontCache accept_cache   # clients gate.accepted() let in with a tuple
    cdef FrontCache verdict_cache  # (client, dest, port) that gate.request() let through
    cdef bint egress_on           # any egress address: the connects bind first
    cdef bint egress_sticky       # by the client's address, not in turn
    cdef Egress egress4
    cdef Egress egress6
    # The shared session counts (limits.SharedLimits, front(counts=...)): each 8-byte word
    # written by one worker only, its row; read as the sum over all rows.
    cdef int64_t[::1] counts_view
    cdef int64_t *counts          # NULL: no counts given
    cdef tuple counts_given       # what front() was given, to refuse another map while counting
    cdef bint count_new           # count the sessions of remembered clients (counts given now)
    cdef int count_slot
    cdef int count_workers
    cdef int count_row            # words per row
    cdef int count_open           # offsets of the sections in a row, in words
    cdef int count_clients
    cdef int count_blocked
    cdef int count_buckets        # buckets in the clients section (both tables)
    cdef int64_t cap_total        # 0: no cap
    cdef int64_t cap_worker
    cdef int64_t cap_client
    cdef bint check_blocked
    cdef int n_counted
    cdef int listen_fd[MAX_LISTENERS]
    cdef bint listen_excl[MAX_LISTENERS]
    cdef int listen_since[MAX_LISTENERS]
    cdef int n_listen
    cdef int accept_errno
    cdef int64_t next_tag
    cdef uint64_t n_accepted
    cdef int n_handshaking
    cdef int *handoffq            # slots in PHASE_HANDOFF, served at the end of run()
    cdef int handoffq_len
    # wait(): the Python loop's epoll fd, and the UDP relay it runs itself.
    cdef int wake_fd
    cdef bint woke                # wake_fd was ready in the last wait()
    cdef object udp               # a UdpRelay, or None
    cdef bint udp_ready
    cdef Accounts accounts        # the shared accounts add(shared=, quota=) name entries of

    cdef int _grow(self) except -1
    cdef int _process(self, int timeout_ms) noexcept nogil
    cdef void _pump(self, int idx) noexcept nogil
    cdef int _pump_dir(self, Session *s, int d) noexcept nogil
    cdef int _flush(self, Session *s, int d) noexcept nogil
    cdef int _read(self, Session *s, int d) noexcept nogil
    cdef ssize_t _allowance(self, Session *s, int d, ssize_t size) noexcept nogil
    cdef void _charge(self, Session *s, int d, ssize_t n) noexcept nogil
    cdef object _shares_checked(self, shared, quota)
    cdef void _resume_due(self) noexcept nogil
    cdef int _resume_in_ms(self) noexcept nogil
    cdef void _timer_push(self, int idx, int d) noexcept nogil
    cdef void _timer_remove(self, int pos) noexcept nogil
    cdef void _timer_place(self, int pos, Timer t) noexcept nogil
    cdef void _timer_sift(self, int pos) noexcept nogil
    cdef int _start_splice(self, Direction *dr) noexcept nogil
    cdef void _stop_splice(self, Direction *dr) noexcept nogil
    cdef void _trim_pool(self) noexcept nogil
    cdef int _read_end(self, Session *s, int d, ssize_t n) noexcept nogil
    cdef int _write_error(self, Session *s, int d) noexcept nogil
    cdef void _count(self, Session *s, int d, ssize_t n) noexcept nogil
    cdef void _finish(self, int idx, int reason, int err) noexcept nogil
    cdef list _collect(self)
    cdef void _release(self, int idx) noexcept nogil
    cdef void _end(self, int idx, int reason, int err) noexcept nogil
    cdef void _accept(self, int li) noexcept nogil
    cdef void _front_open(self, int fd, const sockaddr_in6 *peer) noexcept nogil
    cdef void _front_read(self, int idx) noexcept nogil
    cdef void _front_request(self, int idx) noexcept nogil
    cdef int _front_egress(self, int idx, int fd) noexcept nogil
    cdef void _front_connected(self, int idx) noexcept nogil
    cdef void _front_fail(self, int idx, int reply, int kind, int err) noexcept nogil
    cdef void _hand_off(self, int idx) noexcept nogil
    cdef void _serve_handoffs(self)
    cdef int _serve_python(self) except -1
    cdef void _unlisten(self) noexcept nogil
    cdef int _front_admit(self, int idx) noexcept nogil
    cdef int _front_judge(self, int idx) noexcept nogil
    cdef int _gate_accepted(self, int idx) noexcept nogil
    cdef int _gate_request(self, int idx) noexcept nogil
    cdef void _tally(self, Session *s, int delta) noexcept nogil
    cdef bint _over_caps(self, Session *s) noexcept nogil
    cdef bint _blocked(self, const uint16_t *bucket) noexcept nogil
    cdef str _described(self, Session *s)
    cdef str _why(self, int idx, Session *s)


cdef int front_parse_c(const unsigned char *p, int n, const unsigned char *methods, int nmethods,
                       bint socks4, FrontRequest *out) noexcept nogil


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


# ---------------------------------------------------------------------- UDP relay
# The datagram loop of UDP ASSOCIATE (theory in _udp_relay.pxi): one UdpRelay per
# worker owns an epoll set and the recvmmsg/sendmmsg batch buffers; an association's own
# state is a UdpFlow.

cdef enum:
    UDP_HEADROOM = 22           # UDP_HEADER_MAX_IP: free bytes before every received datagram
    UDP_SLOT = 22 + 65536       # headroom + any UDP datagram (65527 bytes at most over IPv6)
    UDP_V4 = 0                  # index of a family in UdpFlow.remote_fd and of a send group
    UDP_V6 = 1
    UDP_UP = 0                  # index of a direction in UdpFlow.gso_max
    UDP_DOWN = 1
    UDP_GSO_MAX_SEGMENTS = 64   # the kernel's UDP_MAX_SEGMENTS before Linux 6.9
    UDP_MAX_EVENTS = 64         # ready sockets per epoll_wait of UdpRelay.run()
    UDP_RUN_BATCHES = 4         # run() reads at most this many batches' worth of datagrams
    UDP_GSO_MAX_BYTES = 65507   # payload of one IPv4 datagram at most: all segments together


ctypedef struct UdpEntry:
    unsigned char ip[16]        # IPv6, or IPv4 as ::ffff:a.b.c.d, so that one table holds both
    uint16_t port               # 0 in a table of IPs
    uint8_t used
    uint8_t value


ctypedef struct UdpTable:       # open addressing, linear probing, insert-only; grows x2 at half full
    UdpEntry *slots             # NULL until the first insert: an idle association holds none
    uint32_t mask               # capacity - 1 (a power of two)
    uint32_t count


ctypedef struct UdpCache:       # bounded map of addresses: two generations of a UdpTable
    UdpTable young              # new and recently used entries, at most `half`
    UdpTable old                # the previous young generation; forgotten when young fills up
    uint32_t half
    uint64_t seed               # per relay, random: a client cannot aim at one hash chain


cdef class UdpRelay


cdef class UdpFlow:
    cdef UdpRelay relay                 # the worker's batch buffers and epoll set
    cdef int slot                       # in relay.flows, -1 once closed
    cdef uint32_t gen                   # tells this flow's epoll events from a former slot holder's
    cdef object owner                   # the UdpAssociation: the hooks, None once closed
    cdef double last_active_s           # CLOCK_MONOTONIC when a datagram last left
    cdef list socks                     # the socket objects behind the fds, held until close()
    cdef int relay_fd                   # client-facing socket, -1 once closed
    cdef int remote_fd[2]               # remote-facing sockets by UDP_V4/UDP_V6, -1 until opened
    cdef unsigned char client_ip[16]    # §7: the only source IP let in (mapped form)
    cdef uint16_t client_port           # 0: fixed by the first datagram from client_ip
    cdef bint client_known              # client_sa holds where datagrams for the client go
    cdef bint client_seen               # ... and it is the source of a datagram (scope id and all)
    cdef sockaddr_storage client_sa
    cdef socklen_t client_salen
    cdef bint warned_foreign
    cdef uint32_t gso_max[2]            # by UDP_UP/UDP_DOWN: longest datagram sent in a GSO batch
    cdef UdpCache verdicts              # (ip, port) -> allowed, from owner.allowed
    cdef UdpCache peers                 # IPs the client has sent to: the only ones let back in
    cdef public unsigned long long datagrams_up
    cdef public unsigned long long datagrams_down
    cdef public unsigned long long bytes_up
    cdef public unsigned long long bytes_down
    cdef public unsigned long long dropped

    cdef bint _from_client(self, const sockaddr_storage *source, socklen_t length) noexcept
    cdef int _verdict(self, int family, const unsigned char *ip, int port) except -1
    cdef int _remote(self, int family) except -2
    cdef void _remember_peer(self, const unsigned char *ip) noexcept nogil


cdef class UdpRelay:
    cdef int epfd                       # the client- and remote-facing sockets of every flow
    cdef epoll_event *events
    cdef list flows                     # by slot: UdpFlow, or None
    cdef list free_slots
    cdef uint32_t next_gen
    cdef int batch                      # datagrams per recvmmsg
    cdef uint32_t max_verdicts
    cdef uint32_t max_peers
    cdef uint64_t seed
    cdef bint busy                      # in run() or a pump: hooks must not pump again
    cdef object error                   # the first exception a hook raised in run() or a pump
    cdef unsigned char *buf             # batch slots of UDP_SLOT bytes
    cdef mmsghdr *in_msgs               # batch: where recvmmsg puts datagrams
    cdef iovec *in_iov
    cdef sockaddr_storage *in_names
    cdef mmsghdr *out_msgs              # 2 * batch: the IPv4 send group, then the IPv6 one
    cdef iovec *out_iov
    cdef sockaddr_in6 *out_names        # a sockaddr_in fits in one
    cdef unsigned char *out_ips         # 16 bytes per out message: the peer to remember
    cdef mmsghdr *wire_msgs             # 2 * batch: out messages as sent, runs joined by UDP GSO
    cdef int *wire_first                # the out message each wire message starts with
    cdef int *wire_count                # and how many it carries
    cdef unsigned char *wire_ctl        # one UDP_SEGMENT control message per wire message
    cdef size_t ctl_space

    cdef int _attach(self, UdpFlow flow) except -1
    cdef int _watch(self, UdpFlow flow, int which, int fd) except -1
    cdef int _detach(self, UdpFlow flow) except -1
    cdef int _pump_up(self, UdpFlow flow) except -1
    cdef int _pump_down(self, UdpFlow flow, int family) except -1
    cdef int _enter(self) except -1
    cdef int _reraise(self) except -1
    cdef int _receive(self, int fd) noexcept nogil
    cdef int _up_one(self, UdpFlow flow, int i, int *group_len) except -1
    cdef int _join(self, int first, int count, uint32_t gso_max, bint up) noexcept nogil
    cdef int _send(self, UdpFlow flow, int fd, int first, int count, bint up) noexcept
    cdef int _send_each(self, UdpFlow flow, int fd, int first, int count, bint up) noexcept
    cdef void _count(self, UdpFlow flow, int first, int count, bint up) noexcept
    cdef object _hook(self, UdpFlow flow, bint foreign, tuple args)
    cdef int _ask(self, UdpFlow flow, int family, const unsigned char *ip, int port)
    cdef int _open(self, UdpFlow flow, int family)


cdef int udp_cache_get(UdpCache *c, const unsigned char *ip, uint16_t port) noexcept nogil
cdef int udp_cache_put(UdpCache *c, const unsigned char *ip, uint16_t port, uint8_t value) noexcept nogil
cdef void udp_cache_clear(UdpCache *c) noexcept nogil
