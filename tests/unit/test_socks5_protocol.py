"""The sans-I/O SOCKS5 server side against RFC 1928, fed whole, byte by byte and split anywhere."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastsocks.errors import LocalProtocolError, ProtocolError
from fastsocks.protocol import (
    NEED_DATA,
    AddressType,
    Command,
    CommandReply,
    Greeting,
    Method,
    MethodSelection,
    Reply,
    Request,
    ServerConnection,
    State,
)
from fastsocks.protocol.userpass import AuthResponse

GREETING = b"\x05\x01\x00"  # one method offered: NO_AUTH
TRAILER = b"\x05\x01\x00\x01payload that must be relayed"


# --- a driver that plays the session's part --------------------------------


@dataclass(frozen=True)
class Outcome:
    events: tuple[object, ...]
    error: tuple[type, str, int | None] | None
    trailing: bytes | None  # None after an error
    state: State


def run(chunks: list[bytes], *, select: int | None = Method.NO_AUTH, eof: bool = False, **kwargs) -> Outcome:
    """Feed ``chunks``, draining events after each; answer a Greeting with ``select``.

    Empty chunks are skipped (``b""`` would mean EOF); EOF comes last if ``eof``.
    """
    conn = ServerConnection(**kwargs)
    events: list[object] = []
    try:
        for chunk in [chunk for chunk in chunks if chunk] + ([b""] if eof else []):
            conn.receive_data(chunk)
            drain(conn, events, select)
    except ProtocolError as exc:
        assert not isinstance(exc, LocalProtocolError), exc
        # The driver stops at the first error, so what is left unread depends on the split.
        error = (type(exc), str(exc), exc.reply)
        return Outcome(tuple(events), error, None, conn.state)
    return Outcome(tuple(events), None, conn.trailing_data[0], conn.state)


def drain(conn: ServerConnection, events: list[object], select: int | None) -> None:
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, Greeting) and select is not None:
            conn.send(MethodSelection(select))


def split(data: bytes, mode: str) -> list[bytes]:
    if mode == "whole":
        return [data]
    if mode == "bytewise":
        return [data[i : i + 1] for i in range(len(data))]
    assert mode == "trailing"
    return [data + TRAILER]


MODES = ["whole", "bytewise", "trailing"]


def check(data: bytes, mode: str, events: tuple, *, select: int | None = Method.NO_AUTH, **error) -> Outcome:
    """``data`` gives ``events`` (and the error described by ``error``) in every mode."""
    outcome = run(split(data, mode), select=select)
    assert outcome.events == events
    if error:
        assert outcome.error is not None, outcome
        kind, msg, reply = outcome.error
        assert reply == error["reply"]
        assert error["match"] in msg
        assert outcome.state is State.ERROR
    else:
        assert outcome.error is None, outcome.error
        assert outcome.trailing == (TRAILER if mode == "trailing" else b"")
    return outcome


def ipv6_request(command: int, host: str, port: int) -> bytes:
    return bytes([5, command, 0, 4]) + ipaddress.IPv6Address(host).packed + port.to_bytes(2, "big")


def domain_request(command: int, name: bytes, port: int) -> bytes:
    return bytes([5, command, 0, 3, len(name)]) + name + port.to_bytes(2, "big")


# --- RFC 1928 vectors --------------------------------------------------------

GREETINGS = [
    pytest.param(b"\x05\x01\x00", (0,), id="no-auth"),
    pytest.param(b"\x05\x02\x00\x02", (0, 2), id="no-auth+userpass"),
    pytest.param(b"\x05\x03\x02\x01\x00", (2, 1, 0), id="order-kept"),
    pytest.param(b"\x05\x01\x80", (0x80,), id="private-method"),
    pytest.param(b"\x05\xff" + bytes(range(255)), tuple(range(255)), id="255-methods"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("data", "methods"), GREETINGS)
def test_greeting(data: bytes, methods: tuple[int, ...], mode: str) -> None:
    outcome = check(data, mode, (Greeting(methods),), select=None)
    assert outcome.state is State.AWAIT_METHOD_SELECTION


REQUESTS = [
    pytest.param(
        b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
        Request(Command.CONNECT, AddressType.IPV4, "127.0.0.1", 80),
        id="connect-ipv4",
    ),
    pytest.param(
        ipv6_request(1, "2001:db8::1", 443),
        Request(Command.CONNECT, AddressType.IPV6, "2001:db8::1", 443),
        id="connect-ipv6",
    ),
    pytest.param(
        bytes([5, 1, 0, 4]) + bytes(range(1, 17)) + b"\x00\x16",
        Request(Command.CONNECT, AddressType.IPV6, "102:304:506:708:90a:b0c:d0e:f10", 22),
        id="connect-ipv6-full",
    ),
    pytest.param(
        ipv6_request(1, "::", 1), Request(Command.CONNECT, AddressType.IPV6, "::", 1), id="connect-ipv6-zeros"
    ),
    pytest.param(
        domain_request(1, b"example.com", 443),
        Request(Command.CONNECT, AddressType.DOMAIN, "example.com", 443),
        id="connect-domain",
    ),
    pytest.param(
        domain_request(1, b"a" * 255, 65535),
        Request(Command.CONNECT, AddressType.DOMAIN, "a" * 255, 65535),
        id="connect-domain-255",
    ),
    pytest.param(
        b"\x05\x02\x00\x01\xc0\x00\x02\x01\x1f\x90",
        Request(Command.BIND, AddressType.IPV4, "192.0.2.1", 8080),
        id="bind",
    ),
    pytest.param(
        b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00",
        Request(Command.UDP_ASSOCIATE, AddressType.IPV4, "0.0.0.0", 0),
        id="udp-associate-zeros",
    ),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("data", "request_"), REQUESTS)
def test_request(data: bytes, request_: Request, mode: str) -> None:
    outcome = check(GREETING + data, mode, (Greeting((0,)), request_))
    assert outcome.state is State.REQUEST_RECEIVED


def test_pipelined_greeting_request_and_payload() -> None:
    conn = ServerConnection()
    conn.receive_data(GREETING + domain_request(1, b"example.com", 80) + b"GET / HTTP/1.0\r\n\r\n")
    assert conn.next_event() == Greeting((0,))
    assert conn.next_event() is NEED_DATA  # our turn: the request waits in the buffer
    assert conn.send(MethodSelection(Method.NO_AUTH)) == b"\x05\x00"
    assert conn.next_event() == Request(Command.CONNECT, AddressType.DOMAIN, "example.com", 80)
    assert conn.next_event() is NEED_DATA
    assert conn.trailing_data == (b"GET / HTTP/1.0\r\n\r\n", False)
    conn.send(CommandReply(Reply.SUCCEEDED, "10.0.0.1", 40000))
    assert conn.state is State.ESTABLISHED
    assert conn.trailing_data == (b"GET / HTTP/1.0\r\n\r\n", False)


def test_need_data_repr() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"


# --- replies, byte-exact -----------------------------------------------------

REPLIES = [
    pytest.param(CommandReply(Reply.SUCCEEDED, "10.0.0.1", 1080), "05000001" "0a000001" "0438", id="ipv4"),
    pytest.param(CommandReply(Reply.CONNECTION_REFUSED), "05050001" "00000000" "0000", id="default-address"),
    pytest.param(
        CommandReply(Reply.SUCCEEDED, "2001:db8::1", 443),
        "05000004" "20010db8000000000000000000000001" "01bb",
        id="ipv6",
    ),
    pytest.param(
        CommandReply(Reply.SUCCEEDED, "::ffff:1.2.3.4", 80),
        "05000004" "00000000000000000000ffff01020304" "0050",
        id="ipv4-mapped-stays-ipv6",
    ),
    pytest.param(
        CommandReply(Reply.SUCCEEDED, "proxy.example", 1080),
        "05000003" "0d" + b"proxy.example".hex() + "0438",
        id="domain",
    ),
    pytest.param(CommandReply(0x42, "1.2.3.4", 1), "05420001" "01020304" "0001", id="unassigned-code"),
]


@pytest.mark.parametrize(("reply", "wire_hex"), REPLIES)
def test_reply_bytes(reply: CommandReply, wire_hex: str) -> None:
    conn = connection_in(State.REQUEST_RECEIVED)
    assert conn.send(reply).hex() == wire_hex


@pytest.mark.parametrize(
    ("method", "state"),
    [
        (Method.NO_AUTH, State.AWAIT_REQUEST),
        (Method.USERNAME_PASSWORD, State.AUTH),
        (Method.GSSAPI, State.AUTH),
        (Method.NO_ACCEPTABLE, State.CLOSED),
    ],
)
def test_method_selection(method: Method, state: State) -> None:
    conn = ServerConnection()
    conn.receive_data(b"\x05\x03\x00\x01\x02")
    conn.next_event()
    assert conn.send(MethodSelection(method)) == bytes([5, method])
    assert conn.state is state


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(CommandReply(0, "a" * 256), id="domain-too-long"),
        pytest.param(CommandReply(0, ""), id="domain-empty"),
        pytest.param(CommandReply(0, "bad\x00name"), id="domain-nul"),
        pytest.param(CommandReply(0, "exämple.com"), id="domain-non-ascii"),
        pytest.param(CommandReply(0, "1.2.3.4", 65536), id="port-too-big"),
        pytest.param(CommandReply(0, "1.2.3.4", -1), id="port-negative"),
        pytest.param(CommandReply(256), id="reply-too-big"),
        pytest.param(CommandReply(0, 16909060), id="host-not-str"),  # type: ignore[arg-type]
    ],
)
def test_unsendable_reply(reply: CommandReply) -> None:
    conn = connection_in(State.REQUEST_RECEIVED)
    with pytest.raises(LocalProtocolError):
        conn.send(reply)
    assert conn.state is State.REQUEST_RECEIVED  # a refused send changes nothing


# --- errors --------------------------------------------------------------------

GREETING_ERRORS = [
    pytest.param(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", None, "version 0x04", id="socks4"),
    pytest.param(b"\x16\x03\x01", None, "version 0x16", id="tls-hello"),
    pytest.param(b"\x05\x00", Method.NO_ACCEPTABLE, "no method", id="nmethods-0"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("data", "reply", "match"), GREETING_ERRORS)
def test_greeting_error(data: bytes, reply: int | None, match: str, mode: str) -> None:
    check(data, mode, (), reply=reply, match=match)


GF, CNS, ATNS = Reply.GENERAL_FAILURE, Reply.COMMAND_NOT_SUPPORTED, Reply.ADDRESS_TYPE_NOT_SUPPORTED
REQUEST_ERRORS = [
    pytest.param(b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", GF, "version 0x04", id="version"),
    pytest.param(b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50", GF, "reserved byte is 0x01", id="rsv"),
    pytest.param(b"\x05\x01\x00\x02\x7f\x00\x00\x01\x00\x50", ATNS, "address type 0x02", id="atyp-2"),
    pytest.param(b"\x05\x01\x00\x00", ATNS, "address type 0x00", id="atyp-0"),
    pytest.param(b"\x05\x04\x00\x01\x7f\x00\x00\x01\x00\x50", CNS, "command 0x04", id="cmd-4"),
    pytest.param(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x50", CNS, "command 0x00", id="cmd-0"),
    pytest.param(domain_request(0xF0, b"example.com", 0), CNS, "command 0xf0", id="cmd-tor-resolve"),
    pytest.param(b"\x05\x01\x00\x03\x00\x00\x50", GF, "empty domain", id="domain-empty"),
    pytest.param(domain_request(1, b"localhost\x00.example.com", 80), GF, "NUL byte at offset 9", id="nul"),
    pytest.param(domain_request(1, b"\x00", 80), GF, "NUL byte at offset 0", id="only-nul"),
    pytest.param(domain_request(1, b"exa mple.com", 80), GF, "a space at offset 3", id="space"),
    pytest.param(domain_request(1, b"example.com\n", 80), GF, "control byte 0x0a", id="newline"),
    pytest.param(domain_request(1, b"ex\x7fample", 80), GF, "DEL byte", id="del"),
    pytest.param(domain_request(1, "exämple".encode(), 80), GF, "non-ASCII byte 0xc3", id="non-ascii"),
    # The chosen order: VER, RSV, ATYP, domain name, then CMD once the request is whole.
    pytest.param(b"\x05\x09\x00\x05", ATNS, "address type 0x05", id="cmd-and-atyp-bad"),
    pytest.param(b"\x05\x09\x01\x05", GF, "reserved", id="cmd-rsv-atyp-bad"),
    pytest.param(b"\x04\x09\x01\x05", GF, "version", id="all-bad"),
    pytest.param(domain_request(9, b"a b", 80), GF, "a space", id="cmd-and-domain-bad"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("data", "reply", "match"), REQUEST_ERRORS)
def test_request_error(data: bytes, reply: int, match: str, mode: str) -> None:
    check(GREETING + data, mode, (Greeting((0,)),), reply=reply, match=match)


def test_command_checked_only_once_request_is_whole() -> None:
    conn = connection_in(State.AWAIT_REQUEST)
    request = domain_request(9, b"example.com", 80)
    conn.receive_data(request[:-1])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(request[-1:])
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    assert info.value.reply == Reply.COMMAND_NOT_SUPPORTED


def test_port_zero_is_accepted() -> None:
    outcome = run([GREETING + b"\x05\x01\x00\x01\x01\x02\x03\x04\x00\x00"])
    assert outcome.events[-1] == Request(Command.CONNECT, AddressType.IPV4, "1.2.3.4", 0)


def test_error_repeats_and_then_allows_the_refusal() -> None:
    conn = connection_in(State.AWAIT_REQUEST)
    conn.receive_data(b"\x05\x07\x00\x01\x7f\x00\x00\x01\x00\x50")
    for _ in range(2):
        with pytest.raises(ProtocolError, match="command 0x07") as info:
            conn.next_event()
        assert info.value.reply == Reply.COMMAND_NOT_SUPPORTED
    with pytest.raises(LocalProtocolError):
        conn.send(CommandReply(Reply.SUCCEEDED))
    with pytest.raises(LocalProtocolError):
        conn.send(MethodSelection(Method.NO_ACCEPTABLE))
    assert conn.send(CommandReply(Reply.COMMAND_NOT_SUPPORTED)) == b"\x05\x07\x00\x01" + bytes(6)
    assert conn.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.next_event()


def test_no_method_offered_is_refused_with_ff() -> None:
    conn = ServerConnection()
    conn.receive_data(b"\x05\x00")
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    assert info.value.reply == Method.NO_ACCEPTABLE
    with pytest.raises(LocalProtocolError):
        conn.send(MethodSelection(Method.NO_AUTH))
    with pytest.raises(LocalProtocolError):
        conn.send(CommandReply(Reply.GENERAL_FAILURE))
    assert conn.send(MethodSelection(Method.NO_ACCEPTABLE)) == b"\x05\xff"
    assert conn.state is State.CLOSED


def test_bad_version_allows_no_answer() -> None:
    conn = ServerConnection()
    conn.receive_data(b"\x04\x01")
    with pytest.raises(ProtocolError):
        conn.next_event()
    for event in (MethodSelection(Method.NO_ACCEPTABLE), CommandReply(Reply.GENERAL_FAILURE)):
        with pytest.raises(LocalProtocolError):
            conn.send(event)


# --- EOF -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param(b"", "during the greeting", id="nothing-sent"),
        pytest.param(b"\x05\x02\x00", "during the greeting", id="mid-greeting"),
        pytest.param(GREETING + b"\x05\x01\x00\x03\x0bexample", "during the request", id="mid-request"),
        pytest.param(GREETING, "during the request", id="before-request"),
    ],
)
@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_eof_mid_message(data: bytes, match: str, mode: str) -> None:
    outcome = run(split(data, mode), eof=True)
    assert outcome.error is not None
    assert outcome.error[2] is None
    assert match in outcome.error[1]


def test_eof_after_request_is_not_an_error() -> None:
    conn = connection_in(State.AWAIT_REQUEST)
    conn.receive_data(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50tail")
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), Request)
    assert conn.next_event() is NEED_DATA
    assert conn.trailing_data == (b"tail", True)


def test_eof_while_it_is_our_turn_waits_for_our_answer() -> None:
    conn = ServerConnection()
    conn.receive_data(GREETING)
    conn.receive_data(b"")
    assert conn.next_event() == Greeting((0,))
    assert conn.next_event() is NEED_DATA
    conn.send(MethodSelection(Method.NO_AUTH))
    with pytest.raises(ProtocolError, match="during the request"):
        conn.next_event()


def test_receive_after_eof_is_local_error() -> None:
    conn = ServerConnection()
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"\x05")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"")


# --- buffer cap ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "reply"),
    [
        (State.AWAIT_GREETING, None),
        (State.AWAIT_METHOD_SELECTION, None),
        (State.AUTH, None),
        (State.AWAIT_REQUEST, Reply.GENERAL_FAILURE),
        (State.REQUEST_RECEIVED, Reply.GENERAL_FAILURE),
    ],
)
def test_buffer_cap(state: State, reply: int | None) -> None:
    conn = connection_in(state, max_buffer_bytes=1024)
    conn.receive_data(b"\x05" * (1024 - len(conn.trailing_data[0])))  # exactly at the cap: fine
    with pytest.raises(ProtocolError, match="more than 1024") as info:
        conn.receive_data(b"\x05")
    assert not isinstance(info.value, LocalProtocolError)
    assert info.value.reply == reply
    assert conn.state is State.ERROR


def test_buffer_cap_must_fit_a_pipelined_handshake() -> None:
    with pytest.raises(ValueError):
        ServerConnection(max_buffer_bytes=518)
    ServerConnection(max_buffer_bytes=519)


def test_longest_messages_fit_the_smallest_cap() -> None:
    data = b"\x05\xff" + bytes(range(255)) + domain_request(1, b"x" * 255, 1)
    outcome = run([data], select=0, max_buffer_bytes=519)
    assert outcome.error is None
    assert outcome.events[-1] == Request(Command.CONNECT, AddressType.DOMAIN, "x" * 255, 1)


# --- sending out of turn -----------------------------------------------------------


def connection_in(state: State, *, command: int = Command.CONNECT, **kwargs) -> ServerConnection:
    """A connection driven to ``state`` through the public API."""
    conn = ServerConnection(**kwargs)
    if state is State.AWAIT_GREETING:
        return conn
    conn.receive_data(b"\x05\x02\x00\x01")
    conn.next_event()
    if state is State.AWAIT_METHOD_SELECTION:
        return conn
    # AUTH as another method's (GSSAPI) sub-negotiation, read elsewhere (test_userpass for RFC 1929).
    conn.send(MethodSelection(Method.GSSAPI if state is State.AUTH else Method.NO_AUTH))
    if state in (State.AUTH, State.AWAIT_REQUEST):
        return conn
    conn.receive_data(bytes([5, command, 0, 1, 127, 0, 0, 1, 0, 80]))
    conn.next_event()
    if state is State.REQUEST_RECEIVED:
        return conn
    conn.send(CommandReply(Reply.SUCCEEDED))
    assert conn.state is state
    return conn


WRONG_TURN = [
    (State.AWAIT_GREETING, MethodSelection(Method.NO_AUTH)),
    (State.AWAIT_GREETING, CommandReply(Reply.SUCCEEDED)),
    (State.AWAIT_METHOD_SELECTION, CommandReply(Reply.GENERAL_FAILURE)),
    (State.AWAIT_METHOD_SELECTION, MethodSelection(Method.USERNAME_PASSWORD)),  # not offered
    (State.AUTH, MethodSelection(Method.NO_AUTH)),
    (State.AUTH, CommandReply(Reply.SUCCEEDED)),
    (State.AUTH, AuthResponse(ok=True)),  # GSSAPI's sub-negotiation ends in auth_done()
    (State.AWAIT_REQUEST, AuthResponse(ok=True)),
    (State.AWAIT_REQUEST, MethodSelection(Method.NO_AUTH)),
    (State.AWAIT_REQUEST, CommandReply(Reply.SUCCEEDED)),
    (State.REQUEST_RECEIVED, MethodSelection(Method.NO_AUTH)),
    (State.ESTABLISHED, CommandReply(Reply.SUCCEEDED)),
    (State.ESTABLISHED, CommandReply(Reply.GENERAL_FAILURE)),
]


@pytest.mark.parametrize(("state", "event"), WRONG_TURN, ids=lambda v: getattr(v, "name", type(v).__name__))
def test_send_out_of_turn(state: State, event: object) -> None:
    conn = connection_in(state)
    with pytest.raises(LocalProtocolError):
        conn.send(event)  # type: ignore[arg-type]
    assert conn.state is state


def test_send_after_close() -> None:
    conn = connection_in(State.REQUEST_RECEIVED)
    conn.send(CommandReply(Reply.HOST_UNREACHABLE))
    assert conn.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.send(CommandReply(Reply.HOST_UNREACHABLE))
    with pytest.raises(LocalProtocolError):
        conn.next_event()


def test_send_rejects_non_events() -> None:
    with pytest.raises(TypeError):
        ServerConnection().send(Greeting((0,)))  # type: ignore[arg-type]


def test_bind_gets_two_replies() -> None:
    conn = connection_in(State.REQUEST_RECEIVED, command=Command.BIND)
    conn.send(CommandReply(Reply.SUCCEEDED, "192.0.2.1", 5000))
    assert conn.state is State.AWAIT_BIND_PEER
    assert conn.next_event() is NEED_DATA
    conn.send(CommandReply(Reply.SUCCEEDED, "198.51.100.7", 6000))
    assert conn.state is State.ESTABLISHED


def test_bind_second_reply_may_fail() -> None:
    conn = connection_in(State.REQUEST_RECEIVED, command=Command.BIND)
    conn.send(CommandReply(Reply.SUCCEEDED, "192.0.2.1", 5000))
    conn.send(CommandReply(Reply.TTL_EXPIRED))
    assert conn.state is State.CLOSED


# --- sub-negotiation hand-off -----------------------------------------------------


def test_auth_sub_negotiation_then_pipelined_request() -> None:
    auth = b"\x01\x04user\x04pass"  # a sub-negotiation (GSSAPI's, say) parsed by another module
    request = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"
    conn = connection_in(State.AUTH)
    conn.receive_data(auth + request + b"payload")
    assert conn.next_event() is NEED_DATA
    assert conn.trailing_data == (auth + request + b"payload", False)
    conn.auth_done(len(auth))
    assert conn.state is State.AWAIT_REQUEST
    assert conn.next_event() == Request(Command.CONNECT, AddressType.IPV4, "127.0.0.1", 80)
    assert conn.trailing_data == (b"payload", False)


@pytest.mark.parametrize("consumed", [-1, 6])
def test_auth_done_cannot_consume_what_is_not_there(consumed: int) -> None:
    conn = connection_in(State.AUTH)
    conn.receive_data(b"\x01\x01u\x01p")
    with pytest.raises(LocalProtocolError):
        conn.auth_done(consumed)
    assert conn.state is State.AUTH


def test_auth_done_only_during_auth() -> None:
    conn = connection_in(State.AWAIT_REQUEST)
    with pytest.raises(LocalProtocolError):
        conn.auth_done(0)


# --- properties --------------------------------------------------------------------


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, Request]:
    """A valid request on the wire, encoded here independently, and what it means."""
    command = draw(st.sampled_from(Command))
    port = draw(st.integers(0, 0xFFFF))
    kind = draw(st.sampled_from(AddressType))
    if kind is AddressType.DOMAIN:
        name = draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=255))
        address = bytes([len(name)]) + name.encode()
        host = name
    else:
        ip = draw(st.ip_addresses(v=4 if kind is AddressType.IPV4 else 6))
        address, host = ip.packed, str(ip)
    wire = bytes([5, command, 0, kind]) + address + port.to_bytes(2, "big")
    return wire, Request(command, kind, host, port)


@given(requests())
def test_valid_requests_round_trip(case: tuple[bytes, Request]) -> None:
    wire, expected = case
    outcome = run([GREETING + wire])
    assert outcome.error is None
    assert outcome.events == (Greeting((0,)), expected)


@given(st.binary(max_size=400), st.data())
def test_random_bytes_give_events_or_protocol_errors(data: bytes, draw: st.DataObject) -> None:
    # run() fails on any exception other than a (non-local) ProtocolError.
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=8)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    eof = draw.draw(st.booleans())
    outcome = run([GREETING, *chunks], eof=eof)
    assert all(isinstance(event, (Greeting, Request)) for event in outcome.events)
    assert outcome == run([GREETING + data], eof=eof)


@given(st.binary(max_size=300))
def test_random_greetings_give_events_or_protocol_errors(data: bytes) -> None:
    whole = run([data], select=None)
    assert run(split(data, "bytewise"), select=None) == whole


@given(requests(), st.binary(max_size=64), st.data())
def test_split_points_change_nothing(case: tuple[bytes, Request], payload: bytes, draw: st.DataObject) -> None:
    data = b"\x05\x02\x02\x00" + case[0] + payload
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=10)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    whole = run([data])
    assert whole.events == (Greeting((2, 0)), case[1])
    assert whole.trailing == payload
    assert run(chunks) == whole


def decode_reply(wire: bytes) -> tuple[int, int, str, int]:
    """A test-side decoder of a reply (§6): REP, ATYP, host, port."""
    assert wire[:1] == b"\x05" and wire[2] == 0
    atyp, rest = wire[3], wire[4:]
    if atyp == AddressType.DOMAIN:
        host, rest = rest[1 : 1 + rest[0]].decode(), rest[1 + rest[0] :]
    else:
        size = 4 if atyp == AddressType.IPV4 else 16
        host, rest = str(ipaddress.ip_address(rest[:size])), rest[size:]
    assert len(rest) == 2
    return wire[1], atyp, host, int.from_bytes(rest, "big")


def as_replied(host: str) -> tuple[AddressType, str]:
    """How a reply carries ``host``: an address literal as that address (a domain-name
    request for "0.0.0.0" too), anything else as a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return AddressType.DOMAIN, host
    return (AddressType.IPV4 if ip.version == 4 else AddressType.IPV6), str(ip)


