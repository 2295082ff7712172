"""The client side of a parent proxy's handshake (SOCKS5 with RFC 1929, SOCKS4/4a, HTTP
CONNECT), sans-I/O: what to send, and what the parent's answer means.

``handshake_for(scheme, host, port, username, password)`` gives an object with ``start() -> bytes`` and
``receive(data) -> Step``. A Step says what to send next, and whether the tunnel to
``host:port`` is open (``done``, with any bytes the parent sent past its answer: the
destination's, for the client) or refused (``reply``, the SOCKS5 reply code the client
gets, and ``why``). EOF before the answer is the caller's to notice (a dead parent).
"""

from __future__ import annotations

import base64
import ipaddress
import re
import struct
from dataclasses import dataclass, replace
from types import MappingProxyType

import h11

from fastsocks.protocol.socks5 import Reply

SCHEMES = ("socks5", "socks4", "socks4a", "http")
MAX_ANSWER_BYTES = 16384  # an HTTP parent's answer head at most; SOCKS answers are tiny
_HEAD_END = re.compile(rb"\n\r?\n")
# An HTTP parent's refusal, as the client's SOCKS5 reply (anything else: general failure).
HTTP_STATUS_REPLIES = MappingProxyType({403: Reply.CONNECTION_NOT_ALLOWED, 502: Reply.HOST_UNREACHABLE,
                                        503: Reply.HOST_UNREACHABLE, 504: Reply.TTL_EXPIRED})


@dataclass(frozen=True, slots=True)
class Step:
    send: bytes = b""
    done: bool = False
    leftover: bytes = b""
    reply: Reply | None = None   # refused: the client's reply code
    why: str = ""


MORE = Step()


def handshake_for(scheme: str, host: str, port: int, username: bytes = b"", password: bytes = b""):
    """The handshake that asks a parent of ``scheme`` (SCHEMES) for a tunnel to
    ``host:port``; ValueError when that parent cannot be asked for it (a name, of a
    socks4 parent)."""
    if scheme == "socks5":
        return Socks5Handshake(host, port, username, password)
    if scheme == "http":
        return HttpConnectHandshake(host, port, username, password)
    if scheme == "socks4" and _ip_version(host) != 4:
        raise ValueError(f"a socks4:// parent takes IPv4 addresses only, not {host!r}: use socks4a:// for names")
    return Socks4Handshake(host, port, username, scheme == "socks4a")


class Socks5Handshake:
    """RFC 1928 §3-§6, with RFC 1929 when the upstream has a user name."""

    def __init__(self, host: str, port: int, username: bytes, password: bytes) -> None:
        self.host, self.port, self.username, self.password = host, port, username, password
        self.buffer = b""
        self.state = "method"

    def start(self) -> bytes:
        return b"\x05\x02\x00\x02" if self.username else b"\x05\x01\x00"

    def receive(self, data: bytes) -> Step:
        """Each message in turn (a parent answers what was sent, but TCP may bring two
        answers in one read): what to send next, or the outcome."""
        self.buffer += data
        sends = b""
        while True:
            step = getattr(self, f"_{self.state}")()
            if step is None:
                return Step(send=sends) if sends else MORE
            if step.done or step.reply is not None:
                return replace(step, send=sends + step.send)
            sends += step.send

    def _method(self) -> Step | None:
        if len(self.buffer) < 2:
            return None
        version, method = self.buffer[0], self.buffer[1]
        self.buffer = self.buffer[2:]
        if version != 5:
            return Step(reply=Reply.GENERAL_FAILURE, why=f"the parent is no SOCKS5 server (version {version})")
        if method == 0x00:
            self.state = "reply"
            return Step(send=self._request())
        if method == 0x02 and self.username:
            self.state = "auth"
            return Step(send=b"\x01" + bytes([len(self.username)]) + self.username
                        + bytes([len(self.password)]) + self.password)
        return Step(reply=Reply.GENERAL_FAILURE, why=f"the parent accepts none of our methods (it chose {method:#04x})")

    def _auth(self) -> Step | None:
        if len(self.buffer) < 2:
            return None
        status = self.buffer[1]
        self.buffer = self.buffer[2:]
        if status != 0:
            return Step(reply=Reply.GENERAL_FAILURE, why="the parent refused our user name and password")
        self.state = "reply"
        return Step(send=self._request())

    def _reply(self) -> Step | None:
        if len(self.buffer) < 5:
            return None
        version, code, atyp = self.buffer[0], self.buffer[1], self.buffer[3]
        length = {1: 4, 4: 16, 3: 1 + self.buffer[4]}.get(atyp)
        if version != 5 or length is None:
            return Step(reply=Reply.GENERAL_FAILURE, why="the parent's reply is malformed")
        size = 4 + length + 2
        if len(self.buffer) < size:
            return None
        leftover = self.buffer[size:]
        self.state = "done"
        if code != 0:
            reply = Reply(code) if code in Reply._value2member_map_ else Reply.GENERAL_FAILURE
            return Step(reply=reply, why=f"the parent answered {reply.name.lower()}")
        return Step(done=True, leftover=leftover)

    def _done(self) -> None:
        return None  # answered: nothing more is read here

    def _request(self) -> bytes:
        version = _ip_version(self.host)
        if version == 4:
            address = b"\x01" + ipaddress.IPv4Address(self.host).packed
        elif version == 6:
            address = b"\x04" + ipaddress.IPv6Address(self.host).packed
        else:
            name = self.host.encode("ascii", "replace")  # the client's name: printable ASCII already
            address = b"\x03" + bytes([len(name)]) + name
        return b"\x05\x01\x00" + address + struct.pack("!H", self.port)


