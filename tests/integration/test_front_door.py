"""The engine's front door (RelayEngine.front/listen) on real loopback sockets, in both engines.

The engine accepts from a listening socket itself, answers the common SOCKS5 and SOCKS4
CONNECT handshakes, connects and relays; everything else goes to the gate's hand_off()
with what the client sent and what the engine answered; failures are answered as the
session would answer them and come back as Ended(reason="failed") with the reply and why.
The engine runs on the test's thread (run() until the outcome is there); the clients are
plain sockets.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import select
import selectors
import socket
import struct
import time
from dataclasses import dataclass

import pytest
from support import echo_handler, require_ipv6, socks5_request_bytes

from fastsocks import _relay, _relay_py
from fastsocks._relay_types import RULE_DEFAULT, RULE_NONE, Ended, egress_index
from fastsocks.limits import SharedLimits

ENGINES = {"cython": _relay, "python": _relay_py}

GREETING = b"\x05\x01\x00"
SELECTED = b"\x05\x00"


def request4(ip: str, port: int, userid: bytes = b"") -> bytes:
    return b"\x04\x01" + struct.pack("!H", port) + socket.inet_aton(ip) + userid + b"\0"


def failure5(code: int) -> bytes:
    return bytes([5, code, 0, 1]) + bytes(6)


FAILURE4 = b"\x00\x5b" + bytes(6)


def untimed(ended: Ended) -> Ended:
    """An Ended without its clock readings, to compare whole."""
    return ended._replace(started_s=0.0, handshake_s=None, connect_s=None)


@dataclass
class HandOff:
    sock: socket.socket   # the client, the gate's now
    tag: int
    peer: tuple
    data: bytes
    sent: bytes
    started_s: float
    blocking: bool


class Gate:
    """A FrontGate that lets everyone in (or as told) and records every call."""

    def __init__(self, admit: bool = True, refusal: tuple[int, str] | None = None, fail: Exception | None = None):
        self.admit, self.refusal, self.fail = admit, refusal, fail
        self.accepted_calls: list[tuple] = []
        self.requests: list[tuple] = []
        self.handoffs: list[HandOff] = []
        self.accept_failures: list[int] = []

    def accepted(self, tag, host, port):
        self.accepted_calls.append((tag, host, port))
        return self.admit

    def request(self, tag, proto, client, host, port):
        self.requests.append((tag, proto, client, host, port))
        if self.fail is not None:
            raise self.fail
        return self.refusal

    def hand_off(self, fd, tag, peer, data, sent, started_s):
        self.handoffs.append(HandOff(socket.socket(fileno=fd), tag, peer, data, sent, started_s, os.get_blocking(fd)))

    def accept_failed(self, err):
        self.accept_failures.append(err)


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


class FrontDoor:
    """A listener whose connections the engine accepts, and the loop that runs the engine."""

    def __init__(self, module, gate: Gate, host: str, front: dict) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, 0), family=family)
        self.listener.setblocking(False)
        self.gate = gate
        self.engine = module.RelayEngine()
        if "accounts" in front:  # the shared accounts (front's client_rate_*) come first
            self.engine.use_accounts(front.pop("accounts"))
        self.engine.front(gate, **front)
        self.engine.listen(self.listener.fileno())
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.engine.fileno(), selectors.EVENT_READ)
        self.ended: list[Ended] = []
        self.clients: list[socket.socket] = []

    @property
    def address(self) -> tuple:
        return self.listener.getsockname()[:2]

    def connect(self) -> socket.socket:
        client = socket.create_connection(self.address, timeout=5)
        self.clients.append(client)
        return client

    def run_once(self) -> None:
        if not self.engine.pending:
            self.selector.select(0.02)
        self.ended.extend(self.engine.run())

    def run_until(self, predicate, what: str = "the outcome", timeout_s: float = 10.0):
        deadline = time.monotonic() + timeout_s
        while not (result := predicate()):
            assert time.monotonic() < deadline, f"the engine did not bring {what} in time"
            self.run_once()
        return result

    def run_rounds(self, rounds: int = 10) -> None:
        for _ in range(rounds):
            self.run_once()

    def expire(self) -> None:
        self.ended.extend(self.engine.expire_idle())

    def recv_exact(self, sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            self.run_until(lambda: readable(sock), f"{n} bytes to the client")
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {n} bytes: {data!r}")
            data += chunk
        return data

    def recv_to_eof(self, sock: socket.socket) -> bytes:
        data = b""
        while True:
            self.run_until(lambda: readable(sock), "the client's EOF")
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk

    def ended_one(self) -> Ended:
        self.run_until(lambda: self.ended, "an Ended")
        assert len(self.ended) == 1, self.ended
        return self.ended[0]

    def close(self) -> None:
        """Idempotent."""
        self.ended.extend(self.engine.close())
        self.selector.close()
        self.listener.close()
        for sock in self.clients + [h.sock for h in self.gate.handoffs]:
            sock.close()


@pytest.fixture(params=sorted(ENGINES))
def door(request):
    """``door(gate=None, host="127.0.0.1", **front)``: a FrontDoor of the engine under test."""
    made: list[FrontDoor] = []

    def make(gate: Gate | None = None, host: str = "127.0.0.1", **front) -> FrontDoor:
        made.append(FrontDoor(ENGINES[request.param], gate or Gate(), host, front))
        return made[-1]

    yield make
    for front_door in made:
        front_door.close()


def described(client: socket.socket, proto: str, dest: str | None) -> str:
    host, port = client.getsockname()[:2]
    peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"client={peer} proto={proto} " + (f"cmd=connect dest={dest}" if dest else "cmd=- dest=-")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bound_of(reply: bytes) -> tuple[str, int]:
    """BND.ADDR and BND.PORT of a SOCKS5 IPv4 reply."""
    assert reply[:4] == b"\x05\x00\x00\x01", reply
    return socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0]


# --------------------------------------------------------------------- what the engine serves



def greeted(d):
    """A client accepted and answered 05 00, and the monotonic times around its accept."""
    before_s = time.monotonic()
    client = d.connect()
    client.sendall(GREETING)
    assert d.recv_exact(client, 2) == SELECTED
    return client, before_s, time.monotonic()

def test_socks5_connect_relays_both_ways_and_ends_described(door, tcp_target):
    peers = []

    def record_and_echo(conn):
        peers.append(conn.getpeername())
        echo_handler(conn)

    target = tcp_target(record_and_echo)
    d = door()
    client, before_s, after_s = greeted(d)
    client.sendall(socks5_request_bytes("127.0.0.1", target.port))
    bound = bound_of(d.recv_exact(client, 10))
    client.sendall(b"ping")
    assert d.recv_exact(client, 4) == b"ping"
    assert peers == [bound]  # the reply says where the proxy connects from
    client.shutdown(socket.SHUT_WR)
    assert d.recv_to_eof(client) == b""
    ended = d.ended_one()
    assert before_s <= ended.started_s <= after_s
    assert untimed(ended) == Ended(
        1, 4, 4, "eof", 0, described(client, "socks5", f"127.0.0.1:{target.port}"), 0.0, 0, "", RULE_DEFAULT)
    assert (d.engine.accepted, d.engine.handshaking, d.engine.active) == (1, 0, 0)
    assert d.engine.counters()[:3] == (4, 4, 1)
    assert d.gate.handoffs == [] and d.gate.requests == [] and d.gate.accepted_calls == []


def test_pipelined_greeting_request_and_payload_all_reach_the_target(door, echo_target):
    d = door()
    client = d.connect()
    payload = os.urandom(3000)  # more than the engine reads before the request is done
    client.sendall(GREETING + socks5_request_bytes("127.0.0.1", echo_target.port) + payload)
    answer = d.recv_exact(client, 2 + 10 + len(payload))
    assert answer[:2] == SELECTED
    bound_of(answer[2:12])
    assert answer[12:] == payload
    client.shutdown(socket.SHUT_WR)
    assert d.recv_to_eof(client) == b""
    ended = d.ended_one()
    assert (ended.bytes_up, ended.bytes_down, ended.reason, ended.reply) == (3000, 3000, "eof", 0)


def test_socks4_connect_is_granted_and_relayed(door, echo_target):
    gate = Gate()
    d = door(gate, judge_request=True)
    client = d.connect()
    client.sendall(request4("127.0.0.1", echo_target.port) + b"hello")
    reply = d.recv_exact(client, 8)
    assert reply[:2] == b"\x00\x5a"
    assert socket.inet_ntoa(reply[4:8]) == "127.0.0.1" and struct.unpack("!H", reply[2:4])[0] != 0
    assert d.recv_exact(client, 5) == b"hello"
    assert gate.requests == [(1, 4, "127.0.0.1", "127.0.0.1", echo_target.port)]
    client.shutdown(socket.SHUT_WR)
    assert d.recv_to_eof(client) == b""
    ended = d.ended_one()
    assert (ended.tag, ended.bytes_up, ended.bytes_down, ended.reason, ended.reply) == (1, 5, 5, "eof", 0)
    assert ended.described == described(client, "socks4", f"127.0.0.1:{echo_target.port}")


def test_a_client_over_ipv6_is_described_in_brackets(door, echo_target):
    require_ipv6()
    d = door(host="::1")
    client = d.connect()
    client.sendall(GREETING + socks5_request_bytes("127.0.0.1", echo_target.port) + b"x")
    assert d.recv_exact(client, 13)[-1:] == b"x"
    client.shutdown(socket.SHUT_WR)
    d.recv_to_eof(client)
    assert d.ended_one().described == f"client=[::1]:{client.getsockname()[1]} proto=socks5 " \
                                      f"cmd=connect dest=127.0.0.1:{echo_target.port}"


# --------------------------------------------------------------------- what goes to the gate


def handed_off(d: FrontDoor) -> HandOff:
    d.run_until(lambda: d.gate.handoffs, "a hand-off")
    assert len(d.gate.handoffs) == 1 and d.ended == [] and d.engine.handshaking == 0
    return d.gate.handoffs[0]


def test_a_domain_request_is_handed_off_with_what_was_read_and_answered(door):
    d = door()
    client, before_s, after_s = greeted(d)
    request = socks5_request_bytes("example.com", 80) + b"payload"
    client.sendall(request)
    handoff = handed_off(d)
    assert (handoff.tag, handoff.peer, handoff.data, handoff.sent, handoff.blocking) == \
        (1, client.getsockname(), GREETING + request, SELECTED, False)
    assert before_s <= handoff.started_s <= after_s
    # The client is the gate's now: the engine neither reads nor writes it any more.
    handoff.sock.sendall(failure5(4))
    assert client.recv(16) == failure5(4)
    client.sendall(b"after")
    d.run_rounds()
    assert handoff.sock.recv(16) == b"after"


def test_a_pipelined_domain_request_is_handed_off_unanswered(door):
    """Greeting and name request in one read: the engine sees at once that it is not its
    own and sends nothing; the session answers the greeting itself."""
    d = door()
    client = d.connect()
    data = GREETING + socks5_request_bytes("example.com", 80)
    client.sendall(data)
    handoff = handed_off(d)
    assert (handoff.data, handoff.sent) == (data, b"")
    assert not readable(client)


def test_a_domain_request_after_the_greeting_is_handed_off_answered(door):
    """Greeting first, then a name request: the engine has answered the greeting, and
    says so (the session skips those bytes)."""
    d = door()
    client = d.connect()
    client.sendall(GREETING)
    assert d.recv_exact(client, 2) == SELECTED
    data = socks5_request_bytes("example.com", 80)
    client.sendall(data)
    handoff = handed_off(d)
    assert (handoff.data, handoff.sent) == (GREETING + data, SELECTED)


@pytest.mark.parametrize(("greeting", "methods"), [(b"\x05\x01\x02", b"\x00"), (b"\x05\x02\x00\x02", b"\x02\x00")],
                         ids=["userpass offered, none configured", "userpass preferred"])
def test_a_greeting_the_engine_does_not_take_is_handed_off_unanswered(door, greeting, methods):
    d = door(methods=methods)
    client = d.connect()
    client.sendall(greeting)
    handoff = handed_off(d)
    assert (handoff.data, handoff.sent) == (greeting, b"")
    assert not readable(client)


@pytest.mark.parametrize(("sent", "eof", "front"), [
    (b"GET / HTTP/1.0\r\n\r\n", False, {}),
    (request4("127.0.0.1", 80), False, {"socks4": False}),
    (request4("127.0.0.1", 80, b"bob"), False, {}),
    (b"\x05\x01", True, {}),
    (b"", True, {}),
], ids=["not socks", "socks4 off", "socks4 userid", "eof in the greeting", "eof at once"])
def test_what_the_engine_does_not_serve_is_handed_off(door, sent, eof, front):
    d = door(**front)
    client = d.connect()
    client.sendall(sent)
    if eof:
        client.shutdown(socket.SHUT_WR)
    handoff = handed_off(d)
    assert (handoff.data, handoff.sent) == (sent, b"")


@pytest.mark.parametrize("dest", ["0.0.0.0", "0.1.2.3", "::", "::127.0.0.1", "::ffff:127.0.0.1"])
def test_a_connect_whose_target_depends_on_the_host_is_handed_off(door, dest):
    d = door(judge_request=True)
    client = d.connect()
    data = GREETING + socks5_request_bytes(dest, closed_port())
    client.sendall(data)
    handoff = handed_off(d)
    assert (handoff.data, handoff.sent) == (data, SELECTED)
    assert d.gate.requests == []


def test_a_connect_to_ipv6_loopback_is_handed_off(door, tcp_target):
    require_ipv6()
    target = tcp_target(echo_handler, "::1")
    d = door(host="::1")
    client = d.connect()
    data = GREETING + socks5_request_bytes("::1", target.port)
    client.sendall(data)
    handoff = handed_off(d)
    assert (handoff.peer, handoff.data, handoff.sent) == (("::1", client.getsockname()[1]), data, SELECTED)


@pytest.mark.parametrize("others", [0, 300], ids=["one port", "among hundreds"])
def test_a_connect_to_one_of_the_proxys_own_ports_is_handed_off(door, echo_target, others):
    """However many ports the proxy listens on (a bit per port in the engine)."""
    ports = {echo_target.port} | {20000 + i for i in range(others)}
    d = door(own_ports=frozenset(ports))
    client = d.connect()
    data = GREETING + socks5_request_bytes("127.0.0.1", echo_target.port)
    client.sendall(data)
    handoff = handed_off(d)
    assert (handoff.data, handoff.sent) == (data, SELECTED)


# --------------------------------------------------------------------- failures


@pytest.mark.parametrize(("proto", "request_bytes", "reply"), [
    ("socks5", lambda port: GREETING + socks5_request_bytes("127.0.0.1", port), SELECTED + failure5(5)),
    ("socks4", lambda port: request4("127.0.0.1", port), FAILURE4),
], ids=["socks5", "socks4"])
def test_a_refused_connect_is_answered_and_ends_failed(door, proto, request_bytes, reply):
    d = door()
    port = closed_port()
    client = d.connect()
    client.sendall(request_bytes(port))
    assert d.recv_to_eof(client) == reply
    ended = d.ended_one()
    assert untimed(ended) == Ended(
        1, 0, 0, "failed", errno.ECONNREFUSED, described(client, proto, f"127.0.0.1:{port}"), 0.0, 5,
        "connect failed: Connection refused", RULE_DEFAULT)
    assert (d.engine.handshaking, d.engine.active) == (0, 0)


def test_a_failure_reply_survives_payload_the_engine_never_read(door):
    """Closing with unread bytes would reset the connection under the reply."""
    d = door()
    client = d.connect()
    client.sendall(GREETING + socks5_request_bytes("127.0.0.1", closed_port()) + os.urandom(60000))
    assert d.recv_to_eof(client) == SELECTED + failure5(5)


def test_the_gate_refuses_a_request_with_its_code_and_words(door):
    target = socket.create_server(("127.0.0.1", 0))
    target.setblocking(False)
    gate = Gate(refusal=(2, "denied by rule #1"))
    d = door(gate, judge_request=True)
    client = d.connect()
    port = target.getsockname()[1]
    client.sendall(GREETING + socks5_request_bytes("127.0.0.1", port))
    assert d.recv_to_eof(client) == SELECTED + failure5(2)
    ended = d.ended_one()
    assert (ended.reason, ended.reply, ended.errno, ended.why) == ("failed", 2, 0, "denied by rule #1")
    assert ended.described == described(client, "socks5", f"127.0.0.1:{port}")
    assert gate.requests == [(1, 5, "127.0.0.1", "127.0.0.1", port)]
    with pytest.raises(BlockingIOError):
        target.accept()  # the engine never connected
    target.close()


def connect_and_close(d, port: int) -> Ended:
    """A SOCKS5 CONNECT that relays nothing: connected, closed, ended."""
    client = d.connect()
    client.sendall(GREETING + socks5_request_bytes("127.0.0.1", port))
    assert d.recv_exact(client, 12)[:4] == SELECTED + b"\x05\x00"
    client.close()
    ended = d.ended_one()
    d.ended.clear()
    return ended


def test_the_rule_the_gate_names_comes_back_in_ended_and_is_remembered_with_its_answer(door, echo_target):
    gate = Gate(refusal=4)  # go on: rule #5 let it through
    d = door(gate, judge_request=True)
    first = connect_and_close(d, echo_target.port)
    again = connect_and_close(d, echo_target.port)
    assert (first.reason, first.rule, again.rule) == ("eof", 4, 4)
    assert len(gate.requests) == 1  # the second answer, rule and all, came from the engine's memory


@pytest.mark.parametrize(("answer", "rule"), [(None, RULE_DEFAULT), ((2, "denied by rule #3", 2), 2),
                                             ((2, "denied by the default action", RULE_DEFAULT), RULE_DEFAULT),
                                             ((1, "over max_sessions (1)"), RULE_NONE)],
                         ids=["none", "rule", "default", "cap"])
def test_a_refusal_or_a_go_on_carries_what_decided_it(door, echo_target, answer, rule):
    d = door(Gate(refusal=answer), judge_request=True)
    client = d.connect()
    client.sendall(GREETING + socks5_request_bytes("127.0.0.1", echo_target.port))
    if answer is None:
        assert d.recv_exact(client, 12)[:4] == SELECTED + b"\x05\x00"
        client.close()
    else:
        assert d.recv_to_eof(client) == SELECTED + failure5(answer[0])
    assert d.ended_one().rule == rule


def test_without_judge_request_the_default_action_decides(door, echo_target):
    assert connect_and_close(door(), echo_target.port).rule == RULE_DEFAULT


def test_ended_says_which_phases_a_session_went_through(door, echo_target):
    """handshake_s: accept to the request read; connect_s: the connect, to success or
    failure; None for a phase never reached."""
    d = door(Gate(refusal=(2, "denied by rule #1", 0)), judge_request=True, handshake_timeout_s=0.2)
    relayed_d = door()
    relayed = connect_and_close(relayed_d, echo_target.port)
    refused_client = d.connect()
    refused_client.sendall(GREETING + socks5_request_bytes("127.0.0.1", echo_target.port))
    refused = d.ended_one()
    d.ended.clear()
    failed_client = relayed_d.connect()
    failed_client.sendall(GREETING + socks5_request_bytes("127.0.0.1", closed_port()))
    failed = relayed_d.ended_one()
    silent = d.connect()
    d.run_until(lambda: d.engine.handshaking == 1)
    time.sleep(0.3)
    d.expire()
    timed_out = d.ended_one()
    assert (relayed.reason, refused.reason, failed.reason, timed_out.why) == \
        ("eof", "failed", "failed", "handshake timed out")
    assert all(e.handshake_s >= 0 for e in (relayed, refused, failed))
    assert relayed.connect_s >= 0 and failed.connect_s >= 0
    assert refused.connect_s is None  # refused before any connect
    assert (timed_out.handshake_s, timed_out.connect_s) == (None, None)
    for sock in (refused_client, failed_client, silent):
        sock.close()


def test_a_gate_that_raises_refuses_that_session_and_run_raises_it(door):
    d = door(Gate(fail=RuntimeError("a bug in the rules")), judge_request=True)
    client = d.connect()
    client.sendall(GREETING + socks5_request_bytes("127.0.0.1", closed_port()))
    with pytest.raises(RuntimeError, match="a bug in the rules"):
        for _ in range(500):
            d.run_once()
    assert d.ended == []
    assert d.recv_to_eof(client) == SELECTED + failure5(1)  # general failure
    ended = d.ended_one()  # from the next run()
    assert (ended.tag, ended.reason, ended.reply, ended.why) == (1, "failed", 1, "internal error in the gate")


def test_judge_accept_false_closes_the_client_unanswered(door):
    gate = Gate(admit=False)
    d = door(gate, judge_accept=True)
    client = d.connect()
    assert d.recv_to_eof(client) == b""
    assert gate.accepted_calls == [(1, "127.0.0.1", client.getsockname()[1])]
    assert (d.engine.accepted, d.engine.handshaking) == (1, 0)
    assert d.engine.close() == [] and d.ended == []


def test_judge_accept_true_lets_the_handshake_go_on(door):
    gate = Gate(admit=True)
    d = door(gate, judge_accept=True)
    client = d.connect()
    client.sendall(GREETING)
    assert d.recv_exact(client, 2) == SELECTED
    assert gate.accepted_calls == [(1, "127.0.0.1", client.getsockname()[1])]


@pytest.mark.parametrize(("sent", "answer", "proto"), [
    (b"", b"", "-"), (GREETING, SELECTED, "socks5"), (b"\x04\x01\x00", b"", "socks4")],
    ids=["nothing sent", "after the greeting", "in a socks4 request"])
def test_a_handshake_past_its_timeout_is_closed_unanswered(door, sent, answer, proto):
    d = door(handshake_timeout_s=0.2)
    client = d.connect()
    client.sendall(sent)
    d.run_until(lambda: d.engine.accepted == 1 and d.engine.handshaking == 1)
    if answer:
        assert d.recv_exact(client, len(answer)) == answer
    time.sleep(0.3)
    d.expire()
    ended = d.ended_one()
    assert untimed(ended) == Ended(
        1, 0, 0, "failed", 0, described(client, proto, None), 0.0, -1, "handshake timed out", RULE_NONE)
    assert d.recv_to_eof(client) == b""
    assert d.engine.handshaking == 0


def test_a_handshake_within_its_timeout_goes_on(door):
    d = door()  # 10 s
    client = d.connect()
    d.run_until(lambda: d.engine.handshaking == 1)
    d.expire()
    assert d.ended == [] and d.engine.handshaking == 1
    client.sendall(GREETING)
    assert d.recv_exact(client, 2) == SELECTED


@contextlib.contextmanager
def unanswered_target():
    """A listener whose accept queue is full: one more connect stays pending (SYN dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            fillers.append(filler)
            filler.connect_ex(listener.getsockname())
            if not select.select([], [filler], [], 0.2)[1]:
                break  # this one is pending: the queue is full
        else:
            pytest.fail("the accept queue never filled")
        yield listener.getsockname()
    finally:
        for sock in fillers + [listener]:
            sock.close()


def test_a_connect_past_its_timeout_is_answered_ttl_expired(door):
    d = door(connect_timeout_s=0.2)
    with unanswered_target() as (host, port):
        client = d.connect()
        client.sendall(GREETING + socks5_request_bytes(host, port))
        assert d.recv_exact(client, 2) == SELECTED
        d.run_rounds(3)
        assert d.engine.handshaking == 1 and d.ended == []  # connecting
        time.sleep(0.3)
        d.expire()
        assert d.recv_to_eof(client) == failure5(6)
    ended = d.ended_one()
    assert (ended.reason, ended.reply, ended.errno, ended.why) == \
        ("failed", 6, errno.ETIMEDOUT, "connect failed: Connection timed out")
    assert ended.described == described(client, "socks5", f"{host}:{port}")


def test_close_ends_the_clients_still_in_the_handshake(door):
    d = door()
    greeted = d.connect()
    greeted.sendall(GREETING)
    assert d.recv_exact(greeted, 2) == SELECTED
    silent = d.connect()
    d.run_until(lambda: d.engine.handshaking == 2)
    ended = sorted(d.engine.close())
    assert [untimed(e) for e in ended] == [
        Ended(1, 0, 0, "failed", 0, described(greeted, "socks5", None), 0.0, -1, "worker shutting down"),
        Ended(2, 0, 0, "failed", 0, described(silent, "-", None), 0.0, -1, "worker shutting down")]
    assert greeted.recv(16) == b"" and silent.recv(16) == b""


# --------------------------------------------------------------------- accepting


def test_clients_are_counted_and_numbered_in_accept_order(door, echo_target):
    d = door()
    first, second = d.connect(), d.connect()
    d.run_until(lambda: d.engine.handshaking == 2)
    assert d.engine.accepted == 2
    first.sendall(GREETING + socks5_request_bytes("127.0.0.1", echo_target.port))
    d.recv_exact(first, 12)
    assert (d.engine.handshaking, d.engine.active) == (1, 1)
    second.close()
    assert handed_off(d).tag == 2
    first.shutdown(socket.SHUT_WR)
    d.recv_to_eof(first)
    assert d.ended_one().tag == 1
    assert (d.engine.accepted, d.engine.handshaking, d.engine.active) == (2, 0, 0)


def test_front_again_applies_to_every_client_from_its_next_step(door, echo_target):
    """A reload (front() again) that asks for passwords also catches the clients accepted
    before it that have not greeted yet: none slips through without one. A client already
    answered "no authentication" keeps it: its request is served."""
    d = door()
    greeted = d.connect()
    greeted.sendall(GREETING)
    assert d.recv_exact(greeted, 2) == SELECTED  # answered under the old methods
    before = d.connect()
    d.run_until(lambda: d.engine.handshaking == 2)
    d.engine.front(d.gate, methods=b"\x02")  # username/password only from now on
    after = d.connect()
    d.run_until(lambda: d.engine.handshaking == 3)
    before.sendall(GREETING)
    after.sendall(GREETING)
    d.run_until(lambda: len(d.gate.handoffs) == 2, "two hand-offs")
    assert sorted((h.tag, h.data, h.sent) for h in d.gate.handoffs) == [(2, GREETING, b""), (3, GREETING, b"")]
    assert not readable(before) and not readable(after)
    greeted.sendall(socks5_request_bytes("127.0.0.1", echo_target.port) + b"still mine")
    assert d.recv_exact(greeted, 10)[:2] == b"\x05\x00"  # granted, by the engine itself
    assert d.recv_exact(greeted, 10) == b"still mine"
    assert len(d.gate.handoffs) == 2


def test_unlisten_stops_accepting_and_listen_starts_again(door):
    d = door()
    d.engine.unlisten()
    client = d.connect()  # established in the listener's queue
    d.run_rounds()
    assert d.engine.accepted == 0
    d.engine.listen(d.listener.fileno())
    client.sendall(GREETING)
    assert d.recv_exact(client, 2) == SELECTED
    assert d.engine.accepted == 1


def test_out_of_fds_at_accept_stops_listening_and_tells_the_gate(door):
    d = door()
    client = d.connect()
    lowest_free = os.dup(0)  # the number the next fd would get
    os.close(lowest_free)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no fd number left
    try:
        d.run_until(lambda: d.gate.accept_failures, "accept_failed()")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert d.gate.accept_failures == [errno.EMFILE]
    d.run_rounds()
    assert d.engine.accepted == 0  # it stopped listening
    d.engine.listen(d.listener.fileno())
    client.sendall(GREETING)
    assert d.recv_exact(client, 2) == SELECTED


def test_every_fd_the_engine_opened_is_closed(door):
    before = set(os.listdir("/proc/self/fd"))
    d = door(handshake_timeout_s=0.2)
    upstream = socket.create_server(("127.0.0.1", 0))
    relayed, refused, timed_out = d.connect(), d.connect(), d.connect()
    relayed.sendall(GREETING + socks5_request_bytes(*upstream.getsockname()) + b"up")
    refused.sendall(GREETING + socks5_request_bytes("127.0.0.1", closed_port()))
    assert d.recv_exact(relayed, 12)[:2] == SELECTED
    conn, _ = upstream.accept()
    assert d.recv_exact(conn, 2) == b"up"
    conn.close()
    relayed.shutdown(socket.SHUT_WR)
    assert d.recv_to_eof(relayed) == b""
    assert d.recv_to_eof(refused) == SELECTED + failure5(5)
    d.run_until(lambda: len(d.ended) == 2, "the relay's and the refusal's end")
    time.sleep(0.3)
    d.expire()
    assert d.recv_to_eof(timed_out) == b""
    assert sorted((e.reason, e.why) for e in d.ended) == [
        ("eof", ""), ("failed", "connect failed: Connection refused"), ("failed", "handshake timed out")]
    upstream.close()
    d.close()
    assert set(os.listdir("/proc/self/fd")) == before


# --------------------------------------------------------------------- the gate's answers, remembered


def relayed_once(d, port: int) -> socket.socket:
    """A client through the engine to 127.0.0.1:port, granted and still open."""
    client = d.connect()
    client.sendall(GREETING + socks5_request_bytes("127.0.0.1", port))
    answer = d.recv_exact(client, 12)
    assert answer[:4] == b"\x05\x00\x05\x00", answer
    return client


def test_a_tuple_at_accept_is_remembered_and_a_refusal_asked_each_time(door, echo_target):
    gate = Gate(admit=())
    d = door(gate, judge_accept=True)
    for _ in range(3):
        relayed_once(d, echo_target.port)
    assert [call[0] for call in gate.accepted_calls] == [1]  # let in again without asking
    d.engine.front(gate, judge_accept=True)  # a reload: new rules, new answers
    gate.admit = False
    for _ in range(2):
        assert d.recv_to_eof(d.connect()) == b""
    assert [call[0] for call in gate.accepted_calls] == [1, 4, 5]


def test_a_request_let_through_is_remembered_per_client_destination_and_port(door, echo_target, tcp_target):
    gate = Gate()
    d = door(gate, judge_request=True)
    other = tcp_target(echo_handler)
    for port in (echo_target.port, echo_target.port, other.port, echo_target.port):
        relayed_once(d, port)
    assert [(tag, port) for tag, _proto, _client, _host, port in gate.requests] == [
        (1, echo_target.port), (3, other.port)]
    gate.refusal = (2, "not allowed by rule 1")
    d.engine.front(gate, judge_request=True)  # forgotten: the new rules refuse
    client = d.connect()
    client.sendall(GREETING + socks5_request_bytes("127.0.0.1", echo_target.port))
    assert d.recv_to_eof(client) == SELECTED + failure5(2)


@pytest.fixture
def counts():
    limits = SharedLimits(1)
    try:
        yield limits
    finally:
        del limits  # the engine may still hold a view of the map


def test_sessions_of_a_counted_client_are_counted_until_they_end(door, echo_target, counts):
    buckets = counts.buckets(b"a client")
    d = door(Gate(admit=buckets), judge_accept=True, counts=counts.for_engine(0))
    held = [relayed_once(d, echo_target.port) for _ in range(3)]
    assert (counts.of_worker(0), counts.of_client(buckets), counts.total()) == (3, 3, 3)
    for client in held:
        client.close()
    d.run_until(lambda: counts.of_worker(0) == 0, "the sessions uncounted")
    assert counts.of_client(buckets) == 0 and len(d.gate.accepted_calls) == 1


def test_a_counted_client_handed_off_is_uncounted_for_the_gate_to_count(door, counts):
    buckets = counts.buckets(b"a client")
    d = door(Gate(admit=buckets), judge_accept=True, counts=counts.for_engine(0))
    client = d.connect()
    client.sendall(GREETING)
    assert d.recv_exact(client, 2) == SELECTED
    assert counts.of_client(buckets) == 1
    client.sendall(b"\x05\x01\x00\x03\x09localhost\x00\x50")  # a name: the session's
    d.run_until(lambda: d.gate.handoffs, "the hand-off")
    assert (counts.of_worker(0), counts.of_client(buckets)) == (0, 0)


def test_a_session_over_a_cap_is_judged_by_the_gate(door, echo_target, counts):
    """Under the caps the engine answers from memory; over one, the gate gives the refusal."""
    buckets = counts.buckets(b"a client")
    gate = Gate(admit=buckets)
    d = door(gate, judge_accept=True, judge_request=True, counts=counts.for_engine(0), caps=(0, 0, 2))
    held = [relayed_once(d, echo_target.port) for _ in range(2)]
    assert len(gate.requests) == 1
    gate.refusal = (1, "over max_sessions_per_client (2)")
    third = d.connect()
    third.sendall(GREETING + socks5_request_bytes("127.0.0.1", echo_target.port))
    assert d.recv_to_eof(third) == SELECTED + failure5(1)
    assert len(gate.requests) == 2
    assert [e.why for e in d.ended] == ["over max_sessions_per_client (2)"]
    assert counts.of_client(buckets) == 2  # the refused one is uncounted once it ended
    held.pop().close()
    d.run_until(lambda: counts.of_client(buckets) == 1, "the closed one uncounted")
    gate.refusal = None
    held.append(relayed_once(d, echo_target.port))  # under the cap again: not asked
    assert len(gate.requests) == 2


def test_a_remembered_client_blocked_since_is_asked_again(door, echo_target, counts):
    buckets = counts.buckets(b"a client")
    gate = Gate(admit=buckets)
    d = door(gate, judge_accept=True, counts=counts.for_engine(0), check_blocked=True)
    relayed_once(d, echo_target.port).close()
    counts.block(0, buckets, int(time.monotonic() * 1000) + 60_000)
    gate.admit = False  # the gate sees the block
    assert d.recv_to_eof(d.connect()) == b""
    assert len(gate.accepted_calls) == 2


@pytest.mark.parametrize("answer", [(1,), (1, 2, 3), (0, 1 << 20)], ids=["one", "three", "out of range"])
def test_buckets_the_engine_cannot_count_in_refuse_the_client_and_raise(door, counts, answer):
    d = door(Gate(admit=answer), judge_accept=True, counts=counts.for_engine(0))
    client = d.connect()
    with pytest.raises(ValueError, match="gate.accepted"):
        for _ in range(500):
            d.run_once()
    assert d.recv_to_eof(client) == b""
    assert counts.of_worker(0) == 0


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_the_counts_cannot_change_while_sessions_are_counted_in_them(engine, counts, echo_target):
    d = FrontDoor(ENGINES[engine], Gate(admit=counts.buckets(b"x")), "127.0.0.1",
                  {"judge_accept": True, "counts": counts.for_engine(0)})
    try:
        client = relayed_once(d, echo_target.port)
        other = SharedLimits(1)
        with pytest.raises(ValueError, match="counted in another map"):
            d.engine.front(d.gate, judge_accept=True, counts=other.for_engine(0))
        d.engine.front(d.gate, judge_accept=True, counts=counts.for_engine(0))  # a reload: the same map
        assert counts.of_worker(0) == 1
        d.engine.front(d.gate, judge_accept=True)  # no counts: new sessions are not counted...
        client.close()
        d.run_until(lambda: counts.of_worker(0) == 0, "...but the counted one is uncounted")
    finally:
        d.close()


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_front_refuses_what_it_cannot_honour(engine):
    made = ENGINES[engine].RelayEngine()
    try:
        with pytest.raises(ValueError, match="0-65535"):
            made.front(object(), own_ports=frozenset({1080, 70000}))
        with pytest.raises(ValueError, match="methods"):
            made.front(object(), methods=bytes(9))
        with pytest.raises(ValueError, match="caps"):
            made.front(object(), caps=(0, -1, 0))
        words = SharedLimits(1).for_engine(0)
        with pytest.raises(ValueError, match="layout"):
            made.front(object(), counts=words._replace(slot=1))
        with pytest.raises(ValueError, match="need more"):
            made.front(object(), counts=words._replace(workers=4, slot=3))
        with pytest.raises(ValueError, match="front"):
            ENGINES[engine].RelayEngine().listen(0)  # no gate to hand clients to yet
    finally:
        made.close()


# --------------------------------------------------------------------- egress addresses


def packed(*hosts: str) -> tuple[bytes, ...]:
    return tuple(socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host) for host in hosts)


