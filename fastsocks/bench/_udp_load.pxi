# ====================================================================== udp mode
# Included by _loadgen.pyx: the UDP half of LoadGen (mode "udp"), as functions of the
# LoadGen they drive. Associations are opened in Python (_udp_establish: the TCP side of
# UDP ASSOCIATE, RFC 1928 §4/§6, then a UDP socket connected to the relay); datagrams
# move in C: each association keeps ``inflight`` slots, a slot's datagram carries its slot
# number and a sequence number, every echoed byte is compared, and a datagram not back
# within loss_ns is given up and its slot refilled (_udp_scan), so a lost one never stalls
# a run.
#
# Closed loop by default: an echo's slot is refilled at once. With --rate the load is
# open: one datagram every pace_ns, over the associations in turn, into a free slot
# (none free: counted as unsent), woken on time by epoll_pwait2's nanosecond timeout, so
# that the proxy sees datagrams spread out as many independent clients send them.


cdef object _udp_establish(LoadGen g):
    """Open every association: over the proxy, a TCP connection with the greeting,
    [auth] and UDP ASSOCIATE (RFC 1928 §4, §6), then a UDP socket connected to the
    relay it names; direct, a UDP socket connected to the target. A failure is counted
    by kind and leaves that association closed."""
    import socket as pysocket
    import ipaddress
    cdef int i
    cdef epoll_event ev
    cdef Conn *c
    peer_host, peer_port = _peer(g)
    for i in range(g.n_conns):
        c = &g.conns[i]
        if g.stopping:
            break
        relay = (g.family, peer_host, peer_port)
        if g.via_proxy:
            try:
                relay = _udp_associate(g, peer_host, peer_port)
            except _AssociateError as exc:
                g.errors[exc.args[0]] += 1
                g.last_kind = exc.args[0]
                g.last_reply = exc.args[1]
                g.last_errno = exc.args[2]
                continue
        try:
            udp = pysocket.socket(relay[0], pysocket.SOCK_DGRAM)
            udp.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_RCVBUF, 1 << 20)
            udp.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_SNDBUF, 1 << 20)
            udp.connect(relay[1:])
            udp.setblocking(False)
        except OSError as exc:
            g.errors[E_CONNECT] += 1
            g.last_kind, g.last_errno = E_CONNECT, exc.errno or 0
            continue
        c.fd = udp.detach()
        c.gen += 1
        ev.events = EPOLLIN
        ev.data.u64 = _tag(c.gen, i)
        if epoll_ctl(g.epfd, EPOLL_CTL_ADD, c.fd, &ev) < 0:
            g.errors[E_OTHER] += 1
            g.last_kind, g.last_errno = E_OTHER, errno
            g._close_conn(c)
            continue
        g._set_state(c, C_PARKED)

cdef tuple _peer(LoadGen g):
    import socket as pysocket
    cdef sockaddr_in *sin = <sockaddr_in *>&g.peer
    cdef sockaddr_in6 *sin6 = <sockaddr_in6 *>&g.peer
    if g.family == AF_INET:
        return pysocket.inet_ntop(pysocket.AF_INET, (<char *>&sin.sin_addr)[:4]), htons(sin.sin_port)
    return pysocket.inet_ntop(pysocket.AF_INET6, (<char *>&sin6.sin6_addr)[:16]), htons(sin6.sin6_port)

cdef tuple _udp_associate(LoadGen g, host, port):
    """One association's TCP side; (family, relay ip, relay port) or _AssociateError."""
    import socket as pysocket
    import ipaddress
    timeout_s = g.timeout_ns / 1e9
    try:
        tcp = pysocket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise _AssociateError(E_CONNECT, 0, exc.errno or 0) from None
    try:
        tcp.sendall(g.greeting)
        answer = _recv_exact(tcp, 2)
        if answer[0] != 5:
            raise _AssociateError(E_METHOD, 0, 0)
        if answer[1] == 2 and g.auth is not None:
            tcp.sendall(g.auth)
            status = _recv_exact(tcp, 2)
            if status[1] != 0:
                raise _AssociateError(E_AUTH, status[1], 0)
        elif answer[1] != 0:
            raise _AssociateError(E_METHOD, answer[1], 0)
        tcp.sendall(g.request)
        head = _recv_exact(tcp, 4)
        if head[0] != 5 or head[1] != 0:
            raise _AssociateError(E_REPLY, head[1], 0)
        if head[3] == 1:
            raw = _recv_exact(tcp, 6)
            ip = pysocket.inet_ntop(pysocket.AF_INET, raw[:4])
        elif head[3] == 4:
            raw = _recv_exact(tcp, 18)
            ip = pysocket.inet_ntop(pysocket.AF_INET6, raw[:16])
        else:
            raise _AssociateError(E_REPLY, 0, 0)  # a relay named by a domain: not for a bench
        relay_port = (raw[len(raw) - 2] << 8) | raw[len(raw) - 1]
        if ipaddress.ip_address(ip).is_unspecified:
            ip = host  # "0.0.0.0": the relay is on the address we reached over TCP
    except _AssociateError:
        tcp.close()
        raise
    except EOFError:
        tcp.close()
        raise _AssociateError(E_EOF, 0, 0) from None
    except pysocket.timeout:
        tcp.close()
        raise _AssociateError(E_TIMEOUT, 0, 0) from None
    except OSError as exc:
        tcp.close()
        raise _AssociateError(_io_kind(exc.errno or 0), 0, exc.errno or 0) from None
    g.udp_control.append(tcp)
    family = pysocket.AF_INET6 if ":" in ip else pysocket.AF_INET
    return family, ip, relay_port

