"""`fastsocks bench` against a running fastsocks, and directly: short, bounded runs of every
mode, whose counts must add up and whose bytes must arrive intact (the load generator
compares every echoed byte; bulk runs here use --verify). No assertion on speed or time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading

import pytest

from support import children_of, recv_exact, wait_until

BENCH = [sys.executable, "-m", "fastsocks.bench"]
DIRECTION_FACTOR = {"download": 1, "upload": 1, "both": 2}


@pytest.fixture
def bench(tmp_path):
    """``bench(*args, expect=0)``: run the bench command, return its JSON document."""
    runs = iter(range(1000))

    def run(*args: str, expect: int = 0, timeout_s: float = 90) -> dict | subprocess.CompletedProcess:
        out_json = tmp_path / f"bench-{next(runs)}.json"
        done = subprocess.run(BENCH + [*args, "--json", str(out_json), "--quiet"],
                              capture_output=True, text=True, timeout=timeout_s)
        assert done.returncode == expect, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        if expect != 0:
            return done
        doc = json.loads(out_json.read_text())
        assert doc["ok"] is True and doc["problems"] == [], doc
        return doc

    return run


@pytest.fixture
def proxy(start_server):
    server = start_server("--workers", "1")
    server.wait_workers(1)
    return server


def url(server) -> str:
    host = f"[{server.host}]" if ":" in server.host else server.host
    return f"socks5://{host}:{server.port}"


# --------------------------------------------------------------------- through fastsocks


@pytest.mark.parametrize("direction", ["download", "upload", "both"])
def test_bulk_bytes_arrive_intact(bench, proxy, direction):
    streams, per_stream = 2, 3 << 20
    doc = bench("bulk", "--proxy", url(proxy), "--streams", str(streams), "--bytes", "3M",
                "--direction", direction, "--verify")
    r = doc["results"]
    assert r["bytes"] == streams * per_stream * DIRECTION_FACTOR[direction]
    assert (r["streams"], r["streams_ok"], r["errors"]) == (streams, streams, 0)
    assert r["bytes_down"] == (streams * per_stream if direction != "upload" else 0)
    assert r["bytes_up"] == (streams * per_stream if direction != "download" else 0)
    # Found by its listening port: the master and its worker.
    assert set(doc["cpu"]["proxy_pids"]) == {proxy.pid, *proxy.workers()}
    assert isinstance(doc["cpu"]["proxy_s_per_gb"], float)


def test_cps_counts_add_up(bench, proxy):
    doc = bench("cps", "--proxy", url(proxy), "--count", "400", "--connections", "8")
    r = doc["results"]
    assert (r["connections"], r["errors"], r["attempts"]) == (400, 0, 400)
    lat = r["latency_us"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert doc["params"]["count"] == 400 and doc["cpu"]["proxy_ms_per_1000_conn"] is not None


def test_rr_transactions(bench, proxy):
    doc = bench("rr", "--proxy", url(proxy), "--count", "3000", "--connections", "4", "--size", "1000",
                "--proxy-pid", str(proxy.pid))
    r = doc["results"]
    assert (r["transactions"], r["errors"], r["connections"]) == (3000, 0, 4)
    assert doc["cpu"]["proxy_pids"] == sorted([proxy.pid, *proxy.workers()])
    timed = bench("rr", "--proxy", url(proxy), "--duration", "0.3", "--connections", "2")
    assert timed["results"]["transactions"] > 0 and timed["results"]["errors"] == 0


def test_idle_every_connection_answers(bench, proxy):
    doc = bench("idle", "--proxy", url(proxy), "--connections", "200", "--duration", "0.2")
    r = doc["results"]
    assert r["connections"] == r["answered"] == r["requested"] == 200
    assert isinstance(r["rss_per_conn_kb"], float) and isinstance(r["pss_per_conn_kb"], float)


def test_load_split_over_processes(bench, proxy):
    cps = bench("cps", "--proxy", url(proxy), "--count", "301", "--connections", "4", "--clients-procs", "2")
    assert (cps["results"]["connections"], cps["results"]["errors"]) == (301, 0)
    assert cps["cpu"]["loadgen_procs"] == 2
    bulk = bench("bulk", "--proxy", url(proxy), "--streams", "2", "--bytes", "2M", "--verify",
                 "--clients-procs", "2")
    assert bulk["results"]["bytes"] == 2 * (2 << 20) and bulk["results"]["streams_ok"] == 2


def test_ipv6_proxy(bench, start_server):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = start_server("--listen", "[::1]:0")
    doc = bench("cps", "--proxy", f"socks5://[::1]:{server.port}", "--count", "100")
    assert doc["proxy"] == f"socks5://[::1]:{server.port}"
    assert (doc["results"]["connections"], doc["results"]["errors"]) == (100, 0)


def test_external_echo_target(bench, proxy, echo_target):
    target = f"127.0.0.1:{echo_target.port}"
    doc = bench("rr", "--proxy", url(proxy), "--target", target, "--count", "200", "--connections", "2")
    assert doc["results"]["transactions"] == 200 and doc["params"]["target_builtin"] is False
    refused = bench("bulk", "--proxy", url(proxy), "--target", target, "--bytes", "1M", expect=1)
    assert "does not speak the bench protocol" in refused.stderr


def test_unreachable_proxy_is_one_clear_error(bench):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: refused
        failed = bench("cps", "--proxy", f"socks5://127.0.0.1:{port}", "--count", "10", expect=1)
    assert f"proxy 127.0.0.1:{port}: Connection refused" in failed.stderr


# --------------------------------------------------------------------- direct


@pytest.mark.parametrize(("mode", "args", "check"), [
    ("bulk", ["--streams", "2", "--bytes", "2M", "--direction", "both", "--verify"],
     lambda r: r["bytes"] == 2 * 2 * (2 << 20) and r["streams_ok"] == 2),
    ("cps", ["--count", "200"], lambda r: r["connections"] == 200 and r["errors"] == 0),
    ("rr", ["--count", "1000", "--connections", "4"], lambda r: r["transactions"] == 1000),
    ("idle", ["--connections", "50", "--duration", "0.1"], lambda r: r["answered"] == r["connections"] == 50),
])
def test_direct(bench, mode, args, check):
    doc = bench(mode, "--direct", *args)
    assert check(doc["results"]), doc["results"]
    assert doc["proxy"] is None and doc["cpu"]["proxy_s"] is None and doc["params"]["direct"] is True


# --------------------------------------------------------------------- RFC 1929 client side


class AuthProxy:
    """A tiny threaded SOCKS5 CONNECT proxy that demands username/password (RFC 1929)."""

    def __init__(self, username: bytes, password: bytes) -> None:
        self.credentials = (username, password)
        self.logins = 0
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        with conn:
            try:
                upstream = self._handshake(conn)
            except (OSError, ConnectionError):
                return
            if upstream is None:
                return
            with upstream:
                pump = threading.Thread(target=_copy, args=(upstream, conn), daemon=True)
                pump.start()
                _copy(conn, upstream)
                pump.join(10)

    def _handshake(self, conn: socket.socket) -> socket.socket | None:
        _, count = recv_exact(conn, 2)
        if 2 not in recv_exact(conn, count):
            conn.sendall(b"\x05\xff")
            return None
        conn.sendall(b"\x05\x02")
        _, ulen = recv_exact(conn, 2)
        user = recv_exact(conn, ulen)
        password = recv_exact(conn, recv_exact(conn, 1)[0])
        if (user, password) != self.credentials:
            conn.sendall(b"\x01\x01")
            return None
        conn.sendall(b"\x01\x00")
        self.logins += 1
        head = recv_exact(conn, 4)
        assert head[3] == 1, "this stand-in only takes IPv4 destinations"
        host = socket.inet_ntoa(recv_exact(conn, 4))
        port = struct.unpack("!H", recv_exact(conn, 2))[0]
        upstream = socket.create_connection((host, port))
        conn.sendall(b"\x05\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port))
        return upstream

    def close(self) -> None:
        self.sock.close()


def _copy(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def test_username_password_authentication(bench):
    proxy = AuthProxy(b"alice", b"s3cret")
    try:
        doc = bench("cps", "--proxy", f"socks5://alice:s3cret@127.0.0.1:{proxy.port}", "--count", "40",
                    "--connections", "4", "--proxy-pid", str(os.getpid()))
        assert (doc["results"]["connections"], doc["results"]["errors"]) == (40, 0)
        assert proxy.logins == 41  # the preflight's and the run's
        assert doc["proxy"] == f"socks5://alice:***@127.0.0.1:{proxy.port}"
        wrong = bench("cps", "--proxy", f"socks5://alice:guess@127.0.0.1:{proxy.port}", "--count", "5", expect=1)
        assert "refused the user name and password" in wrong.stderr
        anonymous = bench("cps", "--proxy", f"socks5://127.0.0.1:{proxy.port}", "--count", "5", expect=1)
        assert "does not accept no authentication" in anonymous.stderr
    finally:
        proxy.close()


# --------------------------------------------------------------------- serve, and cleanup


def test_serve_is_a_target_for_another_run(bench):
    serve = subprocess.Popen(BENCH + ["serve", "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = serve.stdout.readline()
        port = int(line.rsplit(":", 1)[1].split()[0])
        doc = bench("bulk", "--direct", "--target", f"127.0.0.1:{port}", "--bytes", "2M", "--direction", "both",
                    "--verify")
        assert doc["results"]["bytes"] == 2 * (2 << 20)
        assert bench("cps", "--direct", "--target", f"127.0.0.1:{port}", "--count", "50")["results"]["connections"] == 50
    finally:
        serve.send_signal(signal.SIGINT)
        assert serve.wait(10) == 0


def test_interrupt_leaves_nothing_behind(proxy):
    run = subprocess.Popen(BENCH + ["cps", "--proxy", url(proxy), "--duration", "60", "--clients-procs", "2",
                                    "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        kids = wait_until(lambda: (k := children_of(run.pid)) and len(k) == 3 and k, what="target and 2 shares")
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=20)
        assert run.returncode == 130 and "interrupted" in err
        wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in kids), what="children gone")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


# --------------------------------------------------------------------- udp


def test_udp_through_fastsocks(bench, proxy):
    doc = bench("udp", "--proxy", url(proxy), "--connections", "2", "--inflight", "8", "--size", "300",
                "--count", "4000")
    r = doc["results"]
    assert r["datagrams"] > 0 and r["sent"] == 4000
    assert r["lost"] == r["sent"] - r["datagrams"] and r["lost"] <= 40   # loopback: none or a few
    assert r["bytes_compared"] >= r["datagrams"] * 300 and r["error_kinds"].get("mismatch") is None
    assert r["associations"] == 2
    assert 0 < r["latency_us"]["p50"] <= r["latency_us"]["p99"] <= r["latency_us"]["max"]
    assert doc["cpu"]["proxy_us_per_dgram"] is not None
    timed = bench("udp", "--proxy", url(proxy), "--duration", "0.3")
    assert timed["results"]["datagrams"] > 0 and timed["params"]["inflight"] == 32


def test_udp_direct(bench):
    doc = bench("udp", "--direct", "--count", "2000", "--size", "64")
    r = doc["results"]
    assert r["datagrams"] > 0 and r["lost"] <= 20 and r["bytes_compared"] >= r["datagrams"] * 64
    assert doc["cpu"]["proxy_s"] is None


def test_udp_paced_sends_at_the_rate_asked_not_as_fast_as_echoes_come(bench, proxy):
    """--rate is an open load: evenly spaced datagrams, never more than asked for, however
    fast the echoes come back (closed loop, the same run sends several times as many)."""
    paced = bench("udp", "--proxy", url(proxy), "--connections", "2", "--rate", "2000", "--duration", "1")
    r = paced["results"]
    assert paced["params"]["rate"] == 2000 and r["rate"] == 2000
    assert 0 < r["sent"] <= 2000 * 1.0 + 50        # one datagram per 500 us, a second's worth
    assert r["datagrams"] + r["lost"] == r["sent"] and r["unsent"] == 0
    closed = bench("udp", "--proxy", url(proxy), "--connections", "2", "--duration", "1")
    assert closed["results"]["sent"] > 2 * r["sent"]


def test_udp_refused_association_is_one_clear_error(bench):
    # A TCP-only SOCKS5 stand-in that refuses UDP ASSOCIATE (command not supported).
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve():
            with listener.accept()[0] as conn:
                recv_exact(conn, 3)
                conn.sendall(b"\x05\x00")
                recv_exact(conn, 10)
                conn.sendall(b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00")
        threading.Thread(target=serve, daemon=True).start()
        done = bench("udp", "--proxy", f"socks5://127.0.0.1:{listener.getsockname()[1]}", "--count", "10",
                     expect=1)
    assert "UDP ASSOCIATE" in done.stderr and "command_not_supported" in done.stderr


def test_the_targets_port_is_found_when_every_ephemeral_port_is_taken():
    """After a connection-rate run every ephemeral port can be held in TIME_WAIT, and
    bind(port 0) fails; the target listens below that range, so the next run still starts."""
    from fastsocks.bench.params import Endpoint
    from fastsocks.bench.targets import LISTEN_PORTS, listening_pair

    tcp, udp = listening_pair(Endpoint("127.0.0.1", 0))
    with tcp, udp:
        port = tcp.getsockname()[1]
        assert LISTEN_PORTS[0] <= port < LISTEN_PORTS[1] and udp.getsockname()[1] == port
        again, again_udp = listening_pair(Endpoint("127.0.0.1", 0))
        with again, again_udp:
            assert again.getsockname()[1] != port
