"""Sans-I/O SOCKS4 and SOCKS4a, server side.

Theory of operation
-------------------
SOCKS4 has no greeting: the client's first message is the request (the SOCKS4 protocol
text, "1) CONNECT")::

    +----+----+----+----+----+----+----+----+----+----+....+----+
    | VN | CD | DSTPORT |      DSTIP        | USERID       |NULL|
    +----+----+----+----+----+----+----+----+----+----+....+----+
       1    1      2              4           variable       1

SOCKS4a: a DSTIP of 0.0.0.x with x != 0 means "resolve it for me": a domain name follows
the USERID's NUL, itself NUL-terminated. The reply is 8 bytes: VN=0, CD (90 granted, 91
rejected or failed), DSTPORT, DSTIP. BIND gets two replies, like SOCKS5's.

States: AWAIT_REQUEST -> (Request parsed) -> REQUEST_RECEIVED -> send(CommandReply):
granted -> ESTABLISHED (BIND: AWAIT_BIND_PEER first), rejected -> CLOSED. A protocol
error moves to ERROR, where ``refusal()`` gives the one reply that may still be sent.

Both variable fields are capped (USERID and the name at 255 bytes, like SOCKS5's fields)
so a client cannot make us buffer without bound while we wait for a NUL; a name is held
to the same rule as SOCKS5's: printable ASCII, never cut at a NUL.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from fastsocks.errors import LocalProtocolError, ProtocolError
from fastsocks.protocol.socks5 import NEED_DATA, AddressType, Command, _NeedData, domain_problem

SOCKS4_VERSION = 4
REPLY_VERSION = 0
MAX_FIELD_BYTES = 255
MAX_REQUEST_BYTES = 8 + MAX_FIELD_BYTES + 1 + MAX_FIELD_BYTES + 1


class Reply(enum.IntEnum):
    """CD of a SOCKS4 reply."""

    GRANTED = 90
    REJECTED = 91
    NO_IDENTD = 92
    IDENT_MISMATCH = 93


class State(enum.Enum):
    AWAIT_REQUEST = enum.auto()
    REQUEST_RECEIVED = enum.auto()
    AWAIT_BIND_PEER = enum.auto()
    ESTABLISHED = enum.auto()
    CLOSED = enum.auto()
    ERROR = enum.auto()


@dataclass(frozen=True, slots=True)
class Request:
    """A SOCKS4 or SOCKS4a request; ``address_type`` is IPV4, or DOMAIN for SOCKS4a."""

    command: Command
    address_type: AddressType
    host: str
    port: int
    userid: bytes

    @property
    def is_4a(self) -> bool:
        return self.address_type == AddressType.DOMAIN


@dataclass(frozen=True, slots=True)
class CommandReply:
    reply: Reply
    host: str = "0.0.0.0"
    port: int = 0


def _find_nul(buffer: bytearray, start: int, field: str) -> int | None:
    """Index of the NUL ending a field that starts at ``start``; None if not yet here."""
    end = buffer.find(b"\0", start, start + MAX_FIELD_BYTES + 1)
    if end < 0 and len(buffer) - start > MAX_FIELD_BYTES:
        raise ProtocolError(f"request: {field} longer than {MAX_FIELD_BYTES} bytes", Reply.REJECTED)
    return None if end < 0 else end


def _parse_request(buffer: bytearray) -> tuple[Request, int] | None:
    """The request at the start of ``buffer`` and its length, or None if incomplete."""
    if buffer and buffer[0] != SOCKS4_VERSION:
        raise ProtocolError(f"request: version {buffer[0]:#04x}, expected 0x04", None)
    if len(buffer) < 8:
        return None
    command_byte = buffer[1]
    port = int.from_bytes(buffer[2:4], "big")
    ip = bytes(buffer[4:8])
    userid_end = _find_nul(buffer, 8, "USERID")
    if userid_end is None:
        return None
    userid = bytes(buffer[8:userid_end])
    end = userid_end + 1
    # SOCKS4a: 0.0.0.x, x != 0, is "no address, a name follows".
    if ip[:3] == b"\0\0\0" and ip[3] != 0:
        name_end = _find_nul(buffer, end, "domain name")
        if name_end is None:
            return None
        name = bytes(buffer[end:name_end])
        if not name:
            raise ProtocolError("request: empty domain name", Reply.REJECTED)
        problem = domain_problem(name)
        if problem:
            raise ProtocolError(f"request: domain name {name!r} {problem}", Reply.REJECTED)
        address_type, host, end = AddressType.DOMAIN, name.decode("ascii"), name_end + 1
    else:
        address_type, host = AddressType.IPV4, str(ipaddress.IPv4Address(ip))
    if command_byte not in (Command.CONNECT, Command.BIND):
        raise ProtocolError(f"request: unknown command {command_byte:#04x}", Reply.REJECTED)
    return Request(Command(command_byte), address_type, host, port, userid), end


def _encode_reply(event: CommandReply) -> bytes:
    try:
        ip = ipaddress.IPv4Address(event.host).packed
    except ValueError:
        # SOCKS4 replies carry IPv4 only; clients ignore CONNECT's address anyway.
        ip = bytes(4)
    if not 0 <= event.port <= 0xFFFF:
        raise LocalProtocolError(f"reply: port must be 0-65535, got {event.port!r}")
    return bytes([REPLY_VERSION, event.reply]) + event.port.to_bytes(2, "big") + ip


class ServerConnection:
    """One client's SOCKS4/4a handshake; the same contract as socks5.ServerConnection."""

    version = SOCKS4_VERSION

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._eof = False
        self._state = State.AWAIT_REQUEST
        self._request: Request | None = None
        self._error: ProtocolError | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        return bytes(self._buffer), self._eof

    def receive_data(self, data: bytes) -> None:
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> Request | _NeedData:
        if self._state is State.ERROR:
            raise ProtocolError(str(self._error), self._error.reply)
        if self._state is State.CLOSED:
            raise LocalProtocolError("next_event() on a closed connection")
        if self._state is not State.AWAIT_REQUEST:
            return NEED_DATA
        try:
            parsed = _parse_request(self._buffer)
            if parsed is None and self._eof:
                raise ProtocolError("client closed the connection during the request", None)
        except ProtocolError as exc:
            self._state, self._error = State.ERROR, exc
            raise
        if parsed is None:
            return NEED_DATA
        self._request, consumed = parsed
        del self._buffer[:consumed]
        self._state = State.REQUEST_RECEIVED
        return self._request

    def send(self, event: CommandReply) -> bytes:
        if not isinstance(event, CommandReply):
            raise TypeError(f"cannot send {event!r}")
        granted = event.reply == Reply.GRANTED
        if self._state is State.ERROR:
            if granted or self._error.reply is None:
                raise LocalProtocolError("a bad request can only be answered with a rejection")
            next_state = State.CLOSED
        elif self._state is State.REQUEST_RECEIVED:
            if not granted:
                next_state = State.CLOSED
            elif self._request.command == Command.BIND:
                next_state = State.AWAIT_BIND_PEER
            else:
                next_state = State.ESTABLISHED
        elif self._state is State.AWAIT_BIND_PEER:
            next_state = State.ESTABLISHED if granted else State.CLOSED
        else:
            raise LocalProtocolError(f"cannot send a reply in state {self._state.name}")
        data = _encode_reply(event)
        self._state = next_state
        return data

    def refusal(self) -> CommandReply | None:
        """After next_event() raised: the reply that answers it, or None (just close)."""
        if self._state is not State.ERROR or self._error.reply is None:
            return None
        return CommandReply(Reply(self._error.reply))
