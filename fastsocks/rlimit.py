"""The open-file limit: every relayed session holds two sockets (and up to two pipes while
streaming), an idle benchmark thousands; the soft RLIMIT_NOFILE is often 1024."""

from __future__ import annotations

import resource

UNLIMITED_TARGET = 1 << 20  # where the hard limit is RLIM_INFINITY


def raise_fd_limit(wanted: int | None = None) -> int:
    """Lift the soft RLIMIT_NOFILE to ``wanted`` (None: as far as the hard limit allows),
    never lower it, and return the soft limit now; children inherit it. OSError or
    ValueError when the kernel refuses (the limit is then as it was)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    target = ceiling if wanted is None else min(ceiling, max(soft, wanted))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
