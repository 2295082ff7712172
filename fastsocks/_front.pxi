# The front door's pure parts (included by _relay.pyx; the RelayEngine methods that use
# them are in its "front door" sections).
#
# Theory of operation
# -------------------
# Most sessions a proxy sees are the same few bytes: a SOCKS5 greeting that the server
# answers "no authentication", a CONNECT to an IP address, or a SOCKS4 CONNECT without a
# USERID. RelayEngine.front() lets the engine serve those itself, from accept() to the
# relay, with no Python object per session; everything else (a name to resolve, a
# password, BIND, UDP ASSOCIATE, a malformed message, SOCKS4a) is handed to the Python
# session (session.py), which replays what the client sent through the sans-I/O reference
# parsers and skips what the engine already answered.
#
# front_parse_c() is stateless: it reads everything the client sent so far, from its first
# byte, and says "more", "connect" or "python" (hand it off), and how much of the method
# selection the server has sent by then. The engine calls it again on each read, so a
# message split anywhere gives the same answer as a whole one. It is stricter than the
# reference parsers, never looser: whatever it is not sure of, Python decides
# (tests/unit/test_front_parse.py checks it against both the twin and the reference).
#
# Egress (front(egress=...)): with source addresses given, each connect binds first to one
# of the destination's family, in turn (a counter per family, kept across front()) or, if
# sticky, by front_fnv1a32() of the client's address, as the session picks (session.py,
# _relay_types.egress_index), so a client leaves from the same address whichever path
# serves it. IP_BIND_ADDRESS_NO_PORT leaves the port to connect(), unique per destination:
# a bind with port 0 alone would take one per socket, and churn would exhaust the range.
# A destination whose family has none fails like an unreachable network (ENETUNREACH);
# a bind() error fails the connect with its errno, before any packet is sent.

cdef int front_parse_c(const unsigned char *p, int n, const unsigned char *methods, int nmethods,
                       bint socks4, FrontRequest *out) noexcept nogil:
    cdef int nm, off, i, j, chosen = -1, alen
    out.sent = 0
    out.proto = 0
    out.family = 0
    out.port = 0
    out.consumed = 0
    if n < 1:
        return FRONT_MORE
    if p[0] == 4:
        out.proto = 4
        if not socks4:
            return FRONT_PYTHON
        if n < 2:
            return FRONT_MORE
        if p[1] != 1:
            return FRONT_PYTHON  # BIND, or no command: the reference answers
        if n < 8:
            return FRONT_MORE
        if p[4] == 0 and p[5] == 0 and p[6] == 0 and p[7] != 0:
            return FRONT_PYTHON  # SOCKS4a: a name follows
        if n < 9:
            return FRONT_MORE
        if p[8] != 0:
            return FRONT_PYTHON  # a USERID: the rules and the access line see it
        out.family = AF_INET
        memcpy(out.ip, p + 4, 4)
        out.port = (p[2] << 8) | p[3]
        out.consumed = 9
        return FRONT_CONNECT
    if p[0] != 5:
        return FRONT_PYTHON
    out.proto = 5
    if n < 2:
        return FRONT_MORE
    nm = p[1]
    if nm == 0:
        return FRONT_PYTHON
    if n < 2 + nm:
        return FRONT_MORE
    # RFC 1928 §3: the server picks; ours is its first method the client offers.
    for i in range(nmethods):
        for j in range(nm):
            if p[2 + j] == methods[i]:
                chosen = methods[i]
                break
        if chosen >= 0:
            break
    if chosen != 0:
        return FRONT_PYTHON  # a password to check, or nothing acceptable
    out.sent = 2
    off = 2 + nm
    if n < off + 1:
        return FRONT_MORE
    if p[off] != 5:
        return FRONT_PYTHON
    if n < off + 2:
        return FRONT_MORE
    if p[off + 1] != 1:
        return FRONT_PYTHON  # BIND, UDP ASSOCIATE or unknown
    if n < off + 3:
        return FRONT_MORE
    if p[off + 2] != 0:
        return FRONT_PYTHON
    if n < off + 4:
        return FRONT_MORE
    if p[off + 3] == 1:
        alen = 4
        out.family = AF_INET
    elif p[off + 3] == 4:
        alen = 16
        out.family = AF_INET6
    else:
        out.family = 0
        return FRONT_PYTHON  # a name to resolve, or an unknown type
    if n < off + 6 + alen:
        out.family = 0
        return FRONT_MORE
    memcpy(out.ip, p + off + 4, alen)
    out.port = (p[off + 4 + alen] << 8) | p[off + 5 + alen]
    out.consumed = off + 6 + alen
    return FRONT_CONNECT


