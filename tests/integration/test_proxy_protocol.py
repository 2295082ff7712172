"""Listeners behind a balancer: PROXY protocol v1/v2 headers, from trusted addresses only.
The address a header names drives the rules and the logs; everything else is closed, logged."""

from __future__ import annotations

import re
import socket
import time

import pytest

from fastsocks.protocol.proxy import encode_v1, encode_v2
from support import read_socks5_reply, recv_exact, socks5_request_bytes, wait_until

PROXIED = re.compile(r"(\d+\.\d+\.\d+\.\d+):(\d+) \(PROXY protocol\)")


def proxied_address(server) -> tuple[str, int]:
    host, port = server.wait_for_log(PROXIED).groups()
    return host, int(port)


def through(address, header: bytes, target_port: int, payload: bytes = b"hello", together: bool = False):
    """Header, then SOCKS5 CONNECT to target_port and an echo; the reply code (None: closed)."""
    with socket.create_connection(address, timeout=10) as sock:
        greeting = b"\x05\x01\x00"
        if together:
            sock.sendall(header + greeting)  # one segment: the greeting trails the header
        else:
            sock.sendall(header)
            time.sleep(0.05)
            sock.sendall(greeting)
        try:
            if recv_exact(sock, 2) != b"\x05\x00":
                return None
            sock.sendall(socks5_request_bytes("127.0.0.1", target_port))
            code, _, _ = read_socks5_reply(sock)
        except (ConnectionError, AssertionError, EOFError, OSError):
            return None
        if code == 0:
            sock.sendall(payload)
            assert recv_exact(sock, len(payload)) == payload
        return code


def closed_by_server(address, data: bytes) -> bool:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        try:
            return sock.recv(100) == b""
        except ConnectionResetError:
            return True


@pytest.fixture
def behind(start_server, tmp_path):
    def start(*extra: str, rules: str = "", trusted: str = "127.0.0.1/32"):
        config = tmp_path / "fastsocks.toml"
        config.write_text(f"""
[server]
listen = ["127.0.0.1:0", {{ address = "127.0.0.1:0", proxy_protocol = true }}]
trusted_proxies = ["{trusted}"]
{rules}
""")
        return start_server("--config", str(config), *extra, listen=False)
    return start


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("together", [False, True], ids=["apart", "one-segment"])
def test_the_header_names_the_client_of_the_session(behind, echo_target, version, together):
    server = behind()
    address = proxied_address(server)
    encode = encode_v1 if version == 1 else encode_v2
    header = encode(("203.0.113.7", 40001), address)
    assert through(address, header, echo_target.port, together=together) == 0
    server.wait_for_log(r"client=203\.0\.113\.7:40001 proto=socks5 cmd=connect dest=127\.0\.0\.1:%d "
                        r"reply=succeeded up=5 down=5" % echo_target.port)


def test_ipv6_clients_from_a_v2_header(behind, echo_target):
    server = behind()
    address = proxied_address(server)
    assert through(address, encode_v2(("2001:db8::5", 443), ("2001:db8::1", 1080)), echo_target.port) == 0
    server.wait_for_log(r"client=\[2001:db8::5\]:443 proto=socks5")


def test_rules_see_the_real_client(behind, echo_target):
    server = behind(rules='[[rules]]\naction = "deny"\nclient = ["198.51.100.0/24"]\n\n'
                          '[[rules]]\naction = "allow"\nclient = ["203.0.113.0/24"]\n')
    address = proxied_address(server)
    assert through(address, encode_v1(("198.51.100.9", 5000), address), echo_target.port) is None
    server.wait_for_log(r"client=198\.51\.100\.9:5000 closed at accept: denied by rule #1")
    assert through(address, encode_v2(("203.0.113.8", 5001), address), echo_target.port) == 0
    server.wait_for_log(r"client=203\.0\.113\.8:5001 proto=socks5 cmd=connect")
    # Without a header the plain listener sees 127.0.0.1, which no rule lets in.
    assert through(server.address, b"", echo_target.port) is None


def test_a_header_from_outside_trusted_proxies_is_refused(behind, echo_target):
    server = behind(trusted="10.0.0.0/8")
    address = proxied_address(server)
    assert closed_by_server(address, encode_v1(("203.0.113.7", 1), address) + b"\x05\x01\x00")
    server.wait_for_log(r"client=127\.0\.0\.1:\d+ connected to a PROXY protocol listener from outside "
                        r"trusted_proxies: closed")
    assert server.count_log("proto=socks5") == 0


@pytest.mark.parametrize("data, why", [
    (b"\x05\x01\x00", "neither a PROXY v1 line nor the v2 signature"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n", "expected 'PROXY TCP4"),
    (b"PROXY TCP4 ::1 5.6.7.8 80 90\r\n", "is not an IPv4 address"),
    (b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12), "version 3"),
], ids=["socks-direct", "v1-fields", "v1-family", "v2-version"])
def test_a_bad_header_closes_the_connection_with_a_line(behind, data, why):
    server = behind()
    address = proxied_address(server)
    assert closed_by_server(address, data)
    server.wait_for_log(r"client=127\.0\.0\.1:\d+ \(a balancer\) bad PROXY header: .*" + re.escape(why))
    assert server.proc.poll() is None


def test_a_header_too_slow_is_closed_at_the_handshake_timeout(behind):
    server = behind("--handshake-timeout", "0.5")
    address = proxied_address(server)
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 ")
        assert sock.recv(10) == b""
    server.wait_for_log(r"no PROXY header within the handshake timeout: closed")


def test_a_local_header_keeps_the_balancers_address(behind, echo_target):
    server = behind()
    address = proxied_address(server)
    assert through(address, encode_v2(None, None, local=True), echo_target.port) == 0
    server.wait_for_log(r"client=127\.0\.0\.1:\d+ proto=socks5 cmd=connect")


def test_the_plain_listener_beside_it_still_runs_in_the_engine(behind, echo_target):
    server = behind()
    assert through(server.address, b"", echo_target.port) == 0
    wait_until(lambda: server.count_log(r"client=127\.0\.0\.1:\d+ proto=socks5 cmd=connect") == 1)
