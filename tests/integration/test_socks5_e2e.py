"""SOCKS5 end to end through a real ``fastsocks``, spoken raw with the shared helpers of
tests/support.py: bulk transfers checked by sha256, half-close both ways, pipelining, the
bound address in the CONNECT reply, failure replies, every malformed input of the parser
and the handshake deadline, plus two regressions (the relay's run queue, the resolver
cache).

Every destination is on loopback. A name that must fail to resolve, and every malformed
domain name (a buggy server could hand it to the resolver), is only sent to a server in
a private network namespace (``netns_prefix``), reached with ``nsenter``.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import re
import select
import socket
import struct
import subprocess
import sys

import pytest

from support import (read_socks5_reply, recv_exact, require_ipv6, require_tool, socks5_connect,
                     socks5_request_bytes, wait_until)

MIB = 1 << 20
BULK_BLOCKS = 100  # 100 MiB each way
GREETING = b"\x05\x01\x00"
RECV_TIMEOUT_S = 10.0


# --------------------------------------------------------------------- small helpers


def recv_until_eof(sock: socket.socket, limit: int = 1 << 16) -> bytes:
    """Everything the peer sends before closing; fails on a hang (socket timeout) or on
    more than ``limit`` bytes."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        assert len(data) <= limit, f"more than {limit} bytes and still no EOF"
    return data


def assert_closed_by_server(sock: socket.socket) -> None:
    """The server closed the connection cleanly: EOF (not a hang, not a reset)."""
    sock.settimeout(RECV_TIMEOUT_S)
    assert sock.recv(1) == b"", "the server sent more bytes instead of closing"


def echo_round_trip(proxy: tuple[str, int], target, payload: bytes = b"still serving") -> None:
    sock, (code, _, _) = socks5_connect(proxy, *target.address)
    with sock:
        assert code == 0
        sock.sendall(payload)
        assert recv_exact(sock, len(payload)) == payload


