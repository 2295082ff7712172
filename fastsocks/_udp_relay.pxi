# The UDP relay, a part of _relay.pyx (included there; declarations in _relay.pxd, what
# Python sees in _relay.pyi): the datagram loop of UDP ASSOCIATE (RFC 1928 §7); udp.py
# keeps the rest: sockets, timers, names, logging. Theory of operation:
#
# One UdpRelay per worker owns an epoll set and the batch buffers: `batch` slots of
# UDP_SLOT bytes (malloc'd once; the kernel backs only the pages datagrams touch), their
# mmsghdr/iovec/sockaddr arrays for recvmmsg, and two send groups (IPv4, IPv6) for
# sendmmsg. A worker is one thread, so its associations share them. An association's own
# state is a UdpFlow: its sockets (in the epoll set, level-triggered), the client's address
# and two small address caches that grow from nothing: an idle association holds no buffer.
#
# The worker's loop watches the epoll fd and calls run(), which reads one batch from each
# ready socket, and does it again while sockets are ready, up to UDP_RUN_BATCHES batches'
# worth of datagrams: a flood cannot starve the worker's other work, and a trickle of
# datagrams costs no Python per datagram, nor per socket.
#
# Up (the client-facing socket): one recvmmsg; each datagram is checked in C: the source
# (§7: client_ip, and client_port once the first datagram fixed it), the header (udp_parse:
# malformed and FRAG != 0 are dropped), the destination's verdict in the flow's cache; the
# payload is queued, in place, on the send group of its family, and each group leaves in
# one sendmmsg. Python is called only for a destination not yet in the cache
# (owner.allowed), a domain name (owner.send_to_name: names are the slow path), the first
# remote socket of a family (owner.remote_socket) and the first foreign datagram
# (owner.warn_foreign). An exception from a hook denies or drops that datagram, the work
# goes on, and run() raises the first exception when it is done.
#
# Down (a remote-facing socket): one recvmmsg; a datagram from an IP the client has not
# sent to is dropped (restricted cone), the others get their header written into the
# headroom before them and leave in one sendmmsg to the client: no copy in user space.
#
# Sending costs the kernel far more than receiving (route, skb, and on loopback the
# receiver's whole path), so runs of datagrams of one length to one address are joined with
# UDP GSO (UDP_SEGMENT): one message of up to UDP_GSO_MAX_SEGMENTS datagrams, which the
# kernel splits again, so receivers see the same datagrams. A route that refuses GSO (EIO:
# no checksum offload; EINVAL/EMSGSIZE: longer than its MTU) gets the run again datagram by
# datagram, and the flow stops joining datagrams that long in that direction.
#
# A datagram the kernel refuses (EAGAIN, EMSGSIZE, unreachable...) is dropped and counted:
# UDP promises no delivery. The GIL is released around epoll_wait, recvmmsg and sendmmsg.

cdef enum:
    UDP_TABLE_MIN = 16
    UDP_MAX_BATCH = 1024

cdef extern from *:
    """
    #define FS_HASH_MUL1 0x9E3779B97F4A7C15ULL
    #define FS_HASH_MUL2 0xC2B2AE3D27D4EB4FULL
    """
    const uint64_t HASH_MUL1 "FS_HASH_MUL1"
    const uint64_t HASH_MUL2 "FS_HASH_MUL2"


cdef inline uint64_t _udp_hash(const unsigned char *ip, uint16_t port, uint64_t seed) noexcept nogil:
    cdef uint64_t a, b, h
    memcpy(&a, ip, 8)
    memcpy(&b, ip + 8, 8)
    # A product's low bits depend only on its operands' low bits, so every input goes in
    # at the bottom and each step folds the high half down: the table index (the low bits)
    # depends on all of the key, the port too.
    h = (a ^ seed) * HASH_MUL1
    h ^= h >> 32
    h = (h ^ b) * HASH_MUL2
    h ^= h >> 32
    h = (h ^ port) * HASH_MUL1
    return h ^ (h >> 32)


cdef UdpEntry *_table_find(UdpTable *t, const unsigned char *ip, uint16_t port, uint64_t h) noexcept nogil:
    cdef uint32_t i
    if t.slots == NULL:
        return NULL
    i = <uint32_t>h & t.mask
    while t.slots[i].used:  # ends: a table is at most half full
        if t.slots[i].port == port and memcmp(t.slots[i].ip, ip, 16) == 0:
            return &t.slots[i]
        i = (i + 1) & t.mask
    return NULL


cdef void _table_place(UdpTable *t, const unsigned char *ip, uint16_t port, uint8_t value,
                       uint64_t h) noexcept nogil:
    cdef uint32_t i = <uint32_t>h & t.mask
    while t.slots[i].used:
        i = (i + 1) & t.mask
    memcpy(t.slots[i].ip, ip, 16)
    t.slots[i].port = port
    t.slots[i].value = value
    t.slots[i].used = 1
    t.count += 1


