"""--metrics: the master serves Prometheus' text format; a real HTTP client scrapes it and
prometheus_client's own parser reads it. Every figure checked is one the test caused."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import fastsocks_command, socks5_connect, wait_until

METRICS_LINE = r"metrics on http://(\S+):(\d+)/metrics"


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample of one scrape: (name, sorted labels) -> value."""
    host, port = server.wait_for_log(METRICS_LINE).groups()
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def echo(proxy, port: int, payload: bytes) -> int:
    sock, (code, _, _) = socks5_connect(proxy, "127.0.0.1", port)
    with sock:
        if code == 0:
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += sock.recv(65536)
            assert got == payload
    return code


def socks4_connect(proxy, port: int) -> int:
    with socket.create_connection(proxy, timeout=10) as sock:
        sock.sendall(struct.pack("!BBH4s", 4, 1, port, socket.inet_aton("127.0.0.1")) + b"\x00")
        reply = sock.recv(8)
        return reply[1]


@pytest.fixture
def metered(start_server, tmp_path, echo_target):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    denied_port = closed.getsockname()[1]  # bound, never listening: nothing can answer there
    config = tmp_path / "fastsocks.toml"
    config.write_text(f"""
[server]
metrics = "127.0.0.1:0"

[[rules]]
action = "deny"
dest = ["127.0.0.1"]
port = [{denied_port}]

[[rules]]
action = "allow"
""")
    server = start_server("--config", str(config), "--workers", "2")
    # "listening on" comes before the forks: a scrape that early truly shows fewer workers
    wait_until(lambda: value(scrape(server), "fastsocks_workers") == 2, what="both workers in the metrics")
    yield server, echo_target, denied_port, config
    closed.close()


def test_a_scrape_counts_the_sessions_bytes_and_denials_it_saw(metered):
    server, target, denied_port, _ = metered
    before = scrape(server)
    assert value(before, "fastsocks_sessions_total", protocol="socks5", command="connect") == 0
    for _ in range(3):
        assert echo(server.address, target.port, b"x" * 1000) == 0
    assert socks4_connect(server.address, target.port) == 90
    assert echo(server.address, denied_port, b"") == 2  # connection_not_allowed, by rule #1

    def counted():
        s = scrape(server)
        return s if value(s, "fastsocks_bytes_total", direction="up") >= 3000 and \
            value(s, "fastsocks_sessions_total", protocol="socks5", command="connect") >= 4 else None

    samples = wait_until(counted, what="the sessions in the metrics")
    assert value(samples, "fastsocks_sessions_total", protocol="socks5", command="connect") == 4
    assert value(samples, "fastsocks_sessions_total", protocol="socks4", command="connect") == 1
    assert value(samples, "fastsocks_replies_total", reply="succeeded") == 4
    assert value(samples, "fastsocks_replies_total", reply="connection_not_allowed") == 1
    assert value(samples, "fastsocks_policy_denials_total", rule="#1") == 1
    assert value(samples, "fastsocks_bytes_total", direction="down") >= 3000
    assert value(samples, "fastsocks_connections_accepted_total") >= 5
    workers = [value(samples, "fastsocks_worker_rss_bytes", worker=str(slot)) for slot in (0, 1)]
    assert all(rss > 1 << 20 for rss in workers)
    assert value(samples, "fastsocks_worker_open_fds", worker="0") > 3


def test_restarts_and_reloads_are_counted(metered):
    server, _, _, config = metered
    os.kill(server.wait_workers(2)[0], signal.SIGKILL)
    wait_until(lambda: value(scrape(server), "fastsocks_worker_restarts_total") == 1, what="one restart")
    os.kill(server.pid, signal.SIGHUP)
    server.wait_for_log("SIGHUP: reloaded")
    config.write_text(config.read_text() + "\n[[rules]]\naction = \"maybe\"\n")
    os.kill(server.pid, signal.SIGHUP)
    server.wait_for_log("SIGHUP: keeping the current configuration")
    samples = scrape(server)
    assert value(samples, "fastsocks_config_reloads_total", result="ok") == 1
    assert value(samples, "fastsocks_config_reloads_total", result="error") == 1
    assert value(samples, "fastsocks_workers") == 2


