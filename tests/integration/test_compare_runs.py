"""The comparison suite run for real, with stand-ins: a tiny SOCKS5 greeting server and a
stand-in for `fastsocks bench` that writes JSON in its format, driven through the whole
matrix (every server started is stopped, interrupts keep what was measured), and Dante's
own check of the config compare.py writes for it. No assertion on speed anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import compare  # benchmarks/compare.py (pyproject puts benchmarks/ on sys.path)
import pytest
from support import require_tool

from comparison.matrix import bench_available
from comparison.servers import ServerSpec, dante_config
from comparison.supervise import ServerError, Supervisor, start_server
from comparison.workloads import QUICK, WORKLOADS

W = WORKLOADS


def test_dante_accepts_the_config_written_for_it(tmp_path):
    danted = require_tool("danted")
    path = tmp_path / "danted.conf"
    path.write_text(dante_config(10800))
    done = subprocess.run([danted, "-V", "-f", str(path)], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------ the whole matrix, with stand-ins

TINY_SOCKS = """
import socket, sys
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = srv.accept()
    with conn:
        if conn.recv(3) == b"\\x05\\x01\\x00":
            conn.sendall(b"\\x05\\x00")
"""

# Accepts `fastsocks bench`'s command line and writes JSON in its format; the numbers are
# made up (they only have to flow through), but it does greet the proxy it is given.
STANDIN_BENCH = """
import argparse, json, os, socket, sys
p = argparse.ArgumentParser()
p.add_argument("mode", choices=["bulk", "cps", "rr", "idle"])
g = p.add_mutually_exclusive_group(required=True)
g.add_argument("--proxy"); g.add_argument("--direct", action="store_true")
for opt in ("--connections", "--streams", "--bytes", "--size", "--count", "--proxy-pid"):
    p.add_argument(opt, type=int)
p.add_argument("--duration", type=float); p.add_argument("--direction")
p.add_argument("--json"); p.add_argument("--quiet", action="store_true")
a = p.parse_args()
if os.environ.get("STANDIN_FAIL_MODE") == a.mode:
    sys.exit("stand-in: failing on purpose")
if a.proxy:
    assert a.proxy_pid and os.path.exists(f"/proc/{a.proxy_pid}"), "the proxy pid must be live"
    host, port = a.proxy.rsplit("/", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"\\x05\\x01\\x00")
        assert s.recv(2) == b"\\x05\\x00"
n = int(os.environ.get("STANDIN_BASE", "10")) + (7 if a.direct else 0)
results = {
    "bulk": {"bytes": (a.bytes or 0) * (a.streams or 1), "gbit_s": float(n), "streams": a.streams},
    "cps": {"connections": 100, "errors": 0, "conn_per_s": 100.0 * n,
            "latency_us": {"p50": 50, "p90": 80, "p99": 120, "max": 300}},
    "rr": {"transactions": 1000, "txn_per_s": 1000.0 * n, "latency_us": {"p50": 30, "p99": 60, "max": 90}},
    "idle": {"connections": a.connections, "answered": a.connections, "rss_per_conn_kb": 5.0,
             "pss_per_conn_kb": 3.0},
}[a.mode]
cpu = {"loadgen_s": 0.1, "proxy_s": None if a.direct else 0.05}
if not a.direct:
    cpu.update(proxy_s_per_gb=0.3, proxy_ms_per_1000_conn=120.0, proxy_us_per_txn=20.0)
problems = ["nothing completed: refused 16"] if os.environ.get("STANDIN_PROBLEM_MODE") == a.mode else []
doc = {"tool": "fastsocks bench", "version": "stand-in", "mode": a.mode, "proxy": a.proxy,
       "params": vars(a), "started_at": "2026-11-28T00:00:00Z", "duration_s": 0.1,
       "results": results, "cpu": cpu, "ok": not problems, "problems": problems,
       "warnings": ["3 connections failed: reset 3"] if a.mode == "cps" else []}
with open(a.json, "w") as f:
    json.dump(doc, f)
