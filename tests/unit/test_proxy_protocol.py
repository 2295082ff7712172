"""PROXY protocol v1/v2 reader (HAProxy's proxy-protocol.txt), fed whole, byte by byte and
with trailing data: the header and the trailing bytes must not depend on the split."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastsocks.errors import ProtocolError
from fastsocks.protocol.common import NEED_DATA
from fastsocks.protocol.proxy import MAX_V2_BYTES, V2_SIGNATURE, HeaderReader, ProxyHeader, encode_v1, encode_v2

# §2.1's own examples, and §2.2's layout: signature, ver/cmd, fam, len, addresses.
V1_TCP4 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
V2_TCP4 = V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack("!HH", 1234, 1080)
V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"
TLV = b"\x04\x00\x04abcd"  # PP2_TYPE_NOOP, skipped
V2_TCP4_TLV = (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 12 + len(TLV)) + bytes([10, 0, 0, 1, 10, 0, 0, 2])
               + struct.pack("!HH", 1234, 1080) + TLV)
TRAILING = b"\x05\x01\x00"  # the SOCKS greeting that followed the header


def read(chunks):
    """The header (or the error) and the trailing bytes of a reader fed ``chunks``."""
    reader = HeaderReader()
    header = NEED_DATA
    for chunk in chunks:
        reader.receive_data(chunk)
        try:
            event = reader.next_event()
        except ProtocolError as exc:
            return exc, b""
        if event is not NEED_DATA:
            header = event
    return header, reader.trailing


def splits(data: bytes):
    return {"whole": [data], "byte-by-byte": [data[i:i + 1] for i in range(len(data))]}


EXPECTED = {
    V1_TCP4: ProxyHeader(1, False, ("192.168.0.1", 56324), ("192.168.0.11", 443), "tcp4"),
    V1_TCP6: ProxyHeader(1, False, ("2001:db8::1", 56324), ("2001:db8::2", 443), "tcp6"),
    V1_UNKNOWN: ProxyHeader(1, True, None, None, "unknown"),
    V2_TCP4: ProxyHeader(2, False, ("10.0.0.1", 1234), ("10.0.0.2", 1080), "tcp4"),
    V2_TCP4_TLV: ProxyHeader(2, False, ("10.0.0.1", 1234), ("10.0.0.2", 1080), "tcp4"),
    V2_LOCAL: ProxyHeader(2, True, None, None, "unknown"),
}


@pytest.mark.parametrize("data", list(EXPECTED), ids=["v1-tcp4", "v1-tcp6", "v1-unknown", "v2-tcp4",
                                                      "v2-tlv", "v2-local"])
@pytest.mark.parametrize("split", ["whole", "byte-by-byte"])
@pytest.mark.parametrize("trailing", [b"", TRAILING], ids=["alone", "trailing"])
def test_headers_whatever_the_split(data, split, trailing):
    header, rest = read(splits(data + trailing)[split])
    assert header == EXPECTED[data]
    assert rest == trailing


def test_bytes_after_the_header_are_trailing_too():
    reader = HeaderReader()
    reader.receive_data(V1_TCP4)
    assert reader.next_event() == EXPECTED[V1_TCP4]
    reader.receive_data(b"more")
    assert reader.next_event() is NEED_DATA
    assert reader.trailing == b"more"


def test_v2_tcp6():
    header = encode_v2(("2001:db8::7", 9), ("::1", 1080))
    assert read([header])[0] == ProxyHeader(2, False, ("2001:db8::7", 9), ("::1", 1080), "tcp6")


@pytest.mark.parametrize("prefix", [b"\x05", b"\x04\x01", b"GET ", b"PROXI", b"\r\n\r\n\x01", b"proxy "])
def test_what_starts_neither_header_is_refused_at_once(prefix):
    reader = HeaderReader()
    reader.receive_data(prefix)
    with pytest.raises(ProtocolError, match="neither a PROXY v1 line nor the v2 signature"):
        reader.next_event()


BAD = {
    "v1-fields": (b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n", "expected 'PROXY TCP4"),
    "v1-protocol": (b"PROXY UDP4 1.2.3.4 5.6.7.8 80 90\r\n", "expected 'PROXY TCP4"),
    "v1-family": (b"PROXY TCP6 1.2.3.4 5.6.7.8 80 90\r\n", "is not an IPv6 address"),
    "v1-name": (b"PROXY TCP4 example.com 5.6.7.8 80 90\r\n", "is not an IP address"),
    "v1-port": (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 90\r\n", "is not a port"),
    "v1-leading-zero": (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 90\r\n", "is not a port"),
    "v1-double-space": (b"PROXY TCP4  1.2.3.4 5.6.7.8 80 90\r\n", "expected 'PROXY TCP4"),
    "v1-bare-lf": (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 90\n", "without CRLF"),
    "v1-too-long": (b"PROXY TCP4 " + b"1" * 200, "longer than 107"),
    "v2-version": (V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "version 1"),
    "v2-command": (V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "command 2"),
    "v2-udp": (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "only TCP"),
    "v2-unix": (V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216), "only TCP"),
    "v2-short-block": (V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "36 needed"),
    "v2-too-long": (V2_SIGNATURE + b"\x21\x11\xff\xff", "more than the 4096"),
}


@pytest.mark.parametrize("name", list(BAD))
@pytest.mark.parametrize("split", ["whole", "byte-by-byte"])
def test_malformed_headers_are_refused_by_the_time_they_are_whole(name, split):
    data, why = BAD[name]
    error, _ = read(splits(data)[split])
    assert isinstance(error, ProtocolError) and error.reply is None
    assert why in str(error)


def test_a_local_command_ignores_whatever_address_block_it_carries():
    data = V2_SIGNATURE + b"\x20\x31\x00\x04abcd"
    assert read([data + TRAILING]) == (ProxyHeader(2, True, None, None, "unknown"), TRAILING)


def test_what_a_header_may_make_us_buffer_is_capped():
    data = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_V2_BYTES - 16) + bytes(MAX_V2_BYTES - 16)
    assert read([data])[0].source == ("0.0.0.0", 0)  # the largest header accepted


addresses_v4 = st.ip_addresses(v=4).map(str)
addresses_v6 = st.ip_addresses(v=6).map(lambda a: str(ipaddress.IPv6Address(a)))
ports = st.integers(0, 65535)
endpoints = st.one_of(st.tuples(st.tuples(addresses_v4, ports), st.tuples(addresses_v4, ports)),
                      st.tuples(st.tuples(addresses_v6, ports), st.tuples(addresses_v6, ports)))


@given(endpoints, st.sampled_from([encode_v1, encode_v2]), st.binary(max_size=20), st.data())
def test_encode_then_read_round_trips_at_any_split(ends, encode, trailing, data):
    source, destination = ends
    wire = encode(source, destination) + trailing
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=4)))
    chunks = [wire[a:b] for a, b in zip([0] + cuts, cuts + [len(wire)])]
    header, rest = read(chunks)
    assert header.source == source and header.destination == destination and not header.local
    assert rest == trailing


@given(st.binary(max_size=300), st.sampled_from([b"", b"PROXY ", V2_SIGNATURE]))
def test_random_bytes_give_need_data_a_header_or_a_protocol_error(noise, prefix):
    header, _ = read([prefix + noise])
    assert header is NEED_DATA or isinstance(header, (ProxyHeader, ProtocolError))
