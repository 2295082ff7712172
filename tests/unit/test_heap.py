"""When a worker gives its free heap back (heap.TrimPolicy): after activity, once quiet, at
most every MIN_INTERVAL_S, and now and then while it stays busy."""

from fastsocks.heap import Heap, TrimPolicy


def test_nothing_happened_nothing_to_trim():
    policy = TrimPolicy(now_s=0.0)
    assert not policy.due(100.0, activity=0, accepts_last_tick=0)


def test_a_quiet_worker_trims_after_activity_at_most_every_interval():
    policy = TrimPolicy(now_s=0.0)
    assert not policy.due(TrimPolicy.MIN_INTERVAL_S / 2, activity=5, accepts_last_tick=0)
    assert policy.due(TrimPolicy.MIN_INTERVAL_S, activity=5, accepts_last_tick=0)
    policy.trimmed(TrimPolicy.MIN_INTERVAL_S, activity=5)
    assert not policy.due(100.0, activity=5, accepts_last_tick=0)        # nothing since
    assert policy.due(100.0, activity=6, accepts_last_tick=0)


def test_a_busy_worker_waits_for_quiet_or_the_busy_interval():
    policy = TrimPolicy(now_s=0.0)
    busy = TrimPolicy.QUIET_ACCEPTS + 1
    assert not policy.due(10.0, activity=1000, accepts_last_tick=busy)
    assert policy.due(10.0, activity=1000, accepts_last_tick=TrimPolicy.QUIET_ACCEPTS)
    assert policy.due(TrimPolicy.BUSY_INTERVAL_S, activity=1000, accepts_last_tick=busy)


def test_glibc_is_found_here():
    # Linux with glibc (Debian, CI): both calls exist; elsewhere the heap is left alone.
    assert Heap().available