def connect_from(d: FrontDoor, source: str, address: tuple | None = None) -> socket.socket:
    """A client of the engine from ``source`` (any 127/8 address is loopback's)."""
    client = socket.create_connection(address or d.address, timeout=5, source_address=(source, 0))
    d.clients.append(client)
    return client


def recording(peers: list):
    """A target's handler that records where each connection comes from."""

    def handle(conn: socket.socket) -> None:
        peers.append(conn.getpeername())
        echo_handler(conn)

    return handle


def egress_of(d: FrontDoor, target, peers: list, client: socket.socket, proto: int = 5) -> str:
    """One CONNECT of ``client`` through the engine to the recording target: the source
    address the target saw (and the reply said)."""
    seen = len(peers)
    if proto == 5:
        client.sendall(GREETING + socks5_request_bytes("127.0.0.1", target.port))
        answer = d.recv_exact(client, 12)
        assert answer[:2] == SELECTED
        bound = bound_of(answer[2:])
    else:
        client.sendall(request4("127.0.0.1", target.port))
        answer = d.recv_exact(client, 8)
        assert answer[:2] == b"\x00\x5a", answer
        bound = (socket.inet_ntoa(answer[4:]), struct.unpack("!H", answer[2:4])[0])
    d.run_until(lambda: len(peers) > seen, "the target's accept")
    assert peers[seen] == bound
    client.close()
    return bound[0]


