"""HTTP proxy requests on the SOCKS port, parsed by h11: ``CONNECT host:port`` (a tunnel,
what ``https_proxy`` clients send) and absolute-form forward requests (``GET
http://host/path``).

Theory of operation
-------------------
A stream that opens with an ASCII letter is HTTP (SOCKS opens with 0x04 or 0x05). The
``ServerConnection`` here speaks to the session as the SOCKS ones do, so that the
session's rules, caps, resolver, connect and relay serve it unchanged:

- ``next_event()`` gives ``userpass.Credentials`` first when the request carries
  ``Proxy-Authorization: Basic`` (the session checks them against the users file and
  answers with ``send(AuthResponse)``: nothing on success, 407 on failure), then a
  ``Request`` whose command is ``Command.CONNECT`` for both kinds: the rules see a
  ``connect`` to the request's host and port.
- ``send(CommandReply)`` turns the session's SOCKS5 reply into the HTTP answer: ``200
  Connection established`` for a CONNECT; for a forward request, success sends nothing
  to the client: the origin answers, and ``trailing_data`` is the request rewritten to
  origin form (Host from the target, hop-by-hop and Proxy-* headers removed,
  ``Connection: close``) followed by the body bytes the client sent so far, for the
  relay to send upstream. A failure maps to 403, 502 or 504 (``STATUS_FOR_REPLY``).
- A malformed request raises ProtocolError; ``refusal()`` is then the answer (400,
  405, 407, 431 for a head past MAX_HEAD_BYTES), always with ``Connection: close``; a
  client that closes inside its head gets none.

One request per client connection for forward requests (the origin is asked to close
after its response, and the relay ends with it); a tunnel lasts as long as its peers.
h11 parses every byte of the head; the only thing read here besides h11 is where the
head ends, with h11's own rule (the first blank line), to hand on the bytes after it.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from fastsocks.errors import ProtocolError
from fastsocks.protocol import userpass
from fastsocks.protocol.socks5 import NEED_DATA, AddressType, Command, CommandReply, Reply, _NeedData

HTTP_VERSION = "http"           # ServerConnection.version, beside SOCKS' 4 and 5
MAX_HEAD_BYTES = 16384          # request line and headers: more is 431 and a closed connection
REALM = b'Basic realm="fastsocks"'
_HEAD_END = re.compile(rb"\n\r?\n")  # h11's own blank line (its _readers.blank_line_regex)

# RFC 7230 §6.1, RFC 7230 §A.1.2 (Proxy-Connection), RFC 7235 §4.4: not for the origin.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization",
                        b"proxy-authenticate", b"te", b"trailer", b"upgrade"})
REFUSED_METHODS = frozenset({b"TRACE"})  # reflected back through a proxy, it leaks credentials (XST)

STATUS_FOR_REPLY = {
    Reply.CONNECTION_NOT_ALLOWED: (403, b"Forbidden"),
    Reply.TTL_EXPIRED: (504, b"Gateway Timeout"),
    Reply.COMMAND_NOT_SUPPORTED: (405, b"Method Not Allowed"),
    Reply.ADDRESS_TYPE_NOT_SUPPORTED: (400, b"Bad Request"),
}
BAD_GATEWAY = (502, b"Bad Gateway")  # refused, unreachable, a general failure


@dataclass(frozen=True, slots=True)
class Request:
    """What the session connects to; ``command`` is always CONNECT (see the docstring)."""
    command: Command
    address_type: AddressType
    host: str
    port: int
    method: str        # "CONNECT", or the forward request's method
    target: str        # as the client wrote it


@dataclass(frozen=True, slots=True)
class HttpError:
    """An answer that ends the connection."""
    status: int
    reason: bytes
    detail: str


class ServerConnection:
    """One HTTP proxy request of one client connection, seen from the proxy."""

    version = HTTP_VERSION

    def __init__(self, max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self._buffer = bytearray()      # what the client sent, the head included, until it is parsed
        self._max_head_bytes = max_head_bytes
        self._eof = False
        self._head: h11.Request | None = None
        self._head_bytes = 0
        self._request: Request | None = None
        self._credentials_given = False
        self._awaiting_auth = False     # Credentials given, AuthResponse not yet sent: our turn
        self._refusal: HttpError | None = None
        self._error: ProtocolError | None = None
        self._done = False

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """What goes upstream first once connected: for a forward request its rewritten
        head, then the bytes after the client's head (a tunnel's first payload)."""
        after = bytes(self._buffer[self._head_bytes:]) if self._head is not None else bytes(self._buffer)
        if self._request is not None and self._request.method != "CONNECT":
            return origin_request(self._head, self._request) + after, self._eof
        return after, self._eof

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
            return
        self._buffer += data  # the head (its cap is _read_head's), or the bytes sent behind it
        if self._head is not None and len(self._buffer) - self._head_bytes > 1 << 20:
            raise self._fail(ProtocolError("client sent more than 1 MiB before the answer"), 413,
                             b"Content Too Large")

    def next_event(self) -> userpass.Credentials | Request | _NeedData:
        if self._error is not None:
            raise ProtocolError(str(self._error), None)
        if self._request is not None or self._awaiting_auth:
            return NEED_DATA  # the session has the request, or checks the password: our turn
        if self._head is None and not self._read_head():
            return NEED_DATA
        if not self._credentials_given:
            self._credentials_given = True
            credentials = self._credentials()
            if credentials is not None:
                self._awaiting_auth = True
                return credentials
        self._request = self._proxy_request()
        return self._request

    def _read_head(self) -> bool:
        match = _HEAD_END.search(self._buffer)
        if match is None:
            if len(self._buffer) > self._max_head_bytes:
                raise self._fail(ProtocolError(f"request head longer than {self._max_head_bytes} bytes"), 431,
                                 b"Request Header Fields Too Large")
            if self._eof:  # nothing to answer: the client is gone, or never spoke HTTP
                raise self._fail(ProtocolError("client closed the connection during the request head"), None)
            return False
        self._h11.receive_data(bytes(self._buffer[:match.end()]))
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise self._fail(ProtocolError(f"malformed HTTP request: {exc}"), exc.error_status_hint,
                             b"Bad Request") from None
        if not isinstance(event, h11.Request):
            raise self._fail(ProtocolError("malformed HTTP request: no request line"), 400, b"Bad Request")
        self._head, self._head_bytes = event, match.end()
        return True

    def _credentials(self) -> userpass.Credentials | None:
        """Proxy-Authorization: Basic (RFC 7617) as RFC 1929's pair; None without one."""
        values = [v for k, v in self._head.headers if k == b"proxy-authorization"]
        if not values:
            return None
        scheme, _, token = values[0].strip().partition(b" ")
        if scheme.lower() != b"basic":
            raise self._fail(ProtocolError(f"Proxy-Authorization scheme {scheme[:20]!r} is not Basic"), 407,
                             b"Proxy Authentication Required")
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise self._fail(ProtocolError("Proxy-Authorization: not base64"), 400, b"Bad Request") from None
        username, colon, password = decoded.partition(b":")
        if not colon or not username or len(username) > 255 or len(password) > 255:
            raise self._fail(ProtocolError("Proxy-Authorization: not USER:PASSWORD of 1-255 bytes each"), 400,
                             b"Bad Request")
        return userpass.Credentials(username, password)

    def _proxy_request(self) -> Request:
        head = self._head
        method = head.method.decode("ascii", "replace")
        target = head.target.decode("ascii", "replace")
        if head.method in REFUSED_METHODS:
            raise self._fail(ProtocolError(f"method {method} is not proxied"), 405, b"Method Not Allowed")
        if head.method == b"CONNECT":
            host, port = split_authority(target)
        elif target.startswith("http://"):
            host, port = split_authority(urlsplit(target).netloc, default_port=80)
        else:
            raise self._fail(ProtocolError(f"not a proxy request: {method} {target[:100]}"), 400, b"Bad Request")
        if host is None:
            raise self._fail(ProtocolError(f"no host:port in {target[:100]!r}"), 400, b"Bad Request")
        return Request(Command.CONNECT, address_type_of(host), host, port, method, target)

    def refusal(self) -> HttpError | None:
        """The answer to send after next_event() or receive_data() raised, if any."""
        return self._refusal

    def send(self, event) -> bytes:
        """The bytes for the session's answer (see the module docstring)."""
        if self._done:
            return b""
        if isinstance(event, userpass.AuthResponse):
            self._awaiting_auth = False
            if event.ok:
                return b""
            event = HttpError(407, b"Proxy Authentication Required", "authentication failed")
        if isinstance(event, CommandReply):
            if event.reply == Reply.SUCCEEDED:
                self._done = True
                if self._request is not None and self._request.method == "CONNECT":
                    return b"HTTP/1.1 200 Connection established\r\n\r\n"
                return b""  # a forward request: the origin answers
            status, reason = STATUS_FOR_REPLY.get(event.reply, BAD_GATEWAY)
            event = HttpError(status, reason, Reply(event.reply).name.lower().replace("_", " "))
        if not isinstance(event, HttpError):
            raise ProtocolError(f"HTTP has no answer for {event!r}")
        self._done = True
        return error_response(event)

    def _fail(self, error: ProtocolError, status: int | None = 400, reason: bytes = b"Bad Request") -> ProtocolError:
        """Remember the error, and the answer it calls for (none: ``status`` None)."""
        self._error = error
        self._refusal = None if status is None else HttpError(status, reason, str(error))
        return error


