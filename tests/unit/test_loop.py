"""The worker loop's timers: a cancelled one lets its callback go at once (a handshake timer
holds its session), and the heap is rebuilt without cancelled entries once they are most
of it; due timers still run in order."""

import gc
import weakref

from fastsocks.loop import Loop


class Session:
    def on_timeout(self) -> None:
        pass


def test_a_cancelled_timer_lets_its_session_go():
    loop = Loop()
    session = Session()
    timer = loop.call_later(60, session.on_timeout)
    gone = weakref.ref(session)
    del session
    timer.cancel()
    gc.collect()
    assert gone() is None
    timer.cancel()  # idempotent
    loop.close()


def test_cancelled_timers_do_not_pile_up_in_the_heap():
    loop = Loop()
    ran = []
    keep = [loop.call_later(0, lambda i=i: ran.append(i)) for i in range(3)]
    for _ in range(10_000):  # a burst of handshakes, each answered well before its deadline
        loop.call_later(60, lambda: None).cancel()
    assert len(loop._timers) < 2 * Loop.COMPACT_AT + len(keep)
    loop.run_once(0)
    assert ran == [0, 1, 2]
    loop.close()


def test_due_cancelled_timers_are_skipped_and_counted_out():
    loop = Loop()
    ran = []
    timers = [loop.call_later(0, lambda i=i: ran.append(i)) for i in range(5)]
    timers[1].cancel()
    timers[3].cancel()
    loop.run_once(0)
    assert ran == [0, 2, 4]
    assert loop._timers == [] and loop._cancelled == 0
    loop.close()


def test_timeout_is_capped_by_the_next_timer_and_run_timers_runs_only_what_is_due():
    loop = Loop()
    ran = []
    try:
        assert loop.timeout(1.0) == 1.0
        loop.call_later(0.0, lambda: ran.append("due"))
        loop.call_later(60.0, lambda: ran.append("later"))
        assert loop.timeout(1.0) == 0.0
        loop.run_timers()
        assert ran == ["due"]
        assert 59.0 < loop.timeout(3600.0) <= 60.0
        assert loop.fileno() == loop.selector.fileno() >= 0
    finally:
        loop.close()
