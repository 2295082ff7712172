"""Hostile clients against a real ``fastsocks``: truncated and random handshakes, a crowd of
connections that never finish their handshake, a client that stops reading in the middle
of a 200 MB download, a worker out of file descriptors, and floods behind a request.

Each test checks what the hostile client sees (the reply code the protocol promises, then
a close, never a hang: every socket has a timeout), then that the server is still whole:
a fresh client gets its bytes through, the workers are the same processes (no crash and
respawn), and their resident memory and open file descriptors (read from /proc) stay
within a generous bound of what they were before.

Random bytes encode random destinations, and a malformed name could reach a resolver, so
every test that sends them runs the server in a private network namespace holding only
``lo`` (``netns_prefix``); the test joins that namespace from a thread of its own
(``call_in_netns``) to reach the server, and keeps an echo target inside it. The other
tests only ever name loopback addresses, as IP literals.

What the server must answer to a byte stream is worked out independently of the server's
parser by the small model below (``expect``), from RFC 1928, RFC 1929, the SOCKS4 and
SOCKS4a texts and the caps fastsocks documents (255-byte SOCKS4 fields, printable-ASCII
names); where the answer depends on the destination (CONNECT, BIND, UDP ASSOCIATE) the
model names the command and the check allows the codes that destination can give.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import random
import re
import resource
import selectors
import socket
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from fastsocks.errors import ProtocolError
from fastsocks.protocol import http
from fastsocks.protocol.socks5 import NEED_DATA
from support import (HTTP_BODY, call_in_netns, echo_handler, fastsocks_command, join_netns_of,
                     process_usage, read_socks5_reply, recv_exact, require_tool, socks5_connect,
                     socks5_request_bytes, wait_until)

MIB = 1 << 20
RECV_TIMEOUT_S = 10.0
REFUSED_PORT = 9  # "discard": nothing listens on it in a fresh network namespace
CREDENTIALS = b"\x01\x05alice\x0dcorrect horse"  # RFC 1929 request for alice's password
BIND_TIMEOUT_S = "2"  # a BIND whose client pipelined bytes waits this long for its peer
HEALTHY_LOG = re.compile(r"Traceback|internal error|unexpected error|crashed|respawning")
ACCESS_LINE = r"fastsocks\.access: "


# --------------------------------------------------------------------- the server's health


class WorkerWatch:
    """The workers of a warmed-up server, noted once: later they must be the same
    processes, with resident memory and open fds within a bound of what they had."""

    def __init__(self, server, workers: int) -> None:
        self.server = server
        self.pids = sorted(server.wait_workers(workers))
        self.baseline = {pid: process_usage(pid) for pid in self.pids}

    def usage(self) -> dict[int, tuple[int, int]]:
        return {pid: process_usage(pid) for pid in self.pids}

    def assert_same_workers(self) -> None:
        assert sorted(self.server.workers()) == self.pids, (
            f"workers changed (crash and respawn?):\n{self.server.log_text()[-4000:]}")

    def rss_growth_mib(self) -> float:
        """The largest growth of one worker's resident memory since the baseline."""
        return max(rss - self.baseline[pid][0] for pid, (rss, _) in self.usage().items()) / 1024

    def assert_rss_within(self, mib: float, settle_s: float = 10.0) -> None:
        """Within the bound once the worker is quiet: it trims its heap then (heap.py's
        TrimPolicy: at most every 2 s), so a burst's freed pages may need a tick to go."""
        try:
            wait_until(lambda: self.rss_growth_mib() < mib, settle_s, interval_s=0.5, what="the RSS to settle")
        except AssertionError:
            growth = self.rss_growth_mib()
            pytest.fail(f"a worker's resident memory grew by {growth:.1f} MiB (bound {mib} MiB)")

    def fds_settled(self, slack: int = 4) -> bool:
        return all(fds <= self.baseline[pid][1] + slack for pid, (_, fds) in self.usage().items())

    def assert_fds_settle(self, slack: int = 4, timeout_s: float = 10.0) -> None:
        try:
            wait_until(lambda: self.fds_settled(slack), timeout_s, what="worker fds back near baseline")
        except AssertionError:
            pytest.fail(f"worker fds {self.usage()} did not come back near {self.baseline} (+{slack})")

    def assert_healthy(self, rss_mib: float = 32, fd_slack: int = 4) -> None:
        self.assert_same_workers()
        bad = [line for line in self.server.log_text().splitlines() if HEALTHY_LOG.search(line)]
        assert not bad, "\n".join(bad[:20])
        self.assert_fds_settle(fd_slack)
        self.assert_rss_within(rss_mib)


def echo_round_trip(proxy: tuple[str, int], target, payload: bytes = b"still serving",
                    greeting: bytes = b"\x05\x01\x00", credentials: bytes = b"") -> None:
    """A fresh client gets its bytes through the proxy and back (SOCKS5, optional RFC 1929)."""
    with socket.create_connection(proxy, timeout=RECV_TIMEOUT_S) as sock:
        sock.sendall(greeting + credentials + socks5_request_bytes(*target.address) + payload)
        method = recv_exact(sock, 2)
        assert method in (b"\x05\x00", b"\x05\x02"), method
        if method == b"\x05\x02":
            assert recv_exact(sock, 2) == b"\x01\x00"
        assert read_socks5_reply(sock)[0] == 0
        assert recv_exact(sock, len(payload)) == payload