cdef int _table_insert(UdpTable *t, const unsigned char *ip, uint16_t port, uint8_t value,
                       uint64_t seed) noexcept nogil:
    """Add a key that is not in the table; -1 when out of memory (then nothing changed)."""
    cdef uint32_t capacity = t.mask + 1 if t.slots != NULL else 0
    cdef uint32_t i
    cdef UdpTable grown
    if (t.count + 1) * 2 > capacity:
        grown.mask = (capacity * 2 if capacity else UDP_TABLE_MIN) - 1
        grown.count = 0
        grown.slots = <UdpEntry *>calloc(grown.mask + 1, sizeof(UdpEntry))
        if grown.slots == NULL:
            return -1
        for i in range(capacity):
            if t.slots[i].used:
                _table_place(&grown, t.slots[i].ip, t.slots[i].port, t.slots[i].value,
                             _udp_hash(t.slots[i].ip, t.slots[i].port, seed))
        free(t.slots)
        t[0] = grown
    _table_place(t, ip, port, value, _udp_hash(ip, port, seed))
    return 0


cdef int udp_cache_get(UdpCache *c, const unsigned char *ip, uint16_t port) noexcept nogil:
    """The value stored for (ip, port), or -1. A hit in the old generation moves the entry
    to the young one: what is in use is never forgotten first."""
    cdef uint64_t h = _udp_hash(ip, port, c.seed)
    cdef UdpEntry *e = _table_find(&c.young, ip, port, h)
    cdef uint8_t value
    if e != NULL:
        return e.value
    e = _table_find(&c.old, ip, port, h)
    if e == NULL:
        return -1
    value = e.value  # copied first: the put below may free the old generation
    udp_cache_put(c, ip, port, value)
    return value


cdef int udp_cache_put(UdpCache *c, const unsigned char *ip, uint16_t port, uint8_t value) noexcept nogil:
    """Store value for (ip, port); -1 when out of memory (then it is simply not cached).
    At most 2 * half entries are kept: a full young generation replaces the old one."""
    cdef UdpEntry *e = _table_find(&c.young, ip, port, _udp_hash(ip, port, c.seed))
    if e != NULL:
        e.value = value
        return 0
    if c.young.count >= c.half:
        free(c.old.slots)
        c.old = c.young
        c.young.slots = NULL
        c.young.mask = c.young.count = 0
    return _table_insert(&c.young, ip, port, value, c.seed)


cdef void udp_cache_clear(UdpCache *c) noexcept nogil:
    free(c.young.slots)
    free(c.old.slots)
    c.young.slots = c.old.slots = NULL
    c.young.mask = c.young.count = c.old.mask = c.old.count = 0


cdef inline void _map_v4(unsigned char *ip, const void *v4) noexcept nogil:
    memset(ip, 0, 10)
    ip[10] = ip[11] = 0xFF
    memcpy(ip + 12, v4, 4)


cdef int _sockaddr_ip(const sockaddr_storage *sa, unsigned char *ip, uint16_t *port) noexcept nogil:
    """The address of ``sa`` as 16 bytes (IPv4 mapped) and its port; its family (AF_INET for
    an IPv4-mapped IPv6 address), or -1 for a family that is neither."""
    cdef const sockaddr_in *sin
    cdef const sockaddr_in6 *sin6
    if sa.ss_family == AF_INET:
        sin = <const sockaddr_in *>sa
        _map_v4(ip, &sin.sin_addr)
        port[0] = ntohs(sin.sin_port)
        return AF_INET
    if sa.ss_family == AF_INET6:
        sin6 = <const sockaddr_in6 *>sa
        memcpy(ip, &sin6.sin6_addr, 16)
        port[0] = ntohs(sin6.sin6_port)
        return AF_INET if _is_v4_mapped(ip) else AF_INET6
    return -1


cdef socklen_t _fill_sockaddr(sockaddr_in6 *out, int family, const unsigned char *ip, int port,
                              uint32_t scope_id) noexcept nogil:
    """Where to send: IPv4 (from the mapped form) or IPv6; the length of the sockaddr."""
    cdef sockaddr_in *sin
    if family == AF_INET:
        sin = <sockaddr_in *>out
        memset(sin, 0, sizeof(sockaddr_in))
        sin.sin_family = AF_INET
        sin.sin_port = htons(<uint16_t>port)
        memcpy(&sin.sin_addr, ip + 12, 4)
        return sizeof(sockaddr_in)
    memset(out, 0, sizeof(sockaddr_in6))
    out.sin6_family = AF_INET6
    out.sin6_port = htons(<uint16_t>port)
    memcpy(&out.sin6_addr, ip, 16)
    out.sin6_scope_id = scope_id
    return sizeof(sockaddr_in6)


