# Included by _relay.pyx: the accounts every worker shares (limits on all sessions of one
# user, or of one client address, and a user's quota count). The engine reads through them
# in _allowance() and settles in _charge(); accounts.py is the Python side.
#
# Theory of operation
# -------------------
# One anonymous MAP_SHARED mapping, made by the master before it forks, so every worker
# (and a respawned one) sees the same memory. A head, then ``entries`` fixed-size
# Account entries; an entry is found by FNV-1a of (kind, name) and linear probing over at
# most PROBE entries, and holds the name itself, so two keys never share an entry.
#
# Two kinds of lock, both a word set to the holder's pid by compare-and-swap, spun on with
# sched_yield() after a few tries (nobody holds one across a system call):
# - the head's lock covers claiming and freeing entries (open() and reclaim(): once per
#   session start, and the master's sweep);
# - an entry's lock covers its two buckets (take and refund: once per read of a session
#   it limits). ``refs`` and ``used`` are plain atomic adds.
# A worker killed while holding one leaves its pid there: the master calls unlock_dead()
# for every worker it reaps, before the next one forks. Its sessions' holds (refs) die
# with it too: each worker tallies its own in a row of ``holds`` (after the entries, an
# int32 per entry per worker slot, written by that worker alone), which release_slot()
# takes back from the entries' refs.
#
# An entry is freed (kind 0) only by reclaim(), under the head's lock, when no session
# holds it (refs 0), and, while its quota count must survive (keep_used), when that is 0
# too. Since free entries can sit inside a probe run, a lookup always looks at all PROBE
# places; a claim takes the first free one.
#
# A bucket is the session buckets' kind (_relay.pyx, "Rates"): full when the entry is
# claimed, refilled from CLOCK_MONOTONIC (the same clock in every process) at the rate the
# asking session's rule gives, holding max(100 ms of it, 16 KiB). A read takes what it may
# read before it reads (``take``) and gives back what it did not read (``refund``).

from libc.stdint cimport int32_t

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from *:
    """
    static inline int fs_try_lock(int64_t *w, int64_t me) {
        int64_t free_ = 0;
        return __atomic_compare_exchange_n(w, &free_, me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
    }
    static inline void fs_unlock(int64_t *w) { __atomic_store_n(w, 0, __ATOMIC_RELEASE); }
    static inline int64_t fs_load(int64_t *w) { return __atomic_load_n(w, __ATOMIC_ACQUIRE); }
    static inline int64_t fs_add(int64_t *w, int64_t d) { return __atomic_add_fetch(w, d, __ATOMIC_ACQ_REL); }
    static inline int64_t fs_swap(int64_t *w, int64_t v) { return __atomic_exchange_n(w, v, __ATOMIC_ACQ_REL); }
    static inline int fs_release_if(int64_t *w, int64_t holder) {
        int64_t h = holder;
        return __atomic_compare_exchange_n(w, &h, 0, 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED);
    }
    """
    bint fs_try_lock(int64_t *w, int64_t me) nogil
    void fs_unlock(int64_t *w) nogil
    int64_t fs_load(int64_t *w) nogil
    int64_t fs_add(int64_t *w, int64_t d) nogil
    int64_t fs_swap(int64_t *w, int64_t v) nogil
    bint fs_release_if(int64_t *w, int64_t holder) nogil

ACCOUNT_USER = KIND_USER
ACCOUNT_CLIENT = KIND_CLIENT
ACCOUNT_NAME_MAX = 255

cdef enum:
    PROBE = 64
    SPINS = 100


cdef inline void _lock(int64_t *w, int64_t me) noexcept nogil:
    cdef int i = 0
    while not fs_try_lock(w, me):
        i += 1
        if i >= SPINS:
            sched_yield()
            i = 0


cdef inline uint64_t _account_hash(int kind, const unsigned char *name, int n) noexcept nogil:
    cdef uint64_t h = 14695981039346656037ULL ^ <uint64_t>kind
    cdef int i
    h *= 1099511628211ULL
    for i in range(n):
        h = (h ^ name[i]) * 1099511628211ULL
    return h


