"""The RFC 1929 username/password sub-negotiation, fed whole, byte by byte and split anywhere."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastsocks.errors import LocalProtocolError, ProtocolError
from fastsocks.protocol import (
    NEED_DATA,
    Greeting,
    Method,
    MethodSelection,
    Request,
    ServerConnection,
    State,
)
from fastsocks.protocol.socks5 import AddressType, Command
from fastsocks.protocol.userpass import (
    MAX_REQUEST_BYTES,
    AuthResponse,
    Credentials,
    Status,
    encode_reply,
    parse_request,
)

TRAILER = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50payload"  # a pipelined SOCKS5 request, then data


def userpass_request(username: bytes, password: bytes) -> bytes:
    return bytes([1, len(username)]) + username + bytes([len(password)]) + password


# --- a driver that plays the session's part --------------------------------


def run(chunks: list[bytes], *, eof: bool = False) -> object:
    """Buffer ``chunks`` as the SOCKS5 connection does, parsing after each until a result.

    Returns ``(credentials, bytes after the request)``, NEED_DATA, or
    ``("error", message, reply)``. Empty chunks are skipped; EOF comes last if ``eof``.
    """
    buffer = bytearray()
    result = NEED_DATA
    try:
        for chunk in [chunk for chunk in chunks if chunk] + ([b""] if eof else []):
            buffer += chunk
            if result is NEED_DATA:
                result = parse_request(buffer, eof=not chunk)
    except ProtocolError as exc:
        assert not isinstance(exc, LocalProtocolError), exc
        return ("error", str(exc), exc.reply)
    if result is NEED_DATA:
        return NEED_DATA
    credentials, consumed = result
    return credentials, bytes(buffer[consumed:])


def split(data: bytes, mode: str) -> list[bytes]:
    if mode == "whole":
        return [data]
    if mode == "bytewise":
        return [data[i : i + 1] for i in range(len(data))]
    assert mode == "trailing"
    return [data + TRAILER]


MODES = ["whole", "bytewise", "trailing"]


# --- RFC 1929 §2 vectors -----------------------------------------------------

VECTORS = [
    pytest.param(b"\x01\x05alice\x06secret", Credentials(b"alice", b"secret"), id="plain"),
    pytest.param(b"\x01\x01a\x01b", Credentials(b"a", b"b"), id="shortest"),
    pytest.param(userpass_request(b"u" * 255, b"p" * 255), Credentials(b"u" * 255, b"p" * 255), id="longest"),
    pytest.param(b"\x01\x03a:b\x03\x00\xff\n", Credentials(b"a:b", b"\x00\xff\n"), id="any-bytes"),
    pytest.param(
        userpass_request("jürgen".encode(), "pässwort".encode()),
        Credentials("jürgen".encode(), "pässwort".encode()),
        id="utf-8",
    ),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("data", "credentials"), VECTORS)
def test_request(data: bytes, credentials: Credentials, mode: str) -> None:
    trailing = TRAILER if mode == "trailing" else b""
    assert run(split(data, mode)) == (credentials, trailing)


@pytest.mark.parametrize(("data", "credentials"), VECTORS)
def test_consumed_bytes_is_the_request_length(data: bytes, credentials: Credentials) -> None:
    assert parse_request(data + TRAILER) == (credentials, len(data))


def test_longest_request_fits_the_cap() -> None:
    assert len(userpass_request(b"u" * 255, b"p" * 255)) == MAX_REQUEST_BYTES == 513


@pytest.mark.parametrize("size", range(len(b"\x01\x05alice\x06secret")))
def test_incomplete_request_needs_data(size: int) -> None:
    assert parse_request(b"\x01\x05alice\x06secret"[:size]) is NEED_DATA


def test_reply_bytes() -> None:
    # §2: VER 0x01, then STATUS 0x00 for success and anything else for failure.
    assert encode_reply(True) == b"\x01\x00"
    assert encode_reply(False) == b"\x01\x01"
    assert Status.FAILURE != Status.SUCCESS == 0


def test_credentials_repr_hides_the_password() -> None:
    text = repr(Credentials(b"alice", b"hunter2"))
    assert "alice" in text
    assert "hunter2" not in text
    assert str(Credentials(b"alice", b"hunter2")) == text


# --- errors ------------------------------------------------------------------

ERRORS = [
    pytest.param(b"\x05\x05alice\x06secret", "unsupported version 0x05", None, id="socks5-version"),
    pytest.param(b"\x00\x05alice\x06secret", "unsupported version 0x00", None, id="version-0"),
    pytest.param(b"\x02\x05alice\x06secret", "unsupported version 0x02", None, id="version-2"),
    pytest.param(b"\x01\x00\x06secret", "empty user name", Status.FAILURE, id="ulen-0"),
    pytest.param(b"\x01\x05alice\x00", "empty password", Status.FAILURE, id="plen-0"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("data", "match", "reply"), ERRORS)
def test_malformed_request(data: bytes, match: str, reply: int | None, mode: str) -> None:
    kind, msg, got_reply = run(split(data, mode))
    assert kind == "error"
    assert match in msg
    assert got_reply == reply


@pytest.mark.parametrize(("prefix", "match"), [(b"\x04", "version"), (b"\x01\x00", "empty user name"),
                                               (b"\x01\x01a\x00", "empty password")])
def test_errors_are_raised_as_soon_as_their_byte_arrives(prefix: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        parse_request(prefix)


@pytest.mark.parametrize("size", range(len(b"\x01\x05alice\x06secret")))
def test_eof_mid_request(size: int) -> None:
    kind, msg, reply = run([b"\x01\x05alice\x06secret"[:size]], eof=True)
    assert (kind, reply) == ("error", None)
    assert "closed the connection during the request" in msg


def test_errors_never_quote_the_password() -> None:
    for data in (b"\x01\x05alice\x00", b"\x09\x05alice\x06secret", b"\x01\x05alice\x06secr"):
        with pytest.raises(ProtocolError) as info:
            parse_request(data, eof=True)
        assert b"secr" not in str(info.value).encode()


# --- with the SOCKS5 connection, as the session uses it -----------------------

GREETING_USERPASS = b"\x05\x01\x02"
REQUEST = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"


def session_handshake(chunks: list[bytes], ok: bool = True) -> tuple[list[object], ServerConnection]:
    """Drive ServerConnection the way the session does: the credentials are an event,
    answered with AuthResponse; return the events and what was sent, and the connection."""
    conn = ServerConnection()
    events: list[object] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while conn.state is not State.CLOSED:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, Greeting):
                conn.send(MethodSelection(Method.USERNAME_PASSWORD))
            elif isinstance(event, Credentials):
                assert conn.state is State.AWAIT_AUTH_RESPONSE
                assert conn.next_event() is NEED_DATA  # our turn: nothing parses meanwhile
                events.append(conn.send(AuthResponse(ok)))
    return events, conn


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_pipelined_socks5_request_survives_the_subnegotiation(mode: str) -> None:
    data = GREETING_USERPASS + b"\x01\x05alice\x06secret" + REQUEST + b"GET / HTTP/1.0\r\n\r\n"
    chunks = [data] if mode == "whole" else [data[i : i + 1] for i in range(len(data))]
    events, conn = session_handshake(chunks)
    assert events == [
        Greeting((Method.USERNAME_PASSWORD,)),
        Credentials(b"alice", b"secret"),
        b"\x01\x00",
        Request(Command.CONNECT, AddressType.IPV4, "127.0.0.1", 80),
    ]
    assert conn.state is State.REQUEST_RECEIVED
    assert conn.trailing_data[0] == b"GET / HTTP/1.0\r\n\r\n"


def test_refused_credentials_close_the_connection() -> None:
    events, conn = session_handshake([GREETING_USERPASS + b"\x01\x05alice\x05wrong" + REQUEST], ok=False)
    assert events[-1] == b"\x01\x01"
    assert conn.state is State.CLOSED  # RFC 1929 §2: the server MUST close


@pytest.mark.parametrize(("credentials", "refusal"), [
    (b"\x01\x00", AuthResponse(ok=False)),  # ULEN 0: the client speaks RFC 1929, and is told
    (b"\x02\x01a\x01b", None),              # another VER: nothing it would understand
])
def test_malformed_credentials_get_the_answer_the_protocol_has(credentials: bytes, refusal) -> None:
    conn = ServerConnection()
    conn.receive_data(GREETING_USERPASS + credentials)
    conn.next_event()
    conn.send(MethodSelection(Method.USERNAME_PASSWORD))
    with pytest.raises(ProtocolError):
        conn.next_event()
    assert conn.refusal() == refusal
    if refusal is not None:
        assert conn.send(refusal) == b"\x01\x01"
        assert conn.state is State.CLOSED


def test_credentials_are_answered_once_and_only_in_turn() -> None:
    events, conn = session_handshake([GREETING_USERPASS + b"\x01\x01a\x01b"])
    with pytest.raises(LocalProtocolError):
        conn.send(AuthResponse(ok=True))  # answered already
    with pytest.raises(LocalProtocolError):
        conn.auth_done(0)                 # username/password is not another method's


# --- properties --------------------------------------------------------------

fields = st.binary(min_size=1, max_size=255)


@given(fields, fields, st.binary(max_size=64))
def test_round_trip(username: bytes, password: bytes, trailing: bytes) -> None:
    data = userpass_request(username, password)
    assert parse_request(data + trailing) == (Credentials(username, password), len(data))


@given(st.binary(max_size=600), st.booleans())
def test_random_bytes_give_a_result_need_data_or_a_protocol_error(data: bytes, eof: bool) -> None:
    try:
        result = parse_request(data, eof=eof)
    except ProtocolError as exc:
        assert not isinstance(exc, LocalProtocolError)
        assert exc.reply in (None, Status.FAILURE)
        return
    if result is NEED_DATA:
        assert not eof
        return
    credentials, consumed = result
    assert data[:consumed] == userpass_request(credentials.username, credentials.password)


@st.composite
def split_input(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    valid = userpass_request(draw(fields), draw(fields)) + draw(st.binary(max_size=32))
    data = draw(st.one_of(st.just(valid), st.binary(max_size=600)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return data, [data[a:b] for a, b in itertools.pairwise(bounds)]


@given(split_input(), st.booleans())
def test_random_split_points_change_nothing(case: tuple[bytes, list[bytes]], eof: bool) -> None:
    data, chunks = case
    assert run(chunks, eof=eof) == run([data], eof=eof)
