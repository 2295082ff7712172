"""Server side of SOCKS5 (RFC 1928), sans-I/O: bytes in, events out, bytes to send.

Theory of operation
-------------------
One ``ServerConnection`` per client TCP connection, used like h11: the session
feeds what it reads to ``receive_data()`` (``b""`` is EOF), calls
``next_event()`` until it returns ``NEED_DATA``, and writes whatever ``send()``
returns. Nothing here touches a socket, a clock or a logger.

The client sends two messages, the greeting (§3) and the request (§4); we send
two, the method selection (§3) and the reply (§6; BIND gets a second one,
§4). Each side waits for the other, so the state says whose turn it is::

    AWAIT_GREETING ──Greeting received──> AWAIT_METHOD_SELECTION
    AWAIT_METHOD_SELECTION ──send MethodSelection(NO_AUTH)──────> AWAIT_REQUEST
                           ──send MethodSelection(NO_ACCEPTABLE)─> CLOSED
                           ──send MethodSelection(any other)─────> AUTH
    AUTH (USERNAME_PASSWORD) ──Credentials received (RFC 1929)──> AWAIT_AUTH_RESPONSE
    AWAIT_AUTH_RESPONSE ──send AuthResponse(ok=True)───> AWAIT_REQUEST
                        ──send AuthResponse(ok=False)──> CLOSED   (RFC 1929 §2: MUST close)
    AUTH (another method) ──auth_done(consumed_bytes)──> AWAIT_REQUEST
    AWAIT_REQUEST ──Request received──> REQUEST_RECEIVED
    REQUEST_RECEIVED ──send CommandReply(SUCCEEDED), BIND──> AWAIT_BIND_PEER
                     ──send CommandReply(SUCCEEDED)───────> ESTABLISHED
                     ──send CommandReply(failure)─────────> CLOSED
    AWAIT_BIND_PEER ──send CommandReply(SUCCEEDED)──> ESTABLISHED   (§4: BIND's second reply)
                    ──send CommandReply(failure)────> CLOSED
    any live state ──the client breaks the protocol──> ERROR ──send the refusal──> CLOSED

``next_event()`` parses only in AWAIT_GREETING, AWAIT_REQUEST and, once
USERNAME_PASSWORD is selected, AUTH (the credentials, read by ``userpass``). In every
other live state it returns ``NEED_DATA``: it is our turn, or the handshake is
over and what the client sends is payload, left in ``trailing_data`` to be
relayed. Another method's sub-negotiation is read from ``trailing_data`` by its own
code, which calls ``auth_done(consumed_bytes)`` when it succeeds. In CLOSED it raises ``LocalProtocolError``; in ERROR it raises the
client's ``ProtocolError`` again.

A ``ProtocolError`` carries the code to answer with, or None when there is no
way to answer. After one, ``send()`` accepts exactly that kind of refusal once
(``MethodSelection(NO_ACCEPTABLE)`` for a greeting, ``AuthResponse(ok=False)`` for
credentials, a failed ``CommandReply`` for a request), then the connection is CLOSED.

The checks run in one fixed order, each as soon as the bytes it needs are
buffered, so the same input gives the same events and errors whether it comes
whole, byte by byte or split anywhere. The request is checked in this order:
VER, RSV, ATYP (at once: an unknown ATYP leaves the address length unknown),
the domain name, then CMD last, once the whole request is buffered: a
well-formed request for a command we lack is read whole before it is refused,
so that closing does not leave unread bytes that make the kernel reset the
connection under the reply.

The wire format caps each message (257 and 262 bytes); ``max_buffer_bytes``
caps what a client can make us hold unconsumed (e.g. payload sent while we
connect upstream): beyond it ``receive_data()`` raises ``ProtocolError``.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
from dataclasses import dataclass
from typing import Callable, Final

from fastsocks.errors import LocalProtocolError, ProtocolError
from fastsocks.protocol import userpass
from fastsocks.protocol.common import NEED_DATA, _NeedData
from fastsocks.protocol.userpass import AuthResponse, Credentials

SOCKS_VERSION: Final = 5
MAX_GREETING_BYTES: Final = 2 + 255  # VER NMETHODS METHODS(1..255), RFC 1928 §3
MAX_REQUEST_BYTES: Final = 4 + 1 + 255 + 2  # VER CMD RSV ATYP len DOMAIN PORT, §4
_MAX_DOMAIN_BYTES: Final = 255  # the length is one octet, §5


class Method(enum.IntEnum):
    """Authentication methods, RFC 1928 §3."""

    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(enum.IntEnum):
    """Request commands, RFC 1928 §4."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(enum.IntEnum):
    """Address types (ATYP), RFC 1928 §4-5."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Reply(enum.IntEnum):
    """Reply codes (REP), RFC 1928 §6."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    CONNECTION_NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08

    @classmethod
    def for_errno(cls, err: int) -> Reply:
        """The reply for a failed connect() or bind(): what the error says of the destination."""
        return _ERRNO_REPLIES.get(err, cls.GENERAL_FAILURE)


