"""SOCKS4 / SOCKS4a parser and serializer (the SOCKS4 and SOCKS4a protocol texts), fed
whole, byte by byte and with trailing data: the events must not depend on the split."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastsocks.errors import LocalProtocolError, ProtocolError
from fastsocks.protocol.socks4 import CommandReply, Reply, Request, ServerConnection, State
from fastsocks.protocol.socks5 import NEED_DATA, AddressType, Command

# Vectors from the protocol texts' layouts: VN CD DSTPORT DSTIP USERID NUL [NAME NUL].
CONNECT_IPV4 = b"\x04\x01\x00\x50\x7f\x00\x00\x01alice\x00"
CONNECT_4A = b"\x04\x01\x01\xbb\x00\x00\x00\x01bob\x00localhost\x00"
BIND_NO_USER = b"\x04\x02\x1f\x90\x0a\x01\x02\x03\x00"


def feed(chunks, trailing=b""):
    """Events (and a final error, if any) of a connection fed ``chunks`` then ``trailing``."""
    conn = ServerConnection()
    events = []
    for chunk in list(chunks) + ([trailing] if trailing else []):
        conn.receive_data(chunk)
        while True:
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                return conn, events + [("error", exc.reply)]
            if event is NEED_DATA:
                break
            events.append(event)
    return conn, events


def splits(data: bytes):
    return {"whole": [data], "byte-by-byte": [data[i:i + 1] for i in range(len(data))]}


VALID = {
    "connect-ipv4": (CONNECT_IPV4, Request(Command.CONNECT, AddressType.IPV4, "127.0.0.1", 80, b"alice")),
    "connect-4a": (CONNECT_4A, Request(Command.CONNECT, AddressType.DOMAIN, "localhost", 443, b"bob")),
    "bind-no-userid": (BIND_NO_USER, Request(Command.BIND, AddressType.IPV4, "10.1.2.3", 8080, b"")),
}


@pytest.mark.parametrize("how", ["whole", "byte-by-byte"])
@pytest.mark.parametrize("case", list(VALID))
def test_valid_requests_parse_the_same_however_split(case, how):
    data, expected = VALID[case]
    conn, events = feed(splits(data)[how], trailing=b"first payload")
    assert events == [expected]
    assert conn.state is State.REQUEST_RECEIVED
    assert conn.trailing_data == (b"first payload", False)


def test_socks4a_flag_and_is_4a():
    assert VALID["connect-4a"][1].is_4a and not VALID["connect-ipv4"][1].is_4a


def test_ip_0_0_0_0_is_plain_socks4_not_4a():
    _, events = feed([b"\x04\x01\x00\x50\x00\x00\x00\x00\x00"])
    assert events == [Request(Command.CONNECT, AddressType.IPV4, "0.0.0.0", 80, b"")]


BAD = {
    "unknown-command": (b"\x04\x03\x00\x50\x7f\x00\x00\x01\x00", Reply.REJECTED),
    "empty-name": (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\x00", Reply.REJECTED),
    "name-with-space": (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00local host\x00", Reply.REJECTED),
    "name-with-high-byte": (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00caf\xc3\xa9\x00", Reply.REJECTED),
    "userid-too-long": (b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 256, Reply.REJECTED),
    "name-too-long": (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"a" * 256, Reply.REJECTED),
}


@pytest.mark.parametrize("how", ["whole", "byte-by-byte"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_rejected_the_same_however_split(case, how):
    data, reply = BAD[case]
    conn, events = feed(splits(data)[how])
    assert events == [("error", reply)]
    assert conn.send(conn.refusal()) == b"\x00\x5b\x00\x00\x00\x00\x00\x00"
    assert conn.state is State.CLOSED


def test_eof_mid_request_is_an_error_without_reply():
    conn, events = feed([CONNECT_IPV4[:6], b""])
    assert events == [("error", None)]
    assert conn.refusal() is None


def test_replies_serialize_to_eight_bytes():
    conn, _ = feed([CONNECT_IPV4])
    assert conn.send(CommandReply(Reply.GRANTED, "127.0.0.1", 40000)) == b"\x00\x5a\x9c\x40\x7f\x00\x00\x01"
    assert conn.state is State.ESTABLISHED


def test_an_ipv6_bound_address_is_sent_as_zeros():
    conn, _ = feed([CONNECT_4A])
    assert conn.send(CommandReply(Reply.GRANTED, "::1", 5)) == b"\x00\x5a\x00\x05\x00\x00\x00\x00"


def test_bind_takes_two_replies():
    conn, _ = feed([BIND_NO_USER])
    conn.send(CommandReply(Reply.GRANTED, "127.0.0.1", 5000))
    assert conn.state is State.AWAIT_BIND_PEER
    conn.send(CommandReply(Reply.GRANTED, "127.0.0.2", 6000))
    assert conn.state is State.ESTABLISHED


def test_rejection_closes_and_nothing_more_can_be_sent():
    conn, _ = feed([CONNECT_IPV4])
    conn.send(CommandReply(Reply.REJECTED))
    assert conn.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.send(CommandReply(Reply.GRANTED))


def test_a_bad_request_cannot_be_granted():
    conn, _ = feed([BAD["unknown-command"][0]])
    with pytest.raises(LocalProtocolError):
        conn.send(CommandReply(Reply.GRANTED))


@given(st.binary(max_size=600))
def test_random_bytes_give_only_events_or_protocol_errors(data):
    conn = ServerConnection()
    conn.receive_data(b"\x04" + data)
    try:
        event = conn.next_event()
    except ProtocolError:
        return
    assert event is NEED_DATA or isinstance(event, Request)


@given(st.integers(0, 65535), st.binary(max_size=40).filter(lambda b: b"\0" not in b),
       st.from_regex(r"[a-z0-9.-]{1,60}", fullmatch=True), st.data())
def test_random_split_points_change_nothing(port, userid, name, data):
    wire = b"\x04\x01" + port.to_bytes(2, "big") + b"\x00\x00\x00\x07" + userid + b"\x00" + name.encode() + b"\x00"
    payload = b"GET / HTTP/1.0\r\n\r\n"
    whole = wire + payload
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=6)))
    chunks = [whole[a:b] for a, b in zip([0] + cuts, cuts + [len(whole)]) if whole[a:b]]
    conn, events = feed(chunks)
    assert events == [Request(Command.CONNECT, AddressType.DOMAIN, name, port, userid)]
    assert conn.trailing_data == (payload, False)
