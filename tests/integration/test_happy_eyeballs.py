"""Happy Eyeballs (RFC 8305) in a private network namespace: a name whose IPv6 address
black-holes (its SYNs vanish on a veth pair, no answer ever) and whose IPv4 address
answers. With a connect timeout of a minute, the session still connects at once through
IPv4, because the IPv4 attempt starts a quarter second after the IPv6 one instead of
after its timeout; the rules still judge each address."""

from __future__ import annotations

import os
import socket

import pytest

from support import (TcpTarget, call_in_netns, echo_handler, netns_available, read_socks5_reply, recv_exact,
                     require_client, socks5_request_bytes)

BLACK_HOLE = "2001:db8::5"  # on-link through v0, with a neighbour entry nobody answers for
SETUP = f"""set -e
ip link set lo up
ip link add v0 type veth peer name v1
ip link set v0 up
ip link set v1 up
ip -6 addr add 2001:db8::1/64 dev v0 nodad
ip -6 neigh add {BLACK_HOLE} lladdr 02:00:00:00:00:05 dev v0 nud permanent
mount --bind "$FS_RESOLV" /etc/resolv.conf
mount --bind "$FS_HOSTS" /etc/hosts
exec "$@"
"""
CLIENT_WAIT_S = 20  # a fifth of what a one-after-another connect would need (half of 60 s)


@pytest.fixture
def dual_stack_netns(tmp_path):
    ok, why = netns_available()
    require_client(ok, f"a private network namespace ({why})")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{BLACK_HOLE} dual.test\n127.0.0.1 dual.test\n"
                     f"{BLACK_HOLE} v6only.test\n")
    env = dict(os.environ, FS_RESOLV=str(resolv), FS_HOSTS=str(hosts))
    return ["unshare", "-n", "-m", "--propagation", "private", "sh", "-c", SETUP, "netns"], env


def connect_through(proxy, host: str, port: int) -> tuple[int, bytes]:
    with socket.create_connection(proxy, timeout=CLIENT_WAIT_S) as sock:
        sock.sendall(b"\x05\x01\x00" + socks5_request_bytes(host, port))
        assert recv_exact(sock, 2) == b"\x05\x00"
        code, _, _ = read_socks5_reply(sock)
        if code != 0:
            return code, b""
        sock.sendall(b"both families raced")
        return code, recv_exact(sock, 19)


@pytest.mark.netns
def test_a_black_holed_ipv6_address_costs_a_quarter_second_not_the_timeout(start_server, dual_stack_netns):
    prefix, env = dual_stack_netns
    server = start_server("--connect-timeout", "60", "--access-log-format", "json", prefix=prefix, env=env)
    target = call_in_netns(server.pid, TcpTarget, echo_handler, "127.0.0.1")
    try:
        for _ in range(3):
            code, echoed = call_in_netns(server.pid, connect_through, server.address, "dual.test", target.port)
            assert (code, echoed) == (0, b"both families raced")
        assert target.connections == 3
        server.wait_for_log(rf'"dest":"dual.test:{target.port}","reply":"succeeded"')
    finally:
        target.close()


@pytest.mark.netns
def test_the_rules_judge_each_raced_address(start_server, dual_stack_netns, tmp_path):
    """IPv4 refused by a rule: the race has only the black hole left, and the client gets
    the timeout's reply, not a connection the rules forbid."""
    prefix, env = dual_stack_netns
    config = tmp_path / "fastsocks.toml"
    config.write_text('[[rules]]\naction = "deny"\ndest = ["127.0.0.0/8"]\n[[rules]]\naction = "allow"\n')
    server = start_server("--config", str(config), "--connect-timeout", "1", prefix=prefix, env=env)
    target = call_in_netns(server.pid, TcpTarget, echo_handler, "127.0.0.1")
    try:
        code, _ = call_in_netns(server.pid, connect_through, server.address, "dual.test", target.port)
        assert code == 6  # TTL expired: the IPv6 attempt timed out; IPv4 was never tried
        assert target.connections == 0
        server.wait_for_log(rf"dest=dual\.test:{target.port} reply=ttl_expired .*connect failed: Connection timed out")
    finally:
        target.close()
