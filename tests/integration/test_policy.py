"""Access rules, caps and the brute-force block through a real ``fastsocks --config``.

Every destination is on loopback: the rules deny one loopback target (the "forbidden"
echo) and allow another, and each bypass attempt must reach the forbidden one's port
with nothing: the denial reply, no connection at the target, and the server still
serving the allowed target afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess

import pytest

from support import (call_in_netns, echo_handler, fastsocks_command, process_usage, read_socks5_reply, recv_exact,
                     socks5_connect, socks5_request_bytes, wait_until)

NOT_ALLOWED = 0x02
GENERAL_FAILURE = 0x01
SOCKS4_REJECTED = 0x5B


def write_config(tmp_path, text: str):
    path = tmp_path / "fastsocks.toml"
    path.write_text(text)
    return path


@pytest.fixture
def targets(tcp_target):
    return tcp_target(), tcp_target()  # allowed, forbidden


@pytest.fixture
def guarded(tmp_path, start_server, targets):
    allowed, forbidden = targets
    path = write_config(tmp_path, f"""
[policy]
default = "allow"

[[rules]]
action = "allow"
dest = ["127.0.0.1"]
port = [{allowed.port}]

[[rules]]
action = "deny"
dest = ["127.0.0.0/8", "::1"]
""")
    return start_server("--config", str(path))


def echo_through(proxy, target, payload: bytes = b"still serving") -> bytes:
    sock, (code, _, _) = socks5_connect(proxy, "127.0.0.1", target.port)
    with sock:
        assert code == 0
        sock.sendall(payload)
        return recv_exact(sock, len(payload))


def socks5_reply(proxy, host: str, port: int, command: int = 1) -> int:
    with socket.create_connection(proxy, timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00" + socks5_request_bytes(host, port, command))
        assert recv_exact(sock, 2) == b"\x05\x00"
        code = read_socks5_reply(sock)[0]
        assert sock.recv(1) == b""  # and closed
        return code


def socks5_name_reply(proxy, name: str, port: int) -> int:
    """CONNECT with ATYP 3 (a domain name), whatever the name looks like."""
    with socket.create_connection(proxy, timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00\x05\x01\x00\x03" + bytes([len(name)]) + name.encode() + struct.pack("!H", port))
        assert recv_exact(sock, 2) == b"\x05\x00"
        return read_socks5_reply(sock)[0]


def socks5_mapped_reply(proxy, ipv4: str, port: int) -> int:
    """CONNECT to ::ffff:ipv4 as a 16-byte IPv6 address (ATYP 4)."""
    packed = b"\x00" * 10 + b"\xff\xff" + socket.inet_aton(ipv4)
    with socket.create_connection(proxy, timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x04" + packed + struct.pack("!H", port))
        assert recv_exact(sock, 2) == b"\x05\x00"
        return read_socks5_reply(sock)[0]


def socks4_reply(proxy, port: int, ip: str = "127.0.0.1", name: str | None = None) -> int:
    dst = socket.inet_aton("0.0.0.1" if name else ip)
    request = b"\x04\x01" + struct.pack("!H", port) + dst + b"tester\x00"
    if name:
        request += name.encode() + b"\x00"
    with socket.create_connection(proxy, timeout=10) as sock:
        sock.sendall(request)
        reply = recv_exact(sock, 8)
        assert reply[0] == 0
        return reply[1]


@pytest.mark.parametrize("attempt", [
    "ipv4-literal", "localhost-name", "ipv4-mapped-ipv6", "ip-as-a-name", "decimal-ip-as-a-name",
    "hex-ip-as-a-name", "socks4", "socks4a-localhost",
])
def test_bypass_attempts_are_denied_and_reach_nothing(guarded, targets, attempt):
    allowed, forbidden = targets
    proxy, port = guarded.address, forbidden.port
    if attempt == "ipv4-literal":
        assert socks5_reply(proxy, "127.0.0.1", port) == NOT_ALLOWED
    elif attempt == "localhost-name":
        assert socks5_reply(proxy, "localhost", port) == NOT_ALLOWED  # resolved, then judged
    elif attempt == "ipv4-mapped-ipv6":
        assert socks5_mapped_reply(proxy, "127.0.0.1", port) == NOT_ALLOWED
    elif attempt == "ip-as-a-name":
        assert socks5_name_reply(proxy, "127.0.0.1", port) == NOT_ALLOWED  # ATYP 3 carrying an IP
    elif attempt == "decimal-ip-as-a-name":
        assert socks5_name_reply(proxy, "2130706433", port) == NOT_ALLOWED  # inet_aton reads 127.0.0.1
    elif attempt == "hex-ip-as-a-name":
        assert socks5_name_reply(proxy, "0x7f.1", port) == NOT_ALLOWED
    elif attempt == "socks4":
        assert socks4_reply(proxy, port) == SOCKS4_REJECTED
    elif attempt == "socks4a-localhost":
        assert socks4_reply(proxy, port, name="localhost") == SOCKS4_REJECTED
    guarded.wait_for_log(r"reply=connection_not_allowed .*denied by rule #2 \(.*fastsocks\.toml:\d+\)")
    assert forbidden.connections == 0
    assert echo_through(proxy, allowed) == b"still serving"


def test_this_host_and_the_proxy_itself_are_never_destinations(start_server, echo_target):
    server = start_server()  # no rules at all: everything else is allowed
    assert socks5_reply(server.address, "0.0.0.0", echo_target.port) == NOT_ALLOWED
    server.wait_for_log(r"dest=0\.0\.0\.0:\d+ reply=connection_not_allowed .*0\.0\.0\.0 means this host")
    assert socks5_reply(server.address, "::", echo_target.port) == NOT_ALLOWED
    # A loop through the proxy itself would eat a session per round until fds run out.
    assert socks5_reply(server.address, "127.0.0.1", server.port) == NOT_ALLOWED
    assert socks5_reply(server.address, "localhost", server.port) == NOT_ALLOWED
    server.wait_for_log(rf"127\.0\.0\.1:{server.port} is this proxy itself")
    assert echo_target.connections == 0
    assert echo_through(server.address, echo_target) == b"still serving"


@pytest.mark.netns
def test_a_denied_name_is_not_even_resolved(tmp_path, start_server, netns_prefix):
    path = write_config(tmp_path, """
