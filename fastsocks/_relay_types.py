"""The values both relay engines hand back (the compiled _relay and its twin _relay_py)."""

from typing import NamedTuple

REASONS = ("eof", "error", "idle", "shutdown")


class Ended(NamedTuple):
    """A relayed session that ended: its tag (the session id), the bytes it moved each
    way, why it ended (one of REASONS) and, for "error", the errno."""
    tag: int
    bytes_up: int
    bytes_down: int
    reason: str
    errno: int