sys.exit(1 if problems else 0)
"""


@pytest.fixture
def standins(tmp_path):
    server = tmp_path / "tiny_socks.py"
    server.write_text(TINY_SOCKS)
    bench = tmp_path / "bench_standin.py"
    bench.write_text(textwrap.dedent(STANDIN_BENCH))
    servers = [ServerSpec("direct", "direct", "direct"),
               ServerSpec("tiny-a", "tiny A", "fastsocks",
                          lambda port, wd: [sys.executable, str(server), str(port)]),
               ServerSpec("tiny-b", "tiny B", "peer",
                          lambda port, wd: [sys.executable, str(server), str(port)])]
    return servers, [sys.executable, str(bench)]


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_whole_matrix_with_standins_writes_everything_and_stops_every_server(standins, tmp_path, monkeypatch):
    servers, bench = standins
    monkeypatch.setenv("STANDIN_FAIL_MODE", "rr")
    assert bench_available(bench) is None
    lines = []
    workloads = [W["bulk1"], W["rr"]]
    supervisor = Supervisor()
    doc, stem, table = compare.run_matrix(
        workloads=workloads, servers=servers, params=QUICK, repeats=2, bench_cmd=bench, pin=None,
        out_dir=tmp_path / "results", quick=True, run_timeout_s=30, command="test", settle_s=0,
        log=lines.append, supervisor=supervisor)
    order = [(r["workload"], r["server"]) for r in doc["runs"]]
    everyone = ("direct", "tiny-a", "tiny-b")
    assert order == [("bulk1", s) for s in everyone] * 2 + [("rr", s) for s in everyone] * 2
    assert len(lines) == len(order) and lines[0].startswith("[1/12] bulk1")
    bulk = [r for r in doc["runs"] if r["workload"] == "bulk1"]
    assert all(r["ok"] for r in bulk)
    argv = bulk[1]["bench_argv"]
    assert argv[:len(bench) + 1] == bench + ["bulk"]
    assert argv[-9:] == ["--streams", "1", "--bytes", str(QUICK.bulk_bytes), "--direction", "download",
                         "--json", argv[-2], "--quiet"]
    assert "--direct" in bulk[0]["bench_argv"] and "--proxy-pid" in bulk[1]["bench_argv"]
    assert all(not r["ok"] and "failing on purpose" in r["error"] for r in doc["runs"] if r["workload"] == "rr")
    # Every server started was stopped (and reaped), and nothing is left in the registry.
    pids = [r["server_pid"] for r in doc["runs"] if r["server_pid"]]
    assert len(pids) == 8 and len(set(pids)) == 8
    assert all(_pid_gone(pid) for pid in pids)
    assert supervisor.live == {}
    assert doc["summary"]["bulk1"]["direct"]["metrics"]["gbit_s"]["median"] == 17.0
    assert doc["ratios"]["bulk1"]["gbit_s"]["fastsocks"]["tiny-a"] == {"vs_best_peer": 1.0,
                                                                     "vs_direct": 10.0 / 17.0}
    assert "| 1 stream download | Gbit/s ↑ | 17.0 | 10.0 | 10.0 | tiny B 10.0 | 1.00× / 0.59× |" in table
    assert "failed" in table
    assert {p.suffix for p in stem.parent.iterdir()} >= {".json", ".md"}
    markdown = stem.with_suffix(".md").read_text()
    assert "| cores busy: proxy / load side | direct | tiny A | tiny B |" in markdown
    assert "| 1 stream download | — / 1.00 | 0.50 / 1.00 | 0.50 / 1.00 |" in markdown
    # --render rebuilds the same table from the raw runs alone.
    assert compare.rerender(stem.with_suffix(".json"))[2] == table
    assert stem.with_suffix(".md").read_text() == markdown
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["runs"][0]["bench"]["tool"] == "fastsocks bench"
    assert saved["runs"][0]["loadgen_busy"] == pytest.approx(0.1 / 0.1 / (os.cpu_count() or 1), abs=1e-3)


def test_interrupt_stops_servers_and_keeps_what_was_measured(standins, tmp_path):
    servers, bench = standins

    lines = []

    def log(line):
        lines.append(line)
        if len(lines) == 1:
            raise KeyboardInterrupt   # as if Ctrl-C arrived right after the first run

    supervisor = Supervisor()
    doc, stem, _ = compare.run_matrix(
        workloads=[W["cps"]], servers=servers, params=QUICK, repeats=3, bench_cmd=bench, pin=None,
        out_dir=tmp_path, quick=False, run_timeout_s=30, command="test", settle_s=0, log=log,
        supervisor=supervisor)
    assert doc["interrupted"] is True and len(doc["runs"]) == 1
    assert lines[-1].startswith("interrupted")
    assert supervisor.live == {}
    assert json.loads(stem.with_suffix(".json").read_text())["interrupted"] is True


def test_a_server_that_never_answers_fails_its_run_only(tmp_path):
    silent = ServerSpec("silent", "silent", "peer",
                        lambda port, wd: [sys.executable, "-c", "import time; time.sleep(60)"])
    supervisor = Supervisor()
    with pytest.raises(ServerError, match="did not answer"):
        start_server(silent, tmp_path, [], supervisor, ready_timeout_s=0.5, attempts=1)
    assert supervisor.live == {}


def test_bench_problems_fail_the_run_and_warnings_are_kept(standins, tmp_path, monkeypatch):
    servers, bench = standins
    monkeypatch.setenv("STANDIN_PROBLEM_MODE", "rr")
    doc, stem, _ = compare.run_matrix(
        workloads=[W["cps"], W["rr"]], servers=servers[1:], params=QUICK, repeats=1, bench_cmd=bench,
        pin=None, out_dir=tmp_path, quick=True, run_timeout_s=30, command="test", settle_s=0, log=lambda _: None)
    cps, rr = [r for r in doc["runs"] if r["server"] == "tiny-b"]
    assert cps["ok"] and cps["warnings"] == ["3 connections failed: reset 3"]
    assert not rr["ok"] and rr["error"] == "bench: nothing completed: refused 16"
    assert rr["bench"]["problems"] and rr["metrics"]["txn_per_s"] == 10000.0   # kept for a look, not counted
    assert doc["summary"]["rr"]["tiny-b"]["metrics"]["txn_per_s"]["n"] == 0
    markdown = stem.with_suffix(".md").read_text()
    assert "- bench warning, cps / tiny-b run 0: 3 connections failed: reset 3" in markdown
    assert "- failed: rr / tiny-b run 0: bench: nothing completed: refused 16" in markdown


def test_a_server_from_a_command_template_runs_like_the_built_in_ones(standins, tmp_path):
    _, bench = standins
    server = tmp_path / "tiny_socks.py"  # written by the standins fixture
    spec = compare.template_server(f"tiny-t={sys.executable} {server} {{port}}")
    assert (spec.kind, spec.missing()) == ("peer", None)
    doc, _, table = compare.run_matrix(
        workloads=[W["bulk1"]], servers=[ServerSpec("direct", "direct", "direct"), spec], params=QUICK,
        repeats=1, bench_cmd=bench, pin=None, out_dir=tmp_path / "results", quick=True, run_timeout_s=30,
        command="test", settle_s=0, log=lambda line: None, supervisor=Supervisor())
    run = next(r for r in doc["runs"] if r["server"] == "tiny-t")
    assert run["ok"] and str(server) in run["server_argv"]
    assert _pid_gone(run["server_pid"])
    assert "tiny-t" in table
