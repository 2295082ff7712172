"""The messages of SOCKS5's GSS-API method (0x01, RFC 1961), sans-I/O: read from a byte
stream and written, in the order the method allows them. The GSS-API calls themselves
(accepting the context, wrap and unwrap) belong to the caller, outside the protocol layer.

Theory of operation
-------------------
Every message but one is ``VER(0x01) MTYP LEN(2 octets, network order) TOKEN(LEN)``:

- MTYP 0x01, security context establishment (§3): the client's tokens and the server's
  answers, as many rounds as the mechanism needs;
- MTYP 0x02, protection-level negotiation (§4): TOKEN is the wrapped one-octet level;
- MTYP 0x03, per-message protection (§5): TOKEN is a wrapped piece of the session's data.

The one other is the abort, ``VER 0xFF`` with neither length nor token (§3), which
either side may send instead of a token during the negotiation; it ends the exchange.

``Reader`` takes bytes as they arrive (``receive_data``, b"" at EOF) and gives whole
messages (``next_message``). The caller says which types may come next (``expect``):
CONTEXT during establishment, PROTECTION once the context is up, ENCAPSULATED for the rest
of the session. Each check is made as soon as the byte it needs has arrived (VER, then
MTYP against what is expected, then LEN), so the same bytes give the same result whole,
byte by byte or split anywhere, and a message of a type not expected now is refused at
its second byte, before its token is waited for. Bytes after a message stay buffered for
the next call. ``ProtocolError`` carries no reply code: RFC 1961 has no error reply, and
the caller answers with the abort (``ABORT``) where the exchange allows, then closes.

Levels (§4): 1 integrity, 2 integrity and confidentiality, 3 "selective" (per message);
Dante adds 0, no per-message protection after authentication ("clear"), which its client
offers and which this module reads too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from fastsocks.errors import ProtocolError
from fastsocks.protocol.common import NEED_DATA, _NeedData

GSSAPI_VERSION: Final = 0x01
MAX_TOKEN_BYTES: Final = 0xFFFF  # LEN is two octets
HEADER_BYTES: Final = 4          # VER MTYP LEN


class MessageType(enum.IntEnum):
    CONTEXT = 0x01       # §3: security context establishment
    PROTECTION = 0x02    # §4: protection-level negotiation
    ENCAPSULATED = 0x03  # §5: per-message protection of the session's data
    ABORT = 0xFF         # §3: the context establishment failed (VER MTYP only)


class ProtectionLevel(enum.IntEnum):
    CLEAR = 0x00            # Dante's: nothing wrapped once the context is up
    INTEGRITY = 0x01
    CONFIDENTIALITY = 0x02  # integrity and confidentiality
    SELECTIVE = 0x03        # per message, "based on local client and server configurations"


ABORT: Final = bytes([GSSAPI_VERSION, MessageType.ABORT])


@dataclass(frozen=True, slots=True)
class Message:
    """One message read: its type and token (b"" for ABORT)."""

    mtyp: MessageType
    token: bytes


def encode(mtyp: MessageType, token: bytes) -> bytes:
    """A message of ``mtyp`` carrying ``token`` (1 to 65535 bytes); ABORT: use ABORT."""
    if mtyp == MessageType.ABORT:
        raise ValueError("the abort carries no token: send ABORT")
    if not 1 <= len(token) <= MAX_TOKEN_BYTES:
        raise ValueError(f"a token is 1 to {MAX_TOKEN_BYTES} bytes, not {len(token)}")
    return bytes([GSSAPI_VERSION, mtyp]) + len(token).to_bytes(2, "big") + token


def parse_level(data: bytes) -> ProtectionLevel:
    """The protection level in an unwrapped MTYP 2 token: exactly one known octet."""
    if len(data) != 1:
        raise ProtocolError(f"gssapi: a protection level is one octet, not {len(data)}")
    try:
        return ProtectionLevel(data[0])
    except ValueError:
        raise ProtocolError(f"gssapi: unknown protection level {data[0]:#04x}") from None


class Reader:
    """The messages of one direction of the exchange, in order (see the module docstring)."""

    def __init__(self, expected: tuple[MessageType, ...] = (MessageType.CONTEXT,)) -> None:
        self._buffer = bytearray()
        self._eof = False
        self._expected = frozenset(expected)

    def expect(self, *types: MessageType) -> None:
        """What may come next, ABORT aside: the caller's phase of the exchange."""
        self._expected = frozenset(types)

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; b"" is EOF."""
        if data:
            self._buffer += data
        else:
            self._eof = True

    @property
    def trailing(self) -> bytes:
        """Bytes received after the last message returned (not yet a whole message)."""
        return bytes(self._buffer)

    def next_message(self) -> Message | _NeedData:
        """The next whole message, or NEED_DATA; ProtocolError for a malformed one, one of
        a type not expected now (or an abort where none may come), or EOF inside one."""
        buffer = self._buffer
        if not buffer:
            if self._eof:
                raise ProtocolError("gssapi: the peer closed the connection")
            return NEED_DATA
        if buffer[0] != GSSAPI_VERSION:
            raise ProtocolError(f"gssapi: unsupported version {buffer[0]:#04x}, expected 0x01")
        if len(buffer) < 2:
            return self._more()
        mtyp = buffer[1]
        if mtyp == MessageType.ABORT:
            if MessageType.CONTEXT not in self._expected and MessageType.PROTECTION not in self._expected:
                raise ProtocolError("gssapi: an abort after the exchange ended")
            del buffer[:2]
            return Message(MessageType.ABORT, b"")
        if mtyp not in self._expected:
            wanted = " or ".join(f"{t:#04x} ({t.name.lower()})" for t in sorted(self._expected))
            raise ProtocolError(f"gssapi: message type {mtyp:#04x} where {wanted} was expected")
        if len(buffer) < HEADER_BYTES:
            return self._more()
        size = int.from_bytes(buffer[2:4], "big")
        if size == 0:
            raise ProtocolError(f"gssapi: an empty token (LEN 0) in a {MessageType(mtyp).name.lower()} message")
        if len(buffer) < HEADER_BYTES + size:
            return self._more()
        token = bytes(buffer[HEADER_BYTES:HEADER_BYTES + size])
        del buffer[:HEADER_BYTES + size]
        return Message(MessageType(mtyp), token)

    def _more(self) -> _NeedData:
        if self._eof:
            raise ProtocolError("gssapi: the peer closed the connection inside a message")
        return NEED_DATA
