"""front_parse, how the engine's front door reads a client's first bytes, in both engines.

On hand vectors; on random greetings and requests, valid and corrupted, at every prefix: the
Cython engine and its twin agree, a verdict never changes once given, and the engine says
"connect" exactly when the session's sans-I/O parsers (protocol/) read a request the engine
runs itself: a CONNECT to an IPv4 or IPv6 address after a greeting answered "no
authentication", or a SOCKS4 CONNECT with an empty USERID.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsocks import _relay, _relay_py
from fastsocks.errors import ProtocolError
from fastsocks.protocol import NEED_DATA, socks4, socks5
from fastsocks.protocol.socks5 import AddressType, Command, Method, MethodSelection

MODULES = {"cython": _relay, "python": _relay_py}

NO_AUTH = b"\x00"
GREETING = b"\x05\x01\x00"
SELECTED = b"\x05\x00"  # the method selection: no authentication
V4, V6 = int(socket.AF_INET), int(socket.AF_INET6)


@pytest.fixture(params=sorted(MODULES))
def front_parse(request):
    return MODULES[request.param].front_parse


# For the Hypothesis tests (a fixture is not reset between examples): the engine by name.
each_engine = pytest.mark.parametrize("engine", sorted(MODULES))


def request5(atyp: int, address: bytes, port: int, cmd: int = 1, rsv: int = 0, ver: int = 5) -> bytes:
    return bytes([ver, cmd, rsv, atyp]) + address + port.to_bytes(2, "big")


def request4(ip: str, port: int, userid: bytes = b"", cd: int = 1) -> bytes:
    return bytes([4, cd]) + port.to_bytes(2, "big") + socket.inet_aton(ip) + userid + b"\0"


def more(proto: int, sent: bytes = b"") -> tuple:
    return ("more", proto, 0, "", 0, 0, sent)


def python(proto: int, sent: bytes = b"") -> tuple:
    return ("python", proto, 0, "", 0, 0, sent)


IPV4_REQUEST = request5(1, bytes([127, 0, 0, 1]), 8080)
IPV6_REQUEST = request5(4, socket.inet_pton(socket.AF_INET6, "2001:db8::1"), 443)

VECTORS = {
    # SOCKS5 greeting (RFC 1928 §3)
    "nothing yet": (b"", NO_AUTH, True, more(0)),
    "VER only": (b"\x05", NO_AUTH, True, more(5)),
    "no method offered": (b"\x05\x00", NO_AUTH, True, python(5)),
    "methods not all here": (b"\x05\x02\x00", NO_AUTH, True, more(5)),
    "no auth offered": (GREETING, NO_AUTH, True, more(5, SELECTED)),
    "only userpass offered": (b"\x05\x01\x02", NO_AUTH, True, python(5)),
    "no auth among others": (b"\x05\x03\x01\x02\x00", NO_AUTH, True, more(5, SELECTED)),
    "the server prefers userpass": (b"\x05\x02\x00\x02", b"\x02\x00", True, python(5)),
    "userpass server, no auth only": (b"\x05\x01\x00", b"\x02\x00", True, more(5, SELECTED)),
    "userpass only server": (GREETING, b"\x02", True, python(5)),
    "255 methods": (b"\x05\xff" + bytes(range(1, 256)), NO_AUTH, True, python(5)),
    "255 methods, no auth last": (b"\x05\xff" + bytes(range(1, 255)) + b"\x00", NO_AUTH, True, more(5, SELECTED)),
    # SOCKS5 request (§4), each byte judged as it arrives
    "request VER missing": (GREETING, NO_AUTH, True, more(5, SELECTED)),
    "request VER 4": (GREETING + b"\x04", NO_AUTH, True, python(5, SELECTED)),
    "CMD missing": (GREETING + b"\x05", NO_AUTH, True, more(5, SELECTED)),
    "BIND": (GREETING + b"\x05\x02", NO_AUTH, True, python(5, SELECTED)),
    "UDP ASSOCIATE": (GREETING + b"\x05\x03", NO_AUTH, True, python(5, SELECTED)),
    "RSV missing": (GREETING + b"\x05\x01", NO_AUTH, True, more(5, SELECTED)),
    "RSV not 0": (GREETING + b"\x05\x01\x01", NO_AUTH, True, python(5, SELECTED)),
    "ATYP missing": (GREETING + b"\x05\x01\x00", NO_AUTH, True, more(5, SELECTED)),
    "domain name": (GREETING + b"\x05\x01\x00\x03", NO_AUTH, True, python(5, SELECTED)),
    "unknown ATYP": (GREETING + b"\x05\x01\x00\x02", NO_AUTH, True, python(5, SELECTED)),
    "IPv4 cut in the port": (GREETING + IPV4_REQUEST[:-1], NO_AUTH, True, more(5, SELECTED)),
    "IPv4 CONNECT": (GREETING + IPV4_REQUEST, NO_AUTH, True,
                     ("connect", 5, V4, "127.0.0.1", 8080, 13, SELECTED)),
    "IPv4 CONNECT and payload": (GREETING + IPV4_REQUEST + b"GET /", NO_AUTH, True,
                                 ("connect", 5, V4, "127.0.0.1", 8080, 13, SELECTED)),
    "IPv6 cut in the address": (GREETING + IPV6_REQUEST[:10], NO_AUTH, True, more(5, SELECTED)),
    "IPv6 CONNECT": (GREETING + IPV6_REQUEST, NO_AUTH, True,
                     ("connect", 5, V6, "2001:db8::1", 443, 25, SELECTED)),
    # inet_ntop's text (ipaddress would write ::ffff:102:304); the engine hands these off
    "IPv4-mapped CONNECT": (GREETING + request5(4, bytes(10) + b"\xff\xff\x01\x02\x03\x04", 1), NO_AUTH, True,
                            ("connect", 5, V6, "::ffff:1.2.3.4", 1, 25, SELECTED)),
    "IPv4-compatible CONNECT": (GREETING + request5(4, bytes(12) + b"\x01\x02\x03\x04", 1), NO_AUTH, True,
                                ("connect", 5, V6, "::1.2.3.4", 1, 25, SELECTED)),
    "port 0": (GREETING + request5(1, bytes(4), 0), NO_AUTH, True, ("connect", 5, V4, "0.0.0.0", 0, 13, SELECTED)),
    # SOCKS4 (no greeting: the request comes first)
    "SOCKS4 VN only": (b"\x04", NO_AUTH, True, more(4)),
    "SOCKS4 refused here": (b"\x04", NO_AUTH, False, python(4)),
    "SOCKS4 BIND": (b"\x04\x02", NO_AUTH, True, python(4)),
    "SOCKS4 DSTIP cut": (request4("10.1.2.3", 80)[:7], NO_AUTH, True, more(4)),
    "SOCKS4 NUL missing": (request4("10.1.2.3", 80)[:8], NO_AUTH, True, more(4)),
    "SOCKS4 CONNECT": (request4("10.1.2.3", 80), NO_AUTH, True, ("connect", 4, V4, "10.1.2.3", 80, 9, b"")),
    "SOCKS4 CONNECT and payload": (request4("10.1.2.3", 80) + b"hi", NO_AUTH, True,
                                   ("connect", 4, V4, "10.1.2.3", 80, 9, b"")),
    "SOCKS4 to 0.0.0.0": (request4("0.0.0.0", 80), NO_AUTH, True, ("connect", 4, V4, "0.0.0.0", 80, 9, b"")),
    "SOCKS4 USERID": (request4("10.1.2.3", 80, b"bob")[:9], NO_AUTH, True, python(4)),
    "SOCKS4a": (request4("0.0.0.1", 80)[:8], NO_AUTH, True, python(4)),
    # neither
    "HTTP": (b"GET / HTTP/1.1\r\n", NO_AUTH, True, python(0)),
    "a NUL": (b"\x00", NO_AUTH, True, python(0)),
}


@pytest.mark.parametrize(("data", "methods", "socks4_allowed", "expected"), VECTORS.values(), ids=VECTORS.keys())
def test_hand_vectors(front_parse, data, methods, socks4_allowed, expected):
    assert front_parse(data, methods, socks4_allowed) == expected


def test_every_buffer_reads_alike(front_parse):
    data = GREETING + IPV4_REQUEST + b"payload"
    expected = front_parse(data, NO_AUTH, True)
    assert expected[0] == "connect"
    for buffer in (bytearray(data), memoryview(data), memoryview(b"xx" + data)[2:]):
        assert front_parse(buffer, NO_AUTH, True) == expected


# --------------------------------------------------------------------- random handshakes

ADDRESSES_V4 = st.one_of(st.sampled_from([b"\x7f\x00\x00\x01", bytes(4), b"\x00\x01\x02\x03"]), st.binary(min_size=4, max_size=4))
ADDRESSES_V6 = st.one_of(
    st.sampled_from([bytes(16), bytes(15) + b"\x01", bytes(10) + b"\xff\xff\x7f\x00\x00\x01"]),
    st.binary(min_size=16, max_size=16))


@st.composite
def socks5_handshakes(draw) -> bytes:
    offered = draw(st.lists(st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x80, 0xFF]), max_size=6))
    atyp = draw(st.sampled_from([1, 1, 4, 4, 3, 0, 2, 5]))
    if atyp == 1:
        address = draw(ADDRESSES_V4)
    elif atyp == 4:
        address = draw(ADDRESSES_V6)
    elif atyp == 3:
        name = draw(st.binary(max_size=12))
        address = bytes([len(name)]) + name
    else:
        address = draw(st.binary(max_size=18))
    request = request5(atyp, address, draw(st.integers(0, 0xFFFF)), cmd=draw(st.sampled_from([1, 1, 1, 2, 3, 0])),
                       rsv=draw(st.sampled_from([0, 0, 0, 1])), ver=draw(st.sampled_from([5, 5, 5, 4])))
    return bytes([5, len(offered)]) + bytes(offered) + request + draw(st.binary(max_size=12))


@st.composite
def socks4_requests(draw) -> bytes:
    ip = draw(st.sampled_from(["127.0.0.1", "0.0.0.0", "0.0.0.7", "10.0.0.1", "0.1.2.3"]))
    userid = draw(st.sampled_from([b"", b"", b"bob"]))
    name = draw(st.sampled_from([b"", b"example.com\0"]))
    data = request4(ip, draw(st.integers(0, 0xFFFF)), userid, cd=draw(st.sampled_from([1, 1, 2, 3])))
    return data + name + draw(st.binary(max_size=12))


@st.composite
def corrupted(draw, messages) -> bytes:
    """A message with a byte replaced, dropped or added, or as it is."""
    data = bytearray(draw(messages))
    how = draw(st.sampled_from(["none", "none", "replace", "drop", "insert"]))
    if how != "none" and data:
        at = draw(st.integers(0, len(data) - 1))
        if how == "replace":
            data[at] = draw(st.integers(0, 255))
        elif how == "drop":
            del data[at]
        else:
            data.insert(at, draw(st.integers(0, 255)))
    return bytes(data)


MESSAGES = corrupted(st.one_of(socks5_handshakes(), socks4_requests(), st.binary(max_size=40)))
SERVER_METHODS = st.sampled_from([b"\x00", b"\x02", b"\x00\x02", b"\x02\x00"])
EXAMPLES = settings(max_examples=300, deadline=None)


def prefixes(data: bytes) -> list[bytes]:
    return [data[:k] for k in range(len(data) + 1)]


@EXAMPLES
@given(data=MESSAGES, methods=SERVER_METHODS, socks4_allowed=st.booleans())
def test_the_engine_and_its_twin_agree_at_every_prefix(data, methods, socks4_allowed):
    for prefix in prefixes(data):
        assert _relay.front_parse(prefix, methods, socks4_allowed) == \
            _relay_py.front_parse(prefix, methods, socks4_allowed), prefix


@each_engine
@EXAMPLES
@given(data=MESSAGES, methods=SERVER_METHODS, socks4_allowed=st.booleans())
def test_a_verdict_once_given_never_changes(engine, data, methods, socks4_allowed):
    """More bytes never undo what the engine decided, nor take back what it answered."""
    front_parse = MODULES[engine].front_parse
    seen = [front_parse(prefix, methods, socks4_allowed) for prefix in prefixes(data)]
    for earlier, later in itertools.pairwise(seen):
        if earlier[0] != "more":
            assert later == earlier
        assert later[6].startswith(earlier[6])            # sent only grows
        assert earlier[1] == 0 or later[1] == earlier[1]  # proto, once known, stays


def reference_connect(data: bytes, methods: bytes, socks4_allowed: bool) -> tuple | None:
    """What the session's parsers make of ``data``: (proto, family, address, port, consumed,
    sent) of a request the engine runs itself, or None."""
    try:
        if data[:1] == b"\x05":
            conn = socks5.ServerConnection()
            conn.receive_data(data)
            greeting = conn.next_event()
            if greeting is NEED_DATA:
                return None
            # §3: the server's first method that the client offers (what session.py picks).
            if next((m for m in methods if m in greeting.methods), None) != Method.NO_AUTH:
                return None
            sent = conn.send(MethodSelection(Method.NO_AUTH))
            request = conn.next_event()
            if request is NEED_DATA or request.command != Command.CONNECT or request.address_type == AddressType.DOMAIN:
                return None
            proto = 5
        elif data[:1] == b"\x04" and socks4_allowed:
            conn = socks4.ServerConnection()
            conn.receive_data(data)
            request = conn.next_event()
            if request is NEED_DATA or request.command != Command.CONNECT or request.is_4a or request.userid:
                return None
            proto, sent = 4, b""
        else:
            return None
    except ProtocolError:
        return None
    address = ipaddress.ip_address(request.host)
    family = V4 if address.version == 4 else V6
    return (proto, family, address, request.port, len(data) - len(conn.trailing_data[0]), sent)


@each_engine
@EXAMPLES
@given(data=MESSAGES, methods=SERVER_METHODS, socks4_allowed=st.booleans())
def test_connect_exactly_when_the_reference_parsers_read_one(engine, data, methods, socks4_allowed):
    front_parse = MODULES[engine].front_parse
    for prefix in prefixes(data):
        verdict, proto, family, host, port, consumed, sent = front_parse(prefix, methods, socks4_allowed)
        expected = reference_connect(prefix, methods, socks4_allowed)
        assert (verdict == "connect") == (expected is not None), prefix
        if expected is not None:
            address = ipaddress.ip_address(host)
            assert (proto, family, address, port, consumed, sent) == expected, prefix
            assert host == socket.inet_ntop(family, address.packed)  # the C library's text


def test_the_properties_see_every_verdict():
    """The generated messages reach each verdict of each protocol (else the properties above
    would check less than they claim)."""
    seen = set()

    @settings(max_examples=400, deadline=None)
    @given(data=MESSAGES, methods=SERVER_METHODS, socks4_allowed=st.booleans())
    def collect(data, methods, socks4_allowed):
        for prefix in prefixes(data):
            result = _relay_py.front_parse(prefix, methods, socks4_allowed)
            seen.add((result[0], result[1]))

    collect()
    assert {("more", 5), ("connect", 5), ("python", 5), ("more", 4), ("connect", 4), ("python", 4),
            ("python", 0)} <= seen