[[rules]]
action = "deny"
dest = ["*.blocked.test"]
[[rules]]
action = "allow"
""")
    prefix, env = netns_prefix  # had it been looked up, no query could leave the namespace
    server = start_server("--config", str(path), prefix=prefix, env=env)
    # A name that would need a DNS query: denied before any lookup (0x02, not 0x04).
    assert call_in_netns(server.pid, socks5_reply, server.address, "www.blocked.test", 80) == NOT_ALLOWED
    server.wait_for_log(r"dest=www\.blocked\.test:80 reply=connection_not_allowed .*denied by rule #1")


def test_a_client_that_no_rule_allows_is_closed_at_accept(tmp_path, start_server):
    path = write_config(tmp_path, """
[[rules]]
action = "allow"
client = ["10.0.0.0/8"]
""")
    server = start_server("--config", str(path))
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00")
        try:
            assert sock.recv(16) == b""  # no method selection: closed
        except ConnectionResetError:
            pass
    server.wait_for_log(r"client=127\.0\.0\.1:\d+ closed at accept: denied by the default action")


def test_bind_to_a_denied_peer_is_refused(tmp_path, start_server):
    path = write_config(tmp_path, """
[[rules]]
action = "deny"
command = ["bind"]
dest = ["127.0.0.0/8"]
[[rules]]
action = "allow"
""")
    server = start_server("--config", str(path))
    assert socks5_reply(server.address, "127.0.0.1", 0, command=2) == NOT_ALLOWED
    server.wait_for_log(r"cmd=bind dest=127\.0\.0\.1:0 reply=connection_not_allowed .*rule #1")


def test_udp_associate_is_refused_when_no_destination_could_be_allowed(tmp_path, start_server):
    path = write_config(tmp_path, """