cdef double _account_take(Account *a, int64_t me, int d, double rate, double want, double now,
                          double *wait_s) noexcept nogil:
    """Take at most ``want`` bytes from the entry's bucket of direction ``d`` at ``rate``;
    0: empty, and ``wait_s`` is how long until the resume amount has accrued."""
    cdef double burst = _burst_bytes(rate)
    cdef double got
    _lock(&a.lock, me)
    if a.refilled_s[d] == 0:
        a.tokens[d] = burst  # new: full
    else:
        a.tokens[d] += (now - a.refilled_s[d]) * rate
        if a.tokens[d] > burst:
            a.tokens[d] = burst
    a.refilled_s[d] = now
    if a.tokens[d] >= 1:
        got = want if a.tokens[d] >= want else <double><int64_t>a.tokens[d]
        a.tokens[d] -= got
    else:
        got = 0
        wait_s[0] = (_resume_bytes(rate) - a.tokens[d]) / rate
    fs_unlock(&a.lock)
    return got


cdef void _account_refund(Account *a, int64_t me, int d, double n) noexcept nogil:
    _lock(&a.lock, me)
    a.tokens[d] += n
    fs_unlock(&a.lock)


cdef int _account_open(Accounts t, int kind, const unsigned char *name, int n) noexcept nogil:
    """Accounts.open(), for the engine's front door too: the entry's index, or -1."""
    cdef int i, at, found = -1, free_at = -1
    cdef uint64_t h = _account_hash(kind, name, n)
    cdef Account *a
    _lock(&t.head.lock, t.me)
    for i in range(PROBE if PROBE < t.entries else t.entries):
        at = <int>((h + <uint64_t>i) % <uint64_t>t.entries)
        a = &t.table[at]
        if a.kind == 0:
            if free_at < 0:
                free_at = at
        elif a.kind == kind and a.key == h and a.name_len == n and (n == 0 or memcmp(a.name, name, n) == 0):
            found = at
            break
    if found < 0 and free_at >= 0:
        found = free_at
        a = &t.table[found]
        memset(a, 0, sizeof(Account))
        a.key = h
        a.name_len = n
        if n:
            memcpy(a.name, name, n)
        a.kind = kind
        fs_add(&t.head.claimed, 1)
    if found >= 0:
        fs_add(&t.table[found].refs, 1)
        if t.slot >= 0:
            t.holds[<size_t>t.slot * t.entries + found] += 1
    fs_unlock(&t.head.lock)
    return found


cdef inline void _account_release(Accounts t, int index) noexcept nogil:
    """One session fewer holds entry ``index`` (the inverse of _account_open)."""
    if t.slot >= 0:
        t.holds[<size_t>t.slot * t.entries + index] -= 1
    fs_add(&t.table[index].refs, -1)


