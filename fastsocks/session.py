"""One client connection on the control path, from accept until its relay starts.

Theory of operation
-------------------
``handshake()`` reads the client's bytes into the sans-I/O protocol and answers its
events: a greeting gets a method selection, a request ends the handshake. The whole
handshake has one deadline, so a client trickling a byte a second is cut too.

``connect()`` then resolves the destination (off-loop, see resolver.py) and races its
addresses, each through the rules, within one connect deadline (RFC 8305, eyeballs.py);
the last failure maps to a SOCKS reply code. When the rule that lets it through names
parent proxies, chain.py connects through them instead.

``bind()`` (RFC 1928 §4 BIND, SOCKS4 "2) BIND") resolves the expected peer and hands
the wait for it to ``BindWait`` (bind.py), which answers twice and gives the session its
peer. ``udp_associate()`` (§7) binds the client-facing UDP socket, answers with its
address, and hands both sockets to the worker's UDP association (udp.py).

On success the reply carries the outbound socket's real local address, and both sockets
are detached and handed on, with any bytes the client pipelined behind its request. The
session talks to its worker only through ``SessionHost`` (host.py) and ends in one call,
``host.session_over(self, outcome)``: ``Relay``, ``StartUdp``, or ``Failed`` from
``finish()``, which first closes what the session still owns.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import time
from dataclasses import replace

from fastsocks import access
from fastsocks._relay_types import RULE_DEFAULT, RULE_NONE, egress_index
from fastsocks.bind import BindWait
from fastsocks.chain import Chain
from fastsocks.eyeballs import AddressRace
from fastsocks.errors import ProtocolError
from fastsocks.host import Environment, Failed, Relay, SessionHost, StartUdp, entry_point
from fastsocks.outbound import bind_source
from fastsocks.policy import DIRECT, Query, Verdict, forbidden_destination, normal_name, unmapped
from fastsocks.protocol import http, socks4, socks5, userpass
from fastsocks.protocol.socks5 import AddressType, Command, Method, Reply

log = logging.getLogger(__name__)

RECV_BYTES = 4096
UDP_SOCKET_FLAGS = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC

METHODS = {"none": Method.NO_AUTH, "userpass": Method.USERNAME_PASSWORD}
PROTOCOL_OF_BYTE = {socks5.SOCKS_VERSION: "socks5", socks4.SOCKS4_VERSION: "socks4"}
CONNECTIONS = {"socks5": socks5.ServerConnection, "socks4": socks4.ServerConnection, "http": http.ServerConnection}
POLICY_COMMANDS = {Command.CONNECT: "connect", Command.BIND: "bind", Command.UDP_ASSOCIATE: "udp"}


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


def literal_address(host: str, port: int) -> tuple[int, tuple]:
    """(family, sockaddr) of an IP address literal; ValueError for anything else."""
    ip = ipaddress.ip_address(host.partition("%")[0])
    return (socket.AF_INET, (host, port)) if ip.version == 4 else (socket.AF_INET6, (host, port, 0, 0))


def kernel_text(host: str) -> tuple[int, str]:
    """(family, text) of an IP address, unmapped and written as recvfrom() reports it."""
    ip = ipaddress.ip_address(host.partition("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return family, socket.inet_ntop(family, ip.packed)


class Session:
    __slots__ = ("host", "env", "loop", "sid", "client", "peer", "conn", "upstream", "request",
                 "race", "timer", "deadline_s", "started_s", "over", "bind_wait",
                 "username", "client_ip", "replay", "answered", "requested_s", "auth_s", "dns_s",
                 "connecting_s", "connect_s", "rule", "chain", "direct")

    def __init__(self, host: SessionHost, env: Environment, sid: int, client: socket.socket, peer: str,
                 client_ip=None, replay: tuple[bytes, bytes] = (b"", b""), started_s: float | None = None) -> None:
        self.host = host
        self.env = env
        self.loop = host.loop
        self.sid = sid
        self.client = client
        self.peer = peer
        # By the first byte: SOCKS5, SOCKS4, or HTTP (protocol/http.py speaks to us as they do).
        self.conn: socks5.ServerConnection | socks4.ServerConnection | http.ServerConnection | None = None
        self.upstream: socket.socket | None = None
        self.bind_wait: BindWait | None = None          # BIND only, while it waits for the peer
        self.username = b""                             # SOCKS5 user, once authenticated
        self.client_ip = client_ip                      # ipaddress, unmapped, once parsed
        self.request: socks5.Request | socks4.Request | None = None
        self.race: AddressRace | None = None            # the direct connect's attempts (eyeballs.py)
        self.timer = None
        self.deadline_s = 0.0
        self.started_s = time.monotonic() if started_s is None else started_s
        self.over = False                               # it ended: failed, or its sockets handed on
        # For the access log and the metrics: when the request was read, how long each later
        # phase took (None: not reached), and what decided it (_relay_types.RULE_*).
        self.requested_s = 0.0
        self.auth_s: float | None = None
        self.dns_s: float | None = None
        self.connecting_s = 0.0                         # the first connect attempt began
        self.connect_s: float | None = None
        self.rule = RULE_NONE
        self.chain: Chain | None = None                 # through parent proxies (a rule's via)
        self.direct = False                             # a via's "direct": no parent, whatever the rule
        # From the engine's front door: what the client sent it, and what it answered already.
        self.replay, self.answered = replay

    # ------------------------------------------------------------------ handshake

    @entry_point
    def start(self) -> None:
        self.loop.add_reader(self.client, self.on_client_readable)
        left_s = self.started_s + self.env.settings.handshake_timeout_s - time.monotonic()
        self.timer = self.loop.call_later(max(left_s, 0.0), self.on_handshake_timeout)
        if self.replay:
            # The engine's front door read this and handed the client over: the same bytes
            # go through the reference parsers, and send() skips what it answered already.
            data, self.replay = self.replay, b""
            self.received(data)
        else:
            # TCP_DEFER_ACCEPT means the greeting is usually here already: no loop round trip.
            self.on_client_readable()

    @entry_point
    def on_client_readable(self) -> None:
        if self.over:
            return
        try:
            data = self.client.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.finish(None, f"client error during handshake: {exc.strerror}")
            return
        self.received(data)

    def received(self, data: bytes) -> None:
        if not data:
            # EOF stays readable: stop watching, or the loop calls back (while a password
            # check runs) and the parser is fed a second EOF.
            self.loop.remove(self.client)
        if self.conn is None and not self.choose_protocol(data):
            return
        try:
            self.conn.receive_data(data)  # raises past the parser's buffer cap
        except ProtocolError as exc:
            self.protocol_failure(exc)
            return
        self.handshake()

    def choose_protocol(self, data: bytes) -> bool:
        """SOCKS4, SOCKS5 and HTTP share the port: the byte that opens the stream decides
        (a version, or a method's first letter), among the protocols the port speaks."""
        if not data:
            self.finish(None, "client closed before sending anything")
            return False
        protocols = self.env.settings.protocols
        kind = PROTOCOL_OF_BYTE.get(data[0], "http" if data[:1].isalpha() else None)
        if kind is None or (kind == "http" and kind not in protocols):
            self.finish(None, f"not a SOCKS request: first byte {data[0]:#04x}")
            return False
        if kind not in protocols:
            self.finish(None, f"this port does not speak {kind} (protocols: {', '.join(protocols)})")
            return False
        self.conn = CONNECTIONS[kind]()
        return True

    def handshake(self) -> None:
        while not self.over:
            try:
                event = self.conn.next_event()
            except ProtocolError as exc:
                self.protocol_failure(exc)
                return
            if event is socks5.NEED_DATA:
                return  # more bytes, or our turn (a password check under way)
            if isinstance(event, socks5.Greeting):
                self.answer_greeting(event)
            elif isinstance(event, userpass.Credentials):
                if self.host.auth is None:  # HTTP credentials where no users file asks for any
                    self.conn.send(userpass.AuthResponse(True))  # nothing to send: go on, anonymous
                    continue
                self.check_credentials(event)
            else:  # a SOCKS5 or SOCKS4 request: the handshake is over
                self.answer_request(event)
                return

    def answer_greeting(self, greeting: socks5.Greeting) -> None:
        if self.answered:
            # The engine's front door chose "no authentication" under the rules of its time
            # (a reload since does not take it back, there as here); send() skips the bytes.
            self.send(self.conn.send(socks5.MethodSelection(Method.NO_AUTH)))
            return
        # The server picks (RFC 1928 §3): its first configured method the client offers.
        names = self.env.settings.methods
        for name in names:
            if METHODS[name] in greeting.methods and (name != "userpass" or self.host.auth is not None):
                self.send(self.conn.send(socks5.MethodSelection(METHODS[name])))
                return
        self.send(self.conn.send(socks5.MethodSelection(Method.NO_ACCEPTABLE)))
        self.finish(None, f"no acceptable authentication method in {list(greeting.methods)} "
                          f"(this server accepts {', '.join(names)})")

    def check_credentials(self, credentials: userpass.Credentials) -> None:
        """RFC 1929: the check runs off the loop; the protocol waits for its response."""
        asked_s = time.monotonic()
        self.host.auth.verify(credentials.username, credentials.password,
                              lambda ok: self.on_auth_checked(ok, credentials.username, asked_s))

    @entry_point
    def on_auth_checked(self, ok: bool, username: bytes, asked_s: float) -> None:
        if self.over:
            return
        self.username = username
        self.auth_s = time.monotonic() - asked_s
        if not self.send(self.conn.send(userpass.AuthResponse(ok))):
            return
        if ok:
            self.handshake()  # a request pipelined behind the credentials parses now
        else:
            self.finish(None, "authentication failed", failed_login=username)  # RFC 1929 §2: MUST close

    def answer_request(self, request: socks5.Request | socks4.Request) -> None:
        self.request = request
        self.requested_s = time.monotonic()
        self.loop.remove(self.client)
        if self.conn.version == socks4.SOCKS4_VERSION and "none" not in self.env.settings.methods:
            # SOCKS4 carries no password: with --users it would be a way around them.
            self.fail(Reply.CONNECTION_NOT_ALLOWED, "SOCKS4 has no password and this server requires one")
            return
        if self.conn.version == http.HTTP_VERSION and not self.username and "none" not in self.env.settings.methods:
            self.send(self.conn.send(http.HttpError(407, b"Proxy Authentication Required", "credentials required")))
            self.finish(None, "HTTP request without Proxy-Authorization, and this server requires a password")
            return
        command = POLICY_COMMANDS.get(request.command)
        udp_client = self.peer_ip_text() if command == "udp" else ""  # the UDP caps count by it
        refusal = self.host.admit(self.sid, self.policy_user(), command, udp_client)
        if refusal is not None:
            self.fail(Reply.GENERAL_FAILURE, refusal)
            return
        refusal = self.host.over_quota(self.policy_user())
        if refusal is not None:
            self.fail(Reply.CONNECTION_NOT_ALLOWED, refusal)
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
        # The access line names SOCKS replies; a refused sub-negotiation has none.
        self.finish(None if isinstance(refusal, userpass.AuthResponse) else exc.reply, f"protocol error: {exc}")

    @entry_point
    def on_handshake_timeout(self) -> None:
        self.finish(None, "handshake timed out")

    # ------------------------------------------------------------------ connect

    def connect(self) -> None:
        request = self.request
        self.timer.cancel()
        self.deadline_s = time.monotonic() + self.env.settings.connect_timeout_s
        if request.address_type == socks5.AddressType.DOMAIN:
            verdict = self.env.settings.policy.before_resolve(self.query())
            if verdict is not None and not verdict.allowed:
                self.deny(verdict)  # a denied name is not even looked up
                return
            if verdict is not None:
                self.decided(verdict)
                if self.leave_via_parents(request.host):
                    return  # the parent resolves the name
            self.resolve(self.connect_to)
            return
        self.connect_to([literal_address(request.host, request.port)])

    def resolve(self, then) -> None:
        """Look the name up off the loop, within the connect deadline (a slow resolver
        must not hold a session for ever), then ``then(addresses)``. A cached name calls
        back at once."""
        asked_s = time.monotonic()
        self.timer = self.loop.call_later(self.env.settings.connect_timeout_s,
                                          lambda: self.on_resolve_timeout(asked_s))
        self.host.resolver.resolve(self.request.host, self.request.port,
                                   lambda addresses, error: self.on_resolved(then, addresses, error, asked_s))

    @entry_point
    def on_resolve_timeout(self, asked_s: float) -> None:
        self.dns_s = time.monotonic() - asked_s
        self.fail(Reply.TTL_EXPIRED, f"{self.request.host!r} did not resolve in time")

    @entry_point
    def on_resolved(self, then, addresses, error: OSError | None, asked_s: float) -> None:
        if self.over:
            return
        self.dns_s = time.monotonic() - asked_s
        self.timer.cancel()
        if error is not None:
            self.fail(Reply.HOST_UNREACHABLE, f"cannot resolve {self.request.host!r}: {error}")
            return
        then(addresses)

    def connect_to(self, addresses) -> None:
        """Race the addresses (eyeballs.py; one, for a literal), each through the rules."""
        self.race = AddressRace(self, list(addresses))  # ours to consume; the resolver's value is shared
        self.race.start()

    def bind_egress(self, sock: socket.socket, family: int) -> int:
        """Bind to the egress address this session takes (its rule's, else the server's),
        if any: 0, or the errno that fails this attempt."""
        settings = self.env.settings
        rule = settings.policy.rules[self.rule] if self.rule >= 0 else None
        addresses = rule.egress if rule is not None and rule.egress else settings.egress
        if not addresses:
            return 0
        same = [a for a in addresses if (":" in a) == (family == socket.AF_INET6)]
        if not same:
            return errno.ENETUNREACH  # egress of the other family only: not from here
        rotation = settings.egress_rotation
        if rotation == "round-robin":
            index = self.host.next_turn(("egress", self.rule if rule is not None and rule.egress else None,
                                         family)) % len(same)
        elif rotation == "sticky-user" and self.username:
            index = egress_index(self.username, len(same))
        else:  # sticky-client, and a sticky-user session without a user
            index = egress_index(self.client_address_packed(), len(same))
        return bind_source(sock, same[index])

    def client_address_packed(self) -> bytes:
        """The client's IP as the engine hashes it: 4 bytes for IPv4 (mapped ones too), else 16."""
        if self.client_ip is None:
            self.query()  # parses it
        return self.client_ip.packed

    def leave_via_parents(self, host: str) -> bool:
        """When the rule that let this request through names parents (``via``), the chain
        takes the connect (chain.py); ``host`` is the name as asked or the address judged."""
        if self.direct or self.rule < 0:
            return False
        settings = self.env.settings
        rule = settings.policy.rules[self.rule]
        if not rule.via:
            return False
        hops = [DIRECT if name == DIRECT else settings.upstream(name) for name in rule.via]
        if rule.balance == "round-robin":
            turn = self.host.next_turn(self.rule) % len(hops)
            hops = hops[turn:] + hops[:turn]
        self.chain = Chain(self, hops, host, self.request.port)
        self.chain.start()
        return True

    def go_direct(self, host: str) -> None:
        """A via's "direct" entry: this session's own connect, as with no parent."""
        self.chain = None
        self.direct = True
        try:
            address = literal_address(host, self.request.port)
        except ValueError:
            self.resolve(self.connect_to)
            return
        self.connect_to([address])

    def chained(self, sock: socket.socket, leftover: bytes, via) -> None:
        """The parent opened the tunnel: answer the client, give it what the destination
        already sent, and relay."""
        self.chain = None
        self.upstream = sock
        self.connect_done()
        host, port = sock.getsockname()[:2]
        log.debug("%s: via parent %s", self.describe(), via)
        if self.send(self.conn.send(self.reply_event(Reply.SUCCEEDED, host, port))) and \
                (not leftover or self.send(leftover)):
            self.hand_off()

    def connect_done(self) -> None:
        """The connect phase is over, connected or not (if it ever began)."""
        if self.connecting_s:
            self.connect_s = time.monotonic() - self.connecting_s

    def connected(self, sock: socket.socket) -> None:
        """The race's winner (eyeballs.py): the destination answers."""
        self.race = None
        self.upstream = sock
        self.established()

    def established(self) -> None:
        self.connect_done()
        self.loop.remove(self.upstream)
        host, port = self.upstream.getsockname()[:2]
        if self.send(self.conn.send(self.reply_event(Reply.SUCCEEDED, host, port))):
            self.hand_off()

    def hand_off(self) -> None:
        """Both sockets, and what the client pipelined, go to the relay engine."""
        initial, _eof = self.conn.trailing_data
        self.over = True
        self.bind_wait = None  # BIND: its peer is self.upstream now
        self.host.session_over(self, Relay(self.client.detach(), self.upstream.detach(), initial))

    # ------------------------------------------------------------------ policy

    def policy_user(self) -> bytes:
        """The user the rules see: the SOCKS5 user once authenticated; the SOCKS4 USERID
        only where no password is ever asked (else claiming a name would pass for it)."""
        if self.username:
            return self.username
        userid = getattr(self.request, "userid", b"")
        return userid if "userpass" not in self.env.settings.methods else b""

    def query(self) -> Query:
        request = self.request
        name = normal_name(request.host) if request.address_type == socks5.AddressType.DOMAIN else None
        if self.client_ip is None:  # parsed at accept only when rules or caps needed it then
            self.client_ip = unmapped(ipaddress.ip_address(self.client.getpeername()[0].partition("%")[0]))
        return Query(self.client_ip, POLICY_COMMANDS[request.command], request.port, self.policy_user(), name)

    def screen(self, host: str, port: int) -> str | None:
        """Why this session may not open ``host`` (an address, never a name), or None."""
        env = self.env
        policy = env.settings.policy
        if (not policy.rules and policy.default_allow and ":" not in host
                and not host.startswith("0.") and port not in env.own_addresses):
            self.rule = RULE_DEFAULT
            return None  # no rules, and plainly neither this host nor this proxy: the common case
        ip = unmapped(ipaddress.ip_address(host.partition("%")[0]))
        self.rule = RULE_NONE  # refused below by no rule
        forbidden = forbidden_destination(ip)
        if forbidden is not None:
            return f"denied: {forbidden}"
        if env.is_own_listener(ip, port):
            return f"denied: {access.format_peer((str(ip), port))} is this proxy itself"
        verdict = policy.decide(self.query(), ip)
        self.decided(verdict)
        return None if verdict.allowed else f"{verdict}"

    def decided(self, verdict: Verdict) -> None:
        """The rules' verdict on this request, for its access line and the denial metrics."""
        self.rule = access.rule_of(verdict)

    def deny(self, verdict: Verdict) -> None:
        self.decided(verdict)
        self.fail(Reply.CONNECTION_NOT_ALLOWED, str(verdict))

    # ------------------------------------------------------------------ BIND

    def bind(self) -> None:
        self.timer.cancel()
        self.bind_wait = wait = BindWait(self)
        if self.request.address_type == socks5.AddressType.DOMAIN:
            self.resolve(lambda addresses: wait.open(addresses[0][1][0]))
        else:
            wait.open(self.request.host)

    # ------------------------------------------------------------------ endings

    def send(self, data: bytes) -> bool:
        """Replies are a few bytes on a fresh socket: they fit, or the client is gone."""
        if self.answered:
            done, self.answered = self.answered, b""
            if not data.startswith(done):
                raise AssertionError(f"the engine answered {done!r}, the session would send {data!r}")
            data = data[len(done):]
            if not data:
                return True
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
        if reply is not None and not self.over:
            try:
                self.send(self.conn.send(self.reply_event(reply)))
            except ProtocolError:
                pass  # nothing can be answered in this state (e.g. still in the greeting)
        self.finish(reply, why)

    def finish(self, reply: Reply | None, why: str, failed_login: bytes | None = None) -> None:
        if self.over:
            return
        self.over = True
        if self.timer is not None:
            self.timer.cancel()
        self.loop.remove(self.client)
        close_gently(self.client)
        if self.upstream is not None:
            self.loop.remove(self.upstream)
            self.upstream.close()
        if self.bind_wait is not None:
            self.bind_wait.close()
        if self.chain is not None:
            self.chain.close()
        if self.race is not None:
            self.race.close()
        self.host.session_over(self, Failed(reply, why, failed_login))

    def internal_error(self, where: str) -> None:
        """A bug in one of this session's callbacks (host.entry_point): logged once, and the
        session ends with a failure reply where one can still be sent."""
        log.exception("%s: internal error in %s", self.describe(), where)
        if self.over:
            return
        try:
            self.fail(Reply.GENERAL_FAILURE, f"internal error in {where}")
        except Exception:
            self.over = True
            self.client.close()

    def describe(self) -> str:
        user = getattr(self.request, "userid", b"") or self.username
        return access.describe(self.peer, self.protocol_name(), self.request, user)

    def opening(self, access_log: access.AccessLog) -> str | dict:
        """describe(), or its fields for a JSON access line."""
        user = getattr(self.request, "userid", b"") or self.username
        return access_log.opening_of(self.peer, self.protocol_name(), self.request, user)

    def timing(self) -> access.Timing:
        handshake_s = self.requested_s - self.started_s if self.requested_s else None
        return access.Timing(handshake_s, self.auth_s, self.dns_s, self.connect_s)

    def protocol_name(self) -> str:
        if self.conn is None:
            return "-"
        if self.conn.version == socks4.SOCKS4_VERSION:
            return "socks4a" if self.request is not None and self.request.is_4a else "socks4"
        if self.conn.version == http.HTTP_VERSION:
            return "http"
        return "socks5"

    # ------------------------------------------------------------------ UDP ASSOCIATE

    def peer_ip_text(self) -> str:
        """The client's IP (from the address accept() gave), as the kernel writes it."""
        return kernel_text(self.peer.rpartition(":")[0].strip("[]"))[1]

    def udp_associate(self) -> None:
        """RFC 1928 §7: bind the client-facing UDP socket where the client reached us over
        TCP (it can reach that address, §6 BND.ADDR), answer with it, and hand both sockets
        to the worker's UDP association (udp.py), which ends with the TCP connection."""
        self.timer.cancel()
        verdict = self.env.settings.policy.for_any_destination(self.query())
        if verdict is not None:
            self.deny(verdict)  # no destination could be allowed: refuse the association
            return
        client_ip, client_port = self.udp_source()
        try:
            family, here = kernel_text(self.client.getsockname()[0])
        except OSError as exc:  # the client left already
            self.fail(Reply.GENERAL_FAILURE, f"UDP ASSOCIATE: client gone: {exc.strerror or exc}")
            return
        try:
            relay_sock = socket.socket(family, UDP_SOCKET_FLAGS)
        except OSError as exc:
            self.fail(Reply.GENERAL_FAILURE, f"UDP ASSOCIATE: cannot open the relay socket: {exc.strerror or exc}")
            return
        try:
            relay_sock.bind((here, 0))
        except OSError as exc:
            relay_sock.close()
            self.fail(Reply.GENERAL_FAILURE, f"UDP ASSOCIATE: cannot open the relay socket: {exc.strerror or exc}")
            return
        host, port = relay_sock.getsockname()[:2]
        host = self.env.settings.advertise or host  # behind NAT: what clients must use
        if not self.send(self.conn.send(self.reply_event(Reply.SUCCEEDED, host, port))):
            relay_sock.close()  # the session logged and closed
            return
        self.over = True
        query = replace(self.query(), name=None)  # what the rules see of every datagram
        self.host.session_over(self, StartUdp(self.client, relay_sock, client_ip, client_port, query))

    def udp_source(self) -> tuple[str, int]:
        """The address the client will send from (§6, §7): the request's DST where it is not
        zero, else the TCP connection's IP and the port of the first datagram (port 0)."""
        request = self.request
        client_ip = self.peer_ip_text()
        if request.address_type != AddressType.DOMAIN:  # a name is no address (PySocks sends "0")
            _, ip = kernel_text(request.host)
            if not ipaddress.ip_address(ip).is_unspecified:
                client_ip = ip
        return client_ip, request.port