@given(requests(), st.sampled_from(Reply))
def test_replies_round_trip(case: tuple[bytes, Request], reply: Reply) -> None:
    request = case[1]
    conn = connection_in(State.REQUEST_RECEIVED)
    wire = conn.send(CommandReply(reply, request.host, request.port))
    assert decode_reply(wire) == (reply, *as_replied(request.host), request.port)


# --- refusal(): what the session sends after a protocol error ----------------------------


def test_refusal_answers_a_bad_greeting_with_no_acceptable():
    conn = ServerConnection()
    conn.receive_data(b"\x05\x00")
    with pytest.raises(ProtocolError):
        conn.next_event()
    assert conn.send(conn.refusal()) == b"\x05\xff"
    assert conn.refusal() is None


def test_refusal_answers_a_bad_request_with_its_reply_code():
    conn = ServerConnection()
    conn.receive_data(b"\x05\x01\x00")
    conn.next_event()
    conn.send(MethodSelection(Method.NO_AUTH))
    conn.receive_data(b"\x05\x01\x00\x09")
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    assert info.value.reply == Reply.ADDRESS_TYPE_NOT_SUPPORTED
    assert conn.send(conn.refusal()) == b"\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00"


def test_no_refusal_when_the_version_byte_is_wrong():
    conn = ServerConnection()
    conn.receive_data(b"\x04\x01\x00\x50")
    with pytest.raises(ProtocolError):
        conn.next_event()
    assert conn.refusal() is None