cdef class Accounts:
    """The shared table; see the theory above. Made before the fork; every process uses
    the same mapping. ``entries`` is fixed for its life."""

    def __cinit__(self, int entries=16384, int workers=1):
        if not 1 <= entries <= 1 << 22:
            raise ValueError(f"entries: 1 to {1 << 22}, not {entries}")
        if not 1 <= workers <= 1024:
            raise ValueError(f"workers: 1 to 1024, not {workers}")
        self.size = (sizeof(AccountsHead) + <size_t>entries * sizeof(Account)
                     + <size_t>workers * entries * sizeof(int32_t))
        cdef void *p = mmap(NULL, self.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        if p == MAP_FAILED:
            raise OSError(errno, "mmap of the shared accounts failed")
        self.head = <AccountsHead *>p
        self.table = <Account *>(<char *>p + sizeof(AccountsHead))
        self.holds = <int32_t *>(<char *>self.table + <size_t>entries * sizeof(Account))
        self.entries = entries
        self.workers = workers
        self.slot = -1
        self.me = os.getpid()

    def __dealloc__(self):
        if self.head != NULL:
            munmap(self.head, self.size)
            self.head = NULL

    def forked(self, int slot=-1):
        """In a new process (a forked worker): its pid is what its locks hold, and ``slot``
        (0 to workers - 1) the row its holds are tallied in, for release_slot()."""
        if not -1 <= slot < self.workers:
            raise ValueError(f"slot: -1 (none) or 0 to {self.workers - 1}, not {slot}")
        self.me = os.getpid()
        self.slot = slot

    @property
    def capacity(self):
        return self.entries

    @property
    def in_use(self):
        """Entries claimed now."""
        return fs_load(&self.head.claimed)

    cdef Account *_entry(self, int index) except NULL:
        if not 0 <= index < self.entries or self.table[index].kind == 0:
            raise IndexError(f"no account at {index}")
        return &self.table[index]

    def open(self, int kind, const unsigned char[:] name not None):
        """The entry of (kind, name), claimed if new (buckets full, count 0), with one more
        session holding it; -1 when its probe run is full (the caller refuses the session)."""
        cdef int n = name.shape[0]
        cdef int found
        if kind != ACCOUNT_USER and kind != ACCOUNT_CLIENT:
            raise ValueError(f"kind: ACCOUNT_USER or ACCOUNT_CLIENT, not {kind}")
        if n > ACCOUNT_NAME_MAX:
            raise ValueError(f"name: at most {ACCOUNT_NAME_MAX} bytes")
        with nogil:
            found = _account_open(self, kind, &name[0] if n else NULL, n)
        return found

    def close(self, int index):
        """One session fewer holds the entry."""
        self._entry(index)
        _account_release(self, index)

    def used(self, int index):
        """Bytes counted against the entry's quota this period."""
        return fs_load(&self._entry(index).used)

    def add_used(self, int index, int64_t delta):
        """Add to the count (the master squares it with the quota file); returns the new count."""
        return fs_add(&self._entry(index).used, delta)

    def swap_used(self, int index, int64_t value):
        """Set the count, returning what it was (a new quota period starts)."""
        return fs_swap(&self._entry(index).used, value)

    def take(self, int index, int d, double rate, double want):
        """(bytes granted, seconds to wait when 0): what a read of a direction limited by
        this entry may move now (the twin engine's and the tests' way in)."""
        cdef double wait_s = 0
        if not (d == 0 or d == 1) or rate <= 0 or want < 0:
            raise ValueError("take(): direction 0 or 1, rate > 0, want >= 0")
        cdef double got = _account_take(self._entry(index), self.me, d, rate, want, _monotonic(), &wait_s)
        return <int64_t>got, wait_s

    def refund(self, int index, int d, double n):
        """Give back what a take() granted and the read did not move."""
        if not (d == 0 or d == 1) or n < 0:
            raise ValueError("refund(): direction 0 or 1, n >= 0")
        _account_refund(self._entry(index), self.me, d, n)

    def claimed(self):
        """[(index, kind, name, sessions holding it, count)] of every claimed entry."""
        cdef int i
        cdef Account *a
        out = []
        for i in range(self.entries):
            a = &self.table[i]
            if a.kind:
                out.append((i, a.kind, a.name[:a.name_len], fs_load(&a.refs), fs_load(&a.used)))
        return out

    def reclaim(self, bint keep_used):
        """Free the entries no session holds (with keep_used, only those whose count is 0);
        returns how many were freed."""
        cdef int i, freed = 0
        cdef Account *a
        with nogil:
            _lock(&self.head.lock, self.me)
            for i in range(self.entries):
                a = &self.table[i]
                if a.kind and fs_load(&a.refs) == 0 and not (keep_used and fs_load(&a.used)):
                    a.kind = 0
                    freed += 1
            fs_add(&self.head.claimed, -freed)
            fs_unlock(&self.head.lock)
        return freed

    def release_slot(self, int slot):
        """A dead worker's holds: its sessions died with it, so the entries they held are
        held that much less (before the next worker takes the slot); how many holds."""
        cdef int i
        cdef int64_t n = 0
        cdef int32_t *row
        if not 0 <= slot < self.workers:
            raise ValueError(f"slot: 0 to {self.workers - 1}, not {slot}")
        row = self.holds + <size_t>slot * self.entries
        for i in range(self.entries):
            if row[i]:
                fs_add(&self.table[i].refs, -row[i])
                n += row[i]
                row[i] = 0
        return n

    def unlock_dead(self, int64_t pid):
        """Release every lock a dead process ``pid`` held; returns how many it held."""
        cdef int i, n = 0
        if fs_release_if(&self.head.lock, pid):
            n += 1
        for i in range(self.entries):
            if self.table[i].kind and fs_release_if(&self.table[i].lock, pid):
                n += 1
        return n
