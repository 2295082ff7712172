"""UDP ASSOCIATE through a real ``fastsocks`` (RFC 1928 §7): PySocks' UDP socket, then the
raw protocol — FRAG != 0 dropped, only the client's own source relayed, no datagram in
from a stranger, the association gone with its TCP connection, names resolved, replies
carrying the remote's real address. Every destination is on loopback.

PySocks (1.7.1) cannot speak UDP over IPv6 itself (its ``bind()`` unpacks a 2-tuple from
an AF_INET6 ``getsockname()``), so IPv6 is covered twice: PySocks over IPv4 to an IPv6
destination, and the raw protocol over IPv6 end to end.
"""

from __future__ import annotations

import os
import socket
import struct

import psutil
import pytest

from support import UdpEcho, needs_ipv6, read_socks5_reply, recv_exact, socks5_request_bytes, wait_until

socks = pytest.importorskip("socks", reason="PySocks is not installed")

TIMEOUT_S = 5
UDP_ASSOCIATE = 3


# --------------------------------------------------------------------- the raw protocol


def associate(proxy, dst_host: str = "0.0.0.0", dst_port: int = 0):
    """Greeting and UDP ASSOCIATE; returns the control socket and the relay's address."""
    control = socket.create_connection(proxy, timeout=TIMEOUT_S)
    control.sendall(b"\x05\x01\x00" + socks5_request_bytes(dst_host, dst_port, command=UDP_ASSOCIATE))
    assert recv_exact(control, 2) == b"\x05\x00"
    code, host, port = read_socks5_reply(control)
    assert code == 0, f"UDP ASSOCIATE reply {code:#04x}"
    return control, (host, port)


def wrap(host: str, port: int, payload: bytes, frag: int = 0) -> bytes:
    """RSV FRAG ATYP DST.ADDR DST.PORT DATA (§7); the address part is a request's."""
    return b"\0\0" + bytes([frag]) + socks5_request_bytes(host, port)[3:] + payload


def unwrap(datagram: bytes) -> tuple[str, int, bytes]:
    assert datagram[:3] == b"\0\0\0", datagram
    if datagram[3] == 1:
        host, rest = socket.inet_ntop(socket.AF_INET, datagram[4:8]), datagram[8:]
    else:
        assert datagram[3] == 4, "replies name the remote by its IP address"
        host, rest = socket.inet_ntop(socket.AF_INET6, datagram[4:20]), datagram[20:]
    return host, struct.unpack("!H", rest[:2])[0], rest[2:]


