# The system calls and constants fastsocks' Cython modules use, declared once
# (uvloop keeps the same in includes/system.pxd). Declarations only: no code.

from libc.stdint cimport uint16_t, uint32_t, uint64_t


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLLET
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC
        EPOLLEXCLUSIVE


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    struct sockaddr:
        sa_family_t sa_family

    struct sockaddr_storage:
        sa_family_t ss_family

    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr *addr, socklen_t addrlen)
    int bind(int fd, const sockaddr *addr, socklen_t addrlen)
    int accept4(int fd, sockaddr *addr, socklen_t *addrlen, int flags)
    int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)
    int setsockopt(int fd, int level, int optname, const void *optval, socklen_t optlen)
    ssize_t recv(int fd, void *buf, size_t length, int flags)
    ssize_t send(int fd, const void *buf, size_t length, int flags)
    int shutdown(int fd, int how)
    int getsockname(int fd, sockaddr *addr, socklen_t *addrlen)

    enum:
        AF_INET
        AF_INET6
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SOL_SOCKET
        SO_ERROR
        MSG_NOSIGNAL
        SHUT_WR


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr

    struct in6_addr:
        pass

    struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr

    struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    uint16_t htons(uint16_t x)
    uint32_t htonl(uint32_t x)
    enum:
        IPPROTO_TCP
        IPPROTO_IP
        IP_BIND_ADDRESS_NO_PORT
        INADDR_ANY


cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY


cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)


cdef extern from "<fcntl.h>" nogil:
    ctypedef long long loff_t
    ssize_t splice(int fd_in, loff_t *off_in, int fd_out, loff_t *off_out,
                   size_t length, unsigned int flags)
    int fcntl(int fd, int cmd, ...)
    int open(const char *path, int flags)
    enum:
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        F_SETPIPE_SZ
        F_GETPIPE_SZ
        O_NONBLOCK
        O_CLOEXEC
        O_WRONLY


cdef extern from "<sys/sendfile.h>" nogil:
    ssize_t sendfile(int out_fd, int in_fd, loff_t *offset, size_t count)


cdef extern from "<sys/mman.h>" nogil:
    int memfd_create(const char *name, unsigned int flags)
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    void *MAP_FAILED
    enum:
        PROT_READ
        PROT_WRITE
        MAP_SHARED
        MAP_ANONYMOUS
        MFD_CLOEXEC


cdef extern from "<unistd.h>" nogil:
    int pipe2(int *pipefd, int flags)
    int close(int fd)
    ssize_t write(int fd, const void *buf, size_t count)


cdef extern from "<errno.h>" nogil:
    enum:
        EINPROGRESS
        EMFILE
        ENFILE
        ECONNRESET
        EPIPE
        ECONNABORTED
        ENOBUFS
        ENOMEM
        ETIMEDOUT
        ECONNREFUSED
        ENETUNREACH
        ENETDOWN
        EAFNOSUPPORT
        EADDRNOTAVAIL
        EHOSTUNREACH
        EHOSTDOWN
        EACCES
        EPERM


# ---------------------------------------------------------------------- SOCKS5 UDP header
# What the UDP header codec in _relay.pyx needs beyond the declarations above.

cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)
    enum:
        INET_ADDRSTRLEN
        INET6_ADDRSTRLEN


# ---------------------------------------------------------------------- UDP batches
# What the UDP relay in _relay.pyx needs: recvmmsg/sendmmsg (Linux, _GNU_SOURCE, which
# pyconfig.h defines) and their message headers.

from posix.time cimport timespec


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len


cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    int recvmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags, timespec *timeout)
    int sendmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)

    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)

    enum:
        MSG_TRUNC


cdef extern from "<netinet/in.h>" nogil:
    uint16_t ntohs(uint16_t x)


cdef extern from "<netinet/udp.h>" nogil:
    enum:
        SOL_UDP
        UDP_SEGMENT     # UDP GSO (Linux 4.18): one sendmsg, many datagrams of one size