cdef int front_reply_for_errno(int err) noexcept nogil:
    """protocol.socks5.Reply.for_errno, for a failed connect()."""
    if err == ECONNREFUSED:
        return 5
    if err == ENETUNREACH or err == ENETDOWN or err == EAFNOSUPPORT or err == EADDRNOTAVAIL:
        return 3
    if err == EHOSTUNREACH or err == EHOSTDOWN:
        return 4
    if err == ETIMEDOUT:
        return 6
    if err == EACCES or err == EPERM:
        return 2
    return 1


cdef int front_reply(unsigned char *out, int proto, int reply, const sockaddr_in6 *bound) noexcept nogil:
    """The reply to a CONNECT in the client's protocol, into ``out`` (22 bytes); its length.
    ``bound``: the upstream socket's address for a success (NULL for a failure)."""
    cdef const sockaddr_in *v4 = <const sockaddr_in *>bound
    if proto == 4:
        out[0] = 0
        out[1] = 90 if reply == 0 else 91
        memset(out + 2, 0, 6)
        if bound != NULL and bound.sin6_family == AF_INET:
            memcpy(out + 2, &v4.sin_port, 2)
            memcpy(out + 4, &v4.sin_addr, 4)
        return 8
    out[0] = 5
    out[1] = reply
    out[2] = 0
    if bound != NULL and bound.sin6_family == AF_INET6:
        out[3] = 4
        memcpy(out + 4, &bound.sin6_addr, 16)
        memcpy(out + 20, &bound.sin6_port, 2)
        return 22
    out[3] = 1
    memset(out + 4, 0, 6)
    if bound != NULL:
        memcpy(out + 4, &v4.sin_addr, 4)
        memcpy(out + 8, &v4.sin_port, 2)
    return 10


cdef inline uint32_t front_fnv1a32(const unsigned char *key, int n) noexcept nogil:
    """FNV-1a, 32 bits: _relay_types.egress_index before its modulo."""
    cdef uint32_t h = 2166136261u
    cdef int i
    for i in range(n):
        h = (h ^ key[i]) * 16777619u
    return h


cdef int front_client_key(const sockaddr_in6 *peer, unsigned char *key) noexcept nogil:
    """The client's address as sticky egress hashes it, into ``key``: 4 bytes for IPv4,
    an IPv4-mapped IPv6 one too (the same client on a dual-stack listener), else 16; its length."""
    cdef const unsigned char *ip = <const unsigned char *>&peer.sin6_addr
    cdef const unsigned char *v4 = <const unsigned char *>&(<const sockaddr_in *>peer).sin_addr
    if peer.sin6_family != AF_INET6:
        memcpy(key, v4, 4)
        return 4
    if memcmp(ip, b"\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0:
        memcpy(key, ip + 12, 4)
        return 4
    memcpy(key, ip, 16)
    return 16


cdef int front_bind(int fd, int family, const unsigned char *ip) noexcept nogil:
    """Bind ``fd`` to ``ip`` (4 or 16 bytes, by ``family``), its port left to connect():
    0, or the errno."""
    cdef sockaddr_in6 sa
    cdef sockaddr_in *v4 = <sockaddr_in *>&sa
    cdef socklen_t length
    cdef int one = 1
    # At SOL_IP for an IPv6 socket too: the flag lives in the inet part both families share.
    if setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one)) < 0:
        return errno
    memset(&sa, 0, sizeof(sa))
    if family == AF_INET:
        v4.sin_family = AF_INET
        memcpy(&v4.sin_addr, ip, 4)
        length = sizeof(sockaddr_in)
    else:
        sa.sin6_family = AF_INET6
        memcpy(&sa.sin6_addr, ip, 16)
        length = sizeof(sockaddr_in6)
    if bind(fd, <sockaddr *>&sa, length) < 0:
        return errno
    return 0


cdef str _front_host(int family, const unsigned char *ip):
    cdef char text[INET6_ADDRSTRLEN]
    inet_ntop(family, ip, text, sizeof(text))
    return text.decode("ascii")


