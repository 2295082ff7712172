"""The SOCKS5 UDP request header (RFC 1928 §7): the Cython codec and its pure-Python twin
on the same vectors — whole, cut at every length, with a payload behind, FRAG != 0, bad
RSV and ATYP, names that must be refused — and a round trip through both."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastsocks import _relay, _relay_py

CODECS = {"cython": _relay, "python": _relay_py}


@pytest.fixture(params=sorted(CODECS))
def codec(request):
    return CODECS[request.param]


def header(atyp: int, address: bytes, port: int, frag: int = 0, rsv: bytes = b"\0\0") -> bytes:
    return rsv + bytes([frag, atyp]) + address + port.to_bytes(2, "big")


def domain(name: bytes) -> bytes:
    return bytes([len(name)]) + name


# (wire header, (atyp, host, port)) — the host as inet_ntop writes it.
VALID = [
    (header(1, bytes([192, 0, 2, 7]), 53), (1, "192.0.2.7", 53)),
    (header(1, bytes(4), 0), (1, "0.0.0.0", 0)),
    (header(1, b"\xff" * 4, 65535), (1, "255.255.255.255", 65535)),
    (header(4, bytes(15) + b"\1", 443), (4, "::1", 443)),
    (header(4, bytes.fromhex("20010db8000000000000000000000001"), 8080), (4, "2001:db8::1", 8080)),
    (header(4, bytes.fromhex("20010db8000100010001000100010001"), 1), (4, "2001:db8:1:1:1:1:1:1", 1)),
    (header(4, bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1]), 7), (4, "::ffff:127.0.0.1", 7)),
    (header(3, domain(b"localhost"), 53), (3, "localhost", 53)),
    (header(3, domain(b"a"), 1), (3, "a", 1)),
    (header(3, domain(b"x" * 255), 9), (3, "x" * 255, 9)),
    (header(3, domain(b"!~"), 9), (3, "!~", 9)),
]

INVALID = [
    pytest.param(header(1, bytes(4), 53, frag=1), id="frag-1"),
    pytest.param(header(1, bytes(4), 53, frag=0x80), id="frag-end-of-sequence"),
    pytest.param(header(1, bytes(4), 53, rsv=b"\0\1"), id="rsv"),
    pytest.param(header(1, bytes(4), 53, rsv=b"\1\0"), id="rsv-high"),
    pytest.param(header(0, bytes(4), 53), id="atyp-0"),
    pytest.param(header(2, bytes(4), 53), id="atyp-2"),
    pytest.param(header(5, bytes(16), 53), id="atyp-5"),
    pytest.param(header(3, domain(b""), 53), id="empty-domain"),
    pytest.param(header(3, domain(b"localhost\0.example.com"), 53), id="nul-in-domain"),
    pytest.param(header(3, domain(b"local host"), 53), id="space-in-domain"),
    pytest.param(header(3, domain(b"host\x7f"), 53), id="del-in-domain"),
    pytest.param(header(3, domain(b"h\xc3\xa9"), 53), id="non-ascii-domain"),
    pytest.param(header(3, domain(b"\n"), 53), id="control-domain"),
]


@pytest.mark.parametrize(("wire", "expected"), VALID)
def test_valid_headers(codec, wire, expected):
    assert codec.udp_unpack(wire) == (*expected, len(wire))


@pytest.mark.parametrize(("wire", "expected"), VALID)
def test_payload_behind_the_header_is_left_alone(codec, wire, expected):
    for payload in (b"x", b"\0" * 3, b"\xff" * 300):
        data = wire + payload
        atyp, host, port, header_len = codec.udp_unpack(data)
        assert (atyp, host, port) == expected
        assert data[header_len:] == payload


@pytest.mark.parametrize(("wire", "expected"), VALID)
def test_every_truncation_is_dropped(codec, wire, expected):
    for cut in range(len(wire)):
        assert codec.udp_unpack(wire[:cut]) is None, cut


@pytest.mark.parametrize("wire", INVALID)
def test_invalid_headers_are_dropped(codec, wire):
    assert codec.udp_unpack(wire) is None
    assert codec.udp_unpack(wire + b"payload") is None


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_any_contiguous_buffer(codec, kind):
    wire = header(1, bytes([10, 0, 0, 1]), 5) + b"data"
    assert codec.udp_unpack(kind(wire)) == (1, "10.0.0.1", 5, 10)
    assert codec.udp_unpack(memoryview(bytearray(b"??" + wire))[2:]) == (1, "10.0.0.1", 5, 10)


PACK = [
    (("127.0.0.1", 53), header(1, bytes([127, 0, 0, 1]), 53)),
    (("0.0.0.0", 0), header(1, bytes(4), 0)),
    (("::1", 65535), header(4, bytes(15) + b"\1", 65535)),
    (("2001:db8::1", 1), header(4, bytes.fromhex("20010db8000000000000000000000001"), 1)),
    (("::ffff:192.0.2.1", 9), header(1, bytes([192, 0, 2, 1]), 9)),  # mapped: sent as IPv4
    (("::ffff:c000:201", 9), header(1, bytes([192, 0, 2, 1]), 9)),
    (("::192.0.2.1", 9), header(4, bytes(12) + bytes([192, 0, 2, 1]), 9)),  # compatible: stays v6
]


@pytest.mark.parametrize(("address", "wire"), PACK)
def test_pack(codec, address, wire):
    assert codec.udp_pack(*address) == wire


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("localhost", 53), ("", 53), ("1.2.3", 53), ("1.2.3.4.5", 53), ("01.2.3.4x", 53),
        ("127.0.0.1\0junk", 53), ("::1%lo", 53), ("fe80::1%1", 53), ("\u0661.2.3.4", 53),
        (" 127.0.0.1", 53), ("127.0.0.1", -1), ("127.0.0.1", 65536), ("127.0.0.1", 2**70),
        ("127.0.0.1", "53"), ("127.0.0.1", 5.0),
    ],
)
def test_pack_refuses_what_is_not_an_ip_address_and_port(codec, host, port):
    with pytest.raises(ValueError):
        codec.udp_pack(host, port)


def test_both_implementations_offer_the_same_names():
    assert {"udp_pack", "udp_unpack"} <= set(_relay_py.__all__)
    assert callable(_relay.udp_pack) and callable(_relay.udp_unpack)


ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: socket.inet_ntop(socket.AF_INET6, n.to_bytes(16, "big")), st.integers(0, 2**128 - 1))
ports = st.integers(0, 65535)


@given(host=st.one_of(ipv4, ipv6), port=ports, payload=st.binary(max_size=64))
def test_round_trip(host, port, payload):
    for codec in CODECS.values():
        data = codec.udp_pack(host, port) + payload
        atyp, got_host, got_port, header_len = codec.udp_unpack(data)
        ip = ipaddress.ip_address(host)
        unmapped = ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip
        assert ipaddress.ip_address(got_host) == unmapped
        assert (atyp, got_port) == (1 if unmapped.version == 4 else 4, port)
        assert data[header_len:] == payload


@given(name=st.binary(min_size=1, max_size=255), port=ports, payload=st.binary(max_size=16))
def test_domain_names_agree(name, port, payload):
    data = header(3, domain(name), port) + payload
    expected = _relay_py.udp_unpack(data)
    assert _relay.udp_unpack(data) == expected
    printable = all(0x21 <= b <= 0x7E for b in name)
    assert (expected is not None) == printable
    if printable:
        assert expected == (3, name.decode("ascii"), port, 4 + 1 + len(name) + 2)


@given(data=st.binary(max_size=300))
def test_random_bytes_agree(data):
    assert _relay.udp_unpack(data) == _relay_py.udp_unpack(data)


@given(head=st.sampled_from([b"\0\0\0\1", b"\0\0\0\4", b"\0\0\0\3"]), rest=st.binary(max_size=40))
def test_plausible_headers_agree(head, rest):
    assert _relay.udp_unpack(head + rest) == _relay_py.udp_unpack(head + rest)