_ERRNO_REPLIES: Final = {
    errno.ECONNREFUSED: Reply.CONNECTION_REFUSED,
    errno.ENETUNREACH: Reply.NETWORK_UNREACHABLE,
    errno.ENETDOWN: Reply.NETWORK_UNREACHABLE,
    errno.EAFNOSUPPORT: Reply.NETWORK_UNREACHABLE,
    errno.EADDRNOTAVAIL: Reply.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: Reply.HOST_UNREACHABLE,
    errno.EHOSTDOWN: Reply.HOST_UNREACHABLE,
    errno.ETIMEDOUT: Reply.TTL_EXPIRED,
    errno.EACCES: Reply.CONNECTION_NOT_ALLOWED,
    errno.EPERM: Reply.CONNECTION_NOT_ALLOWED,
}


class State(enum.Enum):
    """Where a connection is in the handshake; see the module docstring."""

    AWAIT_GREETING = enum.auto()
    AWAIT_METHOD_SELECTION = enum.auto()
    AUTH = enum.auto()
    AWAIT_AUTH_RESPONSE = enum.auto()
    AWAIT_REQUEST = enum.auto()
    REQUEST_RECEIVED = enum.auto()
    AWAIT_BIND_PEER = enum.auto()
    ESTABLISHED = enum.auto()
    CLOSED = enum.auto()
    ERROR = enum.auto()


# --- events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Greeting:
    """Received: the methods the client offers, in the order it gave them (§3)."""

    methods: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Request:
    """Received: what the client asks for (§4).

    ``host`` is dotted IPv4 text, compressed IPv6 text or the domain name as
    sent (printable ASCII, never resolved here). ``port`` may be 0: whether
    that is acceptable is policy, not protocol.
    """

    command: Command
    address_type: AddressType
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class MethodSelection:
    """To send: the method the server chose (§3)."""

    method: int


@dataclass(frozen=True, slots=True)
class CommandReply:
    """To send: the answer to a request (§6).

    The address type follows ``host``: IPv4 text, IPv6 text (IPv4-mapped
    included) or else a domain name.
    """

    reply: int
    host: str = "0.0.0.0"
    port: int = 0


# --- parsing ----------------------------------------------------------------


class _Incomplete(Exception):
    """The buffer ends before the message does."""


class _Reader:
    """Reads a message from the start of a buffer; raises _Incomplete at its end."""

    __slots__ = ("_buffer", "offset")

    def __init__(self, buffer: bytes | bytearray) -> None:
        self._buffer = buffer
        self.offset = 0

    def take(self, size: int) -> bytes:
        end = self.offset + size
        if end > len(self._buffer):
            raise _Incomplete
        chunk = bytes(self._buffer[self.offset : end])
        self.offset = end
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]


def _read_greeting(reader: _Reader) -> Greeting:
    version = reader.byte()
    if version != SOCKS_VERSION:
        # Not SOCKS5: there is no reply format we could answer in.
        raise ProtocolError(f"greeting: unsupported SOCKS version {version:#04x}")
    nmethods = reader.byte()
    if nmethods == 0:
        raise ProtocolError("greeting: the client offers no method", reply=Method.NO_ACCEPTABLE)
    return Greeting(methods=tuple(reader.take(nmethods)))


def _read_request(reader: _Reader) -> Request:
    version = reader.byte()
    if version != SOCKS_VERSION:
        raise ProtocolError(f"request: unsupported SOCKS version {version:#04x}", Reply.GENERAL_FAILURE)
    raw_command = reader.byte()
    reserved = reader.byte()
    if reserved != 0:
        raise ProtocolError(f"request: reserved byte is {reserved:#04x}, not 0", Reply.GENERAL_FAILURE)
    address_type = _address_type(reader.byte())
    host = _read_host(reader, address_type)
    port = int.from_bytes(reader.take(2), "big")
    return Request(_command(raw_command), address_type, host, port)


