"""What a burst leaves behind: a fresh 2-worker server per burst, measured from the outside
(the whole process tree's PSS and open fds, psutil), before the burst and until it has given
back what the burst took: fds within baseline + 16, PSS within baseline + 5 MiB. The bursts
are benchmarks/bursts.py's (which prints the same figures): 200 parallel 5 MB streams each
way, 500 wrong passwords from one address, 3000 short connections, 2000 handshakes that
never finish."""

from __future__ import annotations

import time

import bursts  # benchmarks/bursts.py (pyproject puts benchmarks/ on sys.path)
from support import fastsocks_command

FDS_LEFT = 16
PSS_LEFT_BYTES = 5 << 20
GIVE_BACK_S = 20.0  # the pipe pool and the heap are trimmed within seconds of going quiet


def given_back(proxy: bursts.Proxy, before: bursts.Usage) -> bursts.Usage:
    """What is left once it is back within the limits, or after GIVE_BACK_S."""
    deadline = time.monotonic() + GIVE_BACK_S
    while True:
        grown = proxy.usage() - before
        if (grown.fds <= FDS_LEFT and grown.pss_bytes <= PSS_LEFT_BYTES) or time.monotonic() > deadline:
            return grown
        time.sleep(0.5)


def burst(name: str) -> tuple[dict, bursts.Usage]:
    result = bursts.run_burst(name, fastsocks_command(), workers=2, left=given_back)
    return result.outcome, result.grown


def test_a_burst_of_streams_leaves_no_pipes_behind():
    outcome, grown = burst("streams")
    assert outcome["intact"] == outcome["streams"] == 200  # every byte, both ways
    assert grown.fds <= FDS_LEFT, f"{grown.fds} more fds than before the burst: the splice pipe pool kept them"
    assert grown.pss_bytes <= PSS_LEFT_BYTES, f"PSS +{grown.pss_bytes / 2**20:.1f} MiB"


def test_a_burst_of_wrong_passwords_gives_its_memory_back():
    outcome, grown = burst("passwords")
    assert outcome["ok"] == 0 and outcome["failed"] >= 10 and outcome["closed"] > 0  # blocked, as designed
    assert grown.pss_bytes <= PSS_LEFT_BYTES, f"PSS +{grown.pss_bytes / 2**20:.1f} MiB: scrypt's work areas kept"
    assert grown.fds <= FDS_LEFT


def test_a_burst_of_short_connections_gives_its_memory_back():
    outcome, grown = burst("short")
    assert outcome["echoed"] == outcome["connections"] == 3000
    assert grown.pss_bytes <= PSS_LEFT_BYTES, f"PSS +{grown.pss_bytes / 2**20:.1f} MiB"
    assert grown.fds <= FDS_LEFT


def test_a_burst_of_unfinished_handshakes_gives_its_memory_back():
    outcome, grown = burst("halfopen")
    assert outcome["cut"] == outcome["handshakes"] == 2000
    assert grown.pss_bytes <= PSS_LEFT_BYTES, f"PSS +{grown.pss_bytes / 2**20:.1f} MiB"
    assert grown.fds <= FDS_LEFT