cdef inline int _dest_ip(const UdpDest *dest, unsigned char *ip) noexcept nogil:
    """The 16-byte form of an IP destination from a header, and the family it leaves by
    (an IPv4-mapped IPv6 destination goes out as IPv4)."""
    if dest.atyp == UDP_ATYP_IPV4:
        _map_v4(ip, dest.addr)
        return AF_INET
    memcpy(ip, dest.addr, 16)
    return AF_INET if _is_v4_mapped(ip) else AF_INET6


cdef str _ip_text(const unsigned char *ip):
    """Unmapped text, as recvfrom() reports it."""
    cdef char text[INET6_ADDRSTRLEN]
    if _is_v4_mapped(ip):
        inet_ntop(AF_INET, ip + 12, text, sizeof(text))
    else:
        inet_ntop(AF_INET6, ip, text, sizeof(text))
    return text.decode("ascii")


cdef int _parse_ip(str host, unsigned char *ip) except -2:
    """The 16-byte form of IP text (a %scope is ignored) and its family; -1 if not an IP."""
    cdef bytes raw = host.partition("%")[0].encode("ascii", "replace")
    if b"\0" in raw:
        return -1
    if inet_pton(AF_INET, raw, ip + 12) == 1:
        memset(ip, 0, 10)
        ip[10] = ip[11] = 0xFF
        return AF_INET
    if inet_pton(AF_INET6, raw, ip) == 1:
        return AF_INET if _is_v4_mapped(ip) else AF_INET6
    return -1