class Socks4Handshake:
    """SOCKS4 (an IPv4 address) or SOCKS4a (a name: 0.0.0.x and the name after USERID)."""

    def __init__(self, host: str, port: int, userid: bytes, names: bool) -> None:
        self.host, self.port, self.userid, self.names = host, port, userid, names
        self.buffer = b""

    def start(self) -> bytes:
        if _ip_version(self.host) == 4:
            return b"\x04\x01" + struct.pack("!H", self.port) + ipaddress.IPv4Address(self.host).packed \
                + self.userid + b"\x00"
        return (b"\x04\x01" + struct.pack("!H", self.port) + b"\x00\x00\x00\x01" + self.userid + b"\x00"
                + self.host.encode("ascii", "replace") + b"\x00")

    def receive(self, data: bytes) -> Step:
        self.buffer += data
        if len(self.buffer) < 8:
            return MORE
        code = self.buffer[1]
        if self.buffer[0] != 0 or code != 0x5A:
            return Step(reply=Reply.GENERAL_FAILURE, why=f"the parent answered {code:#04x} (SOCKS4: rejected)")
        return Step(done=True, leftover=self.buffer[8:])


class HttpConnectHandshake:
    """``CONNECT host:port`` (RFC 9110 §9.3.6), with Basic credentials when given."""

    def __init__(self, host: str, port: int, username: bytes, password: bytes) -> None:
        self.authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.username, self.password = username, password
        self.buffer = b""
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_ANSWER_BYTES)

    def start(self) -> bytes:
        headers = [(b"Host", self.authority.encode())]
        if self.username:
            token = base64.b64encode(self.username + b":" + self.password)
            headers.append((b"Proxy-Authorization", b"Basic " + token))
        return self.h11.send(h11.Request(method=b"CONNECT", target=self.authority.encode(), headers=headers))

    def receive(self, data: bytes) -> Step:
        self.buffer += data
        match = _HEAD_END.search(self.buffer)
        if match is None:
            if len(self.buffer) > MAX_ANSWER_BYTES:
                return Step(reply=Reply.GENERAL_FAILURE, why="the parent's answer head is too long")
            return MORE
        self.h11.receive_data(self.buffer[:match.end()])
        try:
            response = self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            return Step(reply=Reply.GENERAL_FAILURE, why=f"the parent's answer is not HTTP: {exc}")
        if not isinstance(response, h11.Response):  # an interim 1xx: keep reading
            self.buffer = self.buffer[match.end():]
            return self.receive(b"") if _HEAD_END.search(self.buffer) else MORE
        if 200 <= response.status_code < 300:
            return Step(done=True, leftover=self.buffer[match.end():])
        reply = HTTP_STATUS_REPLIES.get(response.status_code, Reply.GENERAL_FAILURE)
        return Step(reply=reply, why=f"the parent answered HTTP {response.status_code} "
                                     f"{response.reason.decode('ascii', 'replace')}")


def _ip_version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None
