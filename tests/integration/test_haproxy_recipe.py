"""The README's scale-out recipe, built for real: HAProxy (TCP mode, send-proxy-v2) in front of
two fastsocks hosts, each in its own network namespace, joined by veth pairs:

    client ns (10.77.1.2, 10.77.1.3) -- haproxy ns (10.77.1.1 | 10.77.2.1, 10.77.3.1)
                                             |-- host a ns (10.77.2.2): fastsocks + targets on its lo
                                             |-- host b ns (10.77.3.2): fastsocks + targets on its lo

Checked: connections are spread over both hosts, a client rule on the real client address
is enforced through HAProxy, and draining one host (SIGTERM) loses no session."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from support import fastsocks_command, require_client, wait_until

TAG = f"fs{os.getpid() % 100000}"
NS = {name: f"{TAG}{name}" for name in ("c", "h", "a", "b")}
HTTP_PORT, ECHO_PORT, SOCKS_PORT = 8080, 7000, 1080
HOSTS = {"a": "10.77.2.2", "b": "10.77.3.2"}

# A target on each host's own loopback: HTTP says which host it is, the echo port says so
# and then echoes. Run in the host's namespace by the test.
TARGETS = textwrap.dedent("""
    import socket, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    name = sys.argv[1]
    class Who(BaseHTTPRequestHandler):
        def do_GET(self):
            body = name.encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args): pass
    http = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Who)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    echo = socket.create_server(("127.0.0.1", int(sys.argv[3])))
    def serve(conn):
        with conn:
            conn.sendall(name.encode())
            while data := conn.recv(65536):
                conn.sendall(data)
    print("ready", flush=True)
    while True:
        threading.Thread(target=serve, args=(echo.accept()[0],), daemon=True).start()
""")

# A SOCKS5 stream from the client namespace: which host served, bytes echoed back intact.
STREAM = textwrap.dedent("""
    import json, os, socket, struct, sys, time
    src, seconds = sys.argv[1], float(sys.argv[2])
    s = socket.socket(); s.bind((src, 0)); s.settimeout(20); s.connect(("10.77.1.1", 1080))
    def exact(n):
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk: raise ConnectionError(f"closed after {len(data)} of {n}")
            data += chunk
        return data
    s.sendall(b"\\x05\\x01\\x00"); assert exact(2) == b"\\x05\\x00"
    s.sendall(b"\\x05\\x01\\x00\\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", 7000))
    head = exact(10)
    if head[1] != 0:
        print(json.dumps({"reply": head[1]})); sys.exit(0)
    host = exact(1).decode()
    print(json.dumps({"reply": 0, "host": host}), flush=True)
    sent = 0; deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        chunk = os.urandom(8192); s.sendall(chunk); assert exact(len(chunk)) == chunk; sent += len(chunk)
        time.sleep(0.01)
    print(json.dumps({"done": sent}), flush=True)