cdef class UdpFlow:
    """One association's side of the UDP relay, made by UdpRelay.new_flow(); see the
    theory of operation above and _relay.pyi."""

    def __cinit__(self):
        self.slot = -1
        self.relay_fd = -1
        self.remote_fd[UDP_V4] = self.remote_fd[UDP_V6] = -1
        self.gso_max[UDP_UP] = self.gso_max[UDP_DOWN] = UDP_GSO_MAX_BYTES

    def __init__(self, UdpRelay relay not None, owner, relay_sock, str client_ip not None, int client_port):
        cdef int family
        if not 0 <= client_port <= 0xFFFF:
            raise ValueError(f"port must be 0-65535, got {client_port!r}")
        family = _parse_ip(client_ip, self.client_ip)
        if family < 0:
            raise ValueError(f"not an IP address: {client_ip!r}")
        self.relay = relay
        self.owner = owner
        self.socks = [relay_sock]
        self.relay_fd = relay_sock.fileno()
        self.last_active_s = _monotonic()
        self.client_port = client_port
        if client_port:
            self.client_salen = _fill_sockaddr(<sockaddr_in6 *>&self.client_sa, family, self.client_ip,
                                               client_port, 0)
            self.client_known = True
        self.verdicts.half = relay.max_verdicts // 2
        self.verdicts.seed = relay.seed
        self.peers.half = relay.max_peers // 2
        self.peers.seed = relay.seed ^ HASH_MUL2
        relay._attach(self)

    def __dealloc__(self):
        udp_cache_clear(&self.verdicts)
        udp_cache_clear(&self.peers)

    def pump_up(self):
        """What run() does when the client-facing socket is readable: one batch up; how
        many datagrams left."""
        cdef unsigned long long before = self.datagrams_up
        self.relay._enter()
        try:
            self.relay._pump_up(self)
        finally:
            self.relay.busy = False
        self.relay._reraise()
        return self.datagrams_up - before

    def pump_down(self, int family):
        """What run() does when the remote-facing socket of ``family`` is readable: one
        batch down to the client; how many datagrams left."""
        cdef unsigned long long before = self.datagrams_down
        self.relay._enter()
        try:
            self.relay._pump_down(self, family)
        finally:
            self.relay.busy = False
        self.relay._reraise()
        return self.datagrams_down - before

    @property
    def last_active_s(self):
        """time.monotonic() when a datagram last left, or when the flow was made."""
        return self.last_active_s

    @property
    def client_addr(self):
        """(ip, port) where datagrams for the client go, or None until a datagram fixed it."""
        cdef uint16_t port
        cdef unsigned char ip[16]
        if not self.client_known:
            return None
        _sockaddr_ip(&self.client_sa, ip, &port)
        return (_ip_text(ip), port)

    def send(self, tuple sockaddr not None, const unsigned char[::1] payload not None, bint checked=False):
        """One datagram to a resolved name's address: checked and sent like a batch's (it
        uses no batch buffer: a hook may call it). ``checked``: the owner has judged this
        destination already (a name's rules differ from its address's), skip ``allowed``.
        1 if it left, else 0 (counted in ``dropped``). Hooks' exceptions propagate."""
        cdef unsigned char ip[16]
        cdef sockaddr_in6 sa
        cdef iovec iov
        cdef msghdr msg
        cdef int family, fd, port
        cdef uint32_t scope_id = 0
        cdef ssize_t r
        family = _parse_ip(sockaddr[0], ip)
        port = sockaddr[1]
        if family < 0 or not 0 <= port <= 0xFFFF:
            raise ValueError(f"not an IP address and port: {sockaddr!r}")
        if family == AF_INET6 and len(sockaddr) >= 4:
            scope_id = sockaddr[3]
        if not checked and not self._verdict(family, ip, port):
            self.dropped += 1
            return 0
        fd = self._remote(family)
        if fd < 0:
            self.dropped += 1
            return 0
        memset(&msg, 0, sizeof(msg))
        msg.msg_name = &sa
        msg.msg_namelen = _fill_sockaddr(&sa, family, ip, port, scope_id)
        iov.iov_base = <void *>&payload[0] if payload.shape[0] else NULL
        iov.iov_len = payload.shape[0]
        msg.msg_iov = &iov
        msg.msg_iovlen = 1
        with nogil:
            r = sendmsg(fd, &msg, 0)
        if r < 0:
            self.dropped += 1
            return 0
        self._remember_peer(ip)
        self.datagrams_up += 1
        self.bytes_up += payload.shape[0]
        self.last_active_s = _monotonic()
        return 1

    def forget_verdicts(self):
        """Ask owner.allowed again for every destination (the rules were reloaded)."""
        udp_cache_clear(&self.verdicts)

    def close(self):
        """Leave the relay's epoll set and forget the sockets (their owner closes them) and
        the owner; counters stay. Idempotent."""
        if self.slot >= 0:
            self.relay._detach(self)
        self.owner = self.socks = None
        self.relay_fd = self.remote_fd[UDP_V4] = self.remote_fd[UDP_V6] = -1
        self.client_known = False
        udp_cache_clear(&self.verdicts)
        udp_cache_clear(&self.peers)

    cdef bint _from_client(self, const sockaddr_storage *source, socklen_t length) noexcept:
        """§7: only the recorded source. The first datagram from it fixes a zero port and
        becomes where datagrams for the client go."""
        cdef unsigned char ip[16]
        cdef uint16_t port
        if _sockaddr_ip(source, ip, &port) < 0 or memcmp(ip, self.client_ip, 16) != 0:
            return False
        if self.client_port and port != self.client_port:
            return False
        if not self.client_seen:
            self.client_port = port
            memcpy(&self.client_sa, source, length)
            self.client_salen = length
            self.client_known = self.client_seen = True
        return True

    cdef int _verdict(self, int family, const unsigned char *ip, int port) except -1:
        """Whether the client may send to (ip, port): from the cache, else from owner.allowed
        (called with the unmapped address) and then cached."""
        cdef int allowed = udp_cache_get(&self.verdicts, ip, <uint16_t>port)
        if allowed >= 0:
            return allowed
        if self.owner is None:
            return 0
        allowed = 1 if self.owner.allowed(family, (_ip_text(ip), port)) else 0
        udp_cache_put(&self.verdicts, ip, <uint16_t>port, <uint8_t>allowed)
        return allowed

    cdef int _remote(self, int family) except -2:
        """The remote-facing socket of a family, opened by the owner on first use; -1 if it
        cannot be."""
        cdef int g = UDP_V4 if family == AF_INET else UDP_V6
        if self.remote_fd[g] < 0 and self.owner is not None:
            sock = self.owner.remote_socket(family)
            if sock is not None and self.slot >= 0:  # (a hook may have closed the flow)
                self.relay._watch(self, 1 + g, sock.fileno())
                self.remote_fd[g] = sock.fileno()
                self.socks.append(sock)
        return self.remote_fd[g]

    cdef void _remember_peer(self, const unsigned char *ip) noexcept nogil:
        if udp_cache_get(&self.peers, ip, 0) < 0:
            udp_cache_put(&self.peers, ip, 0, 1)


