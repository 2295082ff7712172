# The target server, a part of _loadgen.pyx (included there; see its theory of operation):
# one epoll loop that accepts on a listening socket and, by the first byte of each
# connection, echoes or serves the bulk protocol (source, sink, result).


cdef class TargetServer:
    """Echo, source and sink on one listening socket; see the module docstring."""

    def __cinit__(self):
        self.epfd = -1
        self.devnull_fd = -1
        self.conns = NULL
        self.runq = self.runq_work = NULL
        self.events = NULL
        self.buf = NULL
        self.free_head = -1
        self.udp_fd = -1

    def __init__(self, int listen_fd, Pattern pattern not None, *, size_t buffer_size=1 << 20,
                 int pipe_size=1 << 20, int max_events=512, int udp_fd=-1):
        """udp_fd: a bound UDP socket to echo datagrams on (-1: none); it stays the caller's."""
        cdef epoll_event ev
        if not 4096 <= buffer_size <= PATTERN_BYTES:
            raise ValueError(f"buffer_size must be 4096..{PATTERN_BYTES}")
        self.listen_fd = listen_fd
        self.pattern = pattern
        self.pat = pattern.data
        self.pat_fd = pattern.fd
        self.buf_size = buffer_size
        self.pipe_size = pipe_size
        self.max_events = max_events
        self.buf = <unsigned char *>malloc(buffer_size)
        self.events = <epoll_event *>malloc(sizeof(epoll_event) * max_events)
        if self.buf == NULL or self.events == NULL:
            raise MemoryError()
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.devnull_fd = open(b"/dev/null", O_WRONLY | O_CLOEXEC)
        if self.devnull_fd < 0:
            raise OSError(errno, "cannot open /dev/null")
        ev.events = EPOLLIN
        ev.data.u64 = LISTEN_TAG
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, listen_fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl(listening socket) failed")
        if udp_fd >= 0:
            ev.events = EPOLLIN
            ev.data.u64 = UDP_TAG
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, udp_fd, &ev) < 0:
                raise OSError(errno, "epoll_ctl(UDP socket) failed")
            self.udp_fd = udp_fd

    def __dealloc__(self):
        self.close()

    def serve(self, int stop_fd):
        """Serve until ``stop_fd`` is readable (data or EOF). The listening socket must be
        non-blocking; it stays the caller's."""
        cdef epoll_event ev
        cdef int r
        if self.epfd < 0:
            raise ValueError("the target server is closed")
        ev.events = EPOLLIN
        ev.data.u64 = STOP_TAG
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, stop_fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl(stop fd) failed")
        with nogil:
            r = self._loop(stop_fd)
        if r < 0:
            raise OSError(r, "epoll_wait failed")

    def counters(self):
        """(accepted, echoed bytes, source bytes sent, sink bytes received)."""
        return (self.accepted, self.echoed, self.sent, self.received)

    def datagrams_echoed(self):
        """Datagrams echoed."""
        return self.udp_echoed

    def close(self):
        """Close every connection and the server's own fds (not the listening one)."""
        cdef int i
        if self.conns != NULL:
            for i in range(self.capacity):
                if self.conns[i].state != T_FREE:
                    self._close_conn(i)
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1
        if self.devnull_fd >= 0:
            close(self.devnull_fd)
            self.devnull_fd = -1
        free(self.conns)
        free(self.runq)
        free(self.runq_work)
        free(self.events)
        free(self.buf)
        self.conns = NULL
        self.runq = self.runq_work = NULL
        self.events = NULL
        self.buf = NULL
        self.capacity = 0

    cdef int _loop(self, int stop_fd) noexcept nogil:
        cdef int i, n, idx, nq, wait_ms
        cdef uint64_t tag
        cdef uint64_t *work
        cdef uint32_t low
        cdef epoll_event ev
        while True:
            wait_ms = 0 if self.runq_len else (100 if self.accept_paused else 1000)
            n = epoll_wait(self.epfd, self.events, self.max_events, wait_ms)
            if n < 0 and errno != EINTR:
                return -errno
            for i in range(n):
                tag = self.events[i].data.u64
                low = <uint32_t>(tag & 0xFFFFFFFFU)
                if tag == STOP_TAG:
                    return 0
                if tag == LISTEN_TAG:
                    self._accept()
                    continue
                if tag == UDP_TAG:
                    self._udp_echo()
                    continue
                if (self.conns[low].gen == <uint32_t>(tag >> 32)
                        and self.conns[low].state != T_FREE):
                    self._pump(low)
            nq = self.runq_len
            if nq:
                work = self.runq
                self.runq = self.runq_work
                self.runq_work = work
                self.runq_len = 0
                for i in range(nq):
                    idx = <int>(work[i] & 0xFFFFFFFFU)
                    if (self.conns[idx].queued and self.conns[idx].state != T_FREE
                            and self.conns[idx].gen == <uint32_t>(work[i] >> 32)):
                        self.conns[idx].queued = 0
                        self._pump(idx)
            if self.accept_paused and _now_ns() >= self.resume_accept_ns:
                ev.events = EPOLLIN
                ev.data.u64 = LISTEN_TAG
                if epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.listen_fd, &ev) == 0:
                    self.accept_paused = False

    cdef void _udp_echo(self) noexcept nogil:
        """Send each datagram back to where it came from (level-triggered: a budget, then
        the next epoll_wait)."""
        cdef sockaddr_storage source
        cdef socklen_t source_len
        cdef ssize_t n
        cdef int i
        for i in range(BUDGET * 4):
            source_len = sizeof(source)
            n = recvfrom(self.udp_fd, self.buf, self.buf_size, MSG_DONTWAIT, <sockaddr *>&source, &source_len)
            if n < 0:
                if errno == EAGAIN:
                    return
                continue  # ECONNREFUSED from an earlier echo and the like: not ours to keep
            if sendto(self.udp_fd, self.buf, n, MSG_DONTWAIT, <sockaddr *>&source, source_len) == n:
                self.udp_echoed += 1

    cdef int _grow(self) noexcept nogil:
        cdef int old = self.capacity
        cdef int new = old * 2 if old else 1024
        cdef int i
        cdef TConn *conns = <TConn *>realloc(self.conns, sizeof(TConn) * new)
        if conns == NULL:
            return -1
        self.conns = conns
        cdef uint64_t *q = <uint64_t *>realloc(self.runq, sizeof(uint64_t) * new)
        if q == NULL:
            return -1
        self.runq = q
        q = <uint64_t *>realloc(self.runq_work, sizeof(uint64_t) * new)
        if q == NULL:
            return -1
        self.runq_work = q
        for i in range(new - 1, old - 1, -1):
            memset(&self.conns[i], 0, sizeof(TConn))
            self.conns[i].fd = self.conns[i].pipe_r = self.conns[i].pipe_w = -1
            self.conns[i].next_free = self.free_head
            self.free_head = i
        self.capacity = new
        return 0

    cdef void _accept(self) noexcept nogil:
        cdef int i, fd, idx, one = 1
        cdef uint32_t gen
        cdef TConn *c
        cdef epoll_event ev
        for i in range(64):
            fd = accept4(self.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno == EMFILE or errno == ENFILE:
                    # Out of fds: stop accepting for a moment instead of spinning.
                    epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.listen_fd, NULL)
                    self.accept_paused = True
                    self.resume_accept_ns = _now_ns() + 100000000
                return
            if self.free_head < 0 and self._grow() < 0:
                close(fd)
                return
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
            idx = self.free_head
            c = &self.conns[idx]
            self.free_head = c.next_free
            gen = c.gen
            memset(c, 0, sizeof(TConn))
            c.gen = gen
            c.fd = fd
            c.pipe_r = c.pipe_w = -1
            c.result_off = RESULT_BYTES
            c.state = T_SNIFF
            ev.events = EV_FLAGS
            ev.data.u64 = _tag(gen, idx)
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
                self._close_conn(idx)
                continue
            self.accepted += 1

    cdef void _pump(self, int idx) noexcept nogil:
        cdef TConn *c = &self.conns[idx]
        cdef int r = 2
        while r == 2:
            if c.state == T_SNIFF:
                r = self._sniff(c)
            elif c.state == T_HEADER:
                r = self._read_header(c)
            elif c.state == T_ECHO:
                r = self._pump_echo(c)
            elif c.state == T_BULK:
                r = self._pump_bulk(c)
            else:
                r = self._pump_drain(c)
        if r < 0:
            self._close_conn(idx)
        elif r == 1 and not c.queued:
            c.queued = 1
            self.runq[self.runq_len] = _tag(c.gen, idx)
            self.runq_len += 1

    # Each step returns -1 (close it), 0 (wait for an edge), 1 (budget used up: queue it)
    # or 2 (the state changed: step again).

    cdef int _sniff(self, TConn *c) noexcept nogil:
        cdef ssize_t n = recv(c.fd, self.buf, self.buf_size, 0)
        cdef size_t take
        cdef int r
        if n <= 0:
            return 0 if n < 0 and (errno == EAGAIN or errno == EINTR) else -1
        if self.buf[0] != BULK_MAGIC:
            c.state = T_ECHO
            r = self._echo(c, self.buf, n)
            return 2 if r > 0 else r
        take = <size_t>_min(n, HEADER_BYTES)
        memcpy(c.header, self.buf, take)
        c.header_len = <int>take
        if take < HEADER_BYTES:
            c.state = T_HEADER
            return 2
        return self._begin_bulk(c, self.buf + HEADER_BYTES, n - HEADER_BYTES)

    cdef int _read_header(self, TConn *c) noexcept nogil:
        # Exactly the header: what follows may be for the sink's splice.
        cdef ssize_t n = recv(c.fd, c.header + c.header_len, HEADER_BYTES - c.header_len, 0)
        if n <= 0:
            return 0 if n < 0 and (errno == EAGAIN or errno == EINTR) else -1
        c.header_len += <int>n
        if c.header_len < HEADER_BYTES:
            return 2
        return self._begin_bulk(c, NULL, 0)

    cdef int _begin_bulk(self, TConn *c, const unsigned char *extra, size_t n) noexcept nogil:
        cdef uint64_t nbytes = _get_be64(c.header + 8)
        cdef uint64_t offset
        if c.header[1] != BULK_VERSION:
            return -1
        offset = ((<uint64_t>c.header[4] << 24) | (<uint64_t>c.header[5] << 16)
                  | (<uint64_t>c.header[6] << 8) | c.header[7]) % PATTERN_BYTES
        c.flags = c.header[2]
        c.down_left = nbytes if c.flags & BULK_DOWNLOAD else 0
        c.up_left = nbytes if c.flags & BULK_UPLOAD else 0
        c.down_pos = c.up_pos = offset
        c.result_off = 0 if c.flags & BULK_UPLOAD else RESULT_BYTES
        if c.up_left and not (c.flags & BULK_VERIFY):
            _make_pipe(&c.pipe_r, &c.pipe_w, self.pipe_size)  # on failure, plain recv()
        c.state = T_BULK
        if c.flags & BULK_UPLOAD:
            if self._take_upload(c, extra, n) < 0:  # n may be 0: a 0-byte upload seals at once
                return -1
        elif n:
            return -1  # payload after a download-only header
        return 2

    cdef int _take_upload(self, TConn *c, const unsigned char *data, size_t n) noexcept nogil:
        """Count (and, when asked, verify) n uploaded bytes; seal the verdict at the end."""
        cdef int status
        if n > c.up_left:
            return -1  # more than the header announced
        if data != NULL and c.flags & BULK_VERIFY:
            if memcmp(data, self.pat + c.up_pos % PATTERN_BYTES, n) != 0:
                c.corrupt = 1
        c.up_left -= n
        c.up_pos += n
        c.up_total += n
        self.received += n
        if c.up_left == 0:
            status = STATUS_UNCHECKED
            if c.flags & BULK_VERIFY:
                status = STATUS_CORRUPT if c.corrupt else STATUS_INTACT
            _put_be64(c.result, c.up_total)
            c.result[8] = <unsigned char>status
        return 0

    cdef int _pump_bulk(self, TConn *c) noexcept nogil:
        cdef int i, moved
        cdef loff_t offset
        cdef ssize_t n
        for i in range(BUDGET):
            moved = 0
            if c.down_left:
                offset = c.down_pos % PATTERN_BYTES
                n = sendfile(c.fd, self.pat_fd, &offset, _min(c.down_left, PATTERN_BYTES))
                if n > 0:
                    c.down_left -= n
                    c.down_pos += n
                    self.sent += n
                    moved = 1
                elif n < 0 and errno != EAGAIN and errno != EINTR:
                    return -1
            elif c.up_left == 0 and c.result_off < RESULT_BYTES:
                # The verdict follows the download, never inside it.
                n = send(c.fd, c.result + c.result_off, RESULT_BYTES - c.result_off, MSG_NOSIGNAL)
                if n > 0:
                    c.result_off += <int>n
                    moved = 1
                elif n < 0 and errno != EAGAIN and errno != EINTR:
                    return -1
            if c.up_left:
                if c.pipe_w >= 0:
                    n = splice(c.fd, NULL, c.pipe_w, NULL, _min(c.up_left, self.pipe_size),
                               SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
                    if n > 0 and (_drain_pipe(c.pipe_r, self.devnull_fd, n) < 0
                                  or self._take_upload(c, NULL, n) < 0):
                        return -1
                else:
                    n = recv(c.fd, self.buf, _min(c.up_left, self.buf_size), 0)
                    if n > 0 and self._take_upload(c, self.buf, n) < 0:
                        return -1
                if n == 0 or (n < 0 and errno != EAGAIN and errno != EINTR):
                    return -1  # the client left before the end
                moved |= n > 0
            if c.down_left == 0 and c.up_left == 0 and c.result_off >= RESULT_BYTES:
                c.state = T_DRAIN
                return 2
            if not moved:
                return 0
        return 1

    cdef int _pump_drain(self, TConn *c) noexcept nogil:
        cdef ssize_t n
        cdef int i
        for i in range(BUDGET):
            n = recv(c.fd, self.buf, self.buf_size, 0)
            if n == 0:
                return -1  # the client closed: done
            if n < 0:
                return 0 if errno == EAGAIN or errno == EINTR else -1
        return 1

    cdef int _pump_echo(self, TConn *c) noexcept nogil:
        cdef ssize_t n
        cdef int i, r
        for i in range(BUDGET):
            if c.pending_len:
                n = send(c.fd, c.pending + c.pending_off, c.pending_len, MSG_NOSIGNAL)
                if n < 0:
                    return 0 if errno == EAGAIN or errno == EINTR else -1
                self.echoed += n
                c.pending_off += <int>n
                c.pending_len -= <int>n
                if c.pending_len:
                    return 0
                free(c.pending)
                c.pending = NULL
                c.pending_off = 0
            n = recv(c.fd, self.buf, self.buf_size, 0)
            if n <= 0:
                return 0 if n < 0 and (errno == EAGAIN or errno == EINTR) else -1
            r = self._echo(c, self.buf, n)
            if r <= 0:
                return r
        return 1

    cdef int _echo(self, TConn *c, const unsigned char *data, size_t n) noexcept nogil:
        """Send n bytes back; keep what the client would not take. -1 error, 0 some kept, 1 all sent."""
        cdef ssize_t w = send(c.fd, data, n, MSG_NOSIGNAL)
        if w < 0:
            if errno != EAGAIN and errno != EINTR:
                return -1
            w = 0
        self.echoed += w
        if <size_t>w == n:
            return 1
        c.pending = <char *>malloc(n - w)
        if c.pending == NULL:
            return -1
        memcpy(c.pending, data + w, n - w)
        c.pending_len = <int>(n - w)
        c.pending_off = 0
        return 0

    cdef void _close_conn(self, int idx) noexcept nogil:
        cdef TConn *c = &self.conns[idx]
        free(c.pending)
        c.pending = NULL
        if c.pipe_r >= 0:
            close(c.pipe_r)
            close(c.pipe_w)
            c.pipe_r = c.pipe_w = -1
        if c.fd >= 0:
            close(c.fd)
            c.fd = -1
        c.state = T_FREE
        c.queued = 0
        c.gen += 1
        c.next_free = self.free_head
        self.free_head = idx