def _address_type(value: int) -> AddressType:
    try:
        return AddressType(value)
    except ValueError:
        raise ProtocolError(
            f"request: unknown address type {value:#04x}", Reply.ADDRESS_TYPE_NOT_SUPPORTED
        ) from None


def _command(value: int) -> Command:
    try:
        return Command(value)
    except ValueError:
        raise ProtocolError(f"request: unknown command {value:#04x}", Reply.COMMAND_NOT_SUPPORTED) from None


def _read_host(reader: _Reader, address_type: AddressType) -> str:
    if address_type is AddressType.IPV4:
        return str(ipaddress.IPv4Address(reader.take(4)))
    if address_type is AddressType.IPV6:
        return ipaddress.IPv6Address(reader.take(16)).compressed
    return _read_domain(reader)


def _read_domain(reader: _Reader) -> str:
    # §5: one length octet, then the name "with no terminating NUL octet".
    size = reader.byte()
    if size == 0:
        raise ProtocolError("request: empty domain name", Reply.GENERAL_FAILURE)
    name = reader.take(size)
    problem = domain_problem(name)
    if problem:
        raise ProtocolError(f"request: domain name {name!r} {problem}", Reply.GENERAL_FAILURE)
    return name.decode("ascii")


def domain_problem(name: bytes) -> str | None:
    """What makes ``name`` unusable as a host name, or None.

    Only printable ASCII is accepted. Every other byte is refused, never cut
    at: a resolver that stops at a NUL turns ``localhost\\0.example.com`` into
    ``localhost`` after policy has passed the full name.
    """
    for offset, value in enumerate(name):
        if not 0x21 <= value <= 0x7E:
            return f"has {_describe_byte(value)} at offset {offset}"
    return None


def _describe_byte(value: int) -> str:
    if value == 0x00:
        return "a NUL byte"
    if value == 0x20:
        return "a space"
    if value == 0x7F:
        return "a DEL byte"
    if value > 0x7F:
        return f"a non-ASCII byte {value:#04x}"
    return f"a control byte {value:#04x}"


# --- serializing ------------------------------------------------------------


def _encode_method_selection(event: MethodSelection) -> bytes:
    return bytes([SOCKS_VERSION, _octet(event.method, "method")])


def _encode_command_reply(event: CommandReply) -> bytes:
    # §6: VER REP RSV ATYP BND.ADDR BND.PORT
    header = bytes([SOCKS_VERSION, _octet(event.reply, "reply"), 0x00])
    return header + _encode_address(event.host) + _encode_port(event.port)


def _encode_address(host: str) -> bytes:
    """ATYP and address for ``host``; IPv4-mapped IPv6 stays IPv6 (ATYP 4)."""
    if not isinstance(host, str):
        raise LocalProtocolError(f"reply: host must be a str, got {host!r}")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return _encode_domain(host)
    address_type = AddressType.IPV4 if address.version == 4 else AddressType.IPV6
    return bytes([address_type]) + address.packed


def _encode_domain(host: str) -> bytes:
    # We never send a name we would refuse to receive.
    try:
        name = host.encode("ascii")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"reply: host {host!r} is not an ASCII name or IP address") from None
    if not 0 < len(name) <= _MAX_DOMAIN_BYTES:
        raise LocalProtocolError(f"reply: domain name must be 1-255 bytes, got {len(name)}")
    problem = domain_problem(name)
    if problem:
        raise LocalProtocolError(f"reply: domain name {name!r} {problem}")
    return bytes([AddressType.DOMAIN, len(name)]) + name


def _encode_port(port: int) -> bytes:
    if not (isinstance(port, int) and 0 <= port <= 0xFFFF):
        raise LocalProtocolError(f"reply: port must be 0-65535, got {port!r}")
    return port.to_bytes(2, "big")


def _octet(value: int, field: str) -> int:
    if not (isinstance(value, int) and 0 <= value <= 0xFF):
        raise LocalProtocolError(f"{field} must be 0-255, got {value!r}")
    return value


# --- the connection ---------------------------------------------------------