def refused_port(host: str) -> int:
    """A loopback port nothing listens on: bound, noted, closed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def access_line(server, pattern: str) -> re.Match:
    return server.wait_for_log(r"fastsocks\.access: .*" + pattern)


# --------------------------------------------------------------------- bulk transfers


def seeded_blocks(seed: int, count: int = BULK_BLOCKS):
    """``count`` distinct 1 MiB blocks, the same for the same seed: nothing repeats, so a
    lost, duplicated or reordered chunk changes the hash."""
    rng = random.Random(seed)
    for _ in range(count):
        yield rng.randbytes(MIB)


def test_100_mib_download_arrives_intact(start_server, tcp_target):
    sent: queue.Queue = queue.Queue()

    def source(conn: socket.socket) -> None:
        digest = hashlib.sha256()
        for block in seeded_blocks(1):
            digest.update(block)
            conn.sendall(block)
        sent.put(digest.hexdigest())

    target = tcp_target(source)
    server = start_server()
    sock, (code, _, _) = socks5_connect(server.address, *target.address, timeout_s=30)
    with sock:
        assert code == 0
        digest, received = hashlib.sha256(), 0
        buffer = bytearray(MIB)
        while n := sock.recv_into(buffer):
            digest.update(memoryview(buffer)[:n])
            received += n
    assert received == BULK_BLOCKS * MIB
    assert digest.hexdigest() == sent.get(timeout=30)
    access_line(server, rf"dest=127\.0\.0\.1:{target.port} reply=succeeded up=0 "
                        rf"down={BULK_BLOCKS * MIB} .* end=eof")


def test_100_mib_upload_arrives_intact(start_server, tcp_target):
    def sink(conn: socket.socket) -> None:
        digest, received = hashlib.sha256(), 0
        buffer = bytearray(MIB)
        while n := conn.recv_into(buffer):
            digest.update(memoryview(buffer)[:n])
            received += n
        conn.sendall(f"{received} {digest.hexdigest()}".encode())

    target = tcp_target(sink)
    server = start_server()
    sock, (code, _, _) = socks5_connect(server.address, *target.address, timeout_s=30)
    with sock:
        assert code == 0
        digest = hashlib.sha256()
        for block in seeded_blocks(2):
            digest.update(block)
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
        answer = recv_until_eof(sock)
    assert answer.decode() == f"{BULK_BLOCKS * MIB} {digest.hexdigest()}"
    access_line(server, rf"dest=127\.0\.0\.1:{target.port} reply=succeeded up={BULK_BLOCKS * MIB} "
                        rf"down={len(answer)} .* end=eof")


def test_copy_mode_responses_over_one_budget_all_arrive(start_server, tcp_target):
    """Sessions of request/response rounds whose responses (1.3-1.6 MB) exceed what the
    copy-mode relay moves per call (16 x 64 KiB), so a session regularly ends a call
    with work left: every response must still arrive whole. With the bug, some round
    hangs with the rest of its response unread in the proxy (here most sessions hit it
    within 40 rounds; the test tries up to 25 sessions)."""
    sizes = [1_300_000, 1_600_000]
    blobs = {size: os.urandom(size) for size in sizes}

    def respond(conn: socket.socket) -> None:
        while request := conn.recv(16):
            conn.sendall(blobs[int(request)])

    target = tcp_target(respond)
    server = start_server("--no-splice")
    for session_no in range(25):
        size = sizes[session_no % len(sizes)]
        # A round takes milliseconds; 3 s without progress is a hang.
        sock, (code, _, _) = socks5_connect(server.address, *target.address, timeout_s=3)
        with sock:
            assert code == 0
            for round_no in range(40):
                sock.sendall(b"%d" % size)
                try:
                    response = recv_exact(sock, size)
                except TimeoutError:
                    pytest.fail(f"session {session_no}, round {round_no}: "
                                f"the {size}-byte response stalled in the proxy")
                assert response == blobs[size], f"session {session_no}, round {round_no}: corrupted"


# --------------------------------------------------------------------- half-close


def test_client_half_close_still_gets_the_whole_response(start_server, tcp_target):
    """The client sends its request and shuts down its write side; the target answers
    only after reading EOF; the client gets the whole answer, then EOF."""
    request = os.urandom(300_000)
    response_body = os.urandom(3 * MIB)

    def answer_after_eof(conn: socket.socket) -> None:
        digest, received = hashlib.sha256(), 0
        while chunk := conn.recv(65536):
            digest.update(chunk)
            received += len(chunk)
        conn.sendall(f"{received} {digest.hexdigest()}\n".encode() + response_body)

    target = tcp_target(answer_after_eof)
    server = start_server()
    sock, (code, _, _) = socks5_connect(server.address, *target.address)
    with sock:
        assert code == 0
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = recv_until_eof(sock, limit=4 * MIB)
    head, _, body = answer.partition(b"\n")
    assert head.decode() == f"{len(request)} {hashlib.sha256(request).hexdigest()}"
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(response_body).hexdigest()
    access_line(server, rf"dest=127\.0\.0\.1:{target.port} reply=succeeded up={len(request)} "
                        rf"down={len(answer)} .* end=eof")


def test_target_half_close_still_gets_the_whole_upload(start_server, tcp_target):
    """The other way round: the target says its piece and shuts down its write side; the
    client sees EOF, keeps sending, and every byte still reaches the target."""
    banner = b"hello, then I only listen\n"
    upload = os.urandom(2 * MIB)
    got: queue.Queue = queue.Queue()

    def talk_then_listen(conn: socket.socket) -> None:
        conn.sendall(banner)
        conn.shutdown(socket.SHUT_WR)
        digest, received = hashlib.sha256(), 0
        while chunk := conn.recv(65536):
            digest.update(chunk)
            received += len(chunk)
        got.put((received, digest.hexdigest()))

    target = tcp_target(talk_then_listen)
    server = start_server()
    sock, (code, _, _) = socks5_connect(server.address, *target.address)
    with sock:
        assert code == 0
        assert recv_until_eof(sock) == banner
        sock.sendall(upload)
        sock.shutdown(socket.SHUT_WR)
        assert got.get(timeout=30) == (len(upload), hashlib.sha256(upload).hexdigest())
    access_line(server, rf"dest=127\.0\.0\.1:{target.port} reply=succeeded up={len(upload)} "
                        rf"down={len(banner)} .* end=eof")


# --------------------------------------------------------------------- pipelining


@pytest.mark.parametrize("size", [15, 200_000], ids=["small", "200KB"])
def test_pipelined_greeting_request_and_payload_in_one_send(start_server, echo_target, size):
    """Greeting, CONNECT and the first payload bytes in one send() (microsocks hangs)."""
    payload = os.urandom(size)
    server = start_server()
    sock, (code, _, _) = socks5_connect(server.address, *echo_target.address, pipelined=payload)
    with sock:
        assert code == 0
        assert hashlib.sha256(recv_exact(sock, size)).digest() == hashlib.sha256(payload).digest()
    access_line(server, rf"dest=127\.0\.0\.1:{echo_target.port} reply=succeeded up={size} down={size} ")


def test_pipelined_request_then_half_close_gets_the_echo_then_eof(start_server, echo_target):
    """Greeting, CONNECT, payload and the client's FIN all before the reply (like
    ``nc -N``): the payload is echoed back whole, then the session ends with EOF."""
    payload = os.urandom(100_000)
    server = start_server()
    with socket.create_connection(server.address, timeout=RECV_TIMEOUT_S) as sock:
        sock.sendall(GREETING + socks5_request_bytes(*echo_target.address) + payload)
        sock.shutdown(socket.SHUT_WR)
        assert recv_exact(sock, 2) == b"\x05\x00"
        code, _, _ = read_socks5_reply(sock)
        assert code == 0
        echoed = recv_until_eof(sock, limit=len(payload))
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    access_line(server, rf"dest=127\.0\.0\.1:{echo_target.port} reply=succeeded "
                        rf"up={len(payload)} down={len(payload)} .* end=eof")


def test_greeting_offering_several_methods_gets_no_auth(start_server, echo_target):
    server = start_server()
    with socket.create_connection(server.address, timeout=RECV_TIMEOUT_S) as sock:
        sock.sendall(b"\x05\x03\x02\x01\x00")
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(socks5_request_bytes(*echo_target.address) + b"hi")
        assert read_socks5_reply(sock)[0] == 0
        assert recv_exact(sock, 2) == b"hi"


# --------------------------------------------------------------------- names


def test_second_connect_to_the_same_name_succeeds_too(start_server, echo_target):
    server = start_server()  # one worker: both sessions share its resolver cache
    for attempt in range(1, 4):
        sock, (code, _, _) = socks5_connect(server.address, "localhost", echo_target.port)
        with sock:
            assert code == 0, f"CONNECT localhost:{echo_target.port} #{attempt} got reply {code:#04x}"
            sock.sendall(b"attempt %d" % attempt)
            assert recv_exact(sock, 9) == b"attempt %d" % attempt
    wait_until(lambda: server.count_log(rf"dest=localhost:{echo_target.port} reply=succeeded") == 3,
               what="three succeeded access lines")


# --------------------------------------------------------------------- the CONNECT reply


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_connect_reply_carries_the_real_outbound_address(start_server, tcp_target, host):
    if ":" in host:
        require_ipv6()
    peers: queue.Queue = queue.Queue()

    def note_peer(conn: socket.socket) -> None:
        peers.put(conn.getpeername()[:2])
        while data := conn.recv(65536):
            conn.sendall(data)

    target = tcp_target(note_peer, host=host)
    server = start_server()
    sock, (code, bound_host, bound_port) = socks5_connect(server.address, host, target.port)
    with sock:
        assert code == 0
        peer_host, peer_port = peers.get(timeout=10)
        assert (bound_host, bound_port) == (peer_host, peer_port)
        assert bound_host not in ("0.0.0.0", "::") and bound_port != 0
        sock.sendall(b"ping")
        assert recv_exact(sock, 4) == b"ping"


# --------------------------------------------------------------------- failure replies


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_connection_refused_gets_reply_5_and_an_access_line(start_server, echo_target, host):
    if ":" in host:
        require_ipv6()
    port = refused_port(host)
    server = start_server()
    sock, (code, _, _) = socks5_connect(server.address, host, port)
    with sock:
        assert code == 0x05
        assert_closed_by_server(sock)
    shown = f"[{host}]" if ":" in host else host
    access_line(server, rf"dest={re.escape(shown)}:{port} reply=connection_refused .*Connection refused")
    echo_round_trip(server.address, echo_target)


# --------------------------------------------------------------------- malformed input

REQUEST_BAD_CASES = {
    # id: (request bytes after the greeting, expected reply code, access-log regex)
    "atyp-0x02": (b"\x05\x01\x00\x02\x7f\x00\x00\x01\x00\x50", 0x08,
                  r"reply=address_type_not_supported .*unknown address type 0x02"),
    "atyp-0xff": (b"\x05\x01\x00\xff\x7f\x00\x00\x01\x00\x50", 0x08,
                  r"reply=address_type_not_supported .*unknown address type 0xff"),
    "cmd-0x09": (b"\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50", 0x07,
                 r"reply=command_not_supported .*unknown command 0x09"),
    "cmd-0x00": (b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x50", 0x07,
                 r"reply=command_not_supported .*unknown command 0x00"),
    "rsv-0x01": (b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50", 0x01,
                 r"reply=general_failure .*reserved byte is 0x01"),
    "request-version-4": (b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", 0x01,
                          r"reply=general_failure .*unsupported SOCKS version 0x04"),
}


@pytest.mark.parametrize("case", list(REQUEST_BAD_CASES))
def test_malformed_request_gets_its_reply_then_close(start_server, echo_target, case):
    request, expected_code, log_pattern = REQUEST_BAD_CASES[case]
    server = start_server()
    with socket.create_connection(server.address, timeout=RECV_TIMEOUT_S) as sock:
        sock.sendall(GREETING)
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(request)
        code, _, _ = read_socks5_reply(sock)
        assert code == expected_code
        assert_closed_by_server(sock)
    access_line(server, log_pattern)
    echo_round_trip(server.address, echo_target)


GREETING_BAD_CASES = {
    # id: (bytes sent, exact bytes the server answers before closing, access-log regex)
    "version-6": (b"\x06\x01\x00", b"", r"reply=- .*not a SOCKS request: first byte 0x06"),
    "tls-hello": (b"\x16\x03\x01\x00\x05hello", b"", r"reply=- .*not a SOCKS request: first byte 0x16"),
    "nmethods-0": (b"\x05\x00", b"\x05\xff", r"reply=no_acceptable .*offers no method"),
    "no-no-auth": (b"\x05\x02\x01\x02", b"\x05\xff", r"no acceptable authentication method"),
}


@pytest.mark.parametrize("case", list(GREETING_BAD_CASES))
def test_malformed_greeting_gets_its_answer_then_close(start_server, echo_target, case):
    sent, expected, log_pattern = GREETING_BAD_CASES[case]
    server = start_server()
    with socket.create_connection(server.address, timeout=RECV_TIMEOUT_S) as sock:
        sock.sendall(sent)
        assert recv_until_eof(sock) == expected
    access_line(server, log_pattern)
    echo_round_trip(server.address, echo_target)


def test_pipelined_garbage_after_a_refused_greeting_is_not_relayed(start_server, echo_target):
    """A greeting without NO_AUTH, followed at once by a CONNECT to a live target: the
    server refuses (05 FF) and closes; the target never sees a connection."""
    server = start_server()
    pipelined = b"\x05\x01\x02" + socks5_request_bytes(*echo_target.address) + b"smuggled"
    with socket.create_connection(server.address, timeout=RECV_TIMEOUT_S) as sock:
        sock.sendall(pipelined)
        assert recv_until_eof(sock) == b"\x05\xff"
    access_line(server, r"no acceptable authentication method")
    assert echo_target.connections == 0
    echo_round_trip(server.address, echo_target)


# --------------------------------------------------------------------- network namespace

# Runs inside the server's network namespace (nsenter -n). argv: proxy port, request hex.
# 1) greeting, then the request; prints the method selection, what follows it, and how
#    the connection ended. 2) A fresh client: an echo listener inside the namespace,
#    reached through the proxy by the name `localhost`.
NETNS_CLIENT = r"""
import json, socket, struct, sys, threading
proxy = ("127.0.0.1", int(sys.argv[1]))
request = bytes.fromhex(sys.argv[2])
out = {}

