"""The relay engine and its pure-Python twin, driven through real loopback TCP sockets.

Each case runs on both implementations: the Cython engine must behave exactly like the
simple reference.
"""

from __future__ import annotations

import hashlib
import os
import selectors
import socket
import threading
import time

import pytest

from support import OneWay, Relay, fd_count, limited_engine, tcp_pair  # noqa: F401 (a fixture)

from fastsocks import _relay, _relay_py
from fastsocks._relay_types import Ended, bucket_bytes

ENGINES = {"cython": _relay.RelayEngine, "python": _relay_py.RelayEngine}


@pytest.fixture(params=sorted(ENGINES))
def engine_cls(request):
    return ENGINES[request.param]


def test_bytes_flow_both_ways_and_counters_add_up(engine_cls):
    engine = engine_cls()
    relay = Relay(engine)
    relay.app_client.sendall(b"hello upstream")
    relay.app_upstream.sendall(b"hello client")
    got = {}

    def read(sock, key, n):
        data = b""
        while len(data) < n:
            data += sock.recv(n - len(data))
        got[key] = data

    readers = [threading.Thread(target=read, args=(relay.app_upstream, "up", 14)),
               threading.Thread(target=read, args=(relay.app_client, "down", 12))]
    for t in readers:
        t.start()
    relay.pump(lambda: len(got) == 2)
    assert got == {"up": b"hello upstream", "down": b"hello client"}
    relay.app_client.shutdown(socket.SHUT_WR)
    relay.app_upstream.shutdown(socket.SHUT_WR)
    relay.pump(lambda: relay.ended)
    assert relay.ended == [Ended(7, 14, 12, "eof", 0)]
    assert engine.active == 0
    up, down, sessions, _, _ = engine.counters()
    assert (up, down, sessions) == (14, 12, 1)
    relay.close_apps()
    engine.close()


def test_large_transfer_each_way_is_intact(engine_cls):
    engine = engine_cls()
    relay = Relay(engine)
    payload_up = os.urandom(1 << 20) * 12     # 12 MiB: enough for the splice switch
    payload_down = os.urandom(1 << 20) * 12
    digests = {}

    def send(sock, data):
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    def drain(sock, key):
        h, n = hashlib.sha256(), 0
        while chunk := sock.recv(1 << 16):
            h.update(chunk)
            n += len(chunk)
        digests[key] = (h.hexdigest(), n)

    threads = [threading.Thread(target=send, args=(relay.app_client, payload_up)),
               threading.Thread(target=send, args=(relay.app_upstream, payload_down)),
               threading.Thread(target=drain, args=(relay.app_upstream, "up")),
               threading.Thread(target=drain, args=(relay.app_client, "down"))]
    for t in threads:
        t.start()
    relay.pump(lambda: relay.ended, timeout_s=60)
    for t in threads:
        t.join(10)
    assert digests["up"] == (hashlib.sha256(payload_up).hexdigest(), len(payload_up))
    assert digests["down"] == (hashlib.sha256(payload_down).hexdigest(), len(payload_down))
    assert relay.ended == [Ended(7, len(payload_up), len(payload_down), "eof", 0)]
    relay.close_apps()
    engine.close()


