"""Quotas and shared limits, end to end, with curl through the real ``fastsocks``:

- a user's quota stops the download that uses it up, refuses the next session with 0x02
  and an access line saying why, survives a restart (the SQLite file), and
  ``fastsocks quota reset`` gives it back to the running server;
- a per-user rate is shared by the user's sessions in both workers;
- a per-client rate likewise, for clients with no user at all.
A limit promises a lower bound on a transfer's duration; the bytes must arrive whole."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from support import hash_line, http_handler, read_socks5_reply, require_tool, socks5_request_bytes, wait_until

from fastsocks._relay_types import bucket_bytes

QUOTA = 300_000
BIG = os.urandom(1 << 20)
SMALL = os.urandom(1000)
RATE = 200_000
TIMEOUT_S = 30


def curl(server, target, user: str | None = "alice:pw") -> subprocess.CompletedProcess:
    auth = f"{user}@" if user else ""
    return subprocess.run([require_tool("curl"), "-sS", "--max-time", str(TIMEOUT_S),
                           "--proxy", f"socks5://{auth}127.0.0.1:{server.port}", f"http://127.0.0.1:{target.port}/"],
                          capture_output=True, timeout=TIMEOUT_S + 10,
                          env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")})


def quota_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastsocks", "quota", *args], capture_output=True, text=True,
                          timeout=30)


@pytest.fixture
def quota_config(tmp_path):
    (tmp_path / "users.txt").write_text(hash_line("alice", "pw"))
    path = tmp_path / "fastsocks.toml"
    path.write_text(f"""
[auth]
users_file = "users.txt"
[limits]
quota_bytes = {QUOTA}
quota_period = "day"
quota_db = "state/quota.sqlite"
""")
    return path


def test_a_quota_stops_refuses_survives_a_restart_and_resets(start_server, tcp_target, quota_config):
    big, small = tcp_target(http_handler(BIG)), tcp_target(http_handler(SMALL))
    server = start_server("--config", str(quota_config), "--workers", "2")
    out = curl(server, big)
    assert out.returncode != 0 and len(out.stdout) <= QUOTA  # cut off at the quota
    server.wait_for_log(r"user='alice' .*reply=succeeded .*end=quota")
    out = curl(server, small)
    assert out.returncode != 0 and out.stdout == b""
    server.wait_for_log(r"user='alice' .*reply=connection_not_allowed .*over quota: \d+ of 300000 bytes")

    server.stop()  # the master writes the last counts as it goes
    server = start_server("--config", str(quota_config), "--workers", "2")
    assert curl(server, small).returncode != 0  # still used up: the count came from the file
    server.wait_for_log(r"over quota")

    shown = quota_command("show", "--config", str(quota_config), "--json")
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert [(r["user"], r["quota_bytes"]) for r in rows] == [("alice", QUOTA)] and rows[0]["bytes"] >= QUOTA

    reset = quota_command("reset", "alice", "--config", str(quota_config))
    assert reset.returncode == 0, reset.stderr
    # The running master learns of the reset at its next batch (about a second).
    wait_until(lambda: curl(server, small).stdout == SMALL, timeout_s=15, interval_s=0.5,
               what="a session once the quota was reset")


def concurrent_downloads(n: int, server, target, users, targets=None) -> tuple[list[subprocess.CompletedProcess], float]:
    results: list = [None] * n
    started_s = time.monotonic()
    targets = targets or [target] * n
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, curl(server, targets[i], users[i])))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S + 15)
    return results, time.monotonic() - started_s


@pytest.mark.parametrize("kind", ["user", "client"])
def test_a_shared_rate_holds_for_all_sessions_in_both_workers(start_server, tcp_target, tmp_path, kind):
    body = os.urandom(200_000)
    target = tcp_target(http_handler(body))
    (tmp_path / "users.txt").write_text(hash_line("alice", "pw"))
    auth = '[auth]\nusers_file = "users.txt"\n' if kind == "user" else ""
    path = tmp_path / "fastsocks.toml"
    path.write_text(f"{auth}[limits]\n{kind}_rate_down_bytes_per_s = {RATE}\n")
    server = start_server("--config", str(path), "--workers", "2")
    users = ["alice:pw"] * 4 if kind == "user" else [None] * 4
    results, elapsed_s = concurrent_downloads(4, server, target, users)
    for out in results:
        assert out.returncode == 0, out.stderr
        assert hashlib.sha256(out.stdout).hexdigest() == hashlib.sha256(body).hexdigest()
    # 800 kB through one 200 kB/s bucket, whichever worker served each: about 4 s; the
    # four sessions with a bucket each (or one per worker) would need half of that or less.
    assert elapsed_s >= (4 * len(body) - bucket_bytes(RATE)[0]) / RATE


def test_a_bad_quota_file_stops_the_server_with_its_name(start_server, tmp_path):
    (tmp_path / "quota.sqlite").write_bytes(b"this is not a database" * 100)
    path = tmp_path / "fastsocks.toml"
    path.write_text('[limits]\nquota_bytes = 1000\nquota_db = "quota.sqlite"\n')
    done = subprocess.run([sys.executable, "-m", "fastsocks", "--config", str(path), "--listen", "127.0.0.1:0"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert f"{tmp_path / 'quota.sqlite'}: quota_db:" in done.stderr, done.stderr


def test_a_udp_association_counts_toward_the_quota_and_ends_there(start_server, quota_config, udp_echo):
    """Datagrams never pass through Python: the worker adds an association's bytes to its
    user's count once a second, and ends it once the quota is used up."""
    socks = pytest.importorskip("socks", reason="PySocks is not installed")
    echo = udp_echo()
    server = start_server("--config", str(quota_config))
    client = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    client.set_proxy(socks.SOCKS5, "127.0.0.1", server.port, username="alice", password="pw")
    client.settimeout(0.5)
    payload = os.urandom(1000)
    echoed = 0
    try:
        deadline = time.monotonic() + 20
        while not server.count_log(r"datagrams_up=.* end=quota") and time.monotonic() < deadline:
            client.sendto(payload, echo.address)
            try:
                echoed += len(client.recvfrom(65536)[0])
            except (TimeoutError, OSError):
                pass
    finally:
        client.close()
    server.wait_for_log(r"user='alice' .*cmd=udp_associate .*reply=succeeded .*end=quota")
    assert echoed >= QUOTA // 4  # it relayed until then (counted both ways: at least up + down)
    refused = socks5_session_as_alice(server)
    assert refused == 2  # the count reached the quota: the next session is refused with 0x02