def error_response(error: HttpError) -> bytes:
    body = f"{error.status} {error.reason.decode()}: {error.detail}\n".encode("utf-8", "replace")
    headers = [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Content-Length", str(len(body)).encode()),
               (b"Connection", b"close")]
    if error.status == 407:
        headers.append((b"Proxy-Authenticate", REALM))
    writer = h11.Connection(h11.SERVER)
    # h11 writes a response only after reading a request: give it a minimal one.
    writer.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    writer.next_event()
    return (writer.send(h11.Response(status_code=error.status, headers=headers, reason=error.reason))
            + writer.send(h11.Data(data=body)) + writer.send(h11.EndOfMessage()))


def origin_request(head: h11.Request, request: Request) -> bytes:
    """The forward request as the origin gets it (RFC 7230 §5.3.1 origin form, §5.4 Host)."""
    parts = urlsplit(request.target)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    listed = {token.strip().lower() for k, v in head.headers if k == b"connection" for token in v.split(b",")}
    headers = [(name, value) for (name, value), (lower, _) in zip(head.headers.raw_items(), head.headers)
               if lower not in HOP_BY_HOP and lower not in listed and lower != b"host"]
    headers.insert(0, (b"Host", parts.netloc.rpartition("@")[2].encode("ascii")))
    headers.append((b"Connection", b"close"))
    writer = h11.Connection(h11.CLIENT)
    return writer.send(h11.Request(method=head.method, target=path.encode("ascii", "replace"), headers=headers,
                                   http_version=head.http_version))


def split_authority(authority: str, default_port: int | None = None) -> tuple[str | None, int]:
    """``host:port`` or ``[v6]:port`` (RFC 3986 §3.2.2) into (host, port); (None, 0) if not."""
    if "@" in authority or not authority:
        return None, 0
    if authority.startswith("["):
        host, bracket, rest = authority[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None, 0
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None, 0
    else:
        host, _, port_text = authority.rpartition(":") if ":" in authority else (authority, "", "")
        if ":" in host:
            return None, 0
    if not port_text:
        return (host, default_port) if default_port is not None and host else (None, 0)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None, 0
    if not host or len(host) > 255:
        return None, 0
    return host, int(port_text)


def address_type_of(host: str) -> AddressType:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return AddressType.DOMAIN
    return AddressType.IPV4 if ip.version == 4 else AddressType.IPV6