def test_a_cap_refusal_is_counted_by_cap(start_server, echo_target):
    server = start_server("--metrics", "127.0.0.1:0", "--max-sessions-per-client", "1")
    held, (code, _, _) = socks5_connect(server.address, "127.0.0.1", echo_target.port)
    with held:
        assert code == 0
        assert echo(server.address, echo_target.port, b"") == 1  # general failure: over the cap
    samples = wait_until(lambda: (s := scrape(server)) and
                         value(s, "fastsocks_cap_refusals_total", cap="max_sessions_per_client") and s,
                         what="the refusal in the metrics")
    assert value(samples, "fastsocks_cap_refusals_total", cap="max_sessions_per_client") == 1
    assert value(samples, "fastsocks_cap_refusals_total", cap="max_sessions") == 0


def test_the_metrics_port_is_refused_clearly_when_taken(start_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(AssertionError, match="cannot serve metrics on 127.0.0.1:%d" % port):
            start_server("--metrics", f"127.0.0.1:{port}")


def test_status_shows_a_running_server_at_a_glance(metered):
    server, target, _, config = metered
    assert echo(server.address, target.port, b"y" * 100) == 0
    wait_until(lambda: (s := scrape(server)) and s[("fastsocks_sessions_active", ())] == 0 and
               value(s, "fastsocks_sessions_total", protocol="socks5", command="connect") == 1,
               what="the session over, in the metrics (the active gauge lags up to a second)")
    host, port = server.wait_for_log(METRICS_LINE).groups()
    named = config.with_name("status.toml")  # the server's own says port 0: the kernel chose
    named.write_text(f'[server]\nmetrics = "{host}:{port}"\n')
    for where in (["--metrics", f"{host}:{port}"], ["--config", str(named)]):
        out = subprocess.run(fastsocks_command() + ["status", "--interval", "0.2", *where],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "workers        2 live, 0 restarted" in out.stdout
        assert "sessions       0 active, 1 in all" in out.stdout
        assert re.search(r"worker 1 +\d+\.\d MiB, \d+ fds, \d+% CPU", out.stdout)
    down = subprocess.run(fastsocks_command() + ["status", "--metrics", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "cannot read http://127.0.0.1:1/metrics" in down.stderr


def histogram(samples, name: str) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative buckets by bound, count, sum) of one histogram in a scrape."""
    buckets = sorted((float(dict(labels)["le"]), v) for (n, labels), v in samples.items() if n == name + "_bucket")
    return buckets, value(samples, name + "_count"), value(samples, name + "_sum")


def test_the_phase_histograms_count_the_sessions_that_went_through_each_phase(metered, localhost_target):
    server, target, denied_port, _ = metered
    named = localhost_target()
    for _ in range(3):
        assert echo(server.address, target.port, b"z" * 10) == 0        # engine: handshake, connect
    assert socks4_connect(server.address, target.port) == 90             # engine: handshake, connect
    assert echo(server.address, denied_port, b"") == 2                  # refused by rule #1: handshake only
    sock, (code, _, _) = socks5_connect(server.address, "localhost", named.port)
    with sock:
        assert code == 0                                                 # Python: handshake, DNS, connect

    def counted():
        s = scrape(server)
        return s if histogram(s, "fastsocks_handshake_seconds")[1] >= 6 and \
            histogram(s, "fastsocks_dns_seconds")[1] >= 1 else None

    samples = wait_until(counted, what="six handshakes in the histogram")
    for name, sessions in (("fastsocks_handshake_seconds", 6), ("fastsocks_dns_seconds", 1),
                           ("fastsocks_connect_seconds", 5)):
        buckets, count, total_s = histogram(samples, name)
        assert count == sessions, name
        assert [bound for bound, _ in buckets] == [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                   0.5, 1.0, 2.5, 5.0, 10.0, float("inf")]
        assert buckets[-1][1] == count and all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
        assert total_s > 0
    assert value(samples, "fastsocks_policy_denials_total", rule="#1") == 1