def socks5_session_as_alice(server) -> int:
    """A SOCKS5 CONNECT as alice; its reply code."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"\x05\x01\x02")
        assert sock.recv(2) == b"\x05\x02"
        sock.sendall(b"\x01\x05alice\x02pw")
        assert sock.recv(2) == b"\x01\x00"
        sock.sendall(socks5_request_bytes("127.0.0.1", 9))
        return read_socks5_reply(sock)[0]


def test_the_file_holds_every_byte_the_access_lines_report(start_server, tcp_target, tmp_path):
    """Counted in the engines of two workers, batched by the master, written at its exit:
    the file's count for the user is exactly what the access lines say the sessions moved."""
    (tmp_path / "users.txt").write_text(hash_line("alice", "pw"))
    path = tmp_path / "fastsocks.toml"
    path.write_text('[auth]\nusers_file = "users.txt"\n[limits]\nquota_bytes = 1_000_000_000\n'
                    'quota_db = "quota.sqlite"\n')
    bodies = [os.urandom(n) for n in (1, 70_000, 300_000, 1 << 20)]
    targets = [tcp_target(http_handler(body)) for body in bodies]
    server = start_server("--config", str(path), "--workers", "2")
    results, _elapsed = concurrent_downloads(8, server, None, ["alice:pw"] * 8, targets=targets * 2)
    assert all(out.returncode == 0 for out in results), [out.stderr for out in results]
    wait_until(lambda: server.count_log(r"user='alice' .*end=eof") >= 8, what="8 access lines")
    lines = [line for line in server.log_text().splitlines() if "user='alice'" in line and "end=eof" in line]
    moved = sum(int(re.search(r" up=(\d+)", line).group(1)) + int(re.search(r" down=(\d+)", line).group(1))
                for line in lines)
    assert len(lines) == 8 and moved > 2 * sum(len(b) for b in bodies)
    server.stop()
    shown = quota_command("show", "--config", str(path), "--json")
    assert shown.returncode == 0, shown.stderr
    assert [(row["user"], row["bytes"]) for row in json.loads(shown.stdout)] == [("alice", moved)]
