"""Sans-I/O HAProxy PROXY protocol, versions 1 and 2, receiving side.

Theory of operation
-------------------
A load balancer in front of us may open each connection with a PROXY header that names
the client it relays (spec: haproxy.org/download/2.8/doc/proxy-protocol.txt, "the spec"
below). One ``HeaderReader`` per accepted connection: the session feeds what it reads to
``receive_data()`` and calls ``next_event()``, which returns
``NEED_DATA`` until a whole header is buffered, then the ``ProxyHeader``, once. What came
after the header in the same reads (the SOCKS greeting) is then in ``trailing``. Nothing
here touches a socket, a clock or a logger.

Two formats, told apart by their first bytes (spec §2.2, end: "Identifying the protocol
version is easy")::

    v1: "PROXY" SP ("TCP4" | "TCP6") SP src SP dst SP sport SP dport CRLF   (§2.1)
        "PROXY" SP "UNKNOWN" [anything but CRLF] CRLF
    v2: 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A | ver<<4|cmd | fam<<4|proto | len (2, BE)
        | address block | TLVs, up to len                                 (§2.2)

Every check runs as soon as the bytes it needs are buffered (§2.1: "It is recommended to
abort the connection as soon as possible"), in one fixed order, so that the same input
gives the same header or error however it is split: the first bytes must be a prefix of
"PROXY " or of the v2 signature (so ``GET `` or a SOCKS5 greeting fails on its first
byte); in v1, the protocol word, a lone CR or LF, then the 107-byte line cap, and the
fields once the CRLF is in (§2.1: "The receiver must wait for the CRLF sequence before
starting to decode the addresses"); in v2, the version, the command, the family, the
length (against our cap and the family's address size), and the addresses once the
whole header is in. EOF is the caller's to see: it closes a connection whose header is
not whole (§2.2: "The receiver must also reject incoming connections containing partial
protocol headers"); ``receive_data(b"")`` changes nothing.

A header that says "use the connection's own endpoints" (v1 UNKNOWN, v2 LOCAL, v2 PROXY
over AF_UNSPEC) comes back with ``local=True`` and no addresses. We relay TCP only: v2
PROXY over UDP or AF_UNIX is refused as not TCP, though §2.2 allows a receiver to fall
back to the real endpoints for them. TLVs are skipped, not read.

Errors are ``fastsocks.errors.ProtocolError`` with ``reply=None``: the PROXY protocol has
no reply, a bad header is answered by closing.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from fastsocks.errors import LocalProtocolError, ProtocolError
from fastsocks.protocol.common import NEED_DATA, _NeedData

V1_PREFIX: Final = b"PROXY "
# §2.1: the worst case, "PROXY UNKNOWN" and two full IPv6 addresses and ports, is 107
# bytes with the CRLF; "If the CRLF sequence is not found in the first 107 characters,
# the receiver should declare the line invalid."
V1_MAX_LINE_BYTES: Final = 107
# §2.1: the protocol word is followed by a space, except UNKNOWN's short form.
_V1_PROTOCOL_STARTS: Final = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r\n")
_V1_EXPECTED: Final = "'PROXY TCP4|TCP6 src dst sport dport' or 'PROXY UNKNOWN...'"

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"  # §2.2: the constant 12-byte block
V2_FIXED_BYTES: Final = 16  # signature, ver_cmd, fam, len
V2_VERSION: Final = 2
V2_LOCAL: Final = 0x0
V2_PROXY: Final = 0x1
# §2.2 "In practice, the following protocol bytes are expected": fam byte -> what we call
# the family and the address block it needs (2*4 + 2*2 for IPv4, 2*16 + 2*2 for IPv6).
_V2_TCP: Final = {0x00: ("unknown", 0), 0x11: ("tcp4", 12), 0x21: ("tcp6", 36)}
_V2_NOT_TCP: Final = {0x12: "UDP over IPv4", 0x22: "UDP over IPv6", 0x31: "UNIX stream", 0x32: "UNIX datagram"}
# §2.2 lets len reach 65535, but also says the whole header "is always smaller than an
# MSS": a balancer's TLVs (ALPN, SNI, SSL, cloud endpoint ids) are a few hundred bytes.
# 4096 keeps room for them and stops a peer from making us buffer 64 KiB per connection.
MAX_V2_BYTES: Final = 4096


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY header.

    ``local`` means the connection's own endpoints are to be used (v1 UNKNOWN, v2 LOCAL,
    v2 PROXY over AF_UNSPEC); then ``source`` and ``destination`` are None and ``family``
    is "unknown". Otherwise ``family`` is "tcp4" or "tcp6" and the
    addresses are (IP as ``ipaddress`` writes it, port).
    """

    version: int
    local: bool
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    family: str


def _refuse(msg: str) -> ProtocolError:
    return ProtocolError(f"PROXY header: {msg}", None)