def test_egress_addresses_are_taken_in_turn_per_family(door, tcp_target):
    peers: list = []
    target = tcp_target(recording(peers))
    d = door(egress=packed("127.0.0.2", "::1", "127.0.0.3"))  # ::1 is IPv6's turn, not IPv4's
    sources = [egress_of(d, target, peers, d.connect(), proto) for proto in (5, 4, 5, 4)]
    assert sources == ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"]


EGRESS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
CLIENTS = tuple(f"127.0.0.{n}" for n in range(5, 11))


def sticky_egress(client: str) -> str:
    """Where the session would send this client (the Python path's choice)."""
    return EGRESS[egress_index(socket.inet_aton(client), len(EGRESS))]


def test_sticky_egress_is_the_client_addresss_as_the_session_picks_it(door, tcp_target):
    assert len({sticky_egress(client) for client in CLIENTS}) > 1  # not one answer for all
    peers: list = []
    target = tcp_target(recording(peers))
    d = door(egress=packed(*EGRESS), egress_sticky=True)
    for _ in range(2):  # taken in turn, the second round would differ
        for client in CLIENTS:
            assert egress_of(d, target, peers, connect_from(d, client)) == sticky_egress(client), client


def test_sticky_egress_takes_an_ipv4_mapped_client_as_its_ipv4_address(door, tcp_target):
    require_ipv6()
    peers: list = []
    target = tcp_target(recording(peers))
    d = door(egress=packed(*EGRESS), egress_sticky=True)
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as dual:  # IPv4 clients as ::ffff:a.b.c.d
        dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        dual.bind(("::ffff:127.0.0.1", 0))
        dual.listen()
        dual.setblocking(False)
        d.engine.unlisten()
        d.engine.listen(dual.fileno())
        for client in CLIENTS:
            sock = connect_from(d, client, ("127.0.0.1", dual.getsockname()[1]))
            assert egress_of(d, target, peers, sock) == sticky_egress(client), client
        d.close()


