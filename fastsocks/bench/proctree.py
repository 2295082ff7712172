"""A process tree as psutil sees it: CPU seconds, RSS and PSS, and which processes hold a
listening TCP socket on a port (how the proxy is found without --proxy-pid).

CPU is user + system + children's user + children's system summed over the live tree
(zombies included: their time moves into the parent's once they are reaped): a child that
exits between two samples moves its time into its parent's, so before/after differences
stay right across worker respawns. PSS is ``memory_full_info().pss`` (smaps_rollup).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import psutil


@dataclass(frozen=True, slots=True)
class Sample:
    pids: tuple[int, ...]
    cpu_s: float
    rss_bytes: int
    pss_bytes: int | None  # None when some process's PSS was unreadable


class ProcessTree:
    """Some root processes and all their descendants, re-listed at every sample."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = sorted(set(roots))

    def processes(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for pid in self.roots:
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(pid)
                found.update((p.pid, p) for p in [root, *root.children(recursive=True)])
        return [found[pid] for pid in sorted(found)]

    def pids(self) -> list[int]:
        return [proc.pid for proc in self.processes()]

    def sample(self, memory: bool = False) -> Sample:
        pids, cpu_s, rss, pss = [], 0.0, 0, 0
        for proc in self.processes():
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    if memory:
                        rss_one, pss_one = proc.memory_info().rss, _pss_bytes(proc)
            except psutil.NoSuchProcess:
                continue  # gone since it was listed
            pids.append(proc.pid)
            cpu_s += times.user + times.system + times.children_user + times.children_system
            if memory:
                rss += rss_one
                pss = None if pss is None or pss_one is None else pss + pss_one
        return Sample(tuple(pids), cpu_s, rss, pss if memory else None)


def _pss_bytes(proc: psutil.Process) -> int | None:
    try:
        return proc.memory_full_info().pss
    except (psutil.AccessDenied, psutil.ZombieProcess):
        return None  # another user's process, or one that has no memory any more


def pids_listening_on(port: int, exclude: set[int] = frozenset()) -> list[int]:
    """Processes holding a TCP socket (IPv4 or IPv6, any address) that listens on ``port``
    (the owner of a socket is known for processes we may inspect: the same user, or root).

    psutil names one holder per socket, while a prefork server's master holds its workers'
    listening sockets too: each holder's ancestors that also listen on the port are added."""
    found = {conn.pid for conn in psutil.net_connections(kind="tcp")
             if conn.pid is not None and _is_listener(conn, port)}
    for pid in list(found):
        found.update(_listening_ancestors(pid, port))
    return sorted(found - set(exclude))


def _is_listener(conn, port: int) -> bool:
    return conn.status == psutil.CONN_LISTEN and bool(conn.laddr) and conn.laddr.port == port


def _listening_ancestors(pid: int, port: int) -> list[int]:
    ancestors = []
    with contextlib.suppress(psutil.NoSuchProcess):
        for parent in psutil.Process(pid).parents():
            try:
                if not any(_is_listener(conn, port) for conn in parent.net_connections(kind="tcp")):
                    break
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                break
            ancestors.append(parent.pid)
    return ancestors


def process_cpu_seconds(pid: int) -> float | None:
    """One process's own user + system time (no children); None once it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return None
    return times.user + times.system


def reap(pid: int, timeout_s: float) -> None:
    """Wait for our child ``pid`` to exit; SIGKILL it after ``timeout_s``."""
    try:
        proc = psutil.Process(pid)
        try:
            proc.wait(timeout_s)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait()
    except psutil.NoSuchProcess:
        pass