[[rules]]
action = "allow"
command = ["connect"]
""")
    server = start_server("--config", str(path))
    assert socks5_reply(server.address, "0.0.0.0", 0, command=3) == NOT_ALLOWED
    server.wait_for_log(r"cmd=udp_associate .*reply=connection_not_allowed .*default action")


# ---------------------------------------------------------------- caps


def test_sessions_per_client_are_capped_and_freed(tmp_path, start_server, echo_target):
    server = start_server("--max-sessions-per-client", "3", "--workers", "2")
    held = []
    for _ in range(3):
        sock, (code, _, _) = socks5_connect(server.address, "127.0.0.1", echo_target.port)
        assert code == 0
        held.append(sock)
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00" + socks5_request_bytes("127.0.0.1", echo_target.port))
        assert recv_exact(sock, 2) == b"\x05\x00"
        assert read_socks5_reply(sock)[0] == GENERAL_FAILURE
    server.wait_for_log(r"reply=general_failure .*over max_sessions_per_client \(3\)")
    held.pop().close()

    def serves() -> bool:
        sock, (code, _, _) = socks5_connect(server.address, "127.0.0.1", echo_target.port)
        sock.close()
        return code == 0

    wait_until(serves, what="a freed slot under the cap")
    for sock in held:
        sock.close()


def test_a_cap_counts_the_engines_sessions_and_the_handed_off_ones_alike(start_server, localhost_target):
    """The engine counts the CONNECTs to an address it serves itself; a name goes to a
    Python session, which takes the count over: one cap over both, and nothing leaks."""
    target = localhost_target(echo_handler)
    server = start_server("--max-sessions-per-client", "2")
    by_ip, (code, _, _) = socks5_connect(server.address, "127.0.0.1", target.port)
    assert code == 0
    by_name, (code, _, _) = socks5_connect(server.address, "localhost", target.port)
    assert code == 0
    for host in ("127.0.0.1", "localhost"):
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"\x05\x01\x00" + socks5_request_bytes(host, target.port))
            assert recv_exact(sock, 2) == b"\x05\x00"
            assert read_socks5_reply(sock)[0] == GENERAL_FAILURE
    server.wait_for_log(r"dest=127\.0\.0\.1:\d+ .*reply=general_failure .*over max_sessions_per_client \(2\)")
    server.wait_for_log(r"dest=localhost:\d+ .*reply=general_failure .*over max_sessions_per_client \(2\)")
    by_name.close()
    by_ip.close()

    def both_serve() -> bool:
        socks = [socks5_connect(server.address, host, target.port) for host in ("localhost", "127.0.0.1")]
        for sock, _ in socks:
            sock.close()
        return all(reply[0] == 0 for _, reply in socks)

    wait_until(both_serve, what="both slots freed, whoever counted them")


def test_sessions_in_total_are_capped_across_workers(start_server, echo_target):
    server = start_server("--max-sessions", "4", "--workers", "2")
    server.wait_workers(2)
    held = []
    for _ in range(4):
        sock, (code, _, _) = socks5_connect(server.address, "127.0.0.1", echo_target.port)
        assert code == 0
        held.append(sock)
    codes = []
    for _ in range(4):  # with reuseport these land on both workers
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"\x05\x01\x00" + socks5_request_bytes("127.0.0.1", echo_target.port))
            recv_exact(sock, 2)
            codes.append(read_socks5_reply(sock)[0])
    assert codes == [GENERAL_FAILURE] * 4
    for sock in held:
        sock.close()


def test_socks4_gets_its_own_failure_code_over_a_cap(start_server, echo_target):
    server = start_server("--max-sessions-per-client", "1")
    sock, (code, _, _) = socks5_connect(server.address, "127.0.0.1", echo_target.port)
    with sock:
        assert code == 0
        assert socks4_reply(server.address, echo_target.port) == SOCKS4_REJECTED


# ---------------------------------------------------------------- failed logins


def hash_line(user: str, password: str) -> str:
    out = subprocess.run(fastsocks_command() + ["hash-password", "--user", user], input=password + "\n",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def login(proxy, user: bytes, password: bytes, source: str = "127.0.0.1") -> str:
    """'ok', 'failed' (status 1) or 'closed' (turned away before the method selection)."""
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(proxy)
        try:
            sock.sendall(b"\x05\x01\x02")
            head = sock.recv(2)
            if head == b"":
                return "closed"
            assert head == b"\x05\x02"
            sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            status = recv_exact(sock, 2)
        except (ConnectionResetError, BrokenPipeError):
            return "closed"
        return "ok" if status == b"\x01\x00" else "failed"


def test_500_wrong_passwords_block_the_guesser_and_no_one_else(tmp_path, start_server):
    users = tmp_path / "users.txt"
    users.write_text(hash_line("alice", "correct horse") + "\n")
    path = write_config(tmp_path, f"""
