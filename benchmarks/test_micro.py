"""Micro-benchmarks of the hot paths (pytest-benchmark).

    pytest benchmarks/test_micro.py --benchmark-only
    pytest benchmarks/test_micro.py --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median,ops

- the SOCKS5 handshake parse: greeting + CONNECT request through ``ServerConnection``
  (IPv4, IPv6 and domain-name destinations, pipelined in one read as clients send them);
- the reply serialize: ``ServerConnection.send(CommandReply(...))``;
- the relay engine: one 64-byte message client -> upstream -> client through
  ``fastsocks._relay.RelayEngine`` (Cython) and its pure-Python twin, over loopback TCP
  socket pairs, driven on one thread (no thread hand-off in the measurement).

A plain ``pytest`` runs each once, unmeasured (benchmarks/conftest.py), so that none rots.
"""

from __future__ import annotations

import selectors
import socket
import time

import pytest

from fastsocks import _relay, _relay_py
from fastsocks.protocol.socks5 import (
    CommandReply,
    Greeting,
    Method,
    MethodSelection,
    Reply,
    Request,
    ServerConnection,
    State,
)

GREETING = b"\x05\x01\x00"
REQUESTS = {
    "ipv4": b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + (8080).to_bytes(2, "big"),
    "ipv6": b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + (443).to_bytes(2, "big"),
    "domain": b"\x05\x01\x00\x03" + bytes([len(b"www.example.com")]) + b"www.example.com" + (443).to_bytes(2, "big"),
}


def handshake(data: bytes) -> tuple[Greeting, Request]:
    conn = ServerConnection()
    conn.receive_data(data)
    greeting = conn.next_event()
    conn.send(MethodSelection(Method.NO_AUTH))
    return greeting, conn.next_event()


@pytest.mark.benchmark(group="socks5 parse")
@pytest.mark.parametrize("atyp", sorted(REQUESTS))
def test_parse_greeting_and_request(benchmark, atyp):
    greeting, request = benchmark(handshake, GREETING + REQUESTS[atyp])
    assert isinstance(greeting, Greeting) and isinstance(request, Request)
    assert request.port in (8080, 443)


def _awaiting_reply() -> tuple[tuple[ServerConnection], dict]:
    conn = ServerConnection()
    conn.receive_data(GREETING + REQUESTS["ipv4"])
    conn.next_event()
    conn.send(MethodSelection(Method.NO_AUTH))
    conn.next_event()
    return (conn,), {}


@pytest.mark.benchmark(group="socks5 reply")
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_serialize_reply(benchmark, host):
    reply = CommandReply(Reply.SUCCEEDED, host, 54321)
    sent = []

    def send(conn: ServerConnection) -> bytes:
        data = conn.send(reply)
        sent.append(conn.state)
        return data

    # Each round needs a connection that is waiting for its reply: built in setup, untimed.
    data = benchmark.pedantic(send, setup=_awaiting_reply, rounds=20000, warmup_rounds=200)
    assert data[:4] == b"\x05\x00\x00" + (b"\x01" if host == "127.0.0.1" else b"\x04")
    assert set(sent) == {State.ESTABLISHED}


# --------------------------------------------------------------------------- relay round trip

ENGINES = {"cython": _relay.RelayEngine, "python": _relay_py.RelayEngine}
MESSAGE = b"m" * 64


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


class RoundTrip:
    """app_client <-> [engine] <-> app_upstream, pumped on this thread."""

    def __init__(self, engine_cls) -> None:
        self.engine = engine_cls()
        self.app_client, client_side = _tcp_pair()
        upstream_side, self.app_upstream = _tcp_pair()
        for sock in (client_side, upstream_side, self.app_client, self.app_upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.engine.add(client_side.detach(), upstream_side.detach(), 1, b"")
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.engine.fileno(), selectors.EVENT_READ)
        self.buf = bytearray(256)

    def _deliver(self, src: socket.socket, dst: socket.socket) -> None:
        src.send(MESSAGE)
        got, deadline = 0, time.monotonic() + 10
        while got < len(MESSAGE):
            if not self.engine.pending:
                self.selector.select(0.01)
            self.engine.run()
            try:
                got += dst.recv_into(self.buf)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError("the relay did not deliver the message in 10 s") from None
        assert got == len(MESSAGE)

    def once(self) -> None:
        self._deliver(self.app_client, self.app_upstream)   # request
        self._deliver(self.app_upstream, self.app_client)   # response

    def close(self) -> None:
        self.selector.close()
        self.app_client.close()
        self.app_upstream.close()
        self.engine.close()


@pytest.mark.benchmark(group="relay 64 B round trip")
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_relay_round_trip_64_bytes(benchmark, engine):
    trip = RoundTrip(ENGINES[engine])
    try:
        for _ in range(100):  # warm the connection (and the engine's paths) up
            trip.once()
        benchmark(trip.once)
        up, down, sessions, _, _ = trip.engine.counters()
        assert sessions == 1 and up == down and up % len(MESSAGE) == 0
    finally:
        trip.close()