def udp_client(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(TIMEOUT_S)
    return sock


def round_trip(client: socket.socket, relay, echo: UdpEcho, payload: bytes, dest_host: str | None = None):
    """Send ``payload`` to the echo through the relay; return the reply's (host, port, payload)."""
    client.sendto(wrap(dest_host or echo.address[0], echo.address[1], payload), relay)
    datagram, source = client.recvfrom(65536)
    assert source[:2] == tuple(relay)  # replies come from the relay's address
    return unwrap(datagram)


def worker_fds(server) -> int:
    (worker,) = server.wait_workers(1)
    return psutil.Process(worker).num_fds()


# --------------------------------------------------------------------- PySocks


def pysocks_udp(proxy) -> socks.socksocket:
    sock = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.set_proxy(socks.SOCKS5, proxy[0], proxy[1])
    sock.settimeout(TIMEOUT_S)
    return sock


def test_pysocks_udp_to_ipv4_echo(start_server, udp_echo):
    server = start_server()
    echo = udp_echo("127.0.0.1")
    with pysocks_udp(server.address) as sock:
        for payload in (b"hello over udp", b"\0" * 1200, os.urandom(60000)):
            sock.sendto(payload, echo.address)
            assert sock.recvfrom(65536) == (payload, echo.address)
    server.wait_for_log(r"proto=socks5 cmd=udp_associate dest=\S+ reply=succeeded datagrams_up=3 "
                        r"datagrams_down=3 up=61214 down=61214 dropped=0 duration_s=\S+ end=eof")


@needs_ipv6
def test_pysocks_udp_to_ipv6_echo(start_server, udp_echo):
    server = start_server()
    echo = udp_echo("::1")
    with pysocks_udp(server.address) as sock:
        sock.sendto(b"to ::1", echo.address)
        assert sock.recvfrom(100) == (b"to ::1", echo.address)
    assert echo.payloads() == [b"to ::1"]


# --------------------------------------------------------------------- raw protocol


def test_reply_is_bound_where_the_client_reached_us_and_names_the_remote(start_server, udp_echo):
    server = start_server()
    echo = udp_echo()
    control, relay = associate(server.address)
    assert relay[0] == "127.0.0.1" and relay[1] != 0
    with control, udp_client() as client:
        assert round_trip(client, relay, echo, b"ping") == (*echo.address, b"ping")


@needs_ipv6
def test_ipv6_end_to_end(start_server, udp_echo):
    server = start_server("--listen", "[::1]:0")
    echo = udp_echo("::1")
    control, relay = associate(server.address, "::", 0)
    assert relay[0] == "::1"
    with control, udp_client("::1") as client:
        assert round_trip(client, relay, echo, b"six") == ("::1", echo.address[1], b"six")
        echo4 = udp_echo("127.0.0.1")
        # An IPv4-mapped destination leaves as IPv4, and the reply names it as IPv4.
        assert round_trip(client, relay, echo4, b"four", dest_host="::ffff:127.0.0.1") == (*echo4.address, b"four")


def test_fragments_are_dropped(start_server, udp_echo):
    server = start_server()
    echo = udp_echo()
    control, relay = associate(server.address)
    with control, udp_client() as client:
        client.sendto(wrap(*echo.address, b"fragment 1", frag=1), relay)
        client.sendto(wrap(*echo.address, b"last fragment", frag=0x81), relay)
        client.sendto(b"\0\0\0\x01\x7f", relay)  # truncated header
        assert round_trip(client, relay, echo, b"standalone") == (*echo.address, b"standalone")
        assert echo.payloads() == [b"standalone"]
    server.wait_for_log(r"cmd=udp_associate .*datagrams_up=1 datagrams_down=1 .*dropped=3 .*end=eof")


def test_datagrams_from_another_source_are_not_relayed(start_server, udp_echo):
    server = start_server()
    echo = udp_echo()
    control, relay = associate(server.address)                    # DST zeros: the TCP source IP
    with control, udp_client() as client, udp_client("127.0.0.2") as intruder, udp_client() as neighbour:
        intruder.sendto(wrap(*echo.address, b"from 127.0.0.2"), relay)
        assert round_trip(client, relay, echo, b"first from the client") == (*echo.address, b"first from the client")
        neighbour.sendto(wrap(*echo.address, b"same IP, other port"), relay)  # the port is fixed now
        assert round_trip(client, relay, echo, b"second") == (*echo.address, b"second")
        assert echo.payloads() == [b"first from the client", b"second"]
    server.wait_for_log(r"UDP: dropped a datagram from 127\.0\.0\.2:\d+, the association is for 127\.0\.0\.1:0")
    server.wait_for_log(r"cmd=udp_associate .*datagrams_up=2 datagrams_down=2 .*dropped=2 .*end=eof")


def test_a_named_source_port_is_the_only_one_let_in(start_server, udp_echo):
    server = start_server()
    echo = udp_echo()
    with udp_client() as client, udp_client() as other:
        control, relay = associate(server.address, "127.0.0.1", client.getsockname()[1])
        with control:
            other.sendto(wrap(*echo.address, b"not the named port"), relay)
            assert round_trip(client, relay, echo, b"named") == (*echo.address, b"named")
            assert echo.payloads() == [b"named"]


def test_a_stranger_cannot_send_to_the_client(start_server, udp_echo):
    server = start_server()
    echo = udp_echo()
    control, relay = associate(server.address)
    with control, udp_client() as client, udp_client("127.0.0.3") as stranger:
        round_trip(client, relay, echo, b"open the way")
        (_, proxy_side), = echo.received                      # the proxy's remote-facing address
        stranger.sendto(b"injected", proxy_side)
        # Had the stranger's datagram been relayed it would arrive before this echo.
        assert round_trip(client, relay, echo, b"again") == (*echo.address, b"again")
    server.wait_for_log(r"cmd=udp_associate .*datagrams_down=2 .*dropped=1 .*end=eof")


def test_domain_destination_is_resolved_and_the_reply_names_the_ip(start_server, udp_echo):
    server = start_server()
    sockaddr = socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)[0][4]
    echo = udp_echo(sockaddr[0])                      # where the server's resolver sends "localhost"
    control, relay = associate(server.address)
    with control, udp_client() as client:
        for payload in (b"by name", b"by name, cached"):
            assert round_trip(client, relay, echo, payload, dest_host="localhost") == (*echo.address, payload)