[auth]
users_file = "{users}"
max_failures = 10
failure_window_s = 60
block_s = 3
""")
    server = start_server("--config", str(path))
    worker = server.wait_workers(1)[0]
    # Warm up first: a scrypt check takes its 16 MiB and the check pool its threads once.
    assert login(server.address, b"alice", b"correct horse", source="127.0.0.3") == "ok"
    assert login(server.address, b"alice", b"wrong", source="127.0.0.3") == "failed"
    rss_before, fds_before = process_usage(worker)
    outcomes = [login(server.address, b"alice", b"guess %d" % i) for i in range(500)]
    assert outcomes[:10] == ["failed"] * 10
    assert outcomes[10:] == ["closed"] * 490
    server.wait_for_log(r"client=127\.0\.0\.1 blocked for 3 s after 10 failed logins in 60 s")
    assert server.count_log(r"client=127\.0\.0\.1:\d+ authentication failed for user 'alice'") == 10
    # Someone else, from another address, logs in meanwhile.
    assert login(server.address, b"alice", b"correct horse", source="127.0.0.2") == "ok"
    rss_after, fds_after = process_usage(worker)
    # bounded: the two check threads may each keep a 16 MiB scrypt work area
    assert rss_after - rss_before < 48 * 1024 and fds_after - fds_before < 8
    # The block ends.
    wait_until(lambda: login(server.address, b"alice", b"correct horse") == "ok", timeout_s=10,
               interval_s=0.5, what="the block to end")


# ---------------------------------------------------------------- reload


def test_sighup_swaps_the_rules_and_established_sessions_go_on(tmp_path, start_server, echo_target):
    path = write_config(tmp_path, "[[rules]]\naction = \"allow\"\n")
    server = start_server("--config", str(path))
    sock, (code, _, _) = socks5_connect(server.address, "127.0.0.1", echo_target.port)
    assert code == 0
    path.write_text(f"[[rules]]\naction = \"deny\"\nport = [{echo_target.port}]\n[[rules]]\naction = \"allow\"\n")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log(r"SIGHUP: reloaded .*fastsocks\.toml: 2 rules")
    server.wait_for_log(r"worker 0: reloaded \(2 rules\)")
    assert socks5_reply(server.address, "127.0.0.1", echo_target.port) == NOT_ALLOWED
    with sock:
        sock.sendall(b"established before the reload")
        assert recv_exact(sock, 29) == b"established before the reload"


def test_sighup_with_a_broken_file_keeps_the_rules(tmp_path, start_server, echo_target):
    path = write_config(tmp_path, "[[rules]]\naction = \"allow\"\n")
    server = start_server("--config", str(path))
    path.write_text("[[rules]]\naction = \"alow\"\n")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log(r"SIGHUP: keeping the current configuration: .*fastsocks\.toml:2: rules\[1\]\.action")
    assert echo_through(server.address, echo_target) == b"still serving"
    # A valid file next: the worker reloads that one, and only that one.
    path.write_text(f"[[rules]]\naction = \"allow\"\nport = [{echo_target.port}]\n")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log(r"worker 0: reloaded \(1 rules\)")
    assert server.count_log(r"worker \d: reloaded") == 1, "the broken file reached a worker"
    assert echo_through(server.address, echo_target) == b"still serving"


def test_every_worker_applies_the_masters_reading_not_the_file_as_it_is_later(tmp_path, start_server, echo_target):
    """One reading per reload: a worker slow to take the reload (stopped here) applies what
    the master read and checked, not whatever the file says by the time it gets to it."""
    path = write_config(tmp_path, "[[rules]]\naction = \"allow\"\n")
    server = start_server("--config", str(path), "--workers", "2")
    late = server.wait_workers(2)[0]
    path.write_text(f"[[rules]]\naction = \"deny\"\nport = [{echo_target.port}]\n[[rules]]\naction = \"allow\"\n")
    os.kill(late, signal.SIGSTOP)
    try:
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log(r"SIGHUP: reloaded .*fastsocks\.toml: 2 rules")
        server.wait_for_log(r"worker \d: reloaded \(2 rules\) from the master's reading 1")
        path.write_text("[[rules]]\naction = \"alow\"\n")  # broken: a worker reading it now would balk
    finally:
        os.kill(late, signal.SIGCONT)
    wait_until(lambda: server.count_log(r"worker \d: reloaded \(2 rules\) from the master's reading 1") == 2,
               what="the stopped worker to apply the same reading")
    assert server.count_log(r"keeping the current configuration") == 0
    for _ in range(8):  # whichever worker takes each one, the same rules answer
        assert socks5_reply(server.address, "127.0.0.1", echo_target.port) == NOT_ALLOWED
    # A worker does not reload on its own: SIGHUP goes to the master.
    os.kill(late, signal.SIGHUP)
    server.wait_for_log(r"worker \d: SIGHUP ignored: the master \(pid %d\) reloads" % server.pid)
    assert server.count_log(r"worker \d: reloaded") == 2


# ---------------------------------------------------------------- the command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(fastsocks_command() + list(args), capture_output=True, text=True, timeout=60)


def test_check_config_names_file_line_and_field(tmp_path):
    good = write_config(tmp_path, "[server]\nworkers = 2\n")
    out = run_cli("check-config", str(good))
    assert out.returncode == 0 and "OK" in out.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nworkers = 2\n\n[[rules]]\naction = \"allow\"\nport = [\"99999\"]\n")
    out = run_cli("check-config", str(bad))
    assert out.returncode == 2
    assert f"{bad}:6: rules[1].port: '99999': ports are 0-65535" in out.stderr


def test_the_server_refuses_a_bad_file_with_the_same_words(tmp_path):
    bad = write_config(tmp_path, "[timeouts]\nidle_s = -5\n")
    out = run_cli("--config", str(bad))
    assert out.returncode == 2
    assert f"{bad}:2: timeouts.idle_s: expected a number of seconds >= 0" in out.stderr


def test_an_open_proxy_does_not_start_unless_asked_for():
    out = run_cli("--listen", "0.0.0.0:0", "--workers", "1")
    assert out.returncode == 2
    assert "is reachable from other hosts, with no authentication and no client rule: an open proxy" in out.stderr


def test_allow_open_proxy_starts_with_a_warning(start_server):
    server = start_server("--listen", "0.0.0.0:0", "--allow-open-proxy")
    server.wait_for_log(r"WARNING.*allow_open_proxy: 0\.0\.0\.0:\d+ is reachable from other hosts")


def test_explain_says_which_rule_decides_and_why(tmp_path):
    path = write_config(tmp_path, """