""")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30)


def in_ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", NS[ns], *args]


@pytest.fixture
def recipe(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    require_client(shutil.which("haproxy") is not None, "haproxy (Debian package haproxy)")
    require_client(shutil.which("curl") is not None, "curl")
    procs: list[subprocess.Popen] = []
    try:
        build_network()
        for name, address in HOSTS.items():
            procs.append(start_targets(name))
        rules = tmp_path / "fastsocks.toml"
        rules.write_text('[[rules]]\naction = "deny"\nclient = ["10.77.1.3"]\n\n'
                         '[[rules]]\naction = "allow"\nclient = ["10.77.1.0/24"]\ndest = ["127.0.0.1"]\n')
        servers = {}
        for name, address in HOSTS.items():
            log = (tmp_path / f"{name}.log").open("w")
            servers[name] = subprocess.Popen(
                in_ns(name, *fastsocks_command(), "--proxy-listen", f"{address}:{SOCKS_PORT}",
                      "--trusted-proxy", address.rsplit(".", 1)[0] + ".1", "--config", str(rules),
                      "--workers", "1", "--graceful-timeout", "20"),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(servers[name])
        for name in HOSTS:
            wait_until(lambda n=name: "listening on" in (tmp_path / f"{n}.log").read_text(), what=f"fastsocks {name}")
        config = tmp_path / "haproxy.cfg"
        config.write_text(textwrap.dedent(f"""
            global
                maxconn 512
            defaults
                mode tcp
                timeout connect 2s
                timeout client 60s
                timeout server 60s
                retries 3
                option redispatch
            frontend socks
                bind 10.77.1.1:{SOCKS_PORT}
                default_backend hosts
            backend hosts
                balance roundrobin
                server a {HOSTS['a']}:{SOCKS_PORT} send-proxy-v2 check check-send-proxy inter 300ms fall 1 rise 2
                server b {HOSTS['b']}:{SOCKS_PORT} send-proxy-v2 check check-send-proxy inter 300ms fall 1 rise 2
        """))
        haproxy = subprocess.Popen(in_ns("h", "haproxy", "-db", "-f", str(config)),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(haproxy)
        wait_until(lambda: curl("10.77.1.2", check=False) in HOSTS, what="HAProxy serving")
        yield servers, tmp_path
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for ns in NS.values():
            sh("ip", "netns", "del", ns, check=False)


def build_network() -> None:
    for ns in NS.values():
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    links = [("c", "10.77.1.2/24", "h", "10.77.1.1/24"), ("a", "10.77.2.2/24", "h", "10.77.2.1/24"),
             ("b", "10.77.3.2/24", "h", "10.77.3.1/24")]
    for i, (left, left_ip, right, right_ip) in enumerate(links):
        l_if, r_if = f"{TAG}l{i}", f"{TAG}r{i}"
        sh("ip", "link", "add", l_if, "netns", NS[left], "type", "veth", "peer", "name", r_if, "netns", NS[right])
        sh("ip", "-n", NS[left], "addr", "add", left_ip, "dev", l_if)
        sh("ip", "-n", NS[right], "addr", "add", right_ip, "dev", r_if)
        sh("ip", "-n", NS[left], "link", "set", l_if, "up")
        sh("ip", "-n", NS[right], "link", "set", r_if, "up")
    sh("ip", "-n", NS["c"], "addr", "add", "10.77.1.3/24", "dev", f"{TAG}l0")


def start_targets(name: str) -> subprocess.Popen:
    proc = subprocess.Popen(in_ns(name, sys.executable, "-c", TARGETS, name, str(HTTP_PORT), str(ECHO_PORT)),
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def curl(source: str, check: bool = True) -> str:
    """curl in the client namespace, from ``source``, through HAProxy: the host's name."""
    out = subprocess.run(in_ns("c", "curl", "-s", "--max-time", "5", "--interface", source,
                               "--socks5", f"10.77.1.1:{SOCKS_PORT}", f"http://127.0.0.1:{HTTP_PORT}/who"),
                         capture_output=True, text=True, timeout=30)
    if check:
        assert out.returncode == 0, out.stderr
    return out.stdout


def test_connections_are_spread_over_both_hosts(recipe):
    seen = [curl("10.77.1.2") for _ in range(10)]
    assert set(seen) == {"a", "b"}
    assert min(seen.count("a"), seen.count("b")) >= 3


def test_a_client_rule_on_the_real_address_holds_through_haproxy(recipe):
    servers, logs = recipe
    result = subprocess.run(in_ns("c", sys.executable, "-c", STREAM, "10.77.1.3", "0"),
                            capture_output=True, text=True, timeout=30)
    assert result.stdout == ""  # closed at accept, before any reply
    assert result.returncode != 0 and "closed after 0 of 2" in result.stderr
    wait_until(lambda: any("client=10.77.1.3:" in (logs / f"{n}.log").read_text()
                           and "closed at accept: denied by rule #1" in (logs / f"{n}.log").read_text()
                           for n in HOSTS), what="the denial logged with the real client")
    assert curl("10.77.1.2") in HOSTS  # the other client address is let through


def test_draining_one_host_loses_no_session(recipe):
    servers, logs = recipe
    streams = [subprocess.Popen(in_ns("c", sys.executable, "-c", STREAM, "10.77.1.2", "4"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    hosts = [json.loads(s.stdout.readline())["host"] for s in streams]
    assert set(hosts) == {"a", "b"}
    servers["a"].send_signal(signal.SIGTERM)  # the master drains: its sessions go on
    time.sleep(0.5)
    after = [curl("10.77.1.2") for _ in range(6)]  # HAProxy sends new ones to b
    assert set(after) == {"b"}
    for stream in streams:
        out, err = stream.communicate(timeout=30)
        assert stream.returncode == 0, err
        assert json.loads(out.splitlines()[-1])["done"] > 0
    assert servers["a"].wait(30) == 0
    assert "draining" in (logs / "a.log").read_text()
