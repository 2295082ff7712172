"""What Python sees of the compiled load generator and target server (fastsocks/bench/_loadgen.pyx)."""

from collections.abc import Buffer

ERROR_KINDS: tuple[str, ...]  # keys of LoadGen.result()["errors"]
MODES: tuple[str, str, str, str]  # "bulk", "cps", "rr", "idle"
PATTERN_PERIOD: int
MAGIC: int
VERSION: int
HEADER_SIZE: int
RESULT_SIZE: int
FLAG_DOWNLOAD: int
FLAG_UPLOAD: int
FLAG_VERIFY: int
RESULT_UNCHECKED: int
RESULT_INTACT: int
RESULT_CORRUPT: int

def pattern_bytes(offset: int, n: int) -> bytes:
    """n bytes of the payload stream from offset (it repeats every PATTERN_PERIOD bytes)."""

def sort_samples(values: Buffer) -> None:
    """Sort a writable buffer of uint32 ('I') in place."""

def monotonic_ns() -> int:
    """CLOCK_MONOTONIC, the clock of every *_ns figure (same as time.monotonic_ns())."""

class Pattern:
    """The payload stream, one period twice in a read-only memfd mapping."""

    def __init__(self) -> None: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...

# (established, ok, errors, bytes moved, started)
Progress = tuple[int, int, int, int, int]

class LoadGen:
    def __init__(
        self,
        pattern: Pattern,
        *,
        mode: str,
        connections: int,
        family: int,
        host: str,
        port: int,
        greeting: bytes | None = None,
        auth: bytes | None = None,
        request: bytes | None = None,
        size: int = 64,
        bulk_bytes: int = 0,
        download: bool = True,
        upload: bool = False,
        verify: bool = False,
        limit: int = 0,
        timeout_s: float = 10.0,
        open_limit: int = 128,
        buffer_size: int = 1 << 20,
        max_samples: int = 1 << 24,
        pipe_size: int = 1 << 20,
        max_events: int = 512,
        source_addresses: int = 1,
    ) -> None:
        """greeting/auth/request: SOCKS5 messages to send (None: connect directly)."""
    def establish(self) -> None:
        """bulk, rr, idle: open and park every connection; then run() until True."""
    def go(self, duration_s: float = 0.0) -> None:
        """Start the measured work now; nothing new starts after duration_s (if > 0)."""
    def run(self, max_s: float) -> bool:
        """Drive the connections for at most max_s; True once the phase is over."""
    def abort(self) -> None: ...
    def progress(self) -> Progress: ...
    def result(self) -> dict[str, object]: ...
    def stream_seconds(self) -> list[float]: ...
    def latencies(self) -> bytes:
        """Sorted latency samples in ns, native uint32."""
    def close(self) -> None: ...

class TargetServer:
    def __init__(self, listen_fd: int, pattern: Pattern, *, buffer_size: int = 1 << 20,
                 pipe_size: int = 1 << 20, max_events: int = 512) -> None: ...
    def serve(self, stop_fd: int) -> None:
        """Serve until stop_fd is readable (data or EOF)."""
    def counters(self) -> tuple[int, int, int, int]:
        """(accepted, echoed bytes, source bytes sent, sink bytes received)"""
    def close(self) -> None: ...