[[rules]]
action = "deny"
dest = ["127.0.0.0/8"]

[[rules]]
action = "allow"
client = ["10.0.0.0/8"]
""")
    out = run_cli("explain", "--config", str(path), "--client", "10.1.2.3", "--dest", "localhost:80",
                  "--address", "127.0.0.1")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"127.0.0.1: denied by rule #1 ({path}:2)" in out.stdout
    out = run_cli("explain", "--config", str(path), "--client", "10.1.2.3", "--dest", "192.0.2.1:80")
    assert out.returncode == 0
    assert f"192.0.2.1: allowed by rule #2 ({path}:6)" in out.stdout
    assert "rule #1" in out.stdout and "destination 192.0.2.1 is not in [127.0.0.0/8]" in out.stdout
    out = run_cli("explain", "--config", str(path), "--client", "192.0.2.9", "--dest", "192.0.2.1:80")
    assert out.returncode == 1
    assert "at accept: client 192.0.2.9 denied by the default action" in out.stdout


# ---------------------------------------------------------------- SOCKS4 USERID


def socks4_as(proxy, port: int, userid: bytes) -> int:
    with socket.create_connection(proxy, timeout=10) as sock:
        sock.sendall(b"\x04\x01" + struct.pack("!H", port) + socket.inet_aton("127.0.0.1") + userid + b"\x00")
        return recv_exact(sock, 8)[1]


def test_socks4_can_be_restricted_by_userid(tmp_path, start_server, echo_target):
    path = write_config(tmp_path, '[[rules]]\naction = "allow"\nuser = ["bob"]\n')
    server = start_server("--config", str(path))
    assert socks4_as(server.address, echo_target.port, b"bob") == 0x5A
    assert socks4_as(server.address, echo_target.port, b"eve") == SOCKS4_REJECTED
    server.wait_for_log(r"proto=socks4 user='eve' .*reply=connection_not_allowed .*default action")


def test_a_socks4_userid_is_no_user_where_passwords_are_asked(tmp_path, start_server, echo_target):
    users = tmp_path / "users.txt"
    users.write_text(hash_line("bob", "pw") + "\n")
    path = write_config(tmp_path, f'[auth]\nusers_file = "{users}"\nmethods = ["userpass", "none"]\n'
                                  '[[rules]]\naction = "allow"\nuser = ["bob"]\n')
    server = start_server("--config", str(path))
    # Anyone can type "bob" into a SOCKS4 USERID: it must not pass for the user bob.
    assert socks4_as(server.address, echo_target.port, b"bob") == SOCKS4_REJECTED
    assert login(server.address, b"bob", b"pw") == "ok"


def test_sessions_per_user_are_capped_across_addresses(tmp_path, start_server, echo_target):
    users = tmp_path / "users.txt"
    users.write_text(hash_line("alice", "pw") + "\n" + hash_line("bob", "pw") + "\n")
    server = start_server("--users", str(users), "--max-sessions-per-user", "1", "--workers", "2")

    def connect_as(user: bytes, source: str):
        sock = socket.socket()
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(server.address)
        sock.sendall(b"\x05\x01\x02\x01" + bytes([len(user)]) + user + b"\x02pw"
                     + socks5_request_bytes("127.0.0.1", echo_target.port))
        assert recv_exact(sock, 4) == b"\x05\x02\x01\x00"
        return sock, read_socks5_reply(sock)[0]

    first, code = connect_as(b"alice", "127.0.0.1")
    assert code == 0
    second, code = connect_as(b"alice", "127.0.0.2")  # another address, the same user
    assert code == GENERAL_FAILURE
    second.close()
    server.wait_for_log(r"user='alice' .*reply=general_failure .*over max_sessions_per_user \(1\)")
    other, code = connect_as(b"bob", "127.0.0.2")
    assert code == 0
    for sock in (first, other):
        sock.close()


# ---------------------------------------------------------------- UDP


def udp_echo_socket(port: int = 0):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    sock.settimeout(0.3)
    return sock


def udp_wrap(host: str, port: int, payload: bytes) -> bytes:
    try:
        address = b"\x01" + socket.inet_aton(host)
    except OSError:
        address = b"\x03" + bytes([len(host)]) + host.encode()
    return b"\x00\x00\x00" + address + struct.pack("!H", port) + payload


@pytest.mark.netns
def test_udp_datagrams_to_denied_destinations_are_dropped(tmp_path, start_server, netns_prefix):
    prefix, env = netns_prefix  # a regression that resolved the denied name stays inside
    allowed_port, denied_port = 40001, 40002  # the namespace is ours: these are free
    path = write_config(tmp_path, f"""
