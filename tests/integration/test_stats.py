"""The shared stats map: what a worker writes is what the master reads, across fork."""

import os
import time

from fastsocks.stats import SharedStats, SlotStats


def test_a_forked_writer_is_seen_by_the_parent():
    stats = SharedStats(3)
    stats.reset(1, 0, 10.0)
    pid = os.fork()
    if pid == 0:
        stats.write(1, SlotStats(os.getpid(), 1234.5, 7, 2, 1 << 40, 99, 5, 1))
        os._exit(0)
    os.waitpid(pid, 0)
    assert stats.read(1) == SlotStats(pid, 1234.5, 7, 2, 1 << 40, 99, 5, 1)
    assert stats.heartbeat(1) == 1234.5
    assert stats.read(0) == SlotStats(0, 0.0, 0, 0, 0, 0, 0, 0, 0)
    stats.close()


def test_reset_keeps_cumulative_counts_for_the_next_worker():
    stats = SharedStats(1)
    stats.write(0, SlotStats(111, 1.0, 50, 3, 1000, 2000, 40, 2))
    now = time.monotonic()
    stats.reset(0, 222, now)
    assert stats.read(0) == SlotStats(222, now, 50, 0, 1000, 2000, 40, 2)
    stats.close()