cdef str _sa_host(const sockaddr_in6 *sa):
    """The IP of a socket address (an AF_INET one in the same storage), as inet_ntop writes it."""
    if sa.sin6_family == AF_INET6:
        return _front_host(AF_INET6, <const unsigned char *>&sa.sin6_addr)
    return _front_host(AF_INET, <const unsigned char *>&(<const sockaddr_in *>sa).sin_addr)


cdef inline int _sa_port(const sockaddr_in6 *sa) noexcept nogil:
    return ntohs(sa.sin6_port)  # sin_port sits where sin6_port does


cdef str _front_peer(const sockaddr_in6 *sa):
    """host:port of a socket address, IPv6 in brackets (access.format_peer)."""
    cdef const sockaddr_in *v4 = <const sockaddr_in *>sa
    if sa.sin6_family == AF_INET6:
        return f"[{_front_host(AF_INET6, <const unsigned char *>&sa.sin6_addr)}]:{ntohs(sa.sin6_port)}"
    return f"{_front_host(AF_INET, <const unsigned char *>&v4.sin_addr)}:{ntohs(v4.sin_port)}"


def front_parse(const unsigned char[::1] data not None, bytes methods not None, bint socks4):
    """(verdict, proto, family, host, port, consumed, sent): see _relay.pyi."""
    cdef FrontRequest req
    cdef int n = <int>min(data.shape[0], FRONT_BUF * 4)
    cdef int r = front_parse_c(&data[0] if data.shape[0] else NULL, n, methods, <int>min(len(methods), 8), socks4, &req)
    sent = b"\x05\x00"[:req.sent]
    if r == FRONT_CONNECT:
        return ("connect", req.proto, req.family, _front_host(req.family, req.ip), req.port, req.consumed, sent)
    return ("more" if r == FRONT_MORE else "python", req.proto, 0, "", 0, 0, sent)


# ---------------------------------------------------------------------- the gate's answers, remembered
# The gate is Python, and asking it costs more than the rest of a connection. Its answers
# for a client (gate.accepted) and for a (client, destination, port) CONNECT (gate.request)
# stay the same until the next front(), so the engine keeps the ones that let a client in:
# a refusal is asked again each time, so that its line is written each time. Two small
# direct-mapped tables; a key is compared whole, so a collision only forgets an answer.

cdef inline uint64_t _front_hash(const unsigned char *client, const unsigned char *dest, uint16_t port,
                                 uint64_t seed) noexcept nogil:
    return _udp_hash(dest, port, _udp_hash(client, 0, seed))


cdef FrontEntry *front_cache_find(FrontCache *c, const unsigned char *client, const unsigned char *dest,
                                  uint16_t port) noexcept nogil:
    cdef FrontEntry *e
    if c.entries == NULL:
        return NULL
    e = &c.entries[_front_hash(client, dest, port, c.seed) & (FRONT_CACHE_SIZE - 1)]
    if e.used and e.port == port and memcmp(e.client, client, 16) == 0 and memcmp(e.dest, dest, 16) == 0:
        return e
    return NULL


cdef FrontEntry *front_cache_put(FrontCache *c, const unsigned char *client, const unsigned char *dest,
                                 uint16_t port) noexcept nogil:
    """The entry for this key, filled in but for its value fields; NULL when out of memory."""
    cdef FrontEntry *e
    if c.entries == NULL:
        c.entries = <FrontEntry *>calloc(FRONT_CACHE_SIZE, sizeof(FrontEntry))
        if c.entries == NULL:
            return NULL
    e = &c.entries[_front_hash(client, dest, port, c.seed) & (FRONT_CACHE_SIZE - 1)]
    memcpy(e.client, client, 16)
    memcpy(e.dest, dest, 16)
    e.port = port
    e.used = 1
    e.counted = 0
    return e


cdef void front_cache_clear(FrontCache *c) noexcept nogil:
    free(c.entries)
    c.entries = NULL


cdef void _front_keys(const Session *s, unsigned char *client, unsigned char *dest) noexcept nogil:
    """The client's and (once requested) the destination's address, IPv4 mapped."""
    cdef uint16_t port
    _sockaddr_ip(<const sockaddr_storage *>&s.peer, client, &port)
    memset(dest, 0, 16)
    if s.has_dest:
        if s.dest_family == AF_INET:
            _map_v4(dest, s.dest_ip)
        else:
            memcpy(dest, s.dest_ip, 16)


cdef inline int64_t _now_ms() noexcept nogil:
    """limits.py's clock: CLOCK_MONOTONIC in ms, the same in every process."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000
