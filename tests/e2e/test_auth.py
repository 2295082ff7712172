"""SOCKS5 username/password (RFC 1929) through a real ``fastsocks --users FILE``, with
users made by the real ``fastsocks hash-password``: curl -U, PySocks, python-socks (sync
and asyncio), a wrong password, a client that offers no password, a pipelining client,
a plain password in the file, and SIGHUP reloading the file."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess

import pytest

from support import (HTTP_BODY, fastsocks_command, read_socks5_reply, recv_exact, require_client,
                     require_tool, socks5_request_bytes)

TIMEOUT_S = 20
PAYLOAD = os.urandom(32 * 1024)


def hash_line(user: str, password: str) -> str:
    out = subprocess.run(fastsocks_command() + ["hash-password", "--user", user], input=password + "\n",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert password not in out.stdout
    return out.stdout.strip()


@pytest.fixture(scope="module")
def alice_line() -> str:
    return hash_line("alice", "correct horse")


@pytest.fixture
def users_file(tmp_path, alice_line):
    path = tmp_path / "users.txt"
    path.write_text(f"# fastsocks users\n{alice_line}\n")
    return path


@pytest.fixture
def auth_server(start_server, users_file):
    return start_server("--users", str(users_file))


def curl(server, target, *args):
    return subprocess.run([require_tool("curl"), "-sS", "--max-time", str(TIMEOUT_S), "--socks5",
                           f"127.0.0.1:{server.port}", *args, f"http://127.0.0.1:{target.port}/"],
                          capture_output=True, timeout=TIMEOUT_S + 10,
                          env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")})


def test_curl_with_the_right_password(auth_server, http_target):
    out = curl(auth_server, http_target, "-U", "alice:correct horse")
    assert out.returncode == 0, out.stderr
    assert out.stdout == HTTP_BODY
    auth_server.wait_for_log(r"proto=socks5 user='alice' cmd=connect dest=127\.0\.0\.1:\d+ reply=succeeded")


def test_curl_with_a_wrong_password_fails_and_is_logged(auth_server, http_target):
    out = curl(auth_server, http_target, "-U", "alice:wrong")
    assert out.returncode != 0 and out.stdout == b""
    auth_server.wait_for_log(r"WARNING .*client=127\.0\.0\.1:\d+ authentication failed for user 'alice'")
    assert http_target.connections == 0


def test_a_client_without_a_password_gets_no_acceptable_method(auth_server, http_target):
    out = curl(auth_server, http_target)
    assert out.returncode != 0
    auth_server.wait_for_log(r"no acceptable authentication method in \[0(, 1)?\] \(this server accepts userpass\)")
    with socket.create_connection(auth_server.address, timeout=TIMEOUT_S) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exact(sock, 2) == b"\x05\xff"
        assert sock.recv(1) == b""


def test_pipelined_greeting_credentials_request_and_payload(auth_server, echo_target):
    creds = b"\x01\x05alice\x0dcorrect horse"
    with socket.create_connection(auth_server.address, timeout=TIMEOUT_S) as sock:
        sock.sendall(b"\x05\x01\x02" + creds + socks5_request_bytes(*echo_target.address) + b"early bytes")
        assert recv_exact(sock, 2) == b"\x05\x02"
        assert recv_exact(sock, 2) == b"\x01\x00"
        assert read_socks5_reply(sock)[0] == 0
        assert recv_exact(sock, 11) == b"early bytes"


def test_pysocks_with_a_password(auth_server, echo_target):
    try:
        import socks
    except ImportError:
        require_client(False, "PySocks")
    sock = socks.socksocket()
    sock.set_proxy(socks.SOCKS5, "127.0.0.1", auth_server.port, username="alice", password="correct horse")
    sock.settimeout(TIMEOUT_S)
    with sock:
        sock.connect(echo_target.address)
        sock.sendall(PAYLOAD)
        assert recv_exact(sock, len(PAYLOAD)) == PAYLOAD


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_python_socks_with_a_password(auth_server, echo_target, flavour):
    try:
        from python_socks import ProxyType
        from python_socks.async_.asyncio import Proxy as AsyncProxy
        from python_socks.sync import Proxy
    except ImportError:
        require_client(False, "python-socks")
    if flavour == "sync":
        proxy = Proxy(ProxyType.SOCKS5, "127.0.0.1", auth_server.port, username="alice", password="correct horse")
        sock = proxy.connect(*echo_target.address, timeout=TIMEOUT_S)
        with sock:
            sock.settimeout(TIMEOUT_S)
            sock.sendall(PAYLOAD)
            assert recv_exact(sock, len(PAYLOAD)) == PAYLOAD
        return

    async def run():
        proxy = AsyncProxy(ProxyType.SOCKS5, "127.0.0.1", auth_server.port, username="alice",
                           password="correct horse")
        sock = await proxy.connect(*echo_target.address, timeout=TIMEOUT_S)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(PAYLOAD)
        data = await reader.readexactly(len(PAYLOAD))
        writer.close()
        return data

    assert asyncio.run(run()) == PAYLOAD


def test_a_plain_password_in_the_file_is_refused_at_start(tmp_path, alice_line):
    path = tmp_path / "users.txt"
    path.write_text(f"{alice_line}\nbob:hunter2\n")
    out = subprocess.run(fastsocks_command() + ["--listen", "127.0.0.1:0", "--users", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"{path}:2: users[bob]:" in out.stderr and "plain passwords are not accepted" in out.stderr
    assert "hunter2" not in out.stderr


def test_sighup_reloads_the_users_file(auth_server, users_file, http_target):
    assert curl(auth_server, http_target, "-U", "alice:correct horse").returncode == 0
    users_file.write_text(hash_line("alice", "new secret") + "\n")
    auth_server.proc.send_signal(signal.SIGHUP)
    auth_server.wait_for_log(r"SIGHUP: reloaded: .*, 1 users in ")
    # Workers reload on their own signal: retry briefly until the new password is in force.
    for _ in range(50):
        if curl(auth_server, http_target, "-U", "alice:new secret").returncode == 0:
            break
    else:
        pytest.fail("the new password was never accepted")
    assert curl(auth_server, http_target, "-U", "alice:correct horse").returncode != 0


def test_sighup_with_a_broken_file_keeps_the_old_users(auth_server, users_file, http_target):
    users_file.write_text("alice:plaintext\n")
    auth_server.proc.send_signal(signal.SIGHUP)
    auth_server.wait_for_log(r"SIGHUP: keeping the current configuration: .*users\.txt:1: users\[alice\]")
    assert curl(auth_server, http_target, "-U", "alice:correct horse").returncode == 0
