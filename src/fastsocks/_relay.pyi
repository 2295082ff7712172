"""What Python sees of the Cython relay engine (fastsocks/_relay.pyx).

The pure-Python twin fastsocks._relay_py.RelayEngine has the same surface and is the
reference the tests check the fast engine against.
"""

from collections.abc import Buffer

REASONS: tuple[str, str, str, str]

# (tag, bytes_up, bytes_down, reason, errno); reason is one of REASONS.
Ended = tuple[int, int, int, str, int]

class RelayEngine:
    def __init__(
        self,
        *,
        buffer_size: int = 65536,
        splice: bool = True,
        pipe_size: int = 1 << 20,
        max_pipes: int = 1024,
        pipe_pool: int = 64,
        idle_timeout_s: float = 300.0,
        max_events: int = 256,
    ) -> None: ...
    def fileno(self) -> int: ...
    @property
    def active(self) -> int: ...
    @property
    def pending(self) -> bool: ...
    def counters(self) -> tuple[int, int, int, int, int]:
        """(bytes_up, bytes_down, sessions_total, splice_switches, pipes_open)"""
    def add(self, client_fd: int, upstream_fd: int, tag: int, initial_up: Buffer | None = None) -> None:
        """Relay a session; the engine owns both (non-blocking) fds from now on, also on failure."""
    def run(self) -> list[Ended]: ...
    def expire_idle(self) -> list[Ended]: ...
    def close_all(self) -> list[Ended]: ...
    def close(self) -> list[Ended]: ...
