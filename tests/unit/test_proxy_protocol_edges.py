"""PROXY protocol reader, the edges: hand-built v2 TCP6 vectors with TLVs, PROXY over
AF_UNSPEC, the exact byte each error comes at, the 107- and 4096-byte limits."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsocks.errors import ProtocolError
from fastsocks.protocol.common import NEED_DATA
from fastsocks.protocol.proxy import V2_SIGNATURE, HeaderReader, ProxyHeader, encode_v1, encode_v2

V6_SRC = bytes.fromhex("20010db8000000000000000000000001")
V6_DST = bytes.fromhex("20010db8000000000000000000000002")
V2_TCP6 = V2_SIGNATURE + b"\x21\x21\x00\x24" + V6_SRC + V6_DST + struct.pack("!HH", 56324, 443)
TLVS = b"\x01\x00\x02h2" + b"\x02\x00\x0bexample.com"  # ALPN, AUTHORITY
V2_TCP6_TLV = V2_SIGNATURE + b"\x21\x21" + struct.pack("!H", 36 + len(TLVS)) + V6_SRC + V6_DST + struct.pack("!HH", 56324, 443) + TLVS
V2_UNSPEC = V2_SIGNATURE + b"\x21\x00\x00\x00"
V2_UNSPEC_TLV = V2_SIGNATURE + b"\x21\x00\x00\x05" + b"\x04\x00\x02\x00\x00"
SIX = ProxyHeader(2, False, ("2001:db8::1", 56324), ("2001:db8::2", 443), "tcp6")
LOCAL2 = ProxyHeader(2, True, None, None, "unknown")


def first_error_at(data):
    """Index of the byte whose arrival made next_event() raise, the error, else None."""
    reader = HeaderReader()
    for i in range(len(data)):
        reader.receive_data(data[i:i + 1])
        try:
            event = reader.next_event()
        except ProtocolError as exc:
            return i, str(exc)
        if event is not NEED_DATA:
            return None, event
    return None, NEED_DATA


def whole(data):
    reader = HeaderReader()
    reader.receive_data(data)
    try:
        return reader.next_event(), reader.trailing
    except ProtocolError as exc:
        return str(exc), None


@pytest.mark.parametrize("data,header", [(V2_TCP6, SIX), (V2_TCP6_TLV, SIX), (V2_UNSPEC, LOCAL2),
                                         (V2_UNSPEC_TLV, LOCAL2), (b"PROXY UNKNOWN\r\n", ProxyHeader(1, True, None, None, "unknown"))])
@pytest.mark.parametrize("trailing", [b"", b"\x05\x01\x00", b"PROXY TCP4 x"])
def test_vectors(data, header, trailing):
    assert whole(data + trailing) == (header, trailing)
    reader = HeaderReader()
    for i in range(len(data + trailing)):
        reader.receive_data((data + trailing)[i:i + 1])
        event = reader.next_event()
        if i < len(data) - 1:
            assert event is NEED_DATA
        elif i == len(data) - 1:
            assert event == header
        else:
            assert event is NEED_DATA
    assert reader.trailing == trailing


@pytest.mark.parametrize("data,at", [
    (b"GET / HTTP/1.1\r\n", 0), (b"\x05\x01\x00", 0), (b"\x04\x01\x00\x50", 0), (b"PROXZ", 4),
    (b"PROXY\r\n", 5), (b"PROXY UDP4 1.2.3.4", 7), (b"PROXY TCP5", 9), (b"PROXY TCP4\r\n", 10),
    (b"PROXY UNKNOWN\n", 13), (b"PROXY TCP4 1.2.3.4\n", 18), (b"PROXY TCP4 1.2\r3", 15),
    (V2_SIGNATURE[:5] + b"x", 5), (V2_SIGNATURE + b"\x31", 12), (V2_SIGNATURE + b"\x2f", 12),
    (V2_SIGNATURE + b"\x21\x12", 13), (V2_SIGNATURE + b"\x21\x31", 13), (V2_SIGNATURE + b"\x21\x41", 13),
    (V2_SIGNATURE + b"\x21\x11\x00\x0b", 15), (V2_SIGNATURE + b"\x21\x11\x10\x00", 15),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 90 " + b"1" * 80, 106),
])
def test_errors_come_at_the_first_byte_that_makes_them_certain(data, at):
    i, _ = first_error_at(data + b"\x00" * 200)
    assert i == at


@pytest.mark.parametrize("data", [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 80 90 \r\n", b"PROXY TCP4 01.2.3.4 5.6.7.8 80 90\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 90\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 90\r\n",
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
    b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 0 00\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n",
])
def test_bad_v1_lines_fail_by_their_crlf(data):
    i, msg = first_error_at(data)
    assert i is not None and i <= len(data) - 1, msg


def test_limits():
    assert whole(b"PROXY TCP4 1.2.3.4 5.6.7.8 0 65535\r\n")[0].source == ("1.2.3.4", 0)
    line = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(line) == 107 and whole(line)[0].local
    assert "107" in whole(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n")[0]
    assert whole(V2_SIGNATURE + b"\x20\x00" + struct.pack("!H", 4080) + bytes(4080))[0] == LOCAL2
    assert "4096" in whole(V2_SIGNATURE + b"\x20\x00" + struct.pack("!H", 4081))[0]


def test_errors_stick_and_encoders():
    reader = HeaderReader()
    reader.receive_data(b"GET")
    for _ in range(2):
        with pytest.raises(ProtocolError):
            reader.next_event()
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert encode_v2(None, None, local=True) == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert encode_v2(None, None) == V2_UNSPEC
    assert encode_v2(("2001:db8::1", 56324), ("2001:db8::2", 443), tlvs=TLVS) == V2_TCP6_TLV
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda b: b"PROXY " + b),
                 st.binary(max_size=60).map(lambda b: V2_SIGNATURE + b),
                 st.lists(st.sampled_from([b"PROXY ", b"TCP4 ", b"TCP6 ", b"UNKNOWN", b" ", b"\r", b"\n", b"1.2.3.4",
                                           b"::1", b"80", b"0", b"00"]), max_size=15).map(b"".join)))
def test_whole_and_byte_by_byte_agree_on_random_input(data):
    i, event = first_error_at(data)
    result = whole(data)
    if i is None:
        assert result[0] == event or (event is NEED_DATA and result[0] is NEED_DATA)
    else:
        assert result == (event, None)
