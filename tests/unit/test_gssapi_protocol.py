"""RFC 1961's messages (protocol/gssapi.py), fed whole, byte by byte and split at every point:
the same bytes must give the same messages, or the same error, however they arrive."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastsocks.errors import ProtocolError
from fastsocks.protocol.common import NEED_DATA
from fastsocks.protocol.gssapi import (
    ABORT,
    MAX_TOKEN_BYTES,
    Message,
    MessageType,
    ProtectionLevel,
    Reader,
    encode,
    parse_level,
)

CONTEXT, PROTECTION, ENCAPSULATED = MessageType.CONTEXT, MessageType.PROTECTION, MessageType.ENCAPSULATED


def read_all(chunks, expected=(CONTEXT,)) -> tuple[list[Message], str | None, bytes]:
    """Every message the chunks make (then EOF), the error if one came, what was left."""
    reader = Reader(expected)
    messages: list[Message] = []
    try:
        for chunk in [*chunks, b""]:
            reader.receive_data(chunk)
            while (message := reader.next_message()) is not NEED_DATA:
                messages.append(message)
    except ProtocolError as exc:
        return messages, str(exc), reader.trailing
    raise AssertionError("EOF always ends the reading with an error")


def splits(data: bytes):
    yield "whole", [data]
    yield "byte by byte", [data[i:i + 1] for i in range(len(data))]
    for at in range(1, len(data)):
        yield f"split at {at}", [data[:at], data[at:]]


VECTORS = {
    # name: (bytes, expected types, messages, error at the end)
    "one context token": (b"\x01\x01\x00\x03abc", (CONTEXT,), [Message(CONTEXT, b"abc")], "closed the connection"),
    "two rounds": (b"\x01\x01\x00\x01x\x01\x01\x00\x02yz", (CONTEXT,),
                   [Message(CONTEXT, b"x"), Message(CONTEXT, b"yz")], "closed the connection"),
    "an abort": (b"\x01\xff", (CONTEXT,), [Message(MessageType.ABORT, b"")], "closed the connection"),
    "a protection level": (b"\x01\x02\x00\x02\xaa\xbb", (PROTECTION,), [Message(PROTECTION, b"\xaa\xbb")],
                           "closed the connection"),
    "wrapped data": (b"\x01\x03\x00\x04data", (ENCAPSULATED,), [Message(ENCAPSULATED, b"data")],
                     "closed the connection"),
    "a wrong version": (b"\x05\x01\x00\x01x", (CONTEXT,), [], "unsupported version 0x05"),
    "data during the context exchange": (b"\x01\x03\x00\x01x", (CONTEXT,), [],
                                         "message type 0x03 where 0x01 (context) was expected"),
    "an empty token": (b"\x01\x01\x00\x00", (CONTEXT,), [], "empty token"),
    "an abort among the data": (b"\x01\x03\x00\x01x\x01\xff", (ENCAPSULATED,), [Message(ENCAPSULATED, b"x")],
                                "an abort after the exchange ended"),
    "EOF inside a token": (b"\x01\x01\x00\x05abc", (CONTEXT,), [], "inside a message"),
    "EOF inside the header": (b"\x01\x01\x00", (CONTEXT,), [], "inside a message"),
}


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_every_vector_reads_the_same_however_it_arrives(name):
    data, expected, messages, error = VECTORS[name]
    for how, chunks in splits(data):
        got, got_error, _rest = read_all(chunks, expected)
        assert got == messages, how
        assert got_error is not None and error in got_error, (how, got_error)


def test_a_type_not_expected_is_refused_at_its_second_byte_not_after_its_token():
    reader = Reader((CONTEXT,))
    reader.receive_data(b"\x01\x03")  # LEN and the token are not here yet
    with pytest.raises(ProtocolError, match="message type 0x03"):
        reader.next_message()


def test_the_phase_decides_what_may_come_and_the_rest_stays_buffered():
    stream = encode(CONTEXT, b"t1") + encode(PROTECTION, b"lv") + encode(ENCAPSULATED, b"d1")
    still_in_context = Reader()
    still_in_context.receive_data(stream)
    assert still_in_context.next_message() == Message(CONTEXT, b"t1")
    with pytest.raises(ProtocolError, match="0x02 where 0x01"):
        still_in_context.next_message()  # the context is not up: no level yet
    reader = Reader()
    reader.receive_data(stream[:-1])
    assert reader.next_message() == Message(CONTEXT, b"t1")
    reader.expect(PROTECTION)
    assert reader.next_message() == Message(PROTECTION, b"lv")
    reader.expect(ENCAPSULATED)
    assert reader.next_message() is NEED_DATA and reader.trailing == encode(ENCAPSULATED, b"d1")[:-1]
    reader.receive_data(b"1")
    assert reader.next_message() == Message(ENCAPSULATED, b"d1")


def test_encode_makes_what_the_reader_reads_up_to_the_largest_token():
    for size in (1, 255, 256, MAX_TOKEN_BYTES):
        token = bytes(range(256)) * (size // 256) + bytes(size % 256)
        data = encode(ENCAPSULATED, token)
        assert data[:4] == b"\x01\x03" + size.to_bytes(2, "big")
        assert read_all([data], (ENCAPSULATED,))[0] == [Message(ENCAPSULATED, token)]
    assert ABORT == b"\x01\xff"
    for bad in (b"", bytes(MAX_TOKEN_BYTES + 1)):
        with pytest.raises(ValueError):
            encode(CONTEXT, bad)
    with pytest.raises(ValueError):
        encode(MessageType.ABORT, b"x")


@pytest.mark.parametrize("octet, level", [(0, ProtectionLevel.CLEAR), (1, ProtectionLevel.INTEGRITY),
                                          (2, ProtectionLevel.CONFIDENTIALITY), (3, ProtectionLevel.SELECTIVE)])
def test_the_levels_dante_and_the_rfc_name(octet, level):
    assert parse_level(bytes([octet])) is level


@pytest.mark.parametrize("data, error", [(b"", "one octet, not 0"), (b"\x01\x02", "one octet, not 2"),
                                         (b"\x04", "unknown protection level 0x04")])
def test_a_bad_level_is_refused(data, error):
    with pytest.raises(ProtocolError, match=error):
        parse_level(data)


@given(st.binary(max_size=64), st.integers(min_value=1, max_value=63),
       st.sampled_from([(CONTEXT,), (PROTECTION,), (ENCAPSULATED,)]))
def test_random_bytes_give_messages_or_a_protocol_error_the_same_way_split_or_not(data, at, expected):
    whole = read_all([data], expected)
    split = read_all([data[:at], data[at:]], expected)
    assert whole[:2] == split[:2]