[[rules]]
action = "deny"
command = ["udp"]
dest = ["*.blocked.test"]
[[rules]]
action = "allow"
command = ["udp"]
dest = ["127.0.0.1"]
port = [{allowed_port}]
[[rules]]
action = "deny"
dest = ["127.0.0.0/8"]
""")
    server = start_server("--config", str(path), prefix=prefix, env=env)
    allowed, denied = (call_in_netns(server.pid, udp_echo_socket, port) for port in (allowed_port, denied_port))
    control = call_in_netns(server.pid, socket.create_connection, server.address, timeout=10)
    client = call_in_netns(server.pid, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    with control, client, allowed, denied:
        control.sendall(b"\x05\x01\x00" + socks5_request_bytes("0.0.0.0", 0, command=3))
        assert recv_exact(control, 2) == b"\x05\x00"
        code, host, port = read_socks5_reply(control)
        assert code == 0
        client.bind(("127.0.0.1", 0))
        for i in range(3):
            client.sendto(udp_wrap("127.0.0.1", denied.getsockname()[1], b"no %d" % i), (host, port))
            client.sendto(udp_wrap("localhost", denied.getsockname()[1], b"no by name %d" % i), (host, port))
            client.sendto(udp_wrap("www.blocked.test", 53, b"never resolved %d" % i), (host, port))
            client.sendto(udp_wrap("127.0.0.1", allowed.getsockname()[1], b"yes %d" % i), (host, port))
        assert sorted(allowed.recv(100) for _ in range(3)) == [b"yes 0", b"yes 1", b"yes 2"]
        with pytest.raises(TimeoutError):
            denied.recv(100)
    server.wait_for_log(r"cmd=udp_associate .*reply=succeeded datagrams_up=3 .*dropped=9 ")
    server.wait_for_log(r"UDP: dropped datagrams to .*denied by rule #")


def test_the_example_config_is_printed_and_valid(tmp_path):
    out = run_cli("example-config")
    assert out.returncode == 0 and "[[rules]]" in out.stdout
    path = tmp_path / "fastsocks.toml"
    path.write_text(out.stdout)
    checked = run_cli("check-config", str(path))
    assert checked.returncode == 0, checked.stderr
    assert "listen 127.0.0.1:1080, methods none, 4 rules, default deny" in checked.stdout


def test_sighup_to_passwords_only_keeps_a_client_already_answered_no_auth(tmp_path, start_server, echo_target):
    """A client answered "no authentication" before a reload that asks for passwords keeps
    what it was told (its request is served, by the engine or by a Python session); a
    client greeting after the reload must log in."""
    users = tmp_path / "users.txt"
    users.write_text(hash_line("alice", "correct horse") + "\n")
    path = write_config(tmp_path, f'[auth]\nusers_file = "{users}"\nmethods = ["none", "userpass"]\n')
    server = start_server("--config", str(path))
    greeted = []
    for _ in range(2):
        sock = socket.create_connection(server.address, timeout=5)
        sock.sendall(b"\x05\x01\x00")
        assert recv_exact(sock, 2) == b"\x05\x00"
        greeted.append(sock)
    path.write_text(f'[auth]\nusers_file = "{users}"\nmethods = ["userpass"]\n')
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log(r"worker 0: reloaded")
    by_address, by_name = greeted
    with by_address, by_name:
        by_address.sendall(socks5_request_bytes("127.0.0.1", echo_target.port) + b"by address")
        by_name.sendall(socks5_request_bytes("localhost", echo_target.port) + b"by name")
        for sock, payload in ((by_address, b"by address"), (by_name, b"by name")):
            assert read_socks5_reply(sock)[0] == 0
            assert recv_exact(sock, len(payload)) == payload
    with socket.create_connection(server.address, timeout=5) as late:
        late.sendall(b"\x05\x01\x00")
        assert recv_exact(late, 2) == b"\x05\xff"
