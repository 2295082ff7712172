"""A process tree as /proc shows it: CPU seconds, RSS and PSS, and which processes hold
a listening TCP socket on a port (how the proxy is found without --proxy-pid).

Linux only, no third-party module. CPU is utime + stime + cutime + cstime summed over the
live tree: a child that exits between two samples moves its time into its parent's
cutime, so before/after differences stay right across worker respawns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
TCP_LISTEN = "0A"


@dataclass(frozen=True, slots=True)
class Sample:
    pids: tuple[int, ...]
    cpu_s: float
    rss_bytes: int
    pss_bytes: int | None  # None when some smaps_rollup was unreadable


class ProcessTree:
    """Some root processes and all their descendants, re-listed at every sample."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = sorted(set(roots))

    def pids(self) -> list[int]:
        return descendants_and_self(self.roots)

    def sample(self, memory: bool = False) -> Sample:
        pids = self.pids()
        rss, pss = memory_bytes(pids) if memory else (0, None)
        return Sample(tuple(pids), cpu_seconds(pids), rss, pss)


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3, state, comes first)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        fields = stat_fields(pid)
        if fields:
            ticks += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return ticks / TICKS_PER_S


def memory_bytes(pids: list[int]) -> tuple[int, int | None]:
    """(RSS, PSS) summed over pids; PSS is None when any process's could not be read."""
    rss, pss = 0, 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss += int(f.read().split()[1]) * PAGE_BYTES
        except (OSError, IndexError, ValueError):
            continue  # gone
        value = _pss_bytes(pid)
        pss = None if value is None or pss is None else pss + value
    return rss, pss


def _pss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def descendants_and_self(roots: list[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields and fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    seen: set[int] = set()
    todo = [pid for pid in roots if os.path.exists(f"/proc/{pid}")]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, ()))
    return sorted(seen)


def listening_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets (IPv4 and IPv6) listening on ``port``, any address."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, state, inode = fields[1], fields[3], int(fields[9])
                    if state == TCP_LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(inode)
        except (OSError, StopIteration):
            continue
    return inodes


def pids_listening_on(port: int, exclude: set[int] = frozenset()) -> list[int]:
    """Processes holding a socket that listens on ``port`` (needs permission to read their
    /proc/PID/fd: the same user, or root)."""
    wanted = {f"socket:[{inode}]" for inode in listening_inodes(port)}
    found = []
    if not wanted:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in wanted:
                    found.append(int(entry))
                    break
            except OSError:
                continue
    return sorted(found)


def process_cpu_seconds(pid: int) -> float | None:
    """One process's own utime + stime (no children)."""
    fields = stat_fields(pid)
    return None if not fields else (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def reap(pid: int, timeout_s: float) -> None:
    """Wait for our child ``pid`` to exit; SIGKILL it after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(ChildProcessError):
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.01)