def _mismatch(data: bytes, expected: tuple[bytes, ...]) -> bytes | None:
    """None while ``data`` may still begin one of ``expected``; else its bytes up to the one
    that rules the last of them out (what the error shows, the same however split)."""
    last = -1
    for word in expected:
        index = next((i for i, (a, b) in enumerate(zip(data, word)) if a != b), None)
        if index is None:
            return None
        last = max(last, index)
    return data[: last + 1]


def _check_magic(buffer: bytearray) -> int | None:
    """1 or 2 when ``buffer`` starts with that version's magic, None if too short to say."""
    head = bytes(buffer[: len(V2_SIGNATURE)])
    bad = _mismatch(head, (V1_PREFIX, V2_SIGNATURE))
    if bad is not None:
        raise _refuse(f"{bad!r} is neither a PROXY v1 line nor the v2 signature")
    if head.startswith(V1_PREFIX):
        return 1
    return 2 if len(head) == len(V2_SIGNATURE) else None


def _v1_port(field: bytes) -> int:
    # §2.1: "a decimal integer in the range [0..65535] inclusive. Heading zeroes are not
    # permitted".
    if not field.isdigit() or len(field) > 5 or (field[:1] == b"0" and field != b"0") or int(field) > 0xFFFF:
        raise _refuse(f"v1 {field!r} is not a port (0-65535 in decimal, no leading zeros)")
    return int(field)