# The states in which next_event() parses a message: what it reads, the state
# after it, and the name used in errors.
_READERS: Final[dict[State, tuple[Callable[[_Reader], Greeting | Request], State, str]]] = {
    State.AWAIT_GREETING: (_read_greeting, State.AWAIT_METHOD_SELECTION, "greeting"),
    State.AWAIT_REQUEST: (_read_request, State.REQUEST_RECEIVED, "request"),
}

# States in which an overflowing buffer can still be answered with a reply (§6).
_CAN_REPLY: Final = frozenset({State.AWAIT_REQUEST, State.REQUEST_RECEIVED, State.AWAIT_BIND_PEER})


class ServerConnection:
    """The SOCKS5 handshake of one client connection, seen from the server."""

    version = SOCKS_VERSION

    def __init__(self, max_buffer_bytes: int = 65536) -> None:
        # A pipelining client may send both messages before we answer one.
        if max_buffer_bytes < MAX_GREETING_BYTES + MAX_REQUEST_BYTES:
            raise ValueError(
                f"max_buffer_bytes must be at least {MAX_GREETING_BYTES + MAX_REQUEST_BYTES}, "
                f"got {max_buffer_bytes}"
            )
        self._max_buffer_bytes = max_buffer_bytes
        self._buffer = bytearray()
        self._eof = False
        self._state = State.AWAIT_GREETING
        self._offered: tuple[int, ...] = ()
        self._method: int | None = None  # the one selected
        self._command: Command | None = None
        self._error: ProtocolError | None = None
        self._refusal: type[MethodSelection] | type[CommandReply] | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Bytes received but not consumed by any event, and whether EOF was seen.

        Once the handshake is done these are the client's first payload bytes,
        to be relayed before anything read later.
        """
        return bytes(self._buffer), self._eof

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the client; ``b""`` means the client sent EOF."""
        if self._eof:
            raise LocalProtocolError("receive_data() called after EOF")
        if not data:
            self._eof = True
            return
        if len(self._buffer) + len(data) > self._max_buffer_bytes:
            reply = Reply.GENERAL_FAILURE if self._state in _CAN_REPLY else None
            raise self._fail(
                ProtocolError(f"client sent more than {self._max_buffer_bytes} unconsumed bytes", reply)
            )
        self._buffer += data

    def next_event(self) -> Greeting | Credentials | Request | _NeedData:
        """The next message from the client, or NEED_DATA; raises ProtocolError."""
        if self._state is State.CLOSED:
            raise LocalProtocolError("next_event() called on a closed connection")
        if self._error is not None:
            raise ProtocolError(str(self._error), self._error.reply)
        if self._state is State.AUTH and self._method == Method.USERNAME_PASSWORD:
            return self._next_credentials()
        if self._state not in _READERS:
            return NEED_DATA
        read, next_state, message = _READERS[self._state]
        reader = _Reader(self._buffer)
        try:
            event = read(reader)
        except _Incomplete:
            if self._eof:
                raise self._fail(ProtocolError(f"client closed the connection during the {message}")) from None
            return NEED_DATA
        except ProtocolError as error:
            raise self._fail(error) from None
        del self._buffer[: reader.offset]
        self._remember(event)
        self._state = next_state
        return event

    def _next_credentials(self) -> Credentials | _NeedData:
        try:
            parsed = userpass.parse_request(self._buffer, self._eof)
        except ProtocolError as error:
            raise self._fail(error) from None
        if parsed is NEED_DATA:
            return NEED_DATA
        credentials, consumed = parsed
        del self._buffer[:consumed]
        self._state = State.AWAIT_AUTH_RESPONSE
        return credentials

    def send(self, event: MethodSelection | AuthResponse | CommandReply) -> bytes:
        """The bytes for ``event``; raises LocalProtocolError if it is not our turn."""
        # Encode first: it validates the fields the transition looks at.
        if isinstance(event, MethodSelection):
            data = _encode_method_selection(event)
            next_state = self._after_method_selection(event)
        elif isinstance(event, CommandReply):
            data = _encode_command_reply(event)
            next_state = self._after_command_reply(event)
        elif isinstance(event, AuthResponse):
            data = userpass.encode_reply(event.ok)
            next_state = self._after_auth_response(event)
        else:
            raise TypeError(f"cannot send {event!r}")
        self._state = next_state
        return data

    def refusal(self) -> MethodSelection | AuthResponse | CommandReply | None:
        """After next_event() raised a ProtocolError: the event that answers it.

        None when the protocol has no answer at that point (reply None, e.g. a bad
        version byte); the caller then just closes.
        """
        if self._state is not State.ERROR or self._refusal is None:
            return None
        if self._refusal is MethodSelection:
            return MethodSelection(Method.NO_ACCEPTABLE)
        if self._refusal is AuthResponse:
            return AuthResponse(ok=False)
        return CommandReply(self._error.reply)

    def auth_done(self, consumed_bytes: int) -> None:
        """The method's sub-negotiation (§3) succeeded and used ``consumed_bytes``.

        For a method other than USERNAME_PASSWORD (which this connection reads itself):
        its sub-negotiation is parsed elsewhere, from ``trailing_data``; the bytes after
        it are the request, which this connection parses next.
        """
        if self._state is not State.AUTH or self._method == Method.USERNAME_PASSWORD:
            raise LocalProtocolError(f"auth_done() called in state {self._state.name}"
                                     + (" (username/password answers with AuthResponse)"
                                        if self._state is State.AUTH else ""))
        if not 0 <= consumed_bytes <= len(self._buffer):
            raise LocalProtocolError(
                f"auth_done(): consumed_bytes must be 0-{len(self._buffer)}, got {consumed_bytes}"
            )
        del self._buffer[:consumed_bytes]
        self._state = State.AWAIT_REQUEST

    # --- transitions ----------------------------------------------------------

    def _remember(self, event: Greeting | Request) -> None:
        if isinstance(event, Greeting):
            self._offered = event.methods
        else:
            self._command = event.command

    def _after_method_selection(self, event: MethodSelection) -> State:
        if self._owes_refusal(MethodSelection):
            self._require(event.method == Method.NO_ACCEPTABLE, "only NO_ACCEPTABLE can answer a bad greeting")
            return State.CLOSED
        self._require_state(event, State.AWAIT_METHOD_SELECTION)
        if event.method == Method.NO_ACCEPTABLE:
            return State.CLOSED
        # §3: the server selects from the methods given in METHODS.
        self._require(event.method in self._offered, f"method {event.method:#04x} was not offered")
        self._method = event.method
        return State.AWAIT_REQUEST if event.method == Method.NO_AUTH else State.AUTH

    def _after_auth_response(self, event: AuthResponse) -> State:
        if self._owes_refusal(AuthResponse):
            self._require(not event.ok, "bad credentials can only be answered with a failure")
            return State.CLOSED
        self._require_state(event, State.AWAIT_AUTH_RESPONSE)
        return State.AWAIT_REQUEST if event.ok else State.CLOSED

    def _after_command_reply(self, event: CommandReply) -> State:
        succeeded = event.reply == Reply.SUCCEEDED
        if self._owes_refusal(CommandReply):
            self._require(not succeeded, "a bad request can only be answered with a failure")
            return State.CLOSED
        self._require_state(event, State.REQUEST_RECEIVED, State.AWAIT_BIND_PEER)
        if not succeeded:
            return State.CLOSED
        # §4: BIND gets a second reply once the expected peer connects.
        if self._state is State.REQUEST_RECEIVED and self._command is Command.BIND:
            return State.AWAIT_BIND_PEER
        return State.ESTABLISHED

    def _owes_refusal(self, kind: type) -> bool:
        return self._state is State.ERROR and self._refusal is kind

    def _require_state(self, event: object, *allowed: State) -> None:
        self._require(self._state in allowed, f"cannot send {type(event).__name__} in state {self._state.name}")

    @staticmethod
    def _require(condition: bool, msg: str) -> None:
        if not condition:
            raise LocalProtocolError(msg)

    def _fail(self, error: ProtocolError) -> ProtocolError:
        """Enter ERROR for ``error`` (the first one wins) and return it to raise."""
        if self._state not in (State.ERROR, State.CLOSED):
            self._refusal = self._refusal_for(error)
            self._error = error
            self._state = State.ERROR
        return error

    def _refusal_for(self, error: ProtocolError) -> type[MethodSelection | AuthResponse | CommandReply] | None:
        if error.reply is None:
            return None
        if self._state is State.AWAIT_GREETING:
            return MethodSelection
        return AuthResponse if self._state is State.AUTH else CommandReply
