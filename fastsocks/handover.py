"""One reading per reload: the master reads and checks the files once, every worker gets
that very reading.

Theory of operation
-------------------
Each worker has a control channel to its master: a SOCK_SEQPACKET socketpair (messages
that keep their bounds, and an end of file when the other side closes) made before the
fork, one end kept by each side. On SIGHUP the master loads the config and users files,
checks them, pickles the result once into an anonymous memory file (``memfd_create``) and
sends each worker a one-byte message that carries, through SCM_RIGHTS, that file's
descriptor. The worker reads the file from its event loop. So no
worker reads the files itself, and a file edited while a reload goes on cannot leave the
workers on different rule sets. A worker forked later (a respawn) inherits the master's
current objects. Sending never blocks the master: the message is one byte, and a
worker so stuck that its queue is full is about to be killed anyway (its heartbeat stops).

The channel joins a master and its own children only, so unpickling what comes through it
trusts no one new.
"""

from __future__ import annotations

import os
import pickle
import socket
from typing import NamedTuple

from fastsocks.settings import Settings
from fastsocks.users import UserDB

_OFFER = b"R"  # the message: a byte, and the reading's fd beside it


class Reading(NamedTuple):
    """One validated reading of the configuration, as every worker applies it."""
    generation: int
    settings: Settings
    users: UserDB | None


class ControlChannel:
    """The socketpair between the master and one worker; each side closes the other's end
    after the fork (``in_master`` / ``in_worker``)."""

    def __init__(self) -> None:
        self.master_sock, self.worker_sock = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)

    def in_master(self) -> socket.socket:
        self.worker_sock.close()
        return self.master_sock

    def in_worker(self) -> socket.socket:
        self.master_sock.close()
        return self.worker_sock


def publish(reading: Reading) -> int:
    """The reading, pickled once into a memfd: its descriptor (the caller closes it)."""
    data = pickle.dumps(reading, protocol=pickle.HIGHEST_PROTOCOL)
    fd = os.memfd_create("fastsocks-reading", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        os.close(fd)
        raise
    return fd


def send(sock: socket.socket, fd: int) -> bool:
    """Offer the reading in ``fd`` to one worker; False if its queue is full. OSError if
    its end is gone (the worker exited: it is reaped next) or the kernel refuses."""
    try:
        socket.send_fds(sock, [_OFFER], [fd])
    except BlockingIOError:
        return False
    return True


def receive(sock: socket.socket) -> Reading | None:
    """The newest reading waiting on the worker's end (older ones are skipped: the newest
    replaces them whole), or None; EOFError once the master's end is closed."""
    newest = None
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, len(_OFFER), 1, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            break
        if not data and not fds:
            raise EOFError("the master closed its end")
        offered = fds[:1] if data == _OFFER else []
        for fd in fds[len(offered):]:
            os.close(fd)
        if offered:
            if newest is not None:
                os.close(newest)
            newest = offered[0]
    if newest is None:
        return None
    try:
        reading = pickle.loads(_read_whole(newest))
    finally:
        os.close(newest)
    return reading if isinstance(reading, Reading) else None


def _read_whole(fd: int) -> bytes:
    """pread from 0: every worker holds the same open file, and so shares its offset."""
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
