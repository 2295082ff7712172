"""Privilege drop: bind as root, then run as an unprivileged user (``--user``/``--group``).

Theory of operation
-------------------
The master opens the listening sockets (a port below 1024 needs root) and the shared maps,
raises the open-file limit, then calls ``drop()`` before it forks the first worker, so
that no worker ever runs as root. ``drop()`` sets the supplementary groups (the user's,
with ``initgroups``, or only the group given), the group, then the user, and checks that
root cannot be regained. Linux makes a process that changed its ids non-dumpable, which
puts its ``/proc/PID`` files out of reach of its own user: the master could no longer read
its workers' open fds and memory (psutil). ``drop()`` makes it dumpable again, as nginx
does; a process that can no longer become root loses nothing by that (Yama's default
ptrace scope still keeps other processes of the user from attaching).

What is read after the drop must be readable by the user: the config file and the users
file, re-read on SIGHUP. ``readable()`` tries each one as that user and the start fails,
naming the file, if one is not. Python imports some modules only when they are first used
(the IDNA codec of a name lookup, the UDP relay of a first UDP ASSOCIATE): ``PRELOAD`` is
imported before the drop, so a Python installed where the user cannot read (under
``/root``) still serves everything.
"""

from __future__ import annotations

import ctypes
import grp
import importlib
import logging
import os
import pwd
from dataclasses import dataclass

from fastsocks.errors import BootError

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4  # <linux/prctl.h>

# Imported lazily by the worker or the standard library, so after the drop unless here.
PRELOAD = ("encodings.idna", "fastsocks._relay", "fastsocks.udp", "fastsocks.bind",
           "concurrent.futures.thread", "stringprep", "unicodedata")


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    uid: int
    group: str
    gid: int

    def __str__(self) -> str:
        return f"user {self.user} (uid {self.uid}), group {self.group} (gid {self.gid})"


def resolve(user: str | None, group: str | None) -> Identity | None:
    """Who ``--user``/``--group`` name (a group alone: the current user in that group);
    None when neither is given. Raises KeyError with what is unknown."""
    if user is None and group is None:
        return None
    try:
        pw = pwd.getpwnam(user) if user is not None else pwd.getpwuid(os.getuid())
    except KeyError:
        raise KeyError(f"no such user {user!r}") from None
    try:
        gr = grp.getgrnam(group) if group is not None else grp.getgrgid(pw.pw_gid)
    except KeyError:
        raise KeyError(f"no such group {group!r}" if group is not None
                       else f"user {pw.pw_name!r} has no group {pw.pw_gid}") from None
    return Identity(pw.pw_name, pw.pw_uid, gr.gr_name, gr.gr_gid)


def drop(who: Identity, supplementary_from_user: bool) -> None:
    """Become ``who`` for good. Not root: only a no-op "drop" to the ids already held."""
    if os.geteuid() != 0:
        if (os.getuid(), os.getgid()) == (who.uid, who.gid):
            return
        raise BootError(f"cannot run as {who}: only root can change users, and this is uid {os.geteuid()}")
    for name in PRELOAD:
        importlib.import_module(name)
    try:
        if supplementary_from_user:
            os.initgroups(who.user, who.gid)
        else:
            os.setgroups([who.gid])
        os.setgid(who.gid)
        os.setuid(who.uid)
    except OSError as exc:
        raise BootError(f"cannot run as {who}: {exc.strerror}") from exc
    if who.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise BootError(f"dropped to {who}, yet root could be regained: refusing to run")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_DUMPABLE): %s: worker facts (fds, memory) may be unreadable",
                    os.strerror(ctypes.get_errno()))
    log.info("running as %s", who)


def readable(paths: list[str], who: Identity) -> None:
    """Raise BootError for the first of ``paths`` that this process cannot read."""
    for path in paths:
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise BootError(f"{path}: cannot read it as {who.user}: {exc.strerror}; SIGHUP re-reads it, "
                            f"so make it readable by that user (e.g. chgrp {who.group} {path} && "
                            f"chmod g+r {path})") from exc