def _v1_address(field: bytes, version: int) -> str:
    # §2.1: IPv4 as four decimal numbers without leading zeros, IPv6 in hex groups with at
    # most one "::"; ipaddress holds text to the same rules, but for IPv6 scope ids.
    try:
        if b"%" in field:
            raise ValueError
        ip = ipaddress.ip_address(field.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise _refuse(f"v1 {field!r} is not an IP address") from None
    if ip.version != version:
        raise _refuse(f"v1 {field!r} is not an IPv{version} address")
    return str(ip)


def _v1_line_end(buffer: bytearray) -> int | None:
    """Index of the CRLF ending the v1 line, None if not yet here."""
    window = bytes(buffer[:V1_MAX_LINE_BYTES])
    bad = _mismatch(window[len(V1_PREFIX) :], _V1_PROTOCOL_STARTS)
    if bad is not None:
        raise _refuse(f"v1 {bad!r}...: expected {_V1_EXPECTED}")
    # §2.1: "The receiver must not tolerate a single CR or LF character to end the line".
    # The first lone one is reported, as it would be byte by byte.
    cr, lf = window.find(b"\r"), window.find(b"\n")
    lone_lf = lf >= 0 and (lf == 0 or window[lf - 1] != 0x0D)
    if 0 <= cr < len(window) - 1 and window[cr + 1] != 0x0A and not (lone_lf and lf < cr):
        raise _refuse("v1 line has a lone CR, without CRLF")
    if lone_lf:
        raise _refuse("v1 line ends in a lone LF, without CRLF")
    if lf < 0 and len(window) >= V1_MAX_LINE_BYTES:
        raise _refuse(f"v1 line longer than {V1_MAX_LINE_BYTES} bytes without CRLF")
    return None if lf < 0 else lf - 1


def _parse_v1(buffer: bytearray) -> tuple[ProxyHeader, int] | None:
    end = _v1_line_end(buffer)
    if end is None:
        return None
    words = bytes(buffer[len(V1_PREFIX) : end])
    # §2.1: for UNKNOWN "the receiver must ignore anything presented before the CRLF".
    if words == b"UNKNOWN" or words.startswith(b"UNKNOWN "):
        return ProxyHeader(1, True, None, None, "unknown"), end + 2
    fields = words.split(b" ")
    if len(fields) != 5 or b"" in fields:
        raise _refuse(f"v1 {words!r}: expected {_V1_EXPECTED}, single spaces apart")
    protocol, src, dst, sport, dport = fields
    version = 4 if protocol == b"TCP4" else 6  # _v1_line_end let only TCP4/TCP6/UNKNOWN by
    source = (_v1_address(src, version), _v1_port(sport))
    destination = (_v1_address(dst, version), _v1_port(dport))
    return ProxyHeader(1, False, source, destination, protocol.decode("ascii").lower()), end + 2


def _parse_v2(buffer: bytearray) -> tuple[ProxyHeader, int] | None:
    if len(buffer) <= 12:
        return None
    # §2.2, 13th byte: the version (high nibble) "must always be sent as \x2 and the
    # receiver must only accept this value"; the command (low nibble) is LOCAL or PROXY,
    # and "Receivers must drop connections presenting unexpected values here".
    version, command = buffer[12] >> 4, buffer[12] & 0x0F
    if version != V2_VERSION:
        raise _refuse(f"v2 version {version}, expected 2")
    if command not in (V2_LOCAL, V2_PROXY):
        raise _refuse(f"v2 command {command} is neither LOCAL (0) nor PROXY (1)")
    if len(buffer) < 14:
        return None
    # §2.2, LOCAL: "discard the protocol block including the family which is ignored".
    fam = buffer[13]
    if command == V2_PROXY and fam not in _V2_TCP:
        if fam in _V2_NOT_TCP:
            raise _refuse(f"v2 PROXY over {_V2_NOT_TCP[fam]}: only TCP is relayed")
        raise _refuse(f"v2 family/protocol byte {fam:#04x} is invalid")
    if len(buffer) < V2_FIXED_BYTES:
        return None
    # §2.2: "the length of the protocol header in bytes is always exactly 16 + this value".
    total = V2_FIXED_BYTES + int.from_bytes(buffer[14:16], "big")
    if total > MAX_V2_BYTES:
        raise _refuse(f"v2 header of {total} bytes, more than the {MAX_V2_BYTES} we accept")
    family, needed = _V2_TCP[fam] if command == V2_PROXY else ("unknown", 0)
    if total - V2_FIXED_BYTES < needed:
        raise _refuse(f"v2 address block of {total - V2_FIXED_BYTES} bytes, {needed} needed for {family}")
    if len(buffer) < total:
        return None
    if not needed:
        # LOCAL, or PROXY over AF_UNSPEC: "The receiver should ignore address information".
        return ProxyHeader(2, True, None, None, "unknown"), total
    ip_bytes = (needed - 4) // 2
    block = bytes(buffer[V2_FIXED_BYTES : V2_FIXED_BYTES + needed])
    # §2.2: source address, destination address, source port, destination port, all in
    # network byte order.
    src, dst = (str(ipaddress.ip_address(block[i : i + ip_bytes])) for i in (0, ip_bytes))
    sport, dport = int.from_bytes(block[-4:-2], "big"), int.from_bytes(block[-2:], "big")
    return ProxyHeader(2, False, (src, sport), (dst, dport), family), total


class HeaderReader:
    """Reads the PROXY header at the start of one connection; see the module docstring."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._header: ProxyHeader | None = None
        self._error: ProtocolError | None = None

    @property
    def trailing(self) -> bytes:
        """What was received after the header (b"" until ``next_event()`` returned it)."""
        return b"" if self._header is None else bytes(self._buffer)

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def next_event(self) -> ProxyHeader | _NeedData:
        """The header once it is whole, else NEED_DATA; raises ProtocolError."""
        if self._error is not None:
            raise ProtocolError(str(self._error), None)
        if self._header is not None:
            return NEED_DATA
        try:
            version = _check_magic(self._buffer)
            parsed = None if version is None else (_parse_v1 if version == 1 else _parse_v2)(self._buffer)
        except ProtocolError as exc:
            self._error = exc
            raise
        if parsed is None:
            return NEED_DATA
        self._header, consumed = parsed
        del self._buffer[:consumed]
        return self._header


def _address_pair(
    source: tuple[str, int], destination: tuple[str, int]
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Both addresses as ipaddress objects of one family, ports checked (a host that is not
    an IP address raises ValueError)."""
    ips = [ipaddress.ip_address(host) for host, _ in (source, destination)]
    if ips[0].version != ips[1].version:
        raise LocalProtocolError(f"PROXY header: {source[0]} and {destination[0]} are not of one family")
    for _, port in (source, destination):
        if not 0 <= port <= 0xFFFF:
            raise LocalProtocolError(f"PROXY header: port must be 0-65535, got {port!r}")
    return ips


def encode_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v1 line (§2.1); no addresses give "PROXY UNKNOWN\\r\\n"."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = _address_pair(source, destination)
    return f"PROXY TCP{src.version} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def encode_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    local: bool = False,
    *,
    tlvs: bytes = b"",
) -> bytes:
    """A v2 header (§2.2): LOCAL with no address block if ``local``, PROXY over AF_UNSPEC
    if there are no addresses, else PROXY over TCP4/TCP6; ``tlvs`` (raw TLV bytes) follow
    the address block."""
    if local or source is None or destination is None:
        command, fam, block = (V2_LOCAL if local else V2_PROXY), 0x00, b""
    else:
        src, dst = _address_pair(source, destination)
        command, fam = V2_PROXY, (0x11 if src.version == 4 else 0x21)
        block = src.packed + dst.packed + source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
    body = block + tlvs
    if V2_FIXED_BYTES + len(body) > MAX_V2_BYTES:
        raise LocalProtocolError(f"PROXY header: over {MAX_V2_BYTES} bytes")
    return V2_SIGNATURE + bytes([V2_VERSION << 4 | command, fam]) + len(body).to_bytes(2, "big") + body
