"""BIND through a real ``fastsocks`` (RFC 1928 §4 and §6; the SOCKS4 text, "2) BIND"),
spoken raw: two replies, data both ways through the relay, only the expected peer let
in, the bounded wait, and a client that leaves while waiting."""

from __future__ import annotations

import socket
import struct

import pytest

from support import read_socks5_reply, recv_exact, socks5_request_bytes, wait_until

TIMEOUT_S = 10


def socks5_bind(proxy, expected_host: str, expected_port: int = 0):
    """Greeting and BIND; returns the control socket and the first reply's address."""
    control = socket.create_connection(proxy, timeout=TIMEOUT_S)
    control.sendall(b"\x05\x01\x00" + socks5_request_bytes(expected_host, expected_port, command=2))
    assert recv_exact(control, 2) == b"\x05\x00"
    code, host, port = read_socks5_reply(control)
    assert code == 0, f"first BIND reply {code:#04x}"
    return control, (host, port)


def connect_from(source_ip: str, address) -> socket.socket:
    peer = socket.socket()
    peer.settimeout(TIMEOUT_S)
    peer.bind((source_ip, 0))
    peer.connect(address)
    return peer


def test_socks5_bind_two_replies_then_data_both_ways(start_server):
    server = start_server()
    control, bound = socks5_bind(server.address, "127.0.0.1")
    assert bound[0] == "127.0.0.1" and bound[1] != 0      # reachable, never 0.0.0.0
    with control, connect_from("127.0.0.1", bound) as peer:
        code, host, port = read_socks5_reply(control)
        assert (code, host, port) == (0, *peer.getsockname())
        peer.sendall(b"from the peer")
        assert recv_exact(control, 13) == b"from the peer"
        control.sendall(b"from the client")
        assert recv_exact(peer, 15) == b"from the client"
    server.wait_for_log(r"proto=socks5 cmd=bind dest=127\.0\.0\.1:0 reply=succeeded up=15 down=13 .*end=")


def test_bind_lets_only_the_expected_peer_in(start_server):
    server = start_server()
    control, bound = socks5_bind(server.address, "127.0.0.2")
    with control:
        with connect_from("127.0.0.1", bound) as intruder:
            assert intruder.recv(10) == b""                 # closed by the proxy
        server.wait_for_log(r"BIND: closed a connection from 127\.0\.0\.1:\d+, expecting 127\.0\.0\.2")
        with connect_from("127.0.0.2", bound) as peer:
            code, host, port = read_socks5_reply(control)
            assert (code, host) == (0, "127.0.0.2")
            peer.sendall(b"ok")
            assert recv_exact(control, 2) == b"ok"


def test_bind_wait_is_bounded(start_server):
    server = start_server("--bind-timeout", "1")
    control, bound = socks5_bind(server.address, "127.0.0.1")
    with control:
        code, _, _ = read_socks5_reply(control)
        assert code == 0x06
        assert control.recv(1) == b""
    server.wait_for_log(r"cmd=bind .*reply=ttl_expired .*no peer connected")
    with pytest.raises(OSError):                            # the listener is gone
        connect_from("127.0.0.1", bound).close()


def test_client_leaving_during_the_wait_closes_the_listener(start_server):
    server = start_server()
    control, bound = socks5_bind(server.address, "127.0.0.1")
    control.close()
    server.wait_for_log(r"cmd=bind .*client closed while waiting for the BIND peer")

    def refused():
        try:
            connect_from("127.0.0.1", bound).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_until(refused, what="the BIND listener to close")


def test_socks4_bind(start_server):
    server = start_server()
    control = socket.create_connection(server.address, timeout=TIMEOUT_S)
    with control:
        control.sendall(struct.pack("!BBH", 4, 2, 0) + socket.inet_aton("127.0.0.1") + b"dave\x00")
        first = recv_exact(control, 8)
        assert first[:2] == b"\x00\x5a"
        bound = (socket.inet_ntoa(first[4:8]), struct.unpack("!H", first[2:4])[0])
        assert bound[0] == "127.0.0.1"
        with connect_from("127.0.0.1", bound) as peer:
            second = recv_exact(control, 8)
            assert second[:2] == b"\x00\x5a"
            assert (socket.inet_ntoa(second[4:8]), struct.unpack("!H", second[2:4])[0]) == peer.getsockname()
            peer.sendall(b"ping")
            assert recv_exact(control, 4) == b"ping"
    server.wait_for_log(r"proto=socks4 user='dave' cmd=bind dest=127\.0\.0\.1:0 reply=succeeded")


def test_bind_any_peer_and_advertised_address(start_server):
    server = start_server("--bind-any-peer", "--advertise", "127.0.0.9")
    control, bound = socks5_bind(server.address, "127.0.0.2")
    with control:
        assert bound[0] == "127.0.0.9"                       # what the peer is told to use
        with connect_from("127.0.0.1", ("127.0.0.1", bound[1])) as peer:   # not 127.0.0.2: let in
            code, host, _ = read_socks5_reply(control)
            assert (code, host) == (0, "127.0.0.1")
            peer.sendall(b"any")
            assert recv_exact(control, 3) == b"any"
