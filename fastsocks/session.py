"""One client connection on the control path, from accept until its relay starts.

Theory of operation
-------------------
``handshake()`` reads the client's bytes into the sans-I/O protocol and answers its
events: a greeting gets a method selection, a request ends the handshake. The whole
handshake has one deadline, so a client trickling a byte a second is cut too.

``connect()`` then resolves the destination (off-loop, see resolver.py), tries each
address in turn with a non-blocking connect, each attempt getting an equal share of the
time left before the connect deadline, and maps the last failure to a SOCKS reply code.

``bind()`` (RFC 1928 §4 BIND, SOCKS4 "2) BIND") opens a listening socket on the address
the expected peer can reach (the local address outbound traffic to it would leave from;
the address the client reached us on when the request names no peer), answers with it,
then waits a bounded time for one inbound connection from the expected peer address;
others are closed and logged. The second reply names the peer that connected.

On success the reply carries the outbound socket's real local address, and both sockets
are detached and handed to the worker's relay engine together with any bytes the client
pipelined behind its request. Every way out ends in ``finish()``, which closes what the
session still owns and writes the one access-log line of a failed session; the access
line of a relayed session is written when the engine reports it ended.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from fastsocks.errors import ProtocolError
from fastsocks.policy import Query, Verdict, forbidden_destination, normal_name, unmapped
from fastsocks.protocol import socks4, socks5, userpass
from fastsocks.protocol.socks5 import Command, Method, Reply

if TYPE_CHECKING:
    from fastsocks.worker import Worker

access_log = logging.getLogger("fastsocks.access")
log = logging.getLogger(__name__)

RECV_BYTES = 4096

ERRNO_REPLIES = {
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


def reply_for_errno(err: int) -> Reply:
    return ERRNO_REPLIES.get(err, Reply.GENERAL_FAILURE)


METHODS = {"none": Method.NO_AUTH, "userpass": Method.USERNAME_PASSWORD}
POLICY_COMMANDS = {Command.CONNECT: "connect", Command.BIND: "bind", Command.UDP_ASSOCIATE: "udp"}


def _entry_point(method):
    """Wrap what the loop, the resolver or the authenticator calls: a bug in a session
    ends that session (logged once, with its client) instead of leaving its sockets open."""

    @functools.wraps(method)
    def guarded(self: Session, *args):
        try:
            return method(self, *args)
        except Exception:
            log.exception("%s: internal error in %s", self.describe(), method.__name__)
            if not self.closed:
                try:
                    self.fail(Reply.GENERAL_FAILURE, f"internal error in {method.__name__}")
                except Exception:
                    self.closed = True
                    self.client.close()
        return None

    return guarded


def close_gently(sock: socket.socket, max_reads: int = 4) -> None:
    """Close after a failure reply without destroying it: closing a socket with unread
    bytes (a request or payload the client pipelined) makes Linux send RST, and the
    client may lose our reply. Send FIN first and drain what is already queued."""
    try:
        sock.shutdown(socket.SHUT_WR)
        for _ in range(max_reads):
            if not sock.recv(65536):
                break
    except OSError:
        pass  # BlockingIOError: nothing more queued; others: the peer is gone anyway
    sock.close()


def format_peer(address) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Session:
    __slots__ = ("worker", "sid", "client", "peer", "conn", "upstream", "request", "candidates",
                 "timer", "last_errno", "deadline_s", "started_s", "closed", "listener", "expected_peer",
                 "username", "checking", "client_ip", "client_key", "denial")

    def __init__(self, worker: Worker, sid: int, client: socket.socket, peer: str) -> None:
        self.worker = worker
        self.sid = sid
        self.client = client
        self.peer = peer
        self.conn: socks5.ServerConnection | socks4.ServerConnection | None = None  # by the first byte
        self.upstream: socket.socket | None = None
        self.listener: socket.socket | None = None      # BIND only
        self.username = b""                             # SOCKS5 user, once authenticated
        self.checking = False                           # a password check is under way
        self.client_ip = None                           # ipaddress, unmapped: set by the worker at accept
        self.client_key = None                          # its buckets in limits.py, when counted
        self.denial: str | None = None                  # why the last address was refused
        self.expected_peer: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        self.request: socks5.Request | socks4.Request | None = None
        self.candidates: list = []
        self.timer = None
        self.last_errno = 0
        self.deadline_s = 0.0
        self.started_s = time.monotonic()
        self.closed = False

    # ------------------------------------------------------------------ handshake

    @_entry_point
    def start(self) -> None:
        loop = self.worker.loop
        loop.add_reader(self.client, self.on_client_readable)
        self.timer = loop.call_later(self.worker.settings.handshake_timeout_s, self.on_handshake_timeout)
        # TCP_DEFER_ACCEPT means the greeting is usually here already: no loop round trip.
        self.on_client_readable()

    @_entry_point
    def on_client_readable(self) -> None:
        if self.closed:
            return
        try:
            data = self.client.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.finish(None, f"client error during handshake: {exc.strerror}")
            return
        if not data:
            # EOF stays readable: stop watching, or the loop calls back (while a password
            # check runs) and the parser is fed a second EOF.
            self.worker.loop.remove(self.client)
        if self.conn is None and not self.choose_protocol(data):
            return
        try:
            self.conn.receive_data(data)  # raises past the parser's buffer cap
        except ProtocolError as exc:
            self.protocol_failure(exc)
            return
        self.handshake()

    def choose_protocol(self, data: bytes) -> bool:
        """SOCKS4 and SOCKS5 share the port: the version byte that opens the stream decides."""
        if data[:1] == b"\x05":
            self.conn = socks5.ServerConnection()
        elif data[:1] == b"\x04":
            self.conn = socks4.ServerConnection()
        elif data:
            self.finish(None, f"not a SOCKS request: first byte {data[0]:#04x}")
            return False
        else:
            self.finish(None, "client closed before sending anything")
            return False
        return True

    def handshake(self) -> None:
        while not self.closed:
            if self.conn.state is socks5.State.AUTH:
                self.authenticate()
                return  # the check's result carries the handshake on
            try:
                event = self.conn.next_event()
            except ProtocolError as exc:
                self.protocol_failure(exc)
                return
            if event is socks5.NEED_DATA:
                return
            if isinstance(event, socks5.Greeting):
                self.answer_greeting(event)
            else:  # a SOCKS5 or SOCKS4 request: the handshake is over
                self.answer_request(event)
                return

    def answer_greeting(self, greeting: socks5.Greeting) -> None:
        # The server picks (RFC 1928 §3): its first configured method the client offers.
        names = self.worker.settings.methods
        for name in names:
            if METHODS[name] in greeting.methods and (name != "userpass" or self.worker.auth is not None):
                self.send(self.conn.send(socks5.MethodSelection(METHODS[name])))
                return
        self.send(self.conn.send(socks5.MethodSelection(Method.NO_ACCEPTABLE)))
        self.finish(None, f"no acceptable authentication method in {list(greeting.methods)} "
                          f"(this server accepts {', '.join(names)})")

    def authenticate(self) -> None:
        """RFC 1929: parse the credentials from what the client sent after the method
        selection, and check them off the loop; one check at a time."""
        if self.checking:
            return
        try:
            parsed = userpass.parse_request(*self.conn.trailing_data)
        except ProtocolError as exc:
            if exc.reply is None or self.send(userpass.encode_reply(False)):
                self.finish(None, f"protocol error: {exc}")
            return
        if parsed is socks5.NEED_DATA:
            return
        credentials, consumed = parsed
        self.checking = True
        self.worker.auth.verify(credentials.username, credentials.password,
                                lambda ok: self.on_auth_checked(ok, credentials.username, consumed))

    @_entry_point
    def on_auth_checked(self, ok: bool, username: bytes, consumed: int) -> None:
        self.checking = False
        if self.closed:
            return
        self.username = username
        if not ok:
            self.worker.auth_failed(self, username)
            if self.send(userpass.encode_reply(False)):
                self.finish(None, "authentication failed")  # RFC 1929 §2: MUST close
            return
        if self.send(userpass.encode_reply(True)):
            self.conn.auth_done(consumed)
            self.handshake()  # a request pipelined behind the credentials parses now

    def answer_request(self, request: socks5.Request | socks4.Request) -> None:
        self.request = request
        self.worker.loop.remove(self.client)
        if self.conn.version == socks4.SOCKS4_VERSION and "none" not in self.worker.settings.methods:
            # SOCKS4 carries no password: with --users it would be a way around them.
            self.fail(Reply.CONNECTION_NOT_ALLOWED, "SOCKS4 has no password and this server requires one")
            return
        refusal = self.worker.over_cap(self, self.policy_user())
        if refusal is not None:
            self.fail(Reply.GENERAL_FAILURE, refusal)
            return
        if request.command == Command.CONNECT:
            self.connect()
        elif request.command == Command.BIND:
            self.bind()
        elif request.command == Command.UDP_ASSOCIATE:
            self.udp_associate()
        else:
            self.fail(Reply.COMMAND_NOT_SUPPORTED, f"command {request.command.name} is not supported")

    def protocol_failure(self, exc: ProtocolError) -> None:
        refusal = self.conn.refusal()
        if refusal is not None and not self.send(self.conn.send(refusal)):
            return
        self.finish(exc.reply, f"protocol error: {exc}")

    @_entry_point
    def on_handshake_timeout(self) -> None:
        self.finish(None, "handshake timed out")

    # ------------------------------------------------------------------ connect

    def connect(self) -> None:
        request = self.request
        self.timer.cancel()
        self.deadline_s = time.monotonic() + self.worker.settings.connect_timeout_s
        if request.address_type == socks5.AddressType.DOMAIN:
            verdict = self.worker.settings.policy.before_resolve(self.query())
            if verdict is not None and not verdict.allowed:
                self.deny(verdict)  # a denied name is not even looked up
                return
            self.resolve(self.connect_to)
            return
        if request.address_type == socks5.AddressType.IPV6:
            self.candidates = [(socket.AF_INET6, (request.host, request.port, 0, 0))]
        else:
            self.candidates = [(socket.AF_INET, (request.host, request.port))]
        self.try_next_address()

    def resolve(self, then) -> None:
        """Look the name up off the loop, within the connect deadline (a slow resolver
        must not hold a session for ever), then ``then(addresses)``. A cached name calls
        back at once."""
        self.timer = self.worker.loop.call_later(self.worker.settings.connect_timeout_s, self.on_resolve_timeout)
        self.worker.resolver.resolve(self.request.host, self.request.port,
                                     lambda addresses, error: self.on_resolved(then, addresses, error))

    @_entry_point
    def on_resolve_timeout(self) -> None:
        self.fail(Reply.TTL_EXPIRED, f"{self.request.host!r} did not resolve in time")

    @_entry_point
    def on_resolved(self, then, addresses, error: OSError | None) -> None:
        if self.closed:
            return
        self.timer.cancel()
        if error is not None:
            self.fail(Reply.HOST_UNREACHABLE, f"cannot resolve {self.request.host!r}: {error}")
            return
        then(addresses)

    def connect_to(self, addresses) -> None:
        self.candidates = list(addresses)  # ours to consume; the resolver's value is shared
        self.try_next_address()

    def try_next_address(self) -> None:
        while self.candidates:
            family, sockaddr = self.candidates.pop(0)
            denial = self.screen(sockaddr[0], sockaddr[1])
            if denial is not None:
                self.denial = denial
                continue
            left_s = self.deadline_s - time.monotonic()
            if left_s <= 0:
                self.last_errno = errno.ETIMEDOUT
                break
            if self.start_connect(family, sockaddr, left_s / (len(self.candidates) + 1)):
                return
        if self.denial is not None and not self.last_errno:
            self.fail(Reply.CONNECTION_NOT_ALLOWED, self.denial)  # every address was refused
            return
        err = self.last_errno or errno.EHOSTUNREACH
        self.fail(reply_for_errno(err), f"connect failed: {os.strerror(err)}")

    def start_connect(self, family: int, sockaddr: tuple, timeout_s: float) -> bool:
        """Begin one attempt; False when it failed at once (last_errno says why)."""
        try:
            upstream = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as exc:  # EMFILE/ENFILE, or no IPv6 on this host (EAFNOSUPPORT)
            self.last_errno = exc.errno or errno.EIO
            return False
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # No bind() before connect(): the kernel picks a port unique per destination,
        # so churn cannot exhaust the ephemeral range the way bind-first servers do.
        err = upstream.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS):
            upstream.close()
            self.last_errno = err
            return False
        self.upstream = upstream
        self.worker.loop.add_writer(upstream, self.on_upstream_writable)
        self.timer = self.worker.loop.call_later(timeout_s, self.on_connect_timeout)
        return True

    @_entry_point
    def on_upstream_writable(self) -> None:
        if self.closed:
            return
        self.timer.cancel()
        err = self.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.drop_upstream(err)
            self.try_next_address()
            return
        self.established()

    @_entry_point
    def on_connect_timeout(self) -> None:
        if self.closed:
            return
        self.drop_upstream(errno.ETIMEDOUT)
        self.try_next_address()

    def drop_upstream(self, err: int) -> None:
        self.last_errno = err
        self.worker.loop.remove(self.upstream)
        self.upstream.close()
        self.upstream = None

    def established(self) -> None:
        self.worker.loop.remove(self.upstream)
        host, port = self.upstream.getsockname()[:2]
        if self.send(self.conn.send(self.reply_event(Reply.SUCCEEDED, host, port))):
            self.hand_off()

    def hand_off(self) -> None:
        """Both sockets, and what the client pipelined, go to the relay engine."""
        initial, _eof = self.conn.trailing_data
        self.closed = True
        client_fd, upstream_fd = self.client.detach(), self.upstream.detach()
        self.worker.start_relay(self, client_fd, upstream_fd, initial)

    # ------------------------------------------------------------------ policy

    def policy_user(self) -> bytes:
        """The user the rules see: the SOCKS5 user once authenticated; the SOCKS4 USERID
        only where no password is ever asked (else claiming a name would pass for it)."""
        if self.username:
            return self.username
        userid = getattr(self.request, "userid", b"")
        return userid if "userpass" not in self.worker.settings.methods else b""

    def query(self) -> Query:
        request = self.request
        name = normal_name(request.host) if request.address_type == socks5.AddressType.DOMAIN else None
        if self.client_ip is None:  # the worker parses it at accept only when rules need it then
            self.client_ip = unmapped(ipaddress.ip_address(self.client.getpeername()[0].partition("%")[0]))
        return Query(self.client_ip, POLICY_COMMANDS[request.command], request.port, self.policy_user(), name)

    def screen(self, host: str, port: int) -> str | None:
        """Why this session may not open ``host`` (an address, never a name), or None."""
        worker = self.worker
        if (not worker.settings.policy.rules and worker.settings.policy.default_allow and ":" not in host
                and not host.startswith("0.") and port not in worker.own_addresses):
            return None  # no rules, and plainly neither this host nor this proxy: the common case
        ip = unmapped(ipaddress.ip_address(host.partition("%")[0]))
        forbidden = forbidden_destination(ip)
        if forbidden is not None:
            return f"denied: {forbidden}"
        if self.worker.is_own_listener(ip, port):
            return f"denied: {format_peer((str(ip), port))} is this proxy itself"
        verdict = self.worker.settings.policy.decide(self.query(), ip)
        return None if verdict.allowed else f"{verdict}"

    def deny(self, verdict: Verdict) -> None:
        self.fail(Reply.CONNECTION_NOT_ALLOWED, str(verdict))

    # ------------------------------------------------------------------ BIND

    def bind(self) -> None:
        self.timer.cancel()
        request = self.request
        if request.address_type == socks5.AddressType.DOMAIN:
            self.resolve(lambda addresses: self.open_bind_listener(addresses[0][1][0]))
        else:
            self.open_bind_listener(request.host)

    def open_bind_listener(self, peer_ip: str) -> None:
        expected = unmapped(ipaddress.ip_address(peer_ip))
        # A request with no peer (0.0.0.0 / ::) accepts whoever connects first.
        any_peer = expected.is_unspecified or self.worker.settings.bind_any_peer
        if not expected.is_unspecified:
            verdict = self.worker.settings.policy.decide(self.query(), expected)
            if not verdict.allowed:
                self.deny(verdict)
                return
        self.expected_peer = None if any_peer else expected
        family = socket.AF_INET6 if expected.version == 6 else socket.AF_INET
        try:
            listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            self.listener = listener
            listener.bind((self.reachable_address(family, str(expected)), 0))
            listener.listen(1)
        except OSError as exc:
            self.fail(reply_for_errno(exc.errno or errno.EIO), f"BIND listener: {exc.strerror or exc}")
            return
        host, port = listener.getsockname()[:2]
        host = self.worker.settings.advertise or host
        if not self.send(self.conn.send(self.reply_event(Reply.SUCCEEDED, host, port))):
            return
        loop = self.worker.loop
        loop.add_reader(listener, self.on_bind_peer)
        loop.add_reader(self.client, self.on_client_during_bind)
        self.timer = loop.call_later(self.worker.settings.bind_timeout_s, self.on_bind_timeout)

    def reachable_address(self, family: int, peer_ip: str) -> str:
        """The local address the peer can reach: never 0.0.0.0 (RFC 1928 §6, BND.ADDR)."""
        if self.expected_peer is None or ipaddress.ip_address(peer_ip).is_loopback:
            here = self.client.getsockname()[0]
            if (":" in here) == (family == socket.AF_INET6):
                return here
        # connect() on a UDP socket picks the outbound route and sends nothing.
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((peer_ip, 9))
            return probe.getsockname()[0]

    @_entry_point
    def on_bind_peer(self) -> None:
        if self.closed:
            return
        try:
            peer, address = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.fail(Reply.GENERAL_FAILURE, f"BIND accept: {exc.strerror or exc}")
            return
        source = unmapped(ipaddress.ip_address(address[0]))
        if self.expected_peer is not None and source != self.expected_peer:
            peer.close()
            log.warning("%s BIND: closed a connection from %s, expecting %s", self.describe(),
                        format_peer(address), self.expected_peer)
            return
        if self.expected_peer is None:  # any peer: the rules judge who came
            verdict = self.worker.settings.policy.decide(self.query(), source)
            if not verdict.allowed:
                peer.close()
                log.warning("%s BIND: closed a connection from %s: %s", self.describe(),
                            format_peer(address), verdict)
                return
        self.timer.cancel()
        loop = self.worker.loop
        loop.remove(self.listener)
        loop.remove(self.client)
        self.listener.close()
        peer.setblocking(False)
        peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream = peer
        if self.send(self.conn.send(self.reply_event(Reply.SUCCEEDED, address[0], address[1]))):
            self.hand_off()

    @_entry_point
    def on_client_during_bind(self) -> None:
        """The client may only wait; notice if it leaves (peeking leaves its bytes queued)."""
        if self.closed:
            return
        try:
            data = self.client.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.finish(None, f"client error while waiting for the BIND peer: {exc.strerror or exc}")
            return
        if not data:
            self.finish(None, "client closed while waiting for the BIND peer")
        else:
            self.worker.loop.remove(self.client)  # early bytes wait in the kernel for the relay

    @_entry_point
    def on_bind_timeout(self) -> None:
        self.fail(Reply.TTL_EXPIRED, "no peer connected to the BIND address in time")

    # ------------------------------------------------------------------ endings

    def send(self, data: bytes) -> bool:
        """Replies are a few bytes on a fresh socket: they fit, or the client is gone."""
        try:
            sent = self.client.send(data)
        except OSError as exc:
            self.finish(None, f"client error: {exc.strerror or exc}")
            return False
        if sent != len(data):
            self.finish(None, "client does not read its replies")
            return False
        return True

    def reply_event(self, reply: Reply, host: str = "0.0.0.0", port: int = 0):
        """The reply in the client's protocol; SOCKS4 has one code for every failure."""
        if self.conn.version == socks4.SOCKS4_VERSION:
            code = socks4.Reply.GRANTED if reply == Reply.SUCCEEDED else socks4.Reply.REJECTED
            return socks4.CommandReply(code, host, port)
        return socks5.CommandReply(reply, host, port)

    def fail(self, reply: Reply | None, why: str) -> None:
        if reply is not None and not self.closed:
            try:
                self.send(self.conn.send(self.reply_event(reply)))
            except ProtocolError:
                pass  # nothing can be answered in this state (e.g. still in the greeting)
        self.finish(reply, why)

    def finish(self, reply: Reply | None, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        loop = self.worker.loop
        loop.remove(self.client)
        close_gently(self.client)
        for sock in (self.upstream, self.listener):
            if sock is not None:
                loop.remove(sock)
                sock.close()
        self.worker.session_failed(self, reply, why)

    def describe(self) -> str:
        request = self.request
        who = f"client={self.peer} proto={self.protocol_name()}"
        if request is None:
            return f"{who} cmd=- dest=-"
        user = getattr(request, "userid", b"") or self.username
        if user:
            who += f" user={user.decode('utf-8', 'backslashreplace')!r}"
        host = f"[{request.host}]" if ":" in request.host else request.host
        command = getattr(request.command, "name", str(request.command)).lower()
        return f"{who} cmd={command} dest={host}:{request.port}"

    def protocol_name(self) -> str:
        if self.conn is None:
            return "-"
        if self.conn.version == socks4.SOCKS4_VERSION:
            return "socks4a" if self.request is not None and self.request.is_4a else "socks4"
        return "socks5"

    # ------------------------------------------------------------------ UDP ASSOCIATE

    def udp_associate(self) -> None:
        """RFC 1928 §7, in udp.py (beside the session: the worker builds it, DESIGN §3). The
        association answers the request; once it has, it owns the client socket, watches it
        and ends with it, and this session is over."""
        self.timer.cancel()
        verdict = self.worker.settings.policy.for_any_destination(self.query())
        if verdict is not None:
            self.deny(verdict)  # no destination could be allowed: refuse the association
            return
        if self.worker.start_udp(self):
            self.closed = True
