"""SOCKS4 and SOCKS4a through a real ``fastsocks``, on the same port as SOCKS5: curl
(--socks4, --socks4a), PySocks and python-socks (local and remote name resolution, with a
USERID), and the raw protocol for the failure replies. Each test checks the exact bytes
that arrived and the session's access-log line.

Every destination is loopback; a name that must fail to resolve is only ever sent to a
server inside a private network namespace.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys

import pytest

from support import (HTTP_BODY, recv_exact, require_client, require_tool, socks5_connect,
                     wait_until)

CLIENT_TIMEOUT_S = 20
PAYLOAD = os.urandom(64 * 1024)


def socks4_request(host: str, port: int, userid: bytes = b"", command: int = 1) -> bytes:
    """A raw SOCKS4 request for an IPv4 literal, or SOCKS4a for a name."""
    try:
        ip, name = socket.inet_aton(host), b""
        socket.inet_pton(socket.AF_INET, host)
    except OSError:
        ip, name = b"\x00\x00\x00\x01", host.encode() + b"\x00"
    return struct.pack("!BBH", 4, command, port) + ip + userid + b"\x00" + name


def echo_exactly(sock: socket.socket, payload: bytes = PAYLOAD) -> bytes:
    sock.sendall(payload)
    return recv_exact(sock, len(payload))


@pytest.mark.parametrize("flag, host", [("--socks4", "127.0.0.1"), ("--socks4a", "localhost"),
                                        ("--socks4a", "127.0.0.1")])
def test_curl_socks4_fetches_the_exact_body(start_server, http_target, flag, host):
    curl = require_tool("curl")
    server = start_server()
    out = subprocess.run([curl, "-sS", "--max-time", str(CLIENT_TIMEOUT_S), flag, f"127.0.0.1:{server.port}",
                          f"http://{host}:{http_target.port}/"],
                         capture_output=True, timeout=CLIENT_TIMEOUT_S + 10,
                         env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")})
    assert out.returncode == 0, out.stderr
    assert out.stdout == HTTP_BODY
    # curl --socks4 resolves names itself; --socks4a hands over the host as written (an IP
    # literal included, which the server then parses as a name).
    proto, dest = ("socks4a", re.escape(host)) if flag == "--socks4a" else ("socks4", r"127\.0\.0\.1")
    server.wait_for_log(rf"proto={proto} cmd=connect dest={dest}:{http_target.port} reply=succeeded")


@pytest.mark.parametrize("rdns", [False, True])
def test_pysocks_socks4_with_userid(start_server, echo_target, rdns):
    try:
        import socks
    except ImportError:
        require_client(False, "PySocks")
    server = start_server()
    sock = socks.socksocket()
    sock.set_proxy(socks.SOCKS4, "127.0.0.1", server.port, rdns=rdns, username="alice")
    sock.settimeout(CLIENT_TIMEOUT_S)
    with sock:
        sock.connect(("localhost" if rdns else "127.0.0.1", echo_target.port))
        assert echo_exactly(sock) == PAYLOAD
    proto, dest = ("socks4a", "localhost") if rdns else ("socks4", r"127\.0\.0\.1")
    server.wait_for_log(rf"proto={proto} user='alice' cmd=connect dest={dest}:{echo_target.port} "
                        rf"reply=succeeded up={len(PAYLOAD)} down={len(PAYLOAD)}")


@pytest.mark.parametrize("rdns", [False, True])
def test_python_socks_socks4(start_server, echo_target, rdns):
    try:
        from python_socks.sync import Proxy
        from python_socks import ProxyType
    except ImportError:
        require_client(False, "python-socks")
    server = start_server()
    proxy = Proxy(ProxyType.SOCKS4, "127.0.0.1", server.port, username="bob", rdns=rdns)
    sock = proxy.connect("localhost" if rdns else "127.0.0.1", echo_target.port, timeout=CLIENT_TIMEOUT_S)
    with sock:
        sock.settimeout(CLIENT_TIMEOUT_S)
        assert echo_exactly(sock) == PAYLOAD
    server.wait_for_log(rf"proto=socks4a? user='bob' cmd=connect dest=\S+:{echo_target.port} reply=succeeded")


def test_socks4_and_socks5_share_the_port(start_server, echo_target):
    server = start_server()
    with socket.create_connection(server.address, timeout=CLIENT_TIMEOUT_S) as s4:
        s4.sendall(socks4_request(*echo_target.address) + b"pipelined")
        assert recv_exact(s4, 8)[:2] == b"\x00\x5a"
        assert recv_exact(s4, 9) == b"pipelined"    # sent behind the request: relayed, not dropped
    s5, (code, _, _) = socks5_connect(server.address, *echo_target.address)
    with s5:
        assert code == 0 and echo_exactly(s5, b"five") == b"five"


def test_socks4_reply_carries_the_real_bound_address(start_server, tcp_target):
    seen = []
    target = tcp_target(lambda conn: seen.append(conn.getpeername()) or conn.recv(1))
    server = start_server()
    with socket.create_connection(server.address, timeout=CLIENT_TIMEOUT_S) as sock:
        sock.sendall(socks4_request(*target.address))
        reply = recv_exact(sock, 8)
        sock.sendall(b"x")
    assert reply[:2] == b"\x00\x5a"
    bound = (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[2:4])[0])
    wait_until(lambda: seen, what="the target to record its peer")
    assert bound == seen[0]


def test_socks4_refused_gets_91_then_close(start_server):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()
    server = start_server()
    with socket.create_connection(server.address, timeout=CLIENT_TIMEOUT_S) as sock:
        sock.sendall(socks4_request("127.0.0.1", closed_port, b"carol"))
        assert recv_exact(sock, 8) == b"\x00\x5b\x00\x00\x00\x00\x00\x00"
        assert sock.recv(1) == b""
    server.wait_for_log(rf"proto=socks4 user='carol' cmd=connect dest=127\.0\.0\.1:{closed_port} "
                        r"reply=connection_refused")


NETNS_CLIENT = r"""
import socket, struct, sys
port, name = int(sys.argv[1]), sys.argv[2].encode()
s = socket.create_connection(("127.0.0.1", port), timeout=20)
s.sendall(struct.pack("!BBH", 4, 1, 80) + b"\0\0\0\x01" + b"\0" + name + b"\0")
reply = b""
while len(reply) < 8:
    chunk = s.recv(8 - len(reply))
    if not chunk:
        break
    reply += chunk
print(reply.hex(), s.recv(1) == b"")
"""


def test_socks4a_unresolvable_name_is_rejected(start_server, netns_prefix):
    prefix, env = netns_prefix
    server = start_server(prefix=prefix, env=env)
    nsenter = require_tool("nsenter")
    out = subprocess.run([nsenter, "-t", str(server.pid), "-n", sys.executable, "-c", NETNS_CLIENT,
                          str(server.port), "no-such-host.fastsocks.test"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["005b000000000000", "True"]
    server.wait_for_log(r"proto=socks4a cmd=connect dest=no-such-host\.fastsocks\.test:80 "
                        r"reply=host_unreachable .*cannot resolve")