cdef class UdpRelay:
    """The epoll set and batch buffers of a worker's UDP associations; see the theory of
    operation above and _relay.pyi."""

    def __cinit__(self):
        self.epfd = -1
        self.events = NULL
        self.buf = NULL
        self.in_msgs = self.out_msgs = NULL
        self.in_iov = self.out_iov = NULL
        self.in_names = NULL
        self.out_names = NULL
        self.out_ips = NULL
        self.wire_msgs = NULL
        self.wire_first = self.wire_count = NULL
        self.wire_ctl = NULL

    def __init__(self, *, int batch=64, int max_verdicts=4096, int max_peers=4096):
        cdef int i
        cdef cmsghdr *cmsg
        if not 1 <= batch <= UDP_MAX_BATCH or max_verdicts < 2 or max_peers < 2:
            raise ValueError(f"batch 1-{UDP_MAX_BATCH}, max_verdicts >= 2, max_peers >= 2")
        if self.epfd >= 0 or self.buf != NULL:
            raise RuntimeError("UdpRelay is initialised once")
        self.batch = batch
        self.max_verdicts = max_verdicts
        self.max_peers = max_peers
        self.seed = int.from_bytes(os.urandom(8), "little")
        self.flows = []
        self.free_slots = []
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.events = <epoll_event *>malloc(sizeof(epoll_event) * UDP_MAX_EVENTS)
        self.buf = <unsigned char *>malloc(<size_t>batch * UDP_SLOT)
        self.in_msgs = <mmsghdr *>calloc(batch, sizeof(mmsghdr))
        self.in_iov = <iovec *>calloc(batch, sizeof(iovec))
        self.in_names = <sockaddr_storage *>calloc(batch, sizeof(sockaddr_storage))
        self.out_msgs = <mmsghdr *>calloc(2 * batch, sizeof(mmsghdr))
        self.out_iov = <iovec *>calloc(2 * batch, sizeof(iovec))
        self.out_names = <sockaddr_in6 *>calloc(2 * batch, sizeof(sockaddr_in6))
        self.out_ips = <unsigned char *>calloc(2 * batch, 16)
        self.ctl_space = CMSG_SPACE(sizeof(uint16_t))
        self.wire_msgs = <mmsghdr *>calloc(2 * batch, sizeof(mmsghdr))
        self.wire_first = <int *>calloc(2 * batch, sizeof(int))
        self.wire_count = <int *>calloc(2 * batch, sizeof(int))
        self.wire_ctl = <unsigned char *>calloc(2 * batch, self.ctl_space)
        if (self.events == NULL or self.buf == NULL or self.in_msgs == NULL or self.in_iov == NULL
                or self.in_names == NULL or self.out_msgs == NULL or self.out_iov == NULL
                or self.out_names == NULL or self.out_ips == NULL or self.wire_msgs == NULL
                or self.wire_first == NULL or self.wire_count == NULL or self.wire_ctl == NULL):
            raise MemoryError()
        for i in range(batch):
            # Datagrams land UDP_HEADROOM bytes into their slot: room for a reply's header.
            self.in_iov[i].iov_base = self.buf + <size_t>i * UDP_SLOT + UDP_HEADROOM
            self.in_iov[i].iov_len = UDP_SLOT - UDP_HEADROOM
            self.in_msgs[i].msg_hdr.msg_iov = &self.in_iov[i]
            self.in_msgs[i].msg_hdr.msg_iovlen = 1
            self.in_msgs[i].msg_hdr.msg_name = &self.in_names[i]
        for i in range(2 * batch):
            self.out_msgs[i].msg_hdr.msg_iov = &self.out_iov[i]
            self.out_msgs[i].msg_hdr.msg_iovlen = 1
            cmsg = <cmsghdr *>(self.wire_ctl + i * self.ctl_space)
            cmsg.cmsg_level = SOL_UDP
            cmsg.cmsg_type = UDP_SEGMENT
            cmsg.cmsg_len = CMSG_LEN(sizeof(uint16_t))

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)
        free(self.events)
        free(self.buf)
        free(self.in_msgs)
        free(self.in_iov)
        free(self.in_names)
        free(self.out_msgs)
        free(self.out_iov)
        free(self.out_names)
        free(self.out_ips)
        free(self.wire_msgs)
        free(self.wire_first)
        free(self.wire_count)
        free(self.wire_ctl)

    def new_flow(self, owner, relay_sock, str client_ip not None, int client_port):
        """The state of one association: ``owner`` provides the hooks (see _relay.pyi),
        ``relay_sock`` is the client-facing socket, ``client_ip``/``client_port`` the only
        source let in (a zero port: fixed by the first datagram from client_ip)."""
        return UdpFlow(self, owner, relay_sock, client_ip, client_port)

    def fileno(self):
        """The epoll fd of every flow's sockets: watch it for reading, then call run()."""
        return self.epfd

    def run(self):
        """Relay one batch from each ready socket, and again while some are ready, up to
        UDP_RUN_BATCHES batches' worth of datagrams; then raise the first exception a hook
        raised, if one did."""
        cdef int n, i, which, received = 0
        cdef uint64_t data
        cdef object holder
        cdef UdpFlow flow
        if self.epfd < 0:
            return
        self._enter()
        try:
            while received < UDP_RUN_BATCHES * self.batch:
                with nogil:
                    n = epoll_wait(self.epfd, self.events, UDP_MAX_EVENTS, 0)
                if n <= 0:
                    break
                for i in range(n):
                    data = self.events[i].data.u64
                    holder = self.flows[<Py_ssize_t>((data >> 2) & 0x3FFFFFFF)]
                    if holder is None:
                        continue  # closed by a hook earlier in this round
                    flow = <UdpFlow>holder
                    if flow.gen != <uint32_t>(data >> 32):
                        continue
                    which = <int>(data & 3)
                    if which == 0:
                        received += self._pump_up(flow)
                    else:
                        received += self._pump_down(flow, AF_INET if which == 1 else AF_INET6)
        finally:
            self.busy = False
        self._reraise()

    def close(self):
        """Close the epoll set; run() does nothing from then on. Idempotent."""
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1

    # ------------------------------------------------------------------ internals

    cdef int _attach(self, UdpFlow flow) except -1:
        """Give the flow a slot and watch its client-facing socket."""
        if self.epfd < 0:
            raise ValueError("the UdpRelay is closed")
        if self.free_slots:
            flow.slot = self.free_slots.pop()
        else:
            flow.slot = len(self.flows)
            self.flows.append(None)
        self.next_gen += 1
        flow.gen = self.next_gen
        self.flows[flow.slot] = flow
        try:
            self._watch(flow, 0, flow.relay_fd)
        except BaseException:
            self._detach(flow)
            raise
        return 0

    cdef int _watch(self, UdpFlow flow, int which, int fd) except -1:
        """Watch fd for the flow: ``which`` 0 is its client-facing socket, 1 + UDP_V4/UDP_V6
        a remote-facing one. Level-triggered: what one batch leaves is reported again."""
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.u64 = (<uint64_t>flow.gen << 32) | (<uint64_t>flow.slot << 2) | <uint64_t>which
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl(ADD) failed")
        return 0

    cdef int _detach(self, UdpFlow flow) except -1:
        cdef int fd
        for fd in (flow.relay_fd, flow.remote_fd[UDP_V4], flow.remote_fd[UDP_V6]):
            if fd >= 0 and self.epfd >= 0:
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)
        self.flows[flow.slot] = None
        self.free_slots.append(flow.slot)
        flow.slot = -1
        return 0

    cdef int _pump_up(self, UdpFlow flow) except -1:
        """Client -> remotes: one recvmmsg, then a sendmmsg per family; how many datagrams
        were read."""
        cdef int n, i, g, sent = 0
        cdef int group_len[2]
        if flow.relay_fd < 0:
            return 0
        with nogil:
            n = self._receive(flow.relay_fd)
        group_len[UDP_V4] = group_len[UDP_V6] = 0
        for i in range(n):
            self._up_one(flow, i, group_len)
        for g in range(2):
            if group_len[g]:
                sent += self._send(flow, flow.remote_fd[g], g * self.batch, group_len[g], True)
        if sent:
            flow.last_active_s = _monotonic()
        return n

    cdef int _pump_down(self, UdpFlow flow, int family) except -1:
        """Remote socket of ``family`` -> client: one recvmmsg, one sendmmsg; how many
        datagrams were read. Only from IPs the client has sent to (restricted cone)."""
        cdef int n, i, k = 0, hlen, fd
        cdef uint16_t port
        cdef unsigned char ip[16]
        cdef unsigned char *p
        cdef mmsghdr *m
        fd = flow.remote_fd[UDP_V4 if family == AF_INET else UDP_V6]
        if fd < 0:
            return 0
        with nogil:
            n = self._receive(fd)
            for i in range(n):
                m = &self.in_msgs[i]
                if (not flow.client_known or m.msg_hdr.msg_flags & MSG_TRUNC
                        or _sockaddr_ip(&self.in_names[i], ip, &port) < 0
                        or udp_cache_get(&flow.peers, ip, 0) < 0):
                    flow.dropped += 1  # a stranger, or nowhere to send it yet
                    continue
                p = <unsigned char *>self.in_iov[i].iov_base
                hlen = 10 if _is_v4_mapped(ip) else UDP_HEADER_MAX_IP
                udp_header_write(p - hlen, AF_INET6, ip, port)
                self.out_msgs[k].msg_hdr.msg_name = &flow.client_sa
                self.out_msgs[k].msg_hdr.msg_namelen = flow.client_salen
                self.out_iov[k].iov_base = p - hlen
                self.out_iov[k].iov_len = hlen + m.msg_len
                k += 1
        if k and self._send(flow, flow.relay_fd, 0, k, False):
            flow.last_active_s = _monotonic()
        return n

    cdef int _enter(self) except -1:
        if self.busy:
            raise RuntimeError("a hook of the UDP relay may not make it relay again")
        self.busy = True
        self.error = None
        return 0

    cdef int _reraise(self) except -1:
        """Raise the first exception a hook raised in the pump that just ended."""
        error, self.error = self.error, None
        if error is not None:
            raise error
        return 0

    cdef int _receive(self, int fd) noexcept nogil:
        """recvmmsg into the slots; how many datagrams (0 on EAGAIN or an error)."""
        cdef int i, n
        for i in range(self.batch):
            self.in_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
        n = recvmmsg(fd, self.in_msgs, self.batch, 0, NULL)  # non-blocking: never waits
        while n < 0 and errno == EINTR:
            n = recvmmsg(fd, self.in_msgs, self.batch, 0, NULL)
        return n if n > 0 else 0

    cdef int _up_one(self, UdpFlow flow, int i, int *group_len) except -1:
        """Check datagram i from the client and queue it on its family's send group."""
        cdef mmsghdr *m = &self.in_msgs[i]
        cdef unsigned char *p = <unsigned char *>self.in_iov[i].iov_base
        cdef int length = m.msg_len
        cdef UdpDest dest
        cdef unsigned char ip[16]
        cdef int family, g, k, allowed
        if not flow._from_client(&self.in_names[i], m.msg_hdr.msg_namelen):
            flow.dropped += 1
            if not flow.warned_foreign:  # once per association: a flood must not flood the log
                flow.warned_foreign = True
                self._hook(flow, True, (_source_tuple(&self.in_names[i]),))
            return 0
        if m.msg_hdr.msg_flags & MSG_TRUNC or udp_parse(p, length, &dest) != UDP_OK:
            flow.dropped += 1  # malformed, or FRAG != 0
            return 0
        if dest.atyp == UDP_ATYP_DOMAIN:
            self._hook(flow, False, (_udp_host(&dest), dest.port, (<char *>p)[dest.header_len:length]))
            return 0
        family = _dest_ip(&dest, ip)
        allowed = udp_cache_get(&flow.verdicts, ip, <uint16_t>dest.port)
        if allowed < 0:
            allowed = self._ask(flow, family, ip, dest.port)
        g = UDP_V4 if family == AF_INET else UDP_V6
        if not allowed or (flow.remote_fd[g] < 0 and self._open(flow, family) < 0):
            flow.dropped += 1
            return 0
        k = g * self.batch + group_len[g]
        group_len[g] += 1
        self.out_msgs[k].msg_hdr.msg_name = &self.out_names[k]
        self.out_msgs[k].msg_hdr.msg_namelen = _fill_sockaddr(&self.out_names[k], family, ip, dest.port, 0)
        self.out_iov[k].iov_base = p + dest.header_len
        self.out_iov[k].iov_len = length - dest.header_len
        memcpy(self.out_ips + 16 * k, ip, 16)
        return 0

    cdef int _join(self, int first, int count, uint32_t gso_max, bint up) noexcept nogil:
        """Wire messages for out messages first..first+count-1, from index ``first`` on:
        each run of datagrams to one address, all as long as the first but the last (never
        longer), becomes one UDP GSO message. How many wire messages."""
        cdef int i = first, j, w = first, end = first + count
        cdef size_t length, total
        cdef msghdr *a
        cdef msghdr *b
        cdef msghdr *wire
        cdef cmsghdr *cmsg
        while i < end:
            a = &self.out_msgs[i].msg_hdr
            length = total = self.out_iov[i].iov_len
            j = i + 1
            if 0 < length <= gso_max:
                while j < end and j - i < UDP_GSO_MAX_SEGMENTS:
                    b = &self.out_msgs[j].msg_hdr
                    if (self.out_iov[j].iov_len == 0 or self.out_iov[j].iov_len > length
                            or total + self.out_iov[j].iov_len > UDP_GSO_MAX_BYTES):
                        break
                    if up and (b.msg_namelen != a.msg_namelen
                               or memcmp(b.msg_name, a.msg_name, a.msg_namelen) != 0):
                        break  # another destination
                    total += self.out_iov[j].iov_len
                    j += 1
                    if self.out_iov[j - 1].iov_len < length:
                        break  # a shorter datagram ends a run: GSO cuts every segment at `length`
            wire = &self.wire_msgs[w].msg_hdr
            wire.msg_name = a.msg_name
            wire.msg_namelen = a.msg_namelen
            wire.msg_iov = &self.out_iov[i]
            wire.msg_iovlen = j - i
            if j - i > 1:
                cmsg = <cmsghdr *>(self.wire_ctl + w * self.ctl_space)
                (<uint16_t *>CMSG_DATA(cmsg))[0] = <uint16_t>length
                wire.msg_control = cmsg
                wire.msg_controllen = self.ctl_space
            else:
                wire.msg_control = NULL
                wire.msg_controllen = 0
            self.wire_first[w] = i
            self.wire_count[w] = j - i
            w += 1
            i = j
        return w - first

    cdef int _send(self, UdpFlow flow, int fd, int first, int count, bint up) noexcept:
        """Send out messages first..first+count-1, joined by _join, and count them; how many
        datagrams left. A message the kernel refuses is dropped and the rest go on (a GSO
        one is tried again datagram by datagram); EAGAIN drops the rest."""
        cdef int d = UDP_UP if up else UDP_DOWN
        cdef int start = first, end, r, j, err = 0, n, sent = 0
        cdef size_t length
        with nogil:
            end = first + self._join(first, count, flow.gso_max[d], up)
        while start < end:
            with nogil:
                r = sendmmsg(fd, &self.wire_msgs[start], end - start, 0)
                if r < 0:
                    err = errno
            if r < 0:
                if err == EINTR:
                    continue
                if err == EAGAIN:
                    for j in range(start, end):
                        flow.dropped += self.wire_count[j]
                    break
                if self.wire_count[start] == 1:
                    flow.dropped += 1
                else:
                    n = self._send_each(flow, fd, self.wire_first[start], self.wire_count[start], up)
                    if n:  # one by one they go: this route refuses GSO, or datagrams this long
                        length = self.out_iov[self.wire_first[start]].iov_len
                        flow.gso_max[d] = 0 if err == EIO else length - 1
                    sent += n
                start += 1
                continue
            for j in range(start, start + r):
                self._count(flow, self.wire_first[j], self.wire_count[j], up)
                sent += self.wire_count[j]
            start += r
        return sent

    cdef int _send_each(self, UdpFlow flow, int fd, int first, int count, bint up) noexcept:
        """Send out messages first..first+count-1 one datagram per message; how many left."""
        cdef int start = first, end = first + count, r, err = 0, sent = 0
        while start < end:
            with nogil:
                r = sendmmsg(fd, &self.out_msgs[start], end - start, 0)
                if r < 0:
                    err = errno
            if r < 0:
                if err == EINTR:
                    continue
                if err == EAGAIN:
                    flow.dropped += end - start
                    break
                flow.dropped += 1
                start += 1
                continue
            self._count(flow, start, r, up)
            sent += r
            start += r
        return sent

    cdef void _count(self, UdpFlow flow, int first, int count, bint up) noexcept:
        """Out messages first..first+count-1 have left: count them (and remember peers)."""
        cdef int j
        cdef unsigned long long nbytes = 0
        cdef const unsigned char *ip
        cdef const unsigned char *last = NULL
        for j in range(first, first + count):
            if up:
                nbytes += self.out_iov[j].iov_len
                ip = self.out_ips + 16 * j
                if last == NULL or memcmp(ip, last, 16) != 0:
                    flow._remember_peer(ip)
                    last = ip
            else:  # the header before the payload is ours
                ip = <const unsigned char *>self.out_iov[j].iov_base
                nbytes += self.out_iov[j].iov_len - (10 if ip[3] == UDP_ATYP_IPV4 else UDP_HEADER_MAX_IP)
        if up:
            flow.datagrams_up += count
            flow.bytes_up += nbytes
        else:
            flow.datagrams_down += count
            flow.bytes_down += nbytes

    cdef object _hook(self, UdpFlow flow, bint foreign, tuple args):
        """owner.warn_foreign(*args) (``foreign``) or owner.send_to_name(*args); None, and the
        exception kept for later, if it raises."""
        owner = flow.owner
        if owner is None:
            return None
        try:
            return owner.warn_foreign(*args) if foreign else owner.send_to_name(*args)
        except Exception as exc:
            if self.error is None:
                self.error = exc
            return None

    cdef int _ask(self, UdpFlow flow, int family, const unsigned char *ip, int port):
        """flow._verdict for a destination not in the cache; an exception denies."""
        try:
            return flow._verdict(family, ip, port)
        except Exception as exc:
            if self.error is None:
                self.error = exc
            return 0

    cdef int _open(self, UdpFlow flow, int family):
        """flow._remote: the family's remote socket, or -1; an exception gives -1."""
        try:
            return flow._remote(family)
        except Exception as exc:
            if self.error is None:
                self.error = exc
            return -1


cdef tuple _source_tuple(const sockaddr_storage *sa):
    cdef unsigned char ip[16]
    cdef uint16_t port
    if _sockaddr_ip(sa, ip, &port) < 0:
        return ("?", 0)
    return (_ip_text(ip), port)
