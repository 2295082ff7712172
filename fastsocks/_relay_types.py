"""The values both relay engines hand back (the compiled _relay and its twin _relay_py),
and how both read their gate's answer to a request."""

from typing import NamedTuple

# "failed": a session of the engine's own handshake (RelayEngine.front) that never relayed:
# its reply (a SOCKS5 code, as the access log names it, or -1: none could be sent) and why.
# "quota": its user's quota (add(quota=...)) was used up while it ran.
REASONS = ("eof", "error", "idle", "shutdown", "failed", "quota")

NO_REPLY = -1

# What decided a CONNECT (Ended.rule), besides a rule's index into Policy.rules (0: "#1").
RULE_DEFAULT = -1  # the rules' default action (also: no rules to ask, judge_request off)
RULE_NONE = -2     # no rule: the session ended before its request was judged, or a cap refused it


class Ended(NamedTuple):
    """A session that ended: its tag (the session id), the bytes it moved each way, why it
    ended (one of REASONS) and, for "error" and a failed connect, the errno.

    A session the engine accepted itself also says who asked for what (``described``,
    the access line's opening, as access.describe writes it) and since when (``started_s``,
    time.monotonic()); one that failed, the reply it got and ``why`` in words; and, as
    numbers for the access log and the metrics, what decided its CONNECT (``rule``) and how
    long its phases took: ``handshake_s`` from accept to the request read, ``connect_s``
    the outbound connect (success or failure); None for a phase it never reached."""
    tag: int
    bytes_up: int
    bytes_down: int
    reason: str
    errno: int
    described: str = ""
    started_s: float = 0.0
    reply: int = 0
    why: str = ""
    rule: int = RULE_NONE
    handshake_s: float | None = None
    connect_s: float | None = None


# A limited direction's token bucket (add()/front() rate_*_bytes_per_s; the theory is in
# _relay.pyx, "Rates"); both engines take these numbers from here.
RATE_BURST_S = 0.1             # the bucket holds 100 ms of the rate...
RATE_MIN_BURST_BYTES = 16384   # ...and never less than 16 KiB
RATE_RESUME_S = 0.01           # an empty bucket waits for 10 ms of the rate...
RATE_MIN_RESUME_BYTES = 16384  # ...and never less than 16 KiB (never more than the bucket)


def bucket_bytes(rate_bytes_per_s: float) -> tuple[float, float]:
    """(burst, resume) of a bucket at this rate: its size, and what an empty one waits for."""
    return (max(rate_bytes_per_s * RATE_BURST_S, RATE_MIN_BURST_BYTES),
            max(rate_bytes_per_s * RATE_RESUME_S, RATE_MIN_RESUME_BYTES))


def rate_checked(name: str, value) -> int:
    """A rate_*_bytes_per_s argument, checked: an int >= 0 (0: no limit); else ValueError."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}: bytes per second, 0 (no limit) or more, not {value!r}")
    return value


def gate_answer(answer) -> tuple[int, str, int]:
    """A FrontGate.request() answer (_relay.pyi), checked, as (reply code, why, rule): code
    0 goes on. Raises ValueError for anything else: the engine refuses that session."""
    if answer is None:
        return 0, "", RULE_DEFAULT
    if isinstance(answer, int) and not isinstance(answer, bool):
        if answer < RULE_DEFAULT:
            raise ValueError(f"gate.request(): a rule's index or {RULE_DEFAULT}, not {answer!r}")
        return 0, "", answer
    code, why, rule = answer if len(answer) == 3 else (*answer, RULE_NONE)
    if not (isinstance(code, int) and 1 <= code <= 255) or not isinstance(why, str):
        raise ValueError(f"gate.request(): None, a rule or (reply code 1-255, why[, rule]), not {answer!r}")
    if not (isinstance(rule, int) and rule >= RULE_NONE):
        raise ValueError(f"a refusal's rule is an index, {RULE_DEFAULT} or {RULE_NONE}, not {rule!r}")
    return code, why, rule


def egress_index(key: bytes, count: int) -> int:
    """Which of ``count`` egress addresses a sticky session takes: FNV-1a (32 bits) of
    ``key`` (the client's packed address, or the user name), modulo ``count``. The engine
    computes the same, so a client keeps its address whichever path serves it."""
    h = 2166136261
    for byte in key:
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h % count