def failed_as(ended: Ended) -> tuple:
    return ended.reason, ended.errno, ended.reply, ended.why


@pytest.mark.parametrize(("proto", "request_bytes", "reply"), [
    ("socks5", lambda port: GREETING + socks5_request_bytes("127.0.0.1", port), SELECTED + failure5(3)),
    ("socks4", lambda port: request4("127.0.0.1", port), FAILURE4),
], ids=["socks5", "socks4"])
def test_with_egress_of_the_other_family_only_the_network_is_unreachable(door, tcp_target, proto,
                                                                          request_bytes, reply):
    target = tcp_target()
    d = door(egress=packed("::1"))
    client = d.connect()
    client.sendall(request_bytes(target.port))
    assert d.recv_to_eof(client) == reply
    ended = d.ended_one()
    assert ended.described == described(client, proto, f"127.0.0.1:{target.port}")
    assert failed_as(ended) == ("failed", errno.ENETUNREACH, 3, "connect failed: Network is unreachable")
    assert target.connections == 0


def test_an_ipv6_destination_with_ipv4_egress_only_is_unreachable(door):
    # Not ::1: the engine hands ::/80 to the session. A documentation address, never
    # reached: the engine fails it before any connect().
    d = door(egress=packed("127.0.0.2"))
    client = d.connect()
    client.sendall(GREETING + socks5_request_bytes("2001:db8::1", 80))
    assert d.recv_to_eof(client) == SELECTED + failure5(3)
    ended = d.ended_one()
    assert ended.described == described(client, "socks5", "[2001:db8::1]:80")
    assert failed_as(ended) == ("failed", errno.ENETUNREACH, 3, "connect failed: Network is unreachable")


