"""The values both relay engines hand back (the compiled _relay and its twin _relay_py)."""

from typing import NamedTuple

# "failed": a session of the engine's own handshake (RelayEngine.front) that never relayed:
# its reply (a SOCKS5 code, as the access log names it, or -1: none could be sent) and why.
REASONS = ("eof", "error", "idle", "shutdown", "failed")

NO_REPLY = -1


class Ended(NamedTuple):
    """A session that ended: its tag (the session id), the bytes it moved each way, why it
    ended (one of REASONS) and, for "error" and a failed connect, the errno.

    A session the engine accepted itself also says who asked for what (``described``,
    the access line's opening, as access.describe writes it) and since when (``started_s``,
    time.monotonic()); one that failed, the reply it got and ``why`` in words."""
    tag: int
    bytes_up: int
    bytes_down: int
    reason: str
    errno: int
    described: str = ""
    started_s: float = 0.0
    reply: int = 0
    why: str = ""