def read_to_end(sock):
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data, "eof"
            data += chunk
            if len(data) > 65536:
                return data, "flood"
    except socket.timeout:
        return data, "timeout"
    except ConnectionResetError:
        return data, "reset"

def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data

with socket.create_connection(proxy, timeout=10) as s:
    s.sendall(b"\x05\x01\x00")
    out["method"] = recv_exact(s, 2).hex()
    s.sendall(request)
    data, out["end"] = read_to_end(s)
    out["reply"] = data.hex()

listener = socket.create_server(("127.0.0.1", 0))
def echo():
    conn, _ = listener.accept()
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
threading.Thread(target=echo, daemon=True).start()
port = listener.getsockname()[1]
name = b"localhost"
with socket.create_connection(proxy, timeout=10) as s:
    s.sendall(b"\x05\x01\x00\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", port))
    head = recv_exact(s, 12)   # 05 00 + a 10-byte IPv4 reply (or less: then it failed)
    out["fresh_reply"] = head.hex()
    if head[:4] == b"\x05\x00\x05\x00" and len(head) == 12 and head[5] == 1:
        s.sendall(b"fresh client")
        out["fresh_echo"] = recv_exact(s, 12).decode(errors="replace")
print(json.dumps(out))
"""


def netns_exchange(server, request: bytes) -> dict:
    nsenter = require_nsenter()
    run = subprocess.run(
        [nsenter, "-t", str(server.pid), "-n", sys.executable, "-c", NETNS_CLIENT,
         str(server.port), request.hex()],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def require_nsenter() -> str:
    return require_tool("nsenter")


def start_netns_server(start_server, netns_prefix, *args: str):
    prefix, env = netns_prefix
    # A fresh namespace has no other listener: a fixed port is free.
    return start_server("--listen", "127.0.0.1:1080", *args, prefix=prefix, env=env)


def parse_reply(data: bytes) -> tuple[int, bytes]:
    """(reply code, the rest) of a complete IPv4/IPv6 reply at the start of ``data``."""
    assert len(data) >= 4 and data[0] == 5 and data[2] == 0, data
    size = {1: 10, 4: 22}.get(data[3])
    assert size is not None and len(data) >= size, data
    return data[1], data[size:]


def assert_fresh_client_served(out: dict) -> None:
    assert out["fresh_reply"][:4] == "0500", out
    reply = bytes.fromhex(out["fresh_reply"])[2:]
    assert parse_reply(reply)[0] == 0, out
    assert out.get("fresh_echo") == "fresh client", out


@pytest.mark.netns
def test_unresolvable_name_gets_reply_4(start_server, netns_prefix):
    server = start_netns_server(start_server, netns_prefix)
    name = "no-such-host.fastsocks.test"
    out = netns_exchange(server, socks5_request_bytes(name, 80))
    assert out["method"] == "0500"
    code, rest = parse_reply(bytes.fromhex(out["reply"]))
    assert (code, rest, out["end"]) == (0x04, b"", "eof"), out
    access_line(server, rf"dest={re.escape(name)}:80 reply=host_unreachable .*cannot resolve")
    # ... and `localhost` (::1 then 127.0.0.1 in the namespace's hosts file) still works.
    assert_fresh_client_served(out)
    access_line(server, r"dest=localhost:\d+ reply=succeeded up=12 down=12 ")


BAD_DOMAINS = {
    # Names a buggy server would hand to the resolver: only ever sent inside a namespace.
    "empty": b"",
    "nul": b"localhost\x00.fastsocks.test",
    "space": b"local host",
    "trailing-space": b"localhost ",
    "control": b"local\x07host",
    "tab": b"local\thost",
    "del": b"localhost\x7f",
    "non-ascii": "l\u00f6calhost".encode(),
    "latin1": b"localhost\xff",
}


@pytest.mark.netns
@pytest.mark.parametrize("case", list(BAD_DOMAINS))
def test_malformed_domain_gets_reply_1_then_close(start_server, netns_prefix, case):
    name = BAD_DOMAINS[case]
    server = start_netns_server(start_server, netns_prefix)
    request = b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", 80)
    out = netns_exchange(server, request)
    assert out["method"] == "0500"
    code, rest = parse_reply(bytes.fromhex(out["reply"]))
    assert (code, rest, out["end"]) == (0x01, b"", "eof"), out
    expected = "empty domain name" if not name else "domain name"
    access_line(server, rf"reply=general_failure .*{expected}")
    assert server.count_log(r"cannot resolve") == 0
    assert_fresh_client_served(out)


# --------------------------------------------------------------------- handshake deadline


def test_handshake_deadline_cuts_a_silent_client(start_server, echo_target):
    server = start_server("--handshake-timeout", "1")
    with socket.create_connection(server.address, timeout=RECV_TIMEOUT_S) as sock:
        sock.sendall(b"\x05")
        assert sock.recv(16) == b""  # closed by the server, not by our timeout
    access_line(server, r"cmd=- dest=- reply=- .*handshake timed out")
    echo_round_trip(server.address, echo_target)


def test_handshake_deadline_cuts_a_trickling_client(start_server, echo_target):
    """One byte every 0.3 s: each byte arrives well within any per-read timeout, but the
    whole handshake (13 bytes, about 4 s) overruns the 1 s deadline and is cut."""
    server = start_server("--handshake-timeout", "1")
    handshake = GREETING + socks5_request_bytes(*echo_target.address)
    received, sent, closed = b"", 0, False
    with socket.create_connection(server.address, timeout=RECV_TIMEOUT_S) as sock:
        for byte in handshake:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sent += 1
            readable, _, _ = select.select([sock], [], [], 0.3)
            if readable:
                try:
                    chunk = sock.recv(64)
                except ConnectionResetError:
                    closed = True
                    break
                if not chunk:
                    closed = True
                    break
                received += chunk
        if not closed:
            sock.settimeout(RECV_TIMEOUT_S)
            rest = sock.recv(64)
            received += rest
            closed = rest == b""
    assert closed, f"never cut: sent all {sent} bytes, got {received!r}"
    assert sent < len(handshake), f"the whole handshake went through: {received!r}"
    # The greeting may have been answered before the deadline; nothing else was.
    assert received in (b"", b"\x05\x00")
    access_line(server, r"reply=- .*handshake timed out")
    assert echo_target.connections == 0
    echo_round_trip(server.address, echo_target)


def test_a_refusal_survives_bytes_pipelined_behind_the_request(start_server):
    """The server refuses a request that has payload queued behind it: the reply must
    still reach the client. Closing with unread bytes sends RST, which on a Linux kernel
    discards the reply still queued at the client; the client here reads only after the
    server has closed. (gVisor's network stack keeps the data, so in this sandbox the
    test also passes without the fix.)"""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()
    server = start_server()
    with socket.create_connection(server.address, timeout=RECV_TIMEOUT_S) as sock:
        sock.sendall(b"\x05\x01\x00" + socks5_request_bytes("127.0.0.1", closed_port) + b"x" * 60000)
        server.wait_for_log(rf"dest=127\.0\.0\.1:{closed_port} reply=connection_refused", timeout_s=10)
        assert recv_exact(sock, 2) == b"\x05\x00"
        assert read_socks5_reply(sock)[0] == 0x05