@pytest.mark.parametrize(("egress", "dest"), [("192.0.2.1", "127.0.0.1"), ("2001:db8::5", "2001:db8::1")],
                         ids=["ipv4", "ipv6"])
def test_an_egress_address_that_is_not_local_fails_the_connect_before_it_leaves(door, tcp_target, egress, dest):
    """TEST-NET-1 and the IPv6 documentation prefix: configured nowhere, so bind() fails
    (EADDRNOTAVAIL), and nothing is sent; the destination is never reached."""
    family = socket.AF_INET6 if ":" in egress else socket.AF_INET
    if family == socket.AF_INET6:
        require_ipv6()
    with socket.socket(family) as probe, contextlib.suppress(OSError):
        probe.bind((egress, 0))
        pytest.skip(f"{egress} is an address of this host")
    target = tcp_target()
    port = target.port if family == socket.AF_INET else 80
    before = set(os.listdir("/proc/self/fd"))
    d = door(egress=packed(egress))
    client = d.connect()
    client.sendall(GREETING + socks5_request_bytes(dest, port))
    assert d.recv_to_eof(client) == SELECTED + failure5(3)
    assert failed_as(d.ended_one()) == (
        "failed", errno.EADDRNOTAVAIL, 3, "connect failed: Cannot assign requested address")
    assert target.connections == 0
    d.close()
    assert set(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("egress", [["127.0.0.1"], [b"\x7f\0\0"], [bytearray(4)], packed("127.0.0.1") * 65,
                                    packed("::1") * 65], ids=["text", "3 bytes", "bytearray", "65 IPv4", "65 IPv6"])
def test_front_refuses_egress_it_cannot_bind(engine, egress):
    made = ENGINES[engine].RelayEngine()
    try:
        with pytest.raises(ValueError, match="egress"):
            made.front(object(), egress=egress)
        made.front(object(), egress=packed("127.0.0.1") * 64 + packed("::1") * 64)  # 64 of each
    finally:
        made.close()


# --------------------------------------------------------------------- a client's shared limit

CLIENT_RATE = 200_000


def test_a_clients_sessions_share_its_limit_and_its_entry_is_let_go(door, tcp_target):
    """front(client_rate_*): every session of one client address reads through that
    client's one bucket in the shared accounts, held from its connect until it ends."""
    from fastsocks._relay_types import bucket_bytes

    payload = os.urandom(150_000)
    target = tcp_target(lambda conn: conn.sendall(payload))
    accounts = _relay.Accounts(256)
    front_door = door(accounts=accounts, client_rate_down_bytes_per_s=CLIENT_RATE)
    started_s = time.monotonic()
    clients = [front_door.connect() for _ in range(2)]
    for client in clients:
        client.sendall(GREETING + socks5_request_bytes("127.0.0.1", target.port))
    for client in clients:
        assert front_door.recv_exact(client, 2 + 10)[:4] == b"\x05\x00\x05\x00"
    held = [(kind, name, refs) for _i, kind, name, refs, _u in accounts.claimed()]
    assert held == [(_relay.ACCOUNT_CLIENT, socket.inet_aton("127.0.0.1"), 2)]
    for client in clients:
        assert front_door.recv_to_eof(client) == payload
        client.shutdown(socket.SHUT_WR)
    # 300 kB through one 200 kB/s bucket, less its burst: each alone would take half.
    assert time.monotonic() - started_s >= (2 * len(payload) - bucket_bytes(CLIENT_RATE)[0]) / CLIENT_RATE
    front_door.run_until(lambda: len(front_door.ended) == 2, "both sessions' ends")
    assert [refs for _i, _k, _n, refs, _u in accounts.claimed()] == [0]
    assert sorted(e.bytes_down for e in front_door.ended) == [len(payload)] * 2


def test_client_rates_need_the_accounts(door):
    with pytest.raises(ValueError, match="use_accounts"):
        door(client_rate_up_bytes_per_s=1000)