def test_the_association_ends_with_its_tcp_connection(start_server, udp_echo):
    server = start_server()
    echo = udp_echo()
    warm_up, _ = associate(server.address)          # the worker has booted, and opened what it keeps
    warm_up.close()
    server.wait_for_log(r"cmd=udp_associate .*datagrams_up=0 .*end=eof")
    before = worker_fds(server)
    control, relay = associate(server.address)
    with udp_client() as client:
        round_trip(client, relay, echo, b"while it lasts")
        control.close()
        server.wait_for_log(r"cmd=udp_associate dest=0\.0\.0\.0:0 reply=succeeded datagrams_up=1 "
                            r"datagrams_down=1 up=14 down=14 dropped=0 duration_s=\S+ end=eof")
        client.sendto(wrap(*echo.address, b"too late"), relay)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(relay)                         # the relay's port is free: nothing relays there
    assert echo.payloads() == [b"while it lasts"]
    assert wait_until(lambda: worker_fds(server) == before or None, what=f"worker fds back to {before}")


def test_idle_associations_end(start_server, udp_echo):
    server = start_server("--udp-idle-timeout", "0.5")
    control, _ = associate(server.address)
    with control:
        server.wait_for_log(r"cmd=udp_associate .*datagrams_up=0 .*end=idle")
        assert control.recv(1) == b""                 # the TCP connection is closed with it


def test_worker_shutdown_ends_associations(start_server):
    server = start_server("--graceful-timeout", "0")
    control, _ = associate(server.address)
    with control:
        server.stop()
        assert server.count_log(r"cmd=udp_associate .*end=shutdown") == 1


def test_associations_per_client_are_capped(start_server):
    server = start_server("--max-udp-per-client", "1")
    first, _ = associate(server.address)
    with first, socket.create_connection(server.address, timeout=TIMEOUT_S) as second:
        second.sendall(b"\x05\x01\x00" + socks5_request_bytes("0.0.0.0", 0, command=UDP_ASSOCIATE))
        assert recv_exact(second, 2) == b"\x05\x00"
        assert read_socks5_reply(second)[0] == 0x01
    server.wait_for_log(r"cmd=udp_associate .*reply=general_failure .*1 associations for 127\.0\.0\.1")


def test_advertised_address_goes_in_the_reply(start_server, udp_echo):
    """Behind NAT the relay's own address is useless to clients: --advertise replaces it
    in the reply; the relay still listens on the address the client reached."""
    server = start_server("--advertise", "127.0.0.9")
    echo = udp_echo()
    control, relay = associate(server.address)
    with control:
        assert relay[0] == "127.0.0.9"
        with udp_client() as client:
            assert round_trip(client, ("127.0.0.1", relay[1]), echo, b"via the real address") \
                == (*echo.address, b"via the real address")


def test_udp_bytes_count_in_the_servers_totals(start_server, udp_echo):
    server = start_server()
    echo = udp_echo()
    control, relay = associate(server.address)
    with udp_client() as client:
        for payload in (b"a" * 100, b"b" * 200):
            round_trip(client, relay, echo, payload)
    control.close()
    server.wait_for_log(r"cmd=udp_associate .*up=300 down=300 ")
    assert server.stop() == 0
    server.wait_for_log(r"stopped: accepted per worker \[1\], bytes up 300, down 300")