cdef int _udp_loop(LoadGen g, uint64_t until_ns) noexcept nogil:
    cdef int i, n, idx, wait_ms
    cdef uint64_t tag
    if g.phase == PH_ESTABLISH:
        return 1
    while True:
        g.now_ns = _now_ns()
        if g.udp_busy == 0 and not g._can_start():
            return 1
        if g.now_ns >= until_ns:
            return 0
        if g.now_ns >= g.next_scan_ns:
            _udp_scan(g)
            g.next_scan_ns = g.now_ns + UDP_SCAN_NS
            continue
        if g.pace_ns and g._can_start():
            if g.now_ns >= g.next_send_ns:
                _udp_paced(g)
                continue
            n = _udp_wait_ns(g, _min(_min(until_ns, g.next_scan_ns), g.next_send_ns) - g.now_ns)
        else:
            wait_ms = <int>_min(MAX_WAIT_MS, (_min(until_ns, g.next_scan_ns) - g.now_ns) // 1000000 + 1)
            n = epoll_wait(g.epfd, g.events, g.max_events, wait_ms)
        g.now_ns = _now_ns()
        for i in range(n):
            tag = g.events[i].data.u64
            idx = <int>(tag & 0xFFFFFFFFU)
            if g.conns[idx].gen == <uint32_t>(tag >> 32) and g.conns[idx].fd >= 0:
                _udp_recv(g, idx)

cdef int _udp_wait_ns(LoadGen g, uint64_t wait_ns) noexcept nogil:
    """epoll_wait with a nanosecond timeout (milliseconds where epoll_pwait2 is missing)."""
    cdef timespec ts
    cdef int n
    ts.tv_sec = <long>(wait_ns // 1000000000)
    ts.tv_nsec = <long>(wait_ns % 1000000000)
    n = epoll_pwait2(g.epfd, g.events, g.max_events, &ts, NULL)
    if n < 0 and errno == ENOSYS:
        n = epoll_wait(g.epfd, g.events, g.max_events, <int>(wait_ns // 1000000))
    return n

cdef void _udp_paced(LoadGen g) noexcept nogil:
    """The datagram due now: on the next association with a free slot."""
    cdef int tries, idx, k
    g.next_send_ns += g.pace_ns
    if g.next_send_ns + 1000000 < g.now_ns:
        g.next_send_ns = g.now_ns  # more than 1 ms behind: do not catch up in a burst
    for tries in range(g.n_conns):
        idx = g.pace_conn
        g.pace_conn = (g.pace_conn + 1) % g.n_conns
        if g.conns[idx].fd < 0:
            continue
        for k in range(g.inflight):
            if not g.slots[<size_t>idx * g.inflight + k].busy:
                _udp_send(g, idx, k)
                return
    g.udp_unsent += 1

cdef int _udp_send(LoadGen g, int idx, int k) noexcept nogil:
    """Send a new datagram in slot k of association idx. 1 sent, 0 not now (the slot
    stays free for the next scan), -1 the association failed."""
    cdef Conn *c = &g.conns[idx]
    cdef USlot *slot = &g.slots[<size_t>idx * g.inflight + k]
    cdef unsigned char *p = g.buf
    cdef uint64_t seq
    cdef ssize_t n
    cdef size_t length = g.udp_header_len + g.size
    if c.fd < 0 or not g._can_start():
        return 0
    seq = g.serial
    memcpy(p, g.udp_header_p, g.udp_header_len)
    p += g.udp_header_len
    p[0] = <unsigned char>(k >> 24)
    p[1] = <unsigned char>(k >> 16)
    p[2] = <unsigned char>(k >> 8)
    p[3] = <unsigned char>k
    _put_be64(p + 4, seq)
    memcpy(p + UDP_TAG_BYTES, g.pat + (seq * 4099) % PATTERN_BYTES, g.size - UDP_TAG_BYTES)
    n = send(c.fd, g.buf, length, MSG_DONTWAIT)
    if n < 0:
        if errno == EAGAIN or errno == EINTR or errno == ENOBUFS:
            return 0
        # A hard error (ECONNREFUSED: nobody at the relay or the echo): the datagram
        # counts as sent and lost, so that a --count run still ends.
        g.serial += 1
        g.started += 1
        g.errors[E_RESET if errno == ECONNREFUSED else E_OTHER] += 1
        g.last_kind = E_RESET if errno == ECONNREFUSED else E_OTHER
        g.last_errno = errno
        return -1
    g.serial += 1
    g.started += 1
    g.bytes_up += g.size
    slot.seq = seq
    slot.t_sent_ns = _now_ns()
    slot.busy = 1
    g.udp_busy += 1
    return 1

cdef void _udp_recv(LoadGen g, int idx) noexcept nogil:
    cdef Conn *c = &g.conns[idx]
    cdef ssize_t n
    cdef int i
    for i in range(BUDGET * 2):
        n = recv(c.fd, g.buf, g.buf_size, MSG_DONTWAIT)
        if n < 0:
            if errno == EAGAIN or errno == EINTR:
                return
            g.errors[E_RESET if errno == ECONNREFUSED else E_OTHER] += 1
            g.last_kind = E_RESET if errno == ECONNREFUSED else E_OTHER
            g.last_errno = errno
            if errno != ECONNREFUSED:
                return
            continue
        _udp_take(g, idx, n)

cdef void _udp_take(LoadGen g, int idx, ssize_t n) noexcept nogil:
    """One datagram back: every byte compared (header, slot, sequence, payload)."""
    cdef const unsigned char *p = g.buf + g.udp_header_len
    cdef uint32_t k
    cdef uint64_t seq, now
    cdef USlot *slot
    if (n != <ssize_t>(g.udp_header_len + g.size)
            or memcmp(g.buf, g.udp_header_p, g.udp_header_len) != 0):
        g.errors[E_MISMATCH] += 1
        g.last_kind = E_MISMATCH
        return
    k = (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]
    seq = _get_be64(p + 4)
    if k >= <uint32_t>g.inflight:
        g.errors[E_MISMATCH] += 1
        g.last_kind = E_MISMATCH
        return
    slot = &g.slots[<size_t>idx * g.inflight + k]
    if not slot.busy or slot.seq != seq:
        if seq < g.serial:
            g.udp_late += 1  # given up on already, or an echo twice
        else:
            g.errors[E_MISMATCH] += 1
            g.last_kind = E_MISMATCH
        return
    g.udp_compared += g.size
    slot.busy = 0
    g.udp_busy -= 1
    if memcmp(p + UDP_TAG_BYTES, g.pat + (seq * 4099) % PATTERN_BYTES, g.size - UDP_TAG_BYTES) != 0:
        g.errors[E_MISMATCH] += 1
        g.last_kind = E_MISMATCH
    else:
        now = _now_ns()
        g._record(now - slot.t_sent_ns)
        g.ok += 1
        g.bytes_down += g.size
        g.t_last_ns = now
    if not g.pace_ns:
        _udp_send(g, idx, k)  # closed loop: the slot goes out again at once

cdef void _udp_scan(LoadGen g) noexcept nogil:
    """Give up on datagrams older than loss_ns; refill every free slot."""
    cdef int i, k
    cdef USlot *slot
    for i in range(g.n_conns):
        if g.conns[i].fd < 0:
            continue
        for k in range(g.inflight):
            slot = &g.slots[<size_t>i * g.inflight + k]
            if slot.busy:
                if g.now_ns < slot.t_sent_ns + g.loss_ns:
                    continue
                slot.busy = 0
                g.udp_busy -= 1
                g.udp_timeouts += 1
            if g.pace_ns:
                continue  # paced: the free slot waits for its turn
            if _udp_send(g, i, k) < 0:
                break


class _AssociateError(Exception):
    """(error kind, SOCKS reply code, errno) of a failed UDP ASSOCIATE."""


def _recv_exact(sock, int n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError()
        data += chunk
    return data
