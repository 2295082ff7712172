"""--access-log-format json on a running server: every access line is one JSON object,
whoever served the session (the engine's front door or a Python session), with the rule
that decided and the phases it went through; the rest of the log stays text."""

from __future__ import annotations

import json
import socket
import struct

from support import recv_exact, socks5_connect, socks5_request_bytes, wait_until

from fastsocks.users import hash_password

RULES = """
[[rules]]
action = "deny"
dest = ["*.blocked.test"]

[[rules]]
action = "allow"
"""


def records(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines if line.startswith("{")]


def wait_records(server, n: int) -> list[dict]:
    return wait_until(lambda: (r := records(server.lines[:])) and len(r) >= n and r, what=f"{n} JSON access lines")


def echo_once(sock: socket.socket, payload: bytes) -> None:
    with sock:
        sock.sendall(payload)
        assert recv_exact(sock, len(payload)) == payload


def socks4_connect(proxy, port: int, userid: bytes) -> socket.socket:
    sock = socket.create_connection(proxy, timeout=10)
    sock.sendall(struct.pack("!BBH4s", 4, 1, port, socket.inet_aton("127.0.0.1")) + userid + b"\0")
    assert recv_exact(sock, 8)[1] == 90
    return sock


def phases(record: dict) -> set[str]:
    return {key for key in ("handshake_s", "auth_s", "dns_s", "connect_s") if key in record}


HOSTILE_USERID = b'eve"\n{"rule":"#9"}\\\xff'
HOSTILE_NAME = 'x"y\\z{%s}.blocked.test'


def test_engine_python_and_denied_sessions_each_write_one_json_line(start_server, tmp_path, echo_target,
                                                                     localhost_target):
    config = tmp_path / "fastsocks.toml"
    config.write_text(RULES)
    server = start_server("--config", str(config), "--access-log-format", "json")
    named = localhost_target()
    sock, (code, _, _) = socks5_connect(server.address, "127.0.0.1", echo_target.port)  # the engine's own
    assert code == 0
    client = "%s:%d" % sock.getsockname()
    echo_once(sock, b"hello")
    engine, = wait_records(server, 1)
    echo_once(socks4_connect(server.address, echo_target.port, HOSTILE_USERID), b"ab")  # a USERID: Python's
    sock, (code, _, _) = socks5_connect(server.address, "localhost", named.port)  # a name: Python's
    assert code == 0
    echo_once(sock, b"xyz")
    sock, (code, _, _) = socks5_connect(server.address, HOSTILE_NAME, 80)
    sock.close()
    assert code == 2  # connection not allowed, by rule #1, before any lookup
    # Each line is written when its session ends: a relay's EOF may come after the next session.
    by_dest = {(r["proto"], r["dest"]): r for r in wait_records(server, 4)[1:]}
    userid = by_dest["socks4", f"127.0.0.1:{echo_target.port}"]
    by_name = by_dest["socks5", f"localhost:{named.port}"]
    denied = by_dest["socks5", f"{HOSTILE_NAME}:80"]

    assert {k: engine[k] for k in ("client", "proto", "cmd", "dest", "reply", "up", "down", "rule", "end")} == {
        "client": client, "proto": "socks5", "cmd": "connect", "dest": f"127.0.0.1:{echo_target.port}",
        "reply": "succeeded", "up": 5, "down": 5, "rule": "#2", "end": "eof"}
    assert phases(engine) == {"handshake_s", "connect_s"}

    assert (userid["proto"], userid["user"], userid["rule"], userid["up"]) == \
        ("socks4", HOSTILE_USERID.decode("utf-8", "backslashreplace"), "#2", 2)
    assert phases(userid) == {"handshake_s", "connect_s"}

    assert (by_name["rule"], by_name["down"]) == ("#2", 3)
    assert phases(by_name) == {"handshake_s", "dns_s", "connect_s"}

    assert (denied["reply"], denied["rule"]) == ("connection_not_allowed", "#1")
    assert denied["error"].startswith("denied by rule #1 (") and phases(denied) == {"handshake_s"}

    access_lines = [line for line in server.lines[:] if "fastsocks.access" in line or line.startswith("{")]
    assert all(line.startswith("{") for line in access_lines)  # no text access line beside them
    assert server.count_log(r"^\d{4}-\d\d-\d\d .* INFO \[master\] .*listening on") == 1  # the rest stays text


def test_a_login_is_timed_and_the_lines_go_to_the_access_log_file(start_server, tmp_path, echo_target):
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('wonderland', scrypt_ln=10)}\n")
    log = tmp_path / "access.log"
    server = start_server("--users", str(users), "--access-log", str(log), "--access-log-format", "json")
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_exact(sock, 2) == b"\x05\x02"
        sock.sendall(b"\x01\x05alice\x0awonderland" + socks5_request_bytes("127.0.0.1", echo_target.port))
        assert recv_exact(sock, 2) == b"\x01\x00"
        assert recv_exact(sock, 10)[1] == 0
        sock.sendall(b"pw")
        assert recv_exact(sock, 2) == b"pw"
    record, = wait_until(lambda: log.exists() and (r := records(log.read_text().splitlines())) and r,
                         what="the JSON line in the file")
    assert (record["user"], record["reply"], record["rule"], record["up"]) == ("alice", "succeeded", "default", 2)
    assert phases(record) == {"handshake_s", "auth_s", "connect_s"}
    assert record["handshake_s"] >= record["auth_s"]  # the login is part of the handshake
    assert records(server.lines[:]) == []  # not on stderr


def test_a_client_closed_at_accept_is_a_json_line_with_its_rule(start_server, tmp_path):
    config = tmp_path / "fastsocks.toml"
    config.write_text('[[rules]]\naction = "deny"\nclient = ["127.0.0.0/8"]\n\n[[rules]]\naction = "allow"\n')
    server = start_server("--config", str(config), "--access-log-format", "json")
    with socket.create_connection(server.address, timeout=10) as sock:
        client = "%s:%d" % sock.getsockname()
        assert sock.recv(16) == b""
    record, = wait_records(server, 1)
    assert record["client"] == client
    assert record["closed_at_accept"].startswith("denied by rule #1 (") and record["rule"] == "#1"