@contextlib.contextmanager
def open_files_limit(needed: int):
    """Raise this process's soft RLIMIT_NOFILE to at least ``needed``; restore it after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} open files, the hard limit here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --------------------------------------------------------------------- a server in a namespace


class NetnsRig:
    """A server in a private network namespace, an echo target inside it, and a way in."""

    def __init__(self, server, echo, workers: int, credentials: bytes = b"") -> None:
        self.server = server
        self.echo = echo
        self.credentials = credentials
        call_in_netns(server.pid, self.fresh_client)  # also warms the workers up
        # Its access line is written once the relay has seen both ends close.
        wait_until(lambda: server.count_log(ACCESS_LINE) == 1, what="the first access-log line")
        self.watch = WorkerWatch(server, workers)

    def connect(self) -> socket.socket:
        return call_in_netns(self.server.pid, socket.create_connection, self.server.address,
                             RECV_TIMEOUT_S)

    def fresh_client(self) -> None:
        """Runs inside the namespace (a thread that joined it)."""
        greeting = b"\x05\x01\x02" if self.credentials else b"\x05\x01\x00"
        echo_round_trip(self.server.address, self.echo, greeting=greeting, credentials=self.credentials)

    def assert_fresh_client_served(self) -> None:
        for _ in range(3):  # with several workers, try to reach each of them
            call_in_netns(self.server.pid, self.fresh_client)

    def pool(self, threads: int = 16) -> ThreadPoolExecutor:
        """Threads that live in the namespace: what they connect to is the server's loopback."""
        return ThreadPoolExecutor(threads, initializer=join_netns_of, initargs=(self.server.pid,))


