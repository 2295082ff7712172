"""Server side of the SOCKS5 username/password sub-negotiation (RFC 1929), sans-I/O.

Theory of operation
-------------------
After the server selects method 0x02 (``MethodSelection(Method.USERNAME_PASSWORD)``),
the ``socks5.ServerConnection`` reads the sub-negotiation itself, with ``parse_request``
from here: one message each way (RFC 1929 §2), so the connection's states carry it::

    event = conn.next_event()            # in AUTH: Credentials, or NEED_DATA
    # ... verify off the loop (fastsocks.auth), then:
    send(conn.send(AuthResponse(ok=True)))   # the request pipelined behind it parses next
    # ... or:
    send(conn.send(AuthResponse(ok=False)))  # and close: RFC 1929 §2 says MUST

``parse_request`` reads only the request at the start of the buffer and reports how
many bytes it used; everything after it (a pipelining client's SOCKS5 request, even
payload) stays in the connection's buffer.

The checks run in one fixed order, each as soon as the byte it needs is buffered (VER,
ULEN, PLEN), so the same bytes give the same result whole, byte by byte or split
anywhere. A ``ProtocolError`` carries ``Status.FAILURE`` when the client speaks this
protocol and can be told it failed (a zero length), and None when it does not (a wrong
VER) or has gone (EOF): the caller then just closes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from fastsocks.errors import ProtocolError
from fastsocks.protocol.common import NEED_DATA, _NeedData

SUBNEGOTIATION_VERSION: Final = 0x01
MAX_FIELD_BYTES: Final = 255  # ULEN and PLEN are one octet each, RFC 1929 §2
MAX_REQUEST_BYTES: Final = 1 + 1 + MAX_FIELD_BYTES + 1 + MAX_FIELD_BYTES  # VER ULEN UNAME PLEN PASSWD


class Status(enum.IntEnum):
    """The STATUS octet of the reply, RFC 1929 §2: any value but 0x00 is a failure."""

    SUCCESS = 0x00
    FAILURE = 0x01


@dataclass(frozen=True, slots=True, repr=False)
class Credentials:
    """Received: UNAME and PASSWD as sent.

    Bytes, because RFC 1929 names no encoding; decode the user name for logs with
    ``errors="backslashreplace"``. The repr never shows the password.
    """

    username: bytes
    password: bytes

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<hidden>)"


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """To send: the result of checking the credentials (STATUS, RFC 1929 §2)."""

    ok: bool


class _Incomplete(Exception):
    """The buffer ends before the request does."""


def parse_request(buffer: bytes | bytearray, eof: bool = False) -> tuple[Credentials, int] | _NeedData:
    """The username/password request at the start of ``buffer``, and its length in bytes.

    Returns NEED_DATA while the request is incomplete; raises ``ProtocolError`` if it is
    malformed, or incomplete when ``eof`` is true. Bytes after the request are ignored.
    """
    try:
        return _read_request(buffer)
    except _Incomplete:
        if eof:
            raise ProtocolError("username/password: client closed the connection during the request") from None
        return NEED_DATA


def encode_reply(ok: bool) -> bytes:
    """The reply (VER STATUS) for a successful or a failed check."""
    return bytes([SUBNEGOTIATION_VERSION, Status.SUCCESS if ok else Status.FAILURE])


def _read_request(buffer: bytes | bytearray) -> tuple[Credentials, int]:
    # §2: VER ULEN UNAME(1-255) PLEN PASSWD(1-255)
    version = _byte(buffer, 0)
    if version != SUBNEGOTIATION_VERSION:
        # Not this sub-negotiation: there is no reply the client would understand.
        raise ProtocolError(f"username/password: unsupported version {version:#04x}, expected 0x01")
    username_size = _byte(buffer, 1)
    if username_size == 0:
        raise ProtocolError("username/password: empty user name (ULEN 0)", Status.FAILURE)
    username = _take(buffer, 2, username_size)
    password_size_at = 2 + username_size
    password_size = _byte(buffer, password_size_at)
    if password_size == 0:
        raise ProtocolError("username/password: empty password (PLEN 0)", Status.FAILURE)
    password = _take(buffer, password_size_at + 1, password_size)
    return Credentials(username, password), password_size_at + 1 + password_size


def _byte(buffer: bytes | bytearray, offset: int) -> int:
    if offset >= len(buffer):
        raise _Incomplete
    return buffer[offset]


def _take(buffer: bytes | bytearray, offset: int, size: int) -> bytes:
    end = offset + size
    if end > len(buffer):
        raise _Incomplete
    return bytes(buffer[offset:end])