def test_streaming_switches_cython_engine_to_splice():
    engine = _relay.RelayEngine(buffer_size=16384)
    relay = Relay(engine)
    payload = os.urandom(4 << 20)
    received = bytearray()

    def drain():
        while chunk := relay.app_upstream.recv(1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    threading.Thread(target=lambda: (relay.app_client.sendall(payload),
                                     relay.app_client.shutdown(socket.SHUT_WR))).start()
    relay.pump(lambda: not reader.is_alive() or len(received) == len(payload))
    assert bytes(received) == payload
    assert engine.counters()[3] >= 1, "a 4 MiB stream should have switched to splice()"
    relay.close_apps()
    relay.pump(lambda: relay.ended)
    engine.close()


def stream_through(engine, streams: int, size: int = 4 << 20) -> None:
    """``streams`` sessions at once, each streaming ``size`` bytes up, then ended."""
    relays = [Relay(engine, tag=i) for i in range(streams)]
    payload = os.urandom(size)
    received = [bytearray() for _ in relays]

    def drain(relay, into):
        while chunk := relay.app_upstream.recv(1 << 16):
            into.extend(chunk)

    readers = [threading.Thread(target=drain, args=(r, into)) for r, into in zip(relays, received)]
    writers = [threading.Thread(target=lambda r=r: (r.app_client.sendall(payload),
                                                    r.app_client.shutdown(socket.SHUT_WR))) for r in relays]
    for t in readers + writers:
        t.start()
    # Let the writers fill the socket buffers first: a direction turns to splice after three
    # full reads in a row, and an engine that outruns Python writer threads (a loaded CI
    # machine) would read short chunks and never stream.
    time.sleep(0.3)
    relays[0].pump(lambda: all(len(into) == size for into in received))
    for r in relays:
        r.close_apps()
    ended = []
    relays[0].pump(lambda: (ended.extend(engine.run()), len(ended) + sum(map(len, (r.ended for r in relays))) >= streams)[1])
    for t in readers + writers:
        t.join(5)


def test_idle_pooled_pipes_are_closed_down_to_the_reserve():
    """A burst of streams leaves its pipes in the pool; the ones no session takes for
    pipe_idle_s are closed by expire_idle(), but pipe_reserve of them."""
    start = fd_count()
    engine = _relay.RelayEngine(buffer_size=16384, pipe_reserve=1, pipe_idle_s=0.05, idle_timeout_s=0)
    before = fd_count()
    stream_through(engine, streams=4)
    pooled = engine.counters()[4]
    assert pooled >= 2, "the streams should have left pipes in the pool"
    assert fd_count() - before == 2 * pooled
    deadline = time.monotonic() + 5
    while engine.counters()[4] > 1 and time.monotonic() < deadline:
        time.sleep(0.06)
        engine.expire_idle()
    assert engine.counters()[4] == 1          # the reserve
    assert fd_count() - before == 2           # its two ends, nothing else
    stream_through(engine, streams=1)         # and the pool still serves
    assert engine.counters()[3] >= 5
    engine.close()
    assert fd_count() == start


def test_a_pipe_in_use_is_never_trimmed():
    engine = _relay.RelayEngine(buffer_size=16384, pipe_reserve=0, pipe_idle_s=0.0, idle_timeout_s=0)
    relay = Relay(engine)
    payload = os.urandom(4 << 20)
    received = bytearray()
    reader = threading.Thread(target=lambda: [received.extend(c) for c in iter(lambda: relay.app_upstream.recv(1 << 16), b"")])
    reader.start()
    writer = threading.Thread(target=relay.app_client.sendall, args=(payload,))
    writer.start()
    relay.pump(lambda: (engine.expire_idle(), len(received) == len(payload))[1])  # trimming all along
    assert bytes(received) == payload and engine.counters()[3] >= 1
    relay.app_client.shutdown(socket.SHUT_WR)
    relay.close_apps()
    relay.pump(lambda: relay.ended)
    engine.expire_idle()                      # back in the pool: idle from now on
    assert engine.counters()[4] == 1
    engine.expire_idle()                      # idle for a whole interval: reserve 0, closed
    assert engine.counters()[4] == 0
    engine.close()


def test_pipelined_initial_data_goes_first(engine_cls):
    engine = engine_cls()
    relay = Relay(engine, initial=b"GET / HTTP/1.0\r\n")
    relay.app_client.sendall(b"\r\n")
    relay.app_client.shutdown(socket.SHUT_WR)
    data = bytearray()
    relay.app_upstream.setblocking(False)

    def got_all():
        try:
            data.extend(relay.app_upstream.recv(100))
        except BlockingIOError:
            pass
        return bytes(data) == b"GET / HTTP/1.0\r\n\r\n"

    relay.pump(got_all)
    relay.close_apps()
    relay.pump(lambda: relay.ended)
    assert relay.ended[0].bytes_up == 18
    engine.close()


def test_half_close_keeps_the_other_direction(engine_cls):
    engine = engine_cls()
    relay = Relay(engine)
    relay.app_client.sendall(b"request")
    relay.app_client.shutdown(socket.SHUT_WR)   # client is done sending
    seen_eof = []

    def upstream_side():
        data = b""
        while chunk := relay.app_upstream.recv(100):
            data += chunk
        seen_eof.append(data)
        relay.app_upstream.sendall(b"response after EOF")
        relay.app_upstream.close()

    t = threading.Thread(target=upstream_side)
    t.start()
    relay.pump(lambda: relay.ended)
    t.join(5)
    assert seen_eof == [b"request"]
    assert relay.app_client.recv(100) == b"response after EOF"
    assert relay.app_client.recv(100) == b""
    assert relay.ended == [Ended(7, 7, 18, "eof", 0)]
    relay.close_apps()
    engine.close()


def test_backpressure_buffers_nothing_unbounded(engine_cls):
    engine = engine_cls()
    relay = Relay(engine)
    relay.app_client.setblocking(False)
    sent = 0
    chunk = b"x" * 65536
    stalled = 0
    # The upstream app never reads: after the socket buffers and one engine buffer are
    # full, the client's sends must stall instead of the engine soaking up everything.
    while stalled < 20 and sent < (256 << 20):
        try:
            sent += relay.app_client.send(chunk)
            stalled = 0
        except BlockingIOError:
            stalled += 1
            end = time.monotonic() + 0.02
            relay.pump(lambda: time.monotonic() > end)
    assert sent < (64 << 20), f"{sent} bytes taken while the destination read nothing"
    relay.close_apps()
    relay.pump(lambda: relay.ended)
    assert relay.ended[0].reason in ("error", "eof")
    engine.close()


def test_reset_by_peer_ends_with_error(engine_cls):
    engine = engine_cls()
    relay = Relay(engine)
    relay.app_client.sendall(b"data that the upstream never reads")
    relay.app_upstream.setblocking(False)
    relay.pump(lambda: _readable(relay.app_upstream))   # relayed, and left unread
    relay.app_upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    relay.app_upstream.close()                  # RST
    relay.pump(lambda: relay.ended)
    assert relay.ended[0].reason == "error"
    relay.app_client.close()
    engine.close()


def test_idle_sessions_expire_and_peers_see_eof(engine_cls):
    engine = engine_cls(idle_timeout_s=0.05)
    relay = Relay(engine)
    time.sleep(0.1)
    relay.ended.extend(engine.run())
    relay.ended.extend(engine.expire_idle())
    assert [e.reason for e in relay.ended] == ["idle"]
    relay.app_client.settimeout(5)
    assert relay.app_client.recv(10) == b""
    relay.close_apps()
    engine.close()


def test_close_ends_every_session_and_leaks_no_fd(engine_cls):
    before = fd_count()
    engine = engine_cls()
    relays = [Relay(engine, tag=i) for i in range(20)]
    assert engine.active == 20
    ended = engine.close()
    assert sorted(e[0] for e in ended) == list(range(20))
    assert {e[3] for e in ended} == {"shutdown"}
    for relay in relays:
        relay.close_apps()
    assert fd_count() == before
    assert engine.close() == []                 # idempotent


def test_many_sessions_finish_without_fd_leak(engine_cls):
    before = fd_count()
    engine = engine_cls()
    for round_ in range(3):
        relays = [Relay(engine, tag=i) for i in range(50)]
        for relay in relays:
            relay.app_client.sendall(b"ping")
            relay.app_client.shutdown(socket.SHUT_WR)
            relay.app_upstream.shutdown(socket.SHUT_WR)
        ended = []
        relays[0].pump(lambda: (ended.extend(engine.run()), len(ended) >= 50)[1] or
                       sum(len(r.ended) for r in relays) + len(ended) >= 50)
        for relay in relays:
            relay.close_apps()
    assert engine.active == 0
    engine.close()
    assert fd_count() == before


def _readable(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False


# --------------------------------------------------------------------- wait(): one epoll for all


def test_wait_relays_and_returns_the_sessions_that_ended(engine_cls):
    engine = engine_cls()
    relay = Relay(engine)
    relay.app_client.sendall(b"up")
    relay.app_client.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + 20
    upstream_got = b""
    relay.app_upstream.setblocking(False)
    while not relay.ended:
        assert time.monotonic() < deadline, "wait() never returned the session"
        relay.ended.extend(engine.wait(0.2))
        try:
            upstream_got += relay.app_upstream.recv(16)
        except BlockingIOError:
            pass
        if upstream_got.endswith(b"up") and not relay.ended:
            relay.app_upstream.shutdown(socket.SHUT_WR)
    assert relay.ended == [Ended(7, 2, 0, "eof", 0)] and not engine.woke
    relay.close_apps()
    engine.close()


def test_wait_comes_back_for_the_watched_fd_and_not_without_it(engine_cls):
    engine = engine_cls()
    readable, writer = socket.socketpair()
    engine.watch(readable.fileno())
    try:
        assert engine.wait(0.05) == [] and not engine.woke  # the time ran out: nothing to do
        writer.send(b"!")
        for _ in range(100):
            engine.wait(5.0)
            if engine.woke:
                break
        assert engine.woke
        engine.watch(-1)
        assert engine.wait(0.05) == [] and not engine.woke  # still readable, no longer watched
    finally:
        engine.close()
        readable.close()
        writer.close()


# --------------------------------------------------------------------- rate limits
# A limit promises a lower bound on a transfer's duration (and a bound on bytes moved by
# any moment): a slow machine only makes it longer, so the tests check those, never how fast.

RATE_BYTES_PER_S = 200_000
RATE_BURST_BYTES = bucket_bytes(RATE_BYTES_PER_S)[0]
def bucket_bound(started_s: float, rate_bytes_per_s: int = RATE_BYTES_PER_S) -> float:
    """The most a bucket full at ``started_s`` can have let through by now."""
    return bucket_bytes(rate_bytes_per_s)[0] + rate_bytes_per_s * (time.monotonic() - started_s)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_a_limited_direction_moves_all_its_bytes_in_order_no_faster_than_its_bucket(limited_engine, direction):
    engine, payload = limited_engine, os.urandom(300_000)
    started_s = time.monotonic()
    relay = Relay(engine, **{f"rate_{direction}_bytes_per_s": RATE_BYTES_PER_S})
    flow = OneWay(relay, direction, payload)
    moved = 0 if direction == "up" else 1
    deadline = time.monotonic() + 20
    while not relay.ended:
        assert time.monotonic() < deadline, "relay made no progress in time"
        relay.ended += engine.wait(0.02)
        # The engine's own counter, sampled at every turn: never ahead of the bucket.
        assert engine.counters()[moved] <= bucket_bound(started_s)
    flow.join()
    elapsed_s = time.monotonic() - started_s
    assert flow.digest == hashlib.sha256(payload).hexdigest() and flow.received == len(payload)
    assert relay.ended == [Ended(7, *((len(payload), 0) if direction == "up" else (0, len(payload))), "eof", 0)]
    assert elapsed_s >= (len(payload) - RATE_BURST_BYTES) / RATE_BYTES_PER_S
    relay.close_apps()


def test_a_limited_stream_is_spliced_and_still_limited():
    engine = _relay.RelayEngine(splice=True)
    relay = Relay(engine, rate_down_bytes_per_s=RATE_BYTES_PER_S)
    started_s = time.monotonic()
    flow = OneWay(relay, "down", os.urandom(150_000))
    relay.pump(lambda: relay.ended)
    flow.join()
    # Full reads of the bucket's allowance count as streaming: the direction was spliced.
    assert engine.counters()[3] >= 1
    assert flow.received == 150_000 and time.monotonic() - started_s >= (150_000 - RATE_BURST_BYTES) / RATE_BYTES_PER_S
    relay.close_apps()
    engine.close()


def test_a_throttled_session_is_not_stranded_by_a_long_wait(limited_engine):
    """Edge-triggered: the throttled socket brings no new event, so wait() must wake for
    the resume itself; the compiled engine's single long wait() returns the ended session."""
    engine = limited_engine
    relay = Relay(engine, rate_down_bytes_per_s=RATE_BYTES_PER_S)
    flow = OneWay(relay, "down", os.urandom(100_000))
    waits = 0
    while not relay.ended:
        relay.ended += engine.wait(30.0)
        waits += 1
    flow.join()
    assert flow.received == 100_000 and relay.ended[0].bytes_down == 100_000
    if isinstance(engine, _relay.RelayEngine):
        assert waits == 1
    relay.close_apps()


def test_an_unlimited_session_beside_a_limited_one_is_not_held_back(limited_engine):
    engine, slow_bytes_per_s = limited_engine, 1000
    started_s = time.monotonic()
    limited = Relay(engine, tag=1, rate_down_bytes_per_s=slow_bytes_per_s)
    unlimited = Relay(engine, tag=2, rate_down_bytes_per_s=0)
    slow = OneWay(limited, "down", os.urandom(200_000))
    fast = OneWay(unlimited, "down", os.urandom(1 << 20))
    unlimited.pump(lambda: unlimited.ended)
    fast.join()
    assert fast.received == 1 << 20 and unlimited.ended[0].bytes_down == 1 << 20
    assert slow.received <= bucket_bound(started_s, slow_bytes_per_s)
    ended = engine.close_all()
    assert [e.tag for e in ended] == [1] and ended[0].bytes_down <= bucket_bound(started_s, slow_bytes_per_s)
    slow.join()
    limited.close_apps()
    unlimited.close_apps()


@pytest.mark.parametrize("rates", [{"rate_up_bytes_per_s": -1}, {"rate_down_bytes_per_s": 1.5},
                                   {"rate_down_bytes_per_s": True}])
def test_a_bad_rate_is_refused_and_its_fds_closed(engine_cls, rates):
    engine = engine_cls()
    before = fd_count()
    a, b = tcp_pair()
    with pytest.raises(ValueError, match="bytes per second"):
        engine.add(a.detach(), b.detach(), 1, None, **rates)
    assert fd_count() == before
    with pytest.raises(ValueError, match="bytes per second"):
        engine.front(object(), **rates)
    engine.close()
