"""Egress addresses: outbound connections leave from the configured 127.0.0.x sources, in
turn or sticky per client or user, from the engine's front door (a SOCKS5 CONNECT to an
address) and from the Python session (a name, a password, HTTP) alike; a rule's own
egress; a destination of a family with no egress address. The target says which source
it saw."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import threading

import pytest

from fastsocks._relay_types import egress_index
from support import hash_line, read_socks5_reply, recv_exact, require_tool, socks5_request_bytes

TIMEOUT_S = 10


class SourceTarget:
    """A loopback target that answers each connection with the source address it saw."""

    def __init__(self, tcp_target) -> None:
        self.seen: list[str] = []
        self.lock = threading.Lock()
        self.target = tcp_target(self.handle)
        self.port = self.target.port

    def handle(self, conn: socket.socket) -> None:
        source = conn.getpeername()[0]
        with self.lock:
            self.seen.append(source)
        conn.sendall(f"HTTP/1.0 200 OK\r\nContent-Length: {len(source)}\r\n\r\n{source}".encode())


@pytest.fixture
def sources(tcp_target):
    return SourceTarget(tcp_target)


def through(proxy, host: str, port: int, source: str = "127.0.0.1", user: bytes = b"", password: bytes = b"") -> str:
    """One SOCKS5 CONNECT from ``source``: the source address the target saw."""
    with socket.create_connection(proxy, timeout=TIMEOUT_S, source_address=(source, 0)) as sock:
        if user:
            sock.sendall(b"\x05\x01\x02")
            assert recv_exact(sock, 2) == b"\x05\x02"
            sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            assert recv_exact(sock, 2) == b"\x01\x00"
        else:
            sock.sendall(b"\x05\x01\x00")
            assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(socks5_request_bytes(host, port))
        code, _, _ = read_socks5_reply(sock)
        assert code == 0, f"reply {code}"
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.partition(b"\r\n\r\n")[2].decode()


def test_round_robin_from_the_front_door_and_the_session(start_server, sources):
    server = start_server("--egress", "127.0.0.2", "--egress", "127.0.0.3")
    engine = [through(server.address, "127.0.0.1", sources.port) for _ in range(4)]  # the front door's
    session = [through(server.address, "localhost", sources.port) for _ in range(4)]  # a name: the session's
    for seen in (engine, session):
        assert sorted(seen) == ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"]
        assert seen[0] != seen[1] and seen[1] != seen[2]  # in turn
    server.wait_for_log(rf"dest=localhost:{sources.port} reply=succeeded")


def test_sticky_client_keeps_each_client_on_one_address_on_both_paths(start_server, sources):
    server = start_server("--egress", "127.0.0.2", "--egress", "127.0.0.3", "--egress", "127.0.0.4",
                          "--egress-rotation", "sticky-client")
    egress = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    for client in ("127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8"):
        expected = egress[egress_index(ipaddress.ip_address(client).packed, 3)]
        seen = {through(server.address, host, sources.port, source=client)
                for host in ("127.0.0.1", "localhost", "127.0.0.1")}
        assert seen == {expected}, client


def test_sticky_user_keeps_each_user_on_one_address(start_server, sources, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("".join(hash_line(name, "pw") for name in ("alice", "bob", "carol")))
    server = start_server("--users", str(users), "--egress", "127.0.0.2", "--egress", "127.0.0.3",
                          "--egress-rotation", "sticky-user")
    for name in (b"alice", b"bob", b"carol"):
        expected = ["127.0.0.2", "127.0.0.3"][egress_index(name, 2)]
        seen = {through(server.address, "127.0.0.1", sources.port, source=source, user=name, password=b"pw")
                for source in ("127.0.0.5", "127.0.0.6")}  # from anywhere: the user decides
        assert seen == {expected}, name


def test_a_rule_of_its_own_and_http_clients(start_server, sources, tcp_target, tmp_path):
    other = SourceTarget(tcp_target)
    config = tmp_path / "fastsocks.toml"
    config.write_text(f'[server]\negress = ["127.0.0.2"]\n\n[[rules]]\naction = "allow"\nport = [{other.port}]\n'
                      f'egress = ["127.0.0.9"]\n\n[[rules]]\naction = "allow"\n')
    server = start_server("--config", str(config))
    assert through(server.address, "127.0.0.1", other.port) == "127.0.0.9"
    assert through(server.address, "127.0.0.1", sources.port) == "127.0.0.2"
    out = subprocess.run([require_tool("curl"), "-sS", "--max-time", str(TIMEOUT_S), "-x",
                          f"http://127.0.0.1:{server.port}", f"http://127.0.0.1:{other.port}/"],
                         capture_output=True, timeout=TIMEOUT_S + 10,
                         env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")})
    assert out.stdout == b"127.0.0.9", out.stderr


def test_a_family_without_an_egress_address_is_network_unreachable(start_server, tcp_target):
    try:
        v6 = tcp_target(lambda conn: conn.sendall(b"v6"), host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = start_server("--egress", "127.0.0.2")
    for host in ("::1",):
        with socket.create_connection(server.address, timeout=TIMEOUT_S) as sock:
            sock.sendall(b"\x05\x01\x00" + socks5_request_bytes(host, v6.port))
            assert recv_exact(sock, 2) == b"\x05\x00"
            assert read_socks5_reply(sock)[0] == 3
    server.wait_for_log(r"reply=network_unreachable .*Network is unreachable")
    assert v6.connections == 0
