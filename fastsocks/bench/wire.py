"""The bytes a bench client exchanges: SOCKS5 client messages (RFC 1928) with
username/password authentication (RFC 1929), and the bulk header and result that the
built-in target (``fastsocks bench serve``) understands. Pure: bytes in, bytes out.

The compiled load generator sends these messages as given and checks the answers itself;
the constants below mirror the ones in ``_loadgen.pxd`` (a unit test holds them equal).
"""

from __future__ import annotations

import ipaddress
import struct

from fastsocks.protocol.socks5 import AddressType, Command, Method, Reply

SOCKS_VERSION = 5
AUTH_VERSION = 1  # RFC 1929 §2

# The bulk protocol of the built-in target: a header, then payload, then (when the client
# uploads) the sink's result. The first byte tells it apart from echo traffic: the
# payload pattern never contains MAGIC.
MAGIC = 0xFB
VERSION = 1
FLAG_DOWNLOAD, FLAG_UPLOAD, FLAG_VERIFY = 1, 2, 4
RESULT_UNCHECKED, RESULT_INTACT, RESULT_CORRUPT = 0, 1, 2
PATTERN_PERIOD = 1 << 20
_HEADER = struct.Struct("!BBBBIQ")  # MAGIC VERSION FLAGS 0 OFFSET NBYTES
_RESULT = struct.Struct("!QB")      # RECEIVED STATUS
HEADER_SIZE = _HEADER.size
RESULT_SIZE = _RESULT.size


def greeting(with_credentials: bool) -> bytes:
    """The method offer (§3). With credentials we offer only USERNAME/PASSWORD, so that
    the run measures the authenticated path it was asked to measure."""
    method = Method.USERNAME_PASSWORD if with_credentials else Method.NO_AUTH
    return bytes([SOCKS_VERSION, 1, method])


def auth_request(username: str, password: str) -> bytes:
    """VER ULEN UNAME PLEN PASSWD (RFC 1929 §2)."""
    user, secret = username.encode(), password.encode()
    if not (1 <= len(user) <= 255 and 1 <= len(secret) <= 255):
        raise ValueError("user name and password must be 1-255 bytes each (RFC 1929)")
    return bytes([AUTH_VERSION, len(user)]) + user + bytes([len(secret)]) + secret


def connect_request(host: str, port: int) -> bytes:
    """CONNECT to an IP literal (ATYP 1 or 4) or a name the proxy resolves (ATYP 3), §4-5."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode()
        if not 1 <= len(name) <= 255:
            raise ValueError(f"host name {host!r}: 1-255 bytes expected") from None
        encoded = bytes([AddressType.DOMAIN, len(name)]) + name
    else:
        atyp = AddressType.IPV4 if address.version == 4 else AddressType.IPV6
        encoded = bytes([atyp]) + address.packed
    return bytes([SOCKS_VERSION, Command.CONNECT, 0]) + encoded + struct.pack("!H", port)


def udp_associate_request() -> bytes:
    """UDP ASSOCIATE (§4) with DST 0.0.0.0:0: the proxy takes our IP from the TCP
    connection and our port from the first datagram (§6)."""
    return bytes([SOCKS_VERSION, Command.UDP_ASSOCIATE, 0, AddressType.IPV4, 0, 0, 0, 0, 0, 0])


def udp_header(host: str, port: int) -> bytes:
    """RSV RSV FRAG ATYP DST.ADDR DST.PORT (§7), FRAG 0, before every datagram's payload."""
    return b"\0\0\0" + connect_request(host, port)[3:]


def reply_length(head: bytes) -> int | None:
    """Length of the reply (§6) whose first five bytes are ``head``; None if ATYP is unknown."""
    atyp = head[3]
    if atyp == AddressType.IPV4:
        return 10
    if atyp == AddressType.IPV6:
        return 22
    if atyp == AddressType.DOMAIN:
        return 7 + head[4]
    return None


def reply_name(code: int) -> str:
    """``connection_refused`` for 0x05; unknown codes as ``0x2a``."""
    try:
        return Reply(code).name.lower()
    except ValueError:
        return f"0x{code:02x}"


def bulk_header(flags: int, offset: int, nbytes: int) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, flags, 0, offset % PATTERN_PERIOD, nbytes)


def parse_result(data: bytes) -> tuple[int, int]:
    """(bytes the sink received, its status: RESULT_UNCHECKED / INTACT / CORRUPT)."""
    return _RESULT.unpack(data)