@pytest.fixture(scope="module")
def alice_users_line() -> str:
    out = subprocess.run(fastsocks_command() + ["hash-password", "--user", "alice"],
                         input="correct horse\n", capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def users_file(tmp_path, alice_users_line):
    path = tmp_path / "users.txt"
    path.write_text(alice_users_line + "\n")
    return path


@pytest.fixture
def auth_config(tmp_path, users_file):
    """Users, and no brute-force block: the random tests send dozens of wrong passwords
    from one address, and must see every one of them answered."""
    path = tmp_path / "fastsocks.toml"
    path.write_text(f"[auth]\nusers_file = {str(users_file)!r}\nblock_s = 0\n")
    return path


@pytest.fixture
def netns_rig(start_server, netns_prefix, tcp_target, auth_config):
    """``netns_rig(*args, auth=False, workers=2)`` starts a server in a namespace of its own."""
    prefix, env = netns_prefix

    def start(*args: str, auth: bool = False, workers: int = 2) -> NetnsRig:
        # A short graceful timeout: a session left hanging must not hold up the clean-up.
        argv = ["--workers", str(workers), "--bind-timeout", BIND_TIMEOUT_S, "--graceful-timeout", "1",
                *args]
        if auth:
            argv += ["--config", str(auth_config)]
        server = start_server(*argv, prefix=prefix, env=env)
        echo = call_in_netns(server.pid, tcp_target, echo_handler)
        return NetnsRig(server, echo, workers, CREDENTIALS if auth else b"")

    return start


# --------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Expected:
    """What the server must send for a byte stream followed by the client's FIN.

    ``answer`` comes first, exactly. Then either the server closes (``command`` None) or
    the request was well-formed and ``command`` ("connect", "bind", "udp") names what it
    asked for, of ``destination``, answered in SOCKS ``version`` 5 or 4. ``wait_for`` is the
    part of the answer the client waits for before its FIN (see
    test_credentials_pipelined_with_a_fin_still_get_their_answer)."""

    answer: bytes
    command: str | None = None
    destination: tuple[str, int] | None = None
    version: int = 5
    wait_for: bytes = b""


def socks5_failure(code: int) -> bytes:
    return bytes([5, code, 0, 1]) + bytes(6)  # a failure reply names 0.0.0.0:0


SOCKS4_REJECTED = bytes([0, 0x5B]) + bytes(6)


def expect(data: bytes, users: bool = False) -> Expected:
    """The first byte picks the protocol (SOCKS4 and SOCKS5 share the port)."""
    if data[:1] == b"\x05":
        return expect_socks5(data, users)
    if data[:1] == b"\x04":
        return expect_socks4(data, users)
    if data[:1].isalpha():
        return expect_http(data)
    return Expected(b"")  # nothing to answer in: close


def expect_http(data: bytes) -> Expected:
    """A letter opens an HTTP request. Random bytes make none a proxy could serve: the
    answer is the refusal h11's reading calls for (tests/unit/test_http_protocol.py checks
    those), or nothing when the head has no end before the client's FIN."""
    conn = http.ServerConnection()
    conn.receive_data(data)
    conn.receive_data(b"")
    try:
        while conn.next_event() is not NEED_DATA:
            pass
    except ProtocolError:
        refusal = conn.refusal()
        return Expected(b"" if refusal is None else conn.send(refusal))
    return Expected(b"")


def expect_socks5(data: bytes, users: bool) -> Expected:
    # RFC 1928 §3: VER NMETHODS METHODS
    if len(data) < 2:
        return Expected(b"")
    methods = data[2 : 2 + data[1]]
    if data[1] == 0:
        return Expected(b"\x05\xff")
    if len(methods) < data[1]:
        return Expected(b"")
    wanted = 0x02 if users else 0x00
    if wanted not in methods:
        return Expected(b"\x05\xff")
    answer, rest = bytes([5, wanted]), data[2 + data[1] :]
    if not users:
        return expect_socks5_request(answer, rest, b"")
    return expect_credentials(answer, rest)


def expect_credentials(answer: bytes, rest: bytes) -> Expected:
    # RFC 1929 §2: VER ULEN UNAME PLEN PASSWD; a wrong VER cannot be answered
    if len(rest) < 2 or rest[0] != 1:
        return Expected(answer)
    ulen = rest[1]
    if ulen == 0:
        return Expected(answer + b"\x01\x01")
    if len(rest) < 3 + ulen:
        return Expected(answer)
    plen = rest[2 + ulen]
    if plen == 0:
        return Expected(answer + b"\x01\x01")
    if len(rest) < 3 + ulen + plen:
        return Expected(answer)
    ok = rest[: 3 + ulen + plen] == CREDENTIALS
    answer += b"\x01\x00" if ok else b"\x01\x01"
    if not ok:
        return Expected(answer, wait_for=answer)
    return expect_socks5_request(answer, rest[3 + ulen + plen :], answer)


def expect_socks5_request(answer: bytes, rest: bytes, wait_for: bytes) -> Expected:
    """RFC 1928 §4, checked in fastsocks' documented order: VER, RSV, ATYP, the name, CMD
    last (once the request is whole)."""

    def refuse(code: int) -> Expected:
        return Expected(answer + socks5_failure(code), wait_for=wait_for)

    incomplete = Expected(answer, wait_for=wait_for)
    if not rest:
        return incomplete
    if rest[0] != 5:
        return refuse(0x01)
    if len(rest) < 3:
        return incomplete
    if rest[2] != 0:
        return refuse(0x01)
    if len(rest) < 4:
        return incomplete
    atyp, at = rest[3], 4
    if atyp == 1:
        raw = rest[at : at + 4]
        host, at = (str(ipaddress.IPv4Address(raw)) if len(raw) == 4 else None), at + 4
    elif atyp == 4:
        raw = rest[at : at + 16]
        host, at = (ipaddress.IPv6Address(raw).compressed if len(raw) == 16 else None), at + 16
    elif atyp == 3:
        if len(rest) < 5:
            return incomplete
        if rest[4] == 0:
            return refuse(0x01)
        name = rest[5 : 5 + rest[4]]
        if len(name) < rest[4]:
            return incomplete
        if not printable(name):
            return refuse(0x01)
        host, at = name.decode(), 5 + rest[4]
    else:
        return refuse(0x08)
    if host is None or len(rest) < at + 2:
        return incomplete
    port = int.from_bytes(rest[at : at + 2], "big")
    command = {1: "connect", 2: "bind", 3: "udp"}.get(rest[1])
    if command is None:
        return refuse(0x07)
    return Expected(answer, command, (host, port), 5, wait_for)


def expect_socks4(data: bytes, users: bool) -> Expected:
    """VN CD DSTPORT DSTIP USERID NUL [NAME NUL]; fields capped at 255 bytes."""
    if len(data) < 8:
        return Expected(b"")
    userid_end = field_end(data, 8)
    if userid_end is None:
        return Expected(b"")
    if userid_end < 0:
        return Expected(SOCKS4_REJECTED)
    port, ip, at = int.from_bytes(data[2:4], "big"), data[4:8], userid_end + 1
    if ip[:3] == b"\0\0\0" and ip[3] != 0:  # SOCKS4a: a name follows
        name_end = field_end(data, at)
        if name_end is None:
            return Expected(b"")
        if name_end < 0 or name_end == at or not printable(data[at:name_end]):
            return Expected(SOCKS4_REJECTED)
        host = data[at:name_end].decode()
    else:
        host = str(ipaddress.IPv4Address(ip))
    command = {1: "connect", 2: "bind"}.get(data[1])
    if command is None or users:  # with --users SOCKS4 is refused: it carries no password
        return Expected(SOCKS4_REJECTED)
    return Expected(b"", command, (host, port), 4)


def field_end(data: bytes, start: int) -> int | None:
    """Index of the NUL ending a field at ``start``; None: not here yet; -1: over 255 bytes."""
    end = data.find(b"\0", start, start + 256)
    if end >= 0:
        return end
    return -1 if len(data) - start > 255 else None


def printable(name: bytes) -> bool:
    return all(0x21 <= byte <= 0x7E for byte in name)


# --------------------------------------------------------------------- checking an answer


def split_replies(data: bytes, version: int) -> list[int]:
    """The reply codes in ``data``, which must be whole, well-formed replies only."""
    codes = []
    while data:
        if version == 4:
            assert len(data) >= 8 and data[0] == 0, f"bad SOCKS4 reply {data.hex()}"
            codes.append(data[1])
            data = data[8:]
            continue
        assert len(data) >= 4 and data[0] == 5 and data[2] == 0, f"bad SOCKS5 reply {data.hex()}"
        size = {1: 10, 4: 22}.get(data[3]) or (7 + data[4] if data[3] == 3 and len(data) > 4 else None)
        assert size is not None and len(data) >= size, f"bad SOCKS5 reply {data.hex()}"
        codes.append(data[1])
        data = data[size:]
    return codes


def connect_codes(host: str, port: int, version: int, proxy_port: int) -> set[int]:
    """The failures a CONNECT to ``host``:``port`` can get in a namespace holding only ``lo``."""
    if version == 4:
        return {0x5B}  # SOCKS4 has one code for every failure
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # a name: unresolvable (4), or it names an address (1, 2, 3, 5)
        return {0x01, 0x02, 0x03, 0x04, 0x05}
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip in THIS_NETWORK or (ip.is_loopback and port == proxy_port):
        return {0x02}  # this host (RFC 1122 §3.2.1.3), or the proxy itself: never allowed
    if ip.is_loopback:
        return {0x05}  # the host is there, the port is not: connection refused
    return {0x01, 0x03, 0x04}  # no route (3); a scope-less link-local address is EINVAL (1)


THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")


def answer_problem(expected: Expected, received: bytes, end: str, rig: NetnsRig) -> str | None:
    """Why ``received`` (then ``end``) is not what the server had to do, or None."""
    if end != "eof":
        return f"ended with {end}, not a close"
    if not received.startswith(expected.answer):
        return f"expected {expected.answer.hex()} first"
    rest = received[len(expected.answer) :]
    if expected.command is None:
        return f"{len(rest)} bytes more than expected" if rest else None
    try:
        codes = split_replies(rest, expected.version)
    except AssertionError as exc:
        return str(exc)
    ok = 0x00 if expected.version == 5 else 0x5A
    if expected.command == "connect" and codes[:1] == [ok] and expected.destination == rig.echo.address:
        return None  # a random request that named the echo target: relayed, nothing more to check
    if expected.command == "connect":
        allowed = connect_codes(*expected.destination, expected.version, rig.server.port)
        return None if len(codes) == 1 and codes[0] in allowed else f"codes {codes}, allowed {allowed}"
    if expected.command == "udp":
        return None if codes in ([0x00], [0x01]) else f"codes {codes} for UDP ASSOCIATE"
    # BIND: a failure, or the first reply then (peer never came) nothing or one failure
    failures = {0x5B} if expected.version == 4 else {0x01, 0x03, 0x04, 0x05, 0x06}
    if len(codes) == 1 and (codes[0] == ok or codes[0] in failures):
        return None
    if len(codes) == 2 and codes[0] == ok and codes[1] in failures:
        return None
    return f"codes {codes} for BIND"


def exchange(data: bytes, wait_for: bytes = b"", address=None,
             timeout_s: float = RECV_TIMEOUT_S) -> tuple[bytes, str]:
    """Connect (in the calling thread's namespace), send ``data``, wait for ``wait_for``,
    send FIN, read to the end. Returns what came back and how it ended."""
    received = b""
    with socket.create_connection(address, timeout=timeout_s) as sock:
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(data)  # a server that closes at the first byte may refuse the rest
            while len(received) < len(wait_for):
                chunk = sock.recv(4096)
                if not chunk:
                    return received, "eof"
                received += chunk
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                received += chunk
                if len(received) > 65536:
                    return received, "flood"
        except TimeoutError:
            return received, "timeout"
        except ConnectionResetError:
            return received, "reset"
    return received, "eof"


def run_cases(rig: NetnsRig, cases: list[tuple[str, bytes]], users: bool) -> None:
    """Every case through its own connection (16 at a time); all must be answered right."""

    def one(case: tuple[str, bytes]):
        name, data = case
        expected = expect(data, users)
        received, end = exchange(data, expected.wait_for, rig.server.address)
        problem = answer_problem(expected, received, end, rig)
        if problem:
            return (f"{name}: sent {data.hex()}\n    got {received.hex()} then {end}: {problem}")
        return None

    lines_before = rig.server.count_log(ACCESS_LINE)
    with rig.pool() as pool:
        problems = [p for p in pool.map(one, cases) if p]
    assert not problems, f"{len(problems)} of {len(cases)} answered wrong:\n" + "\n".join(problems[:12])
    # One access line per session: none was lost or left hanging in the server.
    wait_until(lambda: rig.server.count_log(ACCESS_LINE) >= lines_before + len(cases), 15,
               what=f"{len(cases)} access-log lines")
    assert rig.server.count_log(ACCESS_LINE) == lines_before + len(cases)
    rig.assert_fresh_client_served()
    rig.watch.assert_healthy(rss_mib=48 if users else 32)


# --------------------------------------------------------------------- the inputs


def socks4_request(command: int, ip: str | None, port: int = REFUSED_PORT, userid: bytes = b"fuzz",
                   name: bytes | None = None) -> bytes:
    address = socket.inet_aton(ip) if name is None else b"\0\0\0\x01"
    tail = b"" if name is None else name + b"\0"
    return bytes([4, command]) + struct.pack("!H", port) + address + userid + b"\0" + tail


HANDSHAKES = {
    # id: (bytes of a whole, valid handshake, is the server started with --users)
    "socks5-ipv4": (b"\x05\x01\x00" + socks5_request_bytes("127.0.0.1", REFUSED_PORT), False),
    "socks5-ipv6": (b"\x05\x02\x02\x00" + socks5_request_bytes("::1", REFUSED_PORT), False),
    "socks5-domain": (b"\x05\x01\x00" + socks5_request_bytes("localhost", REFUSED_PORT), False),
    "socks4": (socks4_request(1, "127.0.0.1"), False),
    "socks4a": (socks4_request(1, None, name=b"localhost"), False),
    "rfc1929": (b"\x05\x01\x02" + CREDENTIALS + socks5_request_bytes("127.0.0.1", REFUSED_PORT), True),
    "rfc1929-domain": (b"\x05\x02\x00\x02" + CREDENTIALS + socks5_request_bytes("localhost", REFUSED_PORT),
                       True),
}

MUTATION_BASES = {
    False: [data for data, users in HANDSHAKES.values() if not users] + [
        b"\x05\x01\x00" + socks5_request_bytes("127.0.0.1", REFUSED_PORT, command=2),
        b"\x05\x01\x00" + socks5_request_bytes("0.0.0.0", 0, command=3),
        socks4_request(2, "127.0.0.1"),
    ],
    True: [data for data, users in HANDSHAKES.values() if users],
}

NAME_ALPHABET = b"abcdefghijklmnopqrstuvwxyz0123456789-"


def random_name(rng: random.Random) -> bytes:
    """Mostly names a resolver can be asked about (labels of 1-63 bytes: see
    test_a_name_the_resolver_cannot_encode_is_answered_and_closed for longer ones); some
    that must be refused before any resolver sees them."""
    roll = rng.random()
    if roll < 0.1:
        return rng.choice([b"localhost", b"127.1", b"0", b"1", b"::1", b"[::1]"])
    labels = [bytes(rng.choice(NAME_ALPHABET) for _ in range(rng.randint(1, 20)))
              for _ in range(rng.randint(1, 4))]
    name = b".".join(labels)[:255]
    if roll < 0.3:  # a byte no host name has, anywhere in it
        at = rng.randrange(len(name) + 1)
        name = (name[:at] + bytes([rng.choice([0, 0x20, 0x7F, 0xFF, 0x09, rng.randrange(256)])])
                + name[at:])[:255]
    return name


def random_socks5_request(rng: random.Random) -> bytes:
    atyp = rng.choice([1, 1, 3, 3, 4, rng.randrange(256)])
    if atyp == 1:
        address = rng.choice([rng.randbytes(4), b"\x7f" + rng.randbytes(3), bytes(4)])
    elif atyp == 4:
        address = rng.choice([rng.randbytes(16), ipaddress.IPv6Address("::1").packed,
                              ipaddress.IPv6Address("::ffff:127.0.0.1").packed])
    elif atyp == 3:
        name = random_name(rng)
        address = bytes([len(name)]) + name
    else:
        address = rng.randbytes(rng.randrange(20))
    version = 5 if rng.random() < 0.9 else rng.randrange(256)
    reserved = 0 if rng.random() < 0.9 else rng.randrange(256)
    command = rng.choice([1, 1, 1, 2, 3, rng.randrange(256)])
    port = rng.choice([REFUSED_PORT, rng.randrange(65536)])
    trailer = rng.randbytes(rng.randrange(64)) if rng.random() < 0.2 else b""
    return bytes([version, command, reserved, atyp]) + address + struct.pack("!H", port) + trailer


def random_socks4_request(rng: random.Random) -> bytes:
    userid = bytes(rng.randrange(1, 256) for _ in range(rng.choice([0, 4, rng.randrange(300)])))
    if rng.random() < 0.5:
        ip, name = rng.choice([rng.randbytes(4), b"\x7f\0\0\x01"]), None
    else:
        ip, name = b"\0\0\0" + bytes([rng.randrange(1, 256)]), random_name(rng).replace(b"\0", b"")
    command = rng.choice([1, 1, 2, rng.randrange(256)])
    port = rng.choice([REFUSED_PORT, rng.randrange(65536)])
    return (bytes([4, command]) + struct.pack("!H", port) + ip + userid + b"\0"
            + (b"" if name is None else name + b"\0"))


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind, at = rng.random(), rng.randrange(len(out) + 1)
        if kind < 0.5 and at < len(out):
            out[at] = rng.randrange(256)
        elif kind < 0.65:
            out[at:at] = rng.randbytes(rng.randint(1, 4))
        elif kind < 0.8 and at < len(out):
            del out[at]
        elif kind < 0.9:
            del out[at:]
        else:
            out += rng.randbytes(rng.randint(1, 64))
    return bytes(out)


def random_cases(seed: int, count: int, users: bool) -> list[tuple[str, bytes]]:
    """``count`` byte strings, the same for the same seed."""
    rng = random.Random(seed)
    greeting = b"\x05\x01\x02" if users else b"\x05\x01\x00"
    cases: list[tuple[str, bytes]] = []
    while len(cases) < count:
        n, roll = len(cases), rng.random()
        if roll < 0.25:
            first = bytes([rng.choice([5, 4, rng.randrange(256)])]) if rng.random() < 0.7 else b""
            data = first + rng.randbytes(rng.randrange(48))
            if users and rng.random() < 0.5:
                data = greeting + data  # garbage where the credentials go
            cases.append((f"random-{n}", data))
        elif roll < 0.7:
            cases.append((f"mutated-{n}", mutate(rng, rng.choice(MUTATION_BASES[users]))))
        elif users:
            creds = CREDENTIALS if rng.random() < 0.3 else mutate(rng, CREDENTIALS)
            cases.append((f"structured-{n}", greeting + creds + random_socks5_request(rng)))
        elif rng.random() < 0.6:
            cases.append((f"structured-{n}", greeting + random_socks5_request(rng)))
        else:
            cases.append((f"structured-{n}", random_socks4_request(rng)))
    return cases


# --------------------------------------------------------------------- 1. truncated and random


@pytest.mark.netns
@pytest.mark.parametrize("handshake", list(HANDSHAKES))
def test_every_prefix_of_a_handshake_then_fin_is_answered_and_closed(netns_rig, handshake):
    """Each proper prefix of a valid handshake, then FIN: the server sends exactly what
    the prefix earned (the method selection once the greeting is whole, the RFC 1929
    status once the credentials are) and closes, in every state of the handshake."""
    data, users = HANDSHAKES[handshake]
    rig = netns_rig(auth=users)
    cases = [(f"prefix-{n}", data[:n]) for n in range(len(data))]
    run_cases(rig, cases, users)


@pytest.mark.netns
@pytest.mark.parametrize("users", [False, True], ids=["no-auth", "rfc1929"])
def test_random_handshakes_get_the_promised_reply_and_a_close(netns_rig, users):
    """A few hundred seeded random, mutated and randomly-filled handshakes (SOCKS5 and
    SOCKS4/4a; with --users, RFC 1929 credentials too): each gets exactly the reply its
    first defect calls for (05 FF, 01 01, 01/07/08, 5B, or the outcome of a well-formed
    request to a random destination) and a close, no hang; no worker crashes."""
    rig = netns_rig(auth=users)
    cases = random_cases(seed=1928 + users, count=200 if users else 300, users=users)
    run_cases(rig, cases, users)


# --------------------------------------------------------------------- 2. unfinished handshakes

IDLE_CONNECTIONS = 2000
HANDSHAKE_TIMEOUT_S = 2


def open_idle_connections(address, count: int) -> list[socket.socket]:
    """Half send nothing at all, half a greeting that lacks one of its two methods."""
    socks = []
    try:
        for n in range(count):
            sock = socket.create_connection(address, timeout=RECV_TIMEOUT_S)
            socks.append(sock)
            if n % 2:
                sock.sendall(b"\x05\x02\x00")
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def wait_all_closed_by_peer(socks: list[socket.socket], timeout_s: float) -> dict[str, int]:
    """How each connection ended ("eof", "reset", "data", or "open" at the deadline)."""
    selector = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    outcomes = {"eof": 0, "reset": 0, "data": 0}
    deadline = time.monotonic() + timeout_s
    pending = len(socks)
    while pending and time.monotonic() < deadline:
        for key, _ in selector.select(0.5):
            try:
                outcome = "data" if key.fileobj.recv(16) else "eof"
            except ConnectionResetError:
                outcome = "reset"
            except BlockingIOError:
                continue
            outcomes[outcome] += 1
            selector.unregister(key.fileobj)
            pending -= 1
    selector.close()
    outcomes["open"] = pending
    return outcomes


def curl_through(server, target) -> subprocess.CompletedProcess:
    curl = require_tool("curl")
    return subprocess.run(
        [curl, "-sS", "--max-time", "20", "--socks5-hostname", f"127.0.0.1:{server.port}",
         f"http://127.0.0.1:{target.port}/"],
        capture_output=True, timeout=30, check=False,
        env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")})


def test_two_thousand_unfinished_handshakes_do_not_block_a_real_client(start_server, http_target):
    """2,000 connections that never finish their handshake are held while curl fetches a
    page through the same server; then the server closes every one of them at its
    handshake deadline, logs why, and gives their file descriptors back."""
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    if somaxconn < IDLE_CONNECTIONS:  # the silent ones wait in the listen queue (TCP_DEFER_ACCEPT)
        pytest.skip(f"net.core.somaxconn is {somaxconn}, below {IDLE_CONNECTIONS}")
    server = start_server("--workers", "2", "--handshake-timeout", str(HANDSHAKE_TIMEOUT_S))
    first = curl_through(server, http_target)  # warms the workers up
    assert first.stdout == HTTP_BODY, first.stderr
    watch = WorkerWatch(server, 2)
    timeouts_before = server.count_log("handshake timed out")
    with open_files_limit(IDLE_CONNECTIONS + 256):
        idle = open_idle_connections(server.address, IDLE_CONNECTIONS)
        try:
            # The half greetings are accepted at once (the silent ones wait in the kernel
            # for TCP_DEFER_ACCEPT): the server really is holding them.
            wait_until(lambda: sum(fds for _, fds in watch.usage().values())
                       >= sum(fds for _, fds in watch.baseline.values()) + IDLE_CONNECTIONS // 2,
                       what="the half greetings accepted")
            out = curl_through(server, http_target)
            assert out.returncode == 0, out.stderr
            assert out.stdout == HTTP_BODY
            watch.assert_rss_within(64)
            ends = wait_all_closed_by_peer(idle, timeout_s=HANDSHAKE_TIMEOUT_S + 20)
        finally:
            for sock in idle:
                sock.close()
    assert ends == {"eof": IDLE_CONNECTIONS, "reset": 0, "data": 0, "open": 0}, ends
    wait_until(lambda: server.count_log("handshake timed out") - timeouts_before >= IDLE_CONNECTIONS,
               what=f"{IDLE_CONNECTIONS} 'handshake timed out' access lines")
    watch.assert_healthy(rss_mib=64, fd_slack=8)
    assert curl_through(server, http_target).stdout == HTTP_BODY


# --------------------------------------------------------------------- 3. a reader that stalls

BLOCKS = 200  # of 1 MiB


def numbered_block(base: bytes, n: int) -> bytes:
    """Block ``n`` of the download: a lost, repeated or reordered block shows."""
    return n.to_bytes(8, "big") + base[8:]


@pytest.mark.parametrize("relay", ["splice", "no-splice"])
def test_a_client_that_stops_reading_costs_no_memory_and_later_gets_every_byte(
        start_server, tcp_target, echo_target, relay):
    """A target sends 200 MiB as fast as it can; the client reads 1 MiB and stalls. The
    target is held back (backpressure), the worker's memory stays flat, another client is
    served meanwhile, and once the client reads again it gets all 200 MiB, in order."""
    base = random.Random(200).randbytes(MIB)
    sent_mib = [0]

    def source(conn: socket.socket) -> None:
        for n in range(BLOCKS):
            conn.sendall(numbered_block(base, n))
            sent_mib[0] = n + 1

    target = tcp_target(source)
    server = start_server(*(["--no-splice"] if relay == "no-splice" else []))
    echo_round_trip(server.address, echo_target)
    watch = WorkerWatch(server, 1)
    sock, (code, _, _) = socks5_connect(server.address, *target.address, timeout_s=30)
    with sock:
        assert code == 0
        assert recv_exact(sock, MIB) == numbered_block(base, 0)

        def target_held_back() -> bool:
            before = sent_mib[0]
            time.sleep(0.3)
            return sent_mib[0] == before or sent_mib[0] == BLOCKS

        wait_until(target_held_back, 20, what="the target to block")
        assert sent_mib[0] < BLOCKS, "the proxy took all 200 MiB while its client read 1 MiB"
        growth = []
        for _ in range(8):  # stalled for about two seconds
            growth.append(watch.rss_growth_mib())
            time.sleep(0.25)
        assert max(growth) < 64, f"worker memory grew by {max(growth):.1f} MiB while the client stalled"
        assert sent_mib[0] < BLOCKS
        echo_round_trip(server.address, echo_target, b"served while another client stalls")

        for n in range(1, BLOCKS):
            block = recv_exact(sock, MIB)
            if block != numbered_block(base, n):
                pytest.fail(f"block {n} arrived wrong (starts {block[:8].hex()})")
        assert sock.recv(1) == b""
    server.wait_for_log(rf"dest=127\.0\.0\.1:{target.port} reply=succeeded up=0 "
                        rf"down={BLOCKS * MIB} .*end=eof")
    watch.assert_healthy(rss_mib=64, fd_slack=8)  # pooled splice pipes may stay open


# --------------------------------------------------------------------- 4. out of descriptors

FD_LIMIT = 64


def test_a_worker_out_of_file_descriptors_says_so_and_recovers(start_server, echo_target):
    """Under a hard limit of 64 fds, connections pile up until the worker cannot accept:
    it logs that clearly, a relayed session keeps flowing, a client whose request needs
    one more fd gets a general failure (not a hang); once the pile is closed, a fresh
    client is served again by the same worker."""
    prlimit = require_tool("prlimit")
    server = start_server("--handshake-timeout", "30",
                          prefix=[prlimit, f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--"])
    echo_round_trip(server.address, echo_target)
    watch = WorkerWatch(server, 1)
    (worker,) = watch.pids
    relayed, (code, _, _) = socks5_connect(server.address, *echo_target.address)
    pile: list[socket.socket] = []
    try:
        assert code == 0
        for _ in range(FD_LIMIT + 16):  # more than the worker can hold
            sock = socket.create_connection(server.address, timeout=RECV_TIMEOUT_S)
            pile.append(sock)
            sock.sendall(b"\x05\x01")  # a greeting without its method: the worker keeps it
        server.wait_for_log(rf"WARNING .*worker 0: {os.strerror(errno.EMFILE)}: not accepting",
                            what="the log line about running out of file descriptors")
        wait_until(lambda: process_usage(worker)[1] >= FD_LIMIT, what=f"the worker at {FD_LIMIT} fds")

        relayed.sendall(b"still relaying")
        assert recv_exact(relayed, 14) == b"still relaying"

        # The first of the pile was accepted: its request needs an upstream socket.
        pile[0].sendall(b"\x00" + socks5_request_bytes(*echo_target.address))
        assert recv_exact(pile[0], 2) == b"\x05\x00"
        assert read_socks5_reply(pile[0])[0] == 0x01
        assert pile[0].recv(1) == b""
        server.wait_for_log(r"reply=general_failure .*Too many open files")
    finally:
        for sock in pile:
            sock.close()
    try:
        echo_round_trip(server.address, echo_target, b"served again")
    finally:
        relayed.close()
    watch.assert_healthy(rss_mib=32, fd_slack=4)


# --------------------------------------------------------------------- 5. floods

FLOOD_CAP_BYTES = 64 * MIB   # what the client would send to a server that never stops reading
FLOOD_BOUND_BYTES = 16 * MIB  # kernel buffers hold a few MiB; past that, the server read it

FLOODS = {
    # id: (--users?, bytes before the flood, flood byte pattern, answers allowed)
    "socks4-userid-no-nul": (False, b"\x04\x01\x00\x09\x7f\x00\x00\x01", b"A" * 4096, [SOCKS4_REJECTED]),
    "socks4a-name-no-nul": (False, socks4_request(1, None, userid=b"u", name=b"")[:-1], b"a" * 4096,
                            [SOCKS4_REJECTED]),
    "socks5-after-unknown-command": (
        False, b"\x05\x01\x00\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x09", None,
        [b"\x05\x00" + socks5_failure(0x07)]),
    "socks5-after-refused-connect": (
        False, b"\x05\x01\x00" + socks5_request_bytes("127.0.0.1", REFUSED_PORT), None,
        [b"\x05\x00" + socks5_failure(0x05)]),
    "socks5-greeting-without-no-auth": (False, b"\x05\xff" + bytes(range(1, 256)), None, [b"\x05\xff"]),
    "not-socks-at-all": (False, b"\x16\x03\x01\x02\x00\x01", b"j" * 4096, [b""]),
    # An HTTP head that never ends: 431 once it passes the cap (protocol/http.py), then a close.
    "http-head-without-end": (False, b"GET http://x/ HTTP/1.1\r\nHost: x\r\n", b"X-Junk: " + b"j" * 4088,
                              [http.error_response(http.HttpError(431, b"Request Header Fields Too Large",
                                                                  "request head longer than 16384 bytes")), b""]),
    # The buffer cap (64 KiB) may cut the session before the failed check is answered.
    "rfc1929-credentials": (True, b"\x05\x01\x02\x01\xff" + b"u" * 255 + b"\xff" + b"p" * 255, None,
                            [b"\x05\x02\x01\x01", b"\x05\x02"]),
}


def flood(sock: socket.socket, pattern: bytes | None, result: dict) -> None:
    """Send ``pattern`` (random bytes if None) until the server closes or the cap."""
    chunk = pattern * (65536 // len(pattern)) if pattern else random.Random(5).randbytes(65536)
    sent = 0
    try:
        while sent < FLOOD_CAP_BYTES:
            sent += sock.send(chunk)
        result["end"] = "cap"
    except (BrokenPipeError, ConnectionResetError):
        result["end"] = "closed"
    except TimeoutError:
        result["end"] = "server stopped reading but did not close"
    except OSError as exc:
        result["end"] = f"error {exc}"
    result["sent"] = sent


@pytest.mark.netns
@pytest.mark.parametrize("case", list(FLOODS))
def test_a_flood_behind_a_request_is_answered_closed_and_not_buffered(netns_rig, case):
    """A request (or a field) followed by an endless stream of bytes: the server sends the
    reply the request calls for and closes; it takes no more than kernel buffers hold (it
    reads no 64 MiB into memory), and its memory stays flat."""
    users, head, pattern, answers = FLOODS[case]
    rig = netns_rig(auth=users, workers=1)
    sock = rig.connect()
    with sock:
        sock.settimeout(RECV_TIMEOUT_S)
        sock.sendall(head)
        result: dict = {}
        sender = threading.Thread(target=flood, args=(sock, pattern, result), daemon=True)
        sender.start()
        received, end = b"", "eof"
        try:
            while chunk := sock.recv(65536):
                received += chunk
                assert len(received) < 4096, f"the server keeps sending: {received[:64].hex()}"
        except ConnectionResetError:
            end = "reset"
        except TimeoutError:
            end = "timeout"
        sender.join(RECV_TIMEOUT_S + 5)
    assert end in ("eof", "reset"), f"no close: got {received.hex()} then {end}"
    assert received in answers, f"got {received.hex()}, expected one of {[a.hex() for a in answers]}"
    assert result.get("end") == "closed", result
    assert result["sent"] <= FLOOD_BOUND_BYTES, f"the server took {result['sent']} bytes of the flood"
    rig.assert_fresh_client_served()
    rig.watch.assert_healthy(rss_mib=16 if not users else 48)


# --------------------------------------------------------------------- bugs found here (fixed)


def test_credentials_pipelined_with_a_fin_still_get_their_answer(start_server, users_file, echo_target):
    """Greeting, credentials, request and payload in one send, then FIN (``nc -N``
    style): the client is owed the status of its credentials (and, when they are right,
    the reply and the echo of its payload) before the server closes."""
    server = start_server("--users", str(users_file))
    request = socks5_request_bytes(*echo_target.address)
    wrong = b"\x01\x05alice\x05wrong"
    received, end = exchange(b"\x05\x01\x02" + wrong + request, address=server.address)
    assert (received, end) == (b"\x05\x02\x01\x01", "eof")
    received, end = exchange(b"\x05\x01\x02" + CREDENTIALS + request + b"payload", address=server.address)
    assert received[:4] == b"\x05\x02\x01\x00" and end == "eof", received.hex()
    assert split_replies(received[4:14], 5) == [0]
    assert received[14:] == b"payload"


UNENCODABLE_NAMES = {
    # Printable ASCII, so the protocol passes them on; Python's idna codec refuses them.
    "socks5-empty-label": b"\x05\x01\x00" + socks5_request_bytes("a..b", 80),
    "socks5-label-of-64": b"\x05\x01\x00" + socks5_request_bytes("a" * 64 + ".test", 80),
    "socks4a-label-of-64": socks4_request(1, None, name=b"a" * 64 + b".test", port=80),
}


@pytest.mark.netns
def test_a_name_the_resolver_cannot_encode_is_answered_and_closed(netns_rig):
    """A CONNECT to a printable name no DNS name can be (an empty label, a label of 64
    bytes) is answered "host unreachable" (SOCKS4a: rejected) and closed, like any name
    that does not resolve, and the session's descriptors are given back."""
    rig = netns_rig("--connect-timeout", "2", "--handshake-timeout", "2", workers=1)

    def one(data: bytes) -> tuple[bytes, str]:
        return exchange(data, address=rig.server.address, timeout_s=5)  # the deadlines are 2 s

    with rig.pool(len(UNENCODABLE_NAMES)) as pool:
        outcomes = dict(zip(UNENCODABLE_NAMES, pool.map(one, UNENCODABLE_NAMES.values()), strict=True))
    assert outcomes == {
        "socks5-empty-label": (b"\x05\x00" + socks5_failure(0x04), "eof"),
        "socks5-label-of-64": (b"\x05\x00" + socks5_failure(0x04), "eof"),
        "socks4a-label-of-64": (SOCKS4_REJECTED, "eof"),
    }
    rig.watch.assert_healthy()


@pytest.mark.netns
def test_a_resolver_that_never_answers_is_cut_at_the_connect_deadline(netns_rig):
    """A DNS server that swallows queries (inside the namespace, on the 127.0.0.1 that its
    resolv.conf names): the session answers "TTL expired" at --connect-timeout instead of
    waiting for the resolver's own timeouts."""
    rig = netns_rig("--connect-timeout", "0.3", workers=1)
    black_hole = call_in_netns(rig.server.pid, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    with black_hole:
        black_hole.bind(("127.0.0.1", 53))
        received, end = call_in_netns(rig.server.pid, exchange,
                                      b"\x05\x01\x00" + socks5_request_bytes("never.answered.test", 80),
                                      address=rig.server.address, timeout_s=10)
        # 0x06, not the 0x04 that the resolver's own give-up would have become
        assert (received, end) == (b"\x05\x00" + socks5_failure(0x06), "eof")
        assert black_hole.recv(512)  # the query did arrive: it was the answer that never came
    rig.server.wait_for_log(r"reply=ttl_expired .*'never\.answered\.test' did not resolve in time")
    rig.assert_fresh_client_served()
