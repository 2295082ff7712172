"""The same benchmark matrix against fastsocks and the SOCKS5 servers people run today,
side by side: medians with min-max, ratios to the best peer and to direct, a Markdown
table and a chart.

    python benchmarks/compare.py                      # everything installed, 3 repeats
    python benchmarks/compare.py --quick              # smoke run: small sizes, 1 repeat
    python benchmarks/compare.py --pin 1              # each proxy on CPU 1, load on the rest
    python benchmarks/compare.py --servers fastsocks-1w,dante --workloads bulk1,cps
    python benchmarks/compare.py --check              # which servers are installed, and how
                                                      # to install the others
    python benchmarks/compare.py --render benchmarks/results/2026-11-28-vm.json
                                                      # rebuild table and chart from raw runs

Servers: fastsocks with 1 and 2 workers, Dante (`danted`, Debian package dante-server,
run with a loopback-only config written here), microsocks (Debian package microsocks),
pproxy (PyPI), and `direct` (the same work without a proxy: the physical reference). A
server that is not installed is skipped with one line saying how to install it.

Load: `fastsocks bench` in a subprocess (`python -m fastsocks bench`, else
`python -m fastsocks.bench`; `--bench CMD` for another), one run per cell:
    bulk1   1 stream download               Gbit/s,  proxy CPU s/GB
    bulk16  16 parallel streams download    Gbit/s,  proxy CPU s/GB
    cps     16 clients: connect, SOCKS5, 64 B echo, close; conn/s, latency, CPU ms/1000 conn
    rr      32 connections, 64 B request/response; txn/s, p99, CPU us/txn
    idle    N connections held open; the proxy's PSS/RSS growth per connection

Fairness. Every measurement gets a freshly started server on a fresh loopback port, and
the server is stopped (and its whole process group gone) before the next one starts:
no run inherits another's memory, sockets in TIME_WAIT, warmed pools or leaked state, and
the idle-memory baseline is always a fresh process. The order is
    for workload: for repeat: for server: run
so the servers of one workload are interleaved (A B C A B C ...) and all cells of a row
are measured within the same few minutes, under the same machine conditions. With
`--pin CPUS` every proxy runs under `taskset -c CPUS` and the load generator (with its
target servers) under `taskset -c` the remaining CPUs, direct included (pinned to one
CPU, the two workers of fastsocks-2w share it: that shows the cost of a second worker,
not scaling; leave --pin off, or pin 2 CPUs on a bigger machine, for that). A median is
taken over the successful runs of a cell; a cell with a failed run says so (n=2/3).

Everything is loopback-only (127.0.0.1), every run is bounded by --run-timeout, and every
server started here is stopped by its pid (and process group), also on errors and Ctrl-C.

Output: benchmarks/results/<YYYY-MM-DD>-<host>[-quick][-N].json (every raw run with its
bench JSON, the medians, the ratios, the setup), the same stem .md (the table, plus a
second one of the CPU cores each side kept busy, to tell whether the proxy or the load
generator set the pace) and .png (the chart: one panel per workload).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

SCHEMA = "fastsocks-compare/1"
HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
LOOPBACK = "127.0.0.1"


# ============================================================== workloads and metrics


@dataclass(frozen=True)
class Params:
    """Sizes and durations of the matrix; `QUICK` is the smoke-run preset."""

    bulk_bytes: int = 1 << 30        # total per run; split over the streams of bulk16
    bulk_streams: int = 16
    cps_clients: int = 16
    cps_duration_s: float = 5.0
    rr_connections: int = 32
    rr_size: int = 64
    rr_duration_s: float = 5.0
    idle_connections: int = 3000
    udp_associations: int = 4
    udp_inflight: int = 32
    udp_size: int = 512
    udp_duration_s: float = 5.0


FULL = Params()
QUICK = Params(bulk_bytes=128 << 20, cps_duration_s=1.0, rr_duration_s=1.0, idle_connections=300,
               udp_duration_s=1.0)


@dataclass(frozen=True)
class Metric:
    key: str                      # name in the summary and the JSON
    label: str                    # row label in the table
    unit: str
    path: tuple[str, ...]         # where it is in the bench JSON
    higher_is_better: bool
    vs_direct: bool = True        # a ratio to direct makes sense (direct measures it too)

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    mode: str
    args: Callable[[Params], list[str]]
    metrics: tuple[Metric, ...]
    primary: str                  # the metric the chart shows
    cost: str | None = None       # the CPU (or memory) per unit of work, annotated on the chart
    direct: bool = True           # whether `direct` can run it
    unsupported: tuple[tuple[str, str], ...] = ()  # (server name, why it cannot run this)

    def skip_reason(self, server: str) -> str | None:
        return dict(self.unsupported).get(server)


def _bulk_metrics(tag: str) -> tuple[Metric, ...]:
    return (
        Metric("gbit_s", f"{tag} download", "Gbit/s", ("results", "gbit_s"), True),
        Metric("proxy_s_per_gb", f"{tag}: proxy CPU", "s/GB", ("cpu", "proxy_s_per_gb"), False, False),
    )


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload(
        "bulk1", "1 stream download", "bulk",
        lambda p: ["--streams", "1", "--bytes", str(p.bulk_bytes), "--direction", "download"],
        _bulk_metrics("1 stream"), primary="gbit_s", cost="proxy_s_per_gb",
    ),
    Workload(
        "bulk16", "16 streams download", "bulk",
        lambda p: ["--streams", str(p.bulk_streams), "--bytes", str(max(1, p.bulk_bytes // p.bulk_streams)),
                   "--direction", "download"],
        _bulk_metrics("16 streams"), primary="gbit_s", cost="proxy_s_per_gb",
    ),
    Workload(
        "cps", "new connections, 16 clients", "cps",
        lambda p: ["--connections", str(p.cps_clients), "--duration", f"{p.cps_duration_s:g}"],
        (
            Metric("conn_per_s", "connections/s, 16 clients", "conn/s", ("results", "conn_per_s"), True),
            Metric("p50_us", "connection latency p50", "µs", ("results", "latency_us", "p50"), False),
            Metric("p99_us", "connection latency p99", "µs", ("results", "latency_us", "p99"), False),
            Metric("proxy_ms_per_1000_conn", "connections: proxy CPU", "ms/1000 conn",
                   ("cpu", "proxy_ms_per_1000_conn"), False, False),
            Metric("errors", "connections: errors per run", "count", ("results", "errors"), False, False),
        ),
        primary="conn_per_s", cost="proxy_ms_per_1000_conn",
    ),
    Workload(
        "rr", "64 B request/response, 32 connections", "rr",
        lambda p: ["--connections", str(p.rr_connections), "--size", str(p.rr_size),
                   "--duration", f"{p.rr_duration_s:g}"],
        (
            Metric("txn_per_s", "64 B req/resp, 32 conns", "txn/s", ("results", "txn_per_s"), True),
            Metric("p99_us", "req/resp latency p99", "µs", ("results", "latency_us", "p99"), False),
            Metric("proxy_us_per_txn", "req/resp: proxy CPU", "µs/txn", ("cpu", "proxy_us_per_txn"), False, False),
        ),
        primary="txn_per_s", cost="proxy_us_per_txn",
    ),
    Workload(
        "idle", "memory per idle connection", "idle",
        lambda p: ["--connections", str(p.idle_connections)],
        (
            Metric("pss_per_conn_kb", "idle connection: PSS growth", "KB/conn",
                   ("results", "pss_per_conn_kb"), False, False),
            Metric("rss_per_conn_kb", "idle connection: RSS growth", "KB/conn",
                   ("results", "rss_per_conn_kb"), False, False),
            Metric("unanswered", "idle connections not answering", "count", (), False, False),
        ),
        primary="pss_per_conn_kb", direct=False,
    ),
    Workload(
        "udp", "UDP datagrams, 4 associations x 32 in flight", "udp",
        lambda p: ["--connections", str(p.udp_associations), "--inflight", str(p.udp_inflight),
                   "--size", str(p.udp_size), "--duration", f"{p.udp_duration_s:g}"],
        (
            Metric("dgram_per_s", "512 B UDP datagrams", "dgram/s", ("results", "dgram_per_s"), True),
            Metric("p99_us", "UDP round trip p99", "µs", ("results", "latency_us", "p99"), False),
            Metric("loss_pct", "UDP datagrams lost", "%", ("results", "loss_pct"), False, False),
            Metric("proxy_us_per_dgram", "UDP: proxy CPU", "µs/dgram", ("cpu", "proxy_us_per_dgram"), False, False),
        ),
        primary="dgram_per_s", cost="proxy_us_per_dgram",
        unsupported=(
            ("microsocks", "microsocks has no UDP ASSOCIATE"),
            ("pproxy", "pproxy's socks5 listener does not answer UDP ASSOCIATE on its TCP port "
                       "(it relays UDP only on a separate -ul listener)"),
        ),
    ),
)}


def unsupported_cells(workloads: list[Workload], servers: list[ServerSpec]) -> list[dict]:
    """The (workload, server) pairs that cannot run, each with its reason."""
    return [{"workload": w.name, "server": s.name, "reason": why}
            for w in workloads for s in servers if (why := w.skip_reason(s.name))]


def dig(data: Any, path: Iterable[str]) -> float | None:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    if isinstance(data, bool) or not isinstance(data, (int, float)):
        return None
    return float(data)


def extract(workload: Workload, bench: dict) -> dict[str, float | None]:
    """The workload's metrics from one `fastsocks bench --json` document."""
    out: dict[str, float | None] = {}
    for m in workload.metrics:
        if m.key == "unanswered":
            conns = dig(bench, ("results", "connections"))
            answered = dig(bench, ("results", "answered"))
            out[m.key] = None if conns is None or answered is None else conns - answered
        else:
            out[m.key] = dig(bench, m.path)
    return out


# ============================================================== servers


@dataclass
class ServerSpec:
    """How to start one server; `kind` is "direct", "fastsocks" or "peer"."""

    name: str
    label: str
    kind: str
    argv: Callable[[int, Path], list[str]] | None = None   # (port, workdir) -> command line
    requires: Callable[[], str | None] = lambda: None        # None when installed, else why not
    install_hint: str = ""
    version: Callable[[], str] = lambda: ""
    env: dict[str, str] = field(default_factory=dict)

    def missing(self) -> str | None:
        try:
            return self.requires()
        except Exception as error:  # a broken probe is reported, not fatal
            return f"check failed: {error}"


def _which(binary: str) -> Callable[[], str | None]:
    return lambda: None if shutil.which(binary) else f"`{binary}` not found on PATH"


def _module(name: str) -> Callable[[], str | None]:
    return lambda: None if importlib.util.find_spec(name) else f"Python module `{name}` not importable"


def _fastsocks_missing() -> str | None:
    try:
        if importlib.util.find_spec("fastsocks") is None or importlib.util.find_spec("fastsocks._relay") is None:
            return "the fastsocks package (with its compiled engine) is not importable"
    except ImportError as error:
        return str(error)
    return None


def _run_text(argv: list[str], timeout_s: float = 10.0) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def _dpkg_version(package: str) -> Callable[[], str]:
    return lambda: _run_text(["dpkg-query", "-W", "-f=${Version}", package]) if shutil.which("dpkg-query") else ""


def _dist_version(dist: str) -> Callable[[], str]:
    def version() -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return ""
    return version


def _dante_version() -> str:
    match = re.search(r"v(\d[\w.]*)", _run_text(["danted", "-v"]))
    return match.group(1).rstrip(".") if match else _dpkg_version("dante-server")()


def dante_config(port: int, *, as_root: bool | None = None) -> str:
    """A minimal danted.conf: SOCKS5 without authentication, loopback only.

    It listens on 127.0.0.1 only, connects out from 127.0.0.1 only, and both rule sets
    pass nothing but 127.0.0.0/8 -> 127.0.0.0/8 and block everything else explicitly.
    """
    if as_root is None:
        as_root = os.geteuid() == 0
    users = "user.privileged: root\nuser.unprivileged: nobody\n" if as_root else ""
    return (
        "# written by benchmarks/compare.py: loopback only\n"
        "logoutput: stderr\n"
        f"internal: {LOOPBACK} port = {port}\n"
        f"external: {LOOPBACK}\n"
        "socksmethod: none\n"
        "clientmethod: none\n"
        f"{users}"
        "client pass {\n    from: 127.0.0.0/8 to: 127.0.0.0/8\n}\n"
        "client block {\n    from: 0.0.0.0/0 to: 0.0.0.0/0\n}\n"
        "socks pass {\n    from: 127.0.0.0/8 to: 127.0.0.0/8\n    command: connect udpassociate udpreply\n}\n"
        "socks block {\n    from: 0.0.0.0/0 to: 0.0.0.0/0\n}\n"
    )


def _dante_argv(port: int, workdir: Path) -> list[str]:
    conf = workdir / f"danted-{port}.conf"
    conf.write_text(dante_config(port))
    return ["danted", "-f", str(conf), "-N", "1"]


def _fastsocks_argv(workers: int) -> Callable[[int, Path], list[str]]:
    return lambda port, workdir: [
        sys.executable, "-m", "fastsocks", "--listen", f"{LOOPBACK}:{port}", "--workers", str(workers),
        "--log-level", "warning", "--graceful-timeout", "2",
    ]


def default_servers() -> list[ServerSpec]:
    fastsocks_version = _dist_version("fastsocks")
    return [
        ServerSpec("direct", "direct", "direct"),
        ServerSpec("fastsocks-1w", "fastsocks 1w", "fastsocks", _fastsocks_argv(1), _fastsocks_missing,
                   "pip install .  (from the fastsocks checkout; builds the Cython engine)", fastsocks_version),
        ServerSpec("fastsocks-2w", "fastsocks 2w", "fastsocks", _fastsocks_argv(2), _fastsocks_missing,
                   "pip install .  (from the fastsocks checkout; builds the Cython engine)", fastsocks_version),
        ServerSpec("dante", "Dante", "peer", _dante_argv, _which("danted"),
                   "apt-get install dante-server", _dante_version),
        ServerSpec("microsocks", "microsocks", "peer",
                   lambda port, workdir: ["microsocks", "-i", LOOPBACK, "-p", str(port)],
                   _which("microsocks"), "apt-get install microsocks", _dpkg_version("microsocks")),
        ServerSpec("pproxy", "pproxy", "peer",
                   lambda port, workdir: [sys.executable, "-m", "pproxy", "-l", f"socks5://{LOOPBACK}:{port}"],
                   _module("pproxy"), "pip install pproxy", _dist_version("pproxy")),
    ]


def check_servers(servers: list[ServerSpec], out=None) -> tuple[list[ServerSpec], list[dict]]:
    """Split into installed servers and skipped ones; one line per skipped server."""
    out = out or sys.stdout
    ready, skipped = [], []
    for spec in servers:
        why = spec.missing()
        if why is None:
            ready.append(spec)
        else:
            skipped.append({"server": spec.name, "reason": why, "install": spec.install_hint})
            print(f"skipping {spec.name}: {why}; install it with: {spec.install_hint}", file=out)
    return ready, skipped


# ============================================================== processes


_LIVE: dict[int, subprocess.Popen] = {}   # pid -> every process started here and not yet reaped


def _stop_all_live() -> None:
    for proc in list(_LIVE.values()):
        stop_process(proc)


atexit.register(_stop_all_live)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def spawn(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``argv`` in its own session (so its process group holds its children)."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    _LIVE[proc.pid] = proc
    return proc


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process(proc: subprocess.Popen, grace_s: float = 5.0) -> int | None:
    """SIGTERM the pid, wait, then SIGKILL its process group (it was started as its leader)."""
    try:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        # Children (Dante's pools, fastsocks workers) share the group: none may outlive us.
        deadline = time.monotonic() + grace_s
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _group_alive(proc.pid) or proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    finally:
        _LIVE.pop(proc.pid, None)
    return proc.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def socks_ready(port: int, timeout_s: float = 1.0) -> bool:
    """True when a SOCKS5 greeting offering 'no authentication' is accepted."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout_s) as sock:
            sock.sendall(b"\x05\x01\x00")
            reply = b""
            while len(reply) < 2:
                chunk = sock.recv(2 - len(reply))
                if not chunk:
                    return False
                reply += chunk
            return reply == b"\x05\x00"
    except OSError:
        return False


class ServerError(RuntimeError):
    pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_server(spec: ServerSpec, workdir: Path, prefix: list[str], ready_timeout_s: float = 20.0,
                 attempts: int = 3) -> tuple[subprocess.Popen, int, Path]:
    """Start ``spec`` on a free loopback port and wait until it answers SOCKS5 greetings."""
    last = ""
    for _ in range(attempts):
        port = free_port()
        log = workdir / f"{spec.name}-{port}.log"
        env = {**os.environ, "TMPDIR": str(workdir), **spec.env}
        proc = spawn(prefix + spec.argv(port, workdir), log, env)
        deadline = time.monotonic() + ready_timeout_s
        good = 0
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            # Several in a row: with several workers every accept queue must be served.
            good = good + 1 if socks_ready(port) else 0
            if good >= 4:
                return proc, port, log
            time.sleep(0.02 if good else 0.05)
        code = stop_process(proc)
        last = f"{spec.name} did not answer on {LOOPBACK}:{port} (exit code {code}):\n{_tail(log)}"
    raise ServerError(last)


# ============================================================== the matrix


def cpu_list(text: str) -> list[int]:
    """'1', '0,2', '2-3' -> sorted CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.update(range(int(lo), int(hi) + 1))
        elif part:
            cpus.add(int(part))
    if not cpus:
        raise ValueError(f"no CPU in {text!r}")
    return sorted(cpus)


def pin_prefixes(pin: str | None, available: Iterable[int] | None = None) -> tuple[list[str], list[str]]:
    """(proxy prefix, load generator prefix): `taskset -c` the pinned CPUs and the rest."""
    if not pin:
        return [], []
    proxy = cpu_list(pin)
    allowed = sorted(available if available is not None else os.sched_getaffinity(0))
    missing = [c for c in proxy if c not in allowed]
    if missing:
        raise ValueError(f"--pin {pin}: CPU {missing} not available (allowed {allowed})")
    rest = [c for c in allowed if c not in proxy]
    if not rest:
        raise ValueError(f"--pin {pin} leaves no CPU for the load generator (allowed {allowed})")
    taskset = shutil.which("taskset")
    if not taskset:
        raise ValueError("--pin needs taskset (apt-get install util-linux)")
    return ([taskset, "-c", ",".join(map(str, proxy))], [taskset, "-c", ",".join(map(str, rest))])


def schedule(workloads: list[Workload], servers: list[ServerSpec],
             repeats: int) -> list[tuple[Workload, int, ServerSpec]]:
    """The run order: for each workload, rounds of every server in turn (A B C A B C ...)."""
    order = []
    for workload in workloads:
        for repeat in range(repeats):
            for spec in servers:
                if spec.kind == "direct" and not workload.direct:
                    continue
                if workload.skip_reason(spec.name):
                    continue
                order.append((workload, repeat, spec))
    return order


def default_bench_commands() -> list[list[str]]:
    """`fastsocks bench`, then the module itself (the same tool, before the CLI routes to it)."""
    return [[sys.executable, "-m", "fastsocks", "bench"], [sys.executable, "-m", "fastsocks.bench"]]


def resolve_bench_command(explicit: str | None) -> tuple[list[str] | None, str | None]:
    """(the load generator command, None) or (None, why none works)."""
    candidates = [shlex.split(explicit)] if explicit else default_bench_commands()
    reasons = []
    for command in candidates:
        why = bench_available(command)
        if why is None:
            return command, None
        reasons.append(why)
    return None, reasons[0]


def bench_available(bench_cmd: list[str]) -> str | None:
    """None when `bench_cmd --help` works and describes the bench modes, else why not."""
    if bench_cmd in default_bench_commands():
        try:
            found = importlib.util.find_spec("fastsocks.bench") is not None
        except ImportError:
            found = False
        if not found:
            return "the installed fastsocks has no `bench` command (fastsocks.bench is missing)"
    try:
        done = subprocess.run(bench_cmd + ["--help"], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{shlex.join(bench_cmd)} --help failed: {error}"
    if done.returncode != 0:
        text = (done.stderr or done.stdout).strip().splitlines()
        return f"{shlex.join(bench_cmd)} --help exited {done.returncode}: {text[-1] if text else ''}"
    if not all(mode in done.stdout for mode in ("bulk", "cps", "rr", "idle")):
        return f"{shlex.join(bench_cmd)} --help does not describe the modes bulk, cps, rr and idle"
    return None


def load_cpus(load_prefix: list[str]) -> int:
    """How many CPUs the load side (load generator and targets) had."""
    return len(cpu_list(load_prefix[-1])) if load_prefix else (os.cpu_count() or 1)


def derive(record: dict, workload: Workload, cpus: int) -> None:
    """Fill a run record's figures from its raw bench document (also when re-rendering)."""
    data = record["bench"]
    record["metrics"] = extract(workload, data)
    record["warnings"] = [str(w) for w in data.get("warnings") or []]
    # Which side set the pace: CPU cores busy on each side during the run. The load side is
    # the load generator and its targets; near all of its CPUs, it may have been the limit.
    duration_s = dig(data, ("duration_s",))
    loadgen_s, target_s = dig(data, ("cpu", "loadgen_s")), dig(data, ("cpu", "target_s")) or 0.0
    proxy_s = dig(data, ("cpu", "proxy_s"))
    record["busy_cores"] = record["loadgen_busy"] = None
    if duration_s:
        record["busy_cores"] = {
            "proxy": None if proxy_s is None else round(proxy_s / duration_s, 3),
            "load": None if loadgen_s is None else round((loadgen_s + target_s) / duration_s, 3),
        }
        if loadgen_s is not None:
            record["loadgen_busy"] = round((loadgen_s + target_s) / duration_s / cpus, 3)


def run_one(workload: Workload, repeat: int, spec: ServerSpec, params: Params, bench_cmd: list[str],
            workdir: Path, proxy_prefix: list[str], load_prefix: list[str], run_timeout_s: float) -> dict:
    """One cell run: fresh server, one bench run, server stopped. Never raises ServerError."""
    record: dict[str, Any] = {
        "workload": workload.name, "server": spec.name, "repeat": repeat, "ok": False,
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "metrics": {}, "error": None, "server_argv": None, "server_pid": None, "bench_argv": None,
        "bench": None, "busy_cores": None, "loadgen_busy": None, "warnings": [],
    }
    start = time.monotonic()
    proc = None
    try:
        if spec.kind == "direct":
            target = ["--direct"]
        else:
            proc, port, log = start_server(spec, workdir, proxy_prefix)
            record["server_argv"] = [str(a) for a in proc.args]
            record["server_pid"] = proc.pid
            target = ["--proxy", f"socks5://{LOOPBACK}:{port}", "--proxy-pid", str(proc.pid)]
        out_json = workdir / f"{workload.name}-{spec.name}-{repeat}.json"
        argv = load_prefix + bench_cmd + [workload.mode, *target, *workload.args(params),
                                          "--json", str(out_json), "--quiet"]
        record["bench_argv"] = argv
        bench_log = workdir / f"bench-{workload.name}-{spec.name}-{repeat}.log"
        bench = spawn(argv, bench_log)
        try:
            code = bench.wait(run_timeout_s)
        except subprocess.TimeoutExpired:
            raise ServerError(f"bench run exceeded --run-timeout {run_timeout_s:g} s") from None
        finally:
            stop_process(bench, grace_s=2)   # also whatever it started in its process group
        try:
            data = json.loads(out_json.read_text())
        except (OSError, ValueError) as error:
            data = None
            unreadable = f"bench wrote no readable JSON: {error}"
        if isinstance(data, dict):
            record["bench"] = data
            derive(record, workload, load_cpus(load_prefix))
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"{spec.name} died during the run (exit {proc.returncode}): {_tail(log, 5)}")
        if isinstance(data, dict) and (data.get("ok") is False or data.get("problems")):
            raise ServerError("bench: " + "; ".join(str(p) for p in data.get("problems") or ["not ok"]))
        if code != 0:
            raise ServerError(f"bench exited {code}: {_tail(bench_log, 5)}")
        if not isinstance(data, dict):
            raise ServerError(unreadable if data is None else "bench JSON is not an object")
        primary = record["metrics"].get(workload.primary)
        if primary is None:
            raise ServerError(f"bench JSON has no {workload.primary}")
        record["ok"] = True
    except (ServerError, OSError) as error:
        record["error"] = str(error)
    finally:
        if proc is not None:
            stop_process(proc)
        record["elapsed_s"] = round(time.monotonic() - start, 3)
    return record


# ============================================================== statistics


def aggregate(values: list[float]) -> dict[str, Any]:
    """Median with min-max (and the values) of one cell's successful runs."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values), "values": list(values)}


def summarize(runs: list[dict], workloads: list[Workload]) -> dict[str, dict[str, dict]]:
    """{workload: {server: {"runs", "ok", "metrics": {metric: aggregate}}}} in run order."""
    summary: dict[str, dict[str, dict]] = {}
    by_name = {w.name: w for w in workloads}
    for run in runs:
        workload = by_name.get(run["workload"])
        if workload is None:
            continue
        cell = summary.setdefault(workload.name, {}).setdefault(
            run["server"], {"runs": 0, "ok": 0, "errors": [], "_values": {m.key: [] for m in workload.metrics}})
        cell["runs"] += 1
        if run["ok"]:
            cell["ok"] += 1
            for key, value in run["metrics"].items():
                if value is not None and key in cell["_values"]:
                    cell["_values"][key].append(value)
        elif run.get("error"):
            cell["errors"].append(run["error"])
    for cells in summary.values():
        for cell in cells.values():
            cell["metrics"] = {key: aggregate(vals) for key, vals in cell.pop("_values").items()}
    return summary


def best_peer(summary: dict, workload: Workload, metric: Metric, servers: list[ServerSpec]) -> tuple[str, float] | None:
    """The best median among the peers (not fastsocks, not direct) for one metric."""
    best = None
    for spec in servers:
        if spec.kind != "peer":
            continue
        median = summary.get(workload.name, {}).get(spec.name, {}).get("metrics", {}).get(metric.key, {}).get("median")
        if median is None:
            continue
        if best is None or (median > best[1] if metric.higher_is_better else median < best[1]):
            best = (spec.name, median)
    return best


def _median(summary: dict, workload: str, server: str, metric: str) -> float | None:
    return summary.get(workload, {}).get(server, {}).get("metrics", {}).get(metric, {}).get("median")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def compute_ratios(summary: dict, workloads: list[Workload], servers: list[ServerSpec]) -> dict:
    """Per workload and metric: the best peer, and each fastsocks variant ÷ best peer and ÷ direct."""
    ratios: dict[str, dict] = {}
    for workload in workloads:
        for metric in workload.metrics:
            best = best_peer(summary, workload, metric, servers)
            entry: dict[str, Any] = {"best_peer": best[0] if best else None,
                                     "best_peer_median": best[1] if best else None,
                                     "higher_is_better": metric.higher_is_better, "fastsocks": {}}
            direct = _median(summary, workload.name, "direct", metric.key) if metric.vs_direct else None
            for spec in servers:
                if spec.kind != "fastsocks":
                    continue
                mine = _median(summary, workload.name, spec.name, metric.key)
                entry["fastsocks"][spec.name] = {
                    "vs_best_peer": _ratio(mine, best[1] if best else None),
                    "vs_direct": _ratio(mine, direct),
                }
            ratios.setdefault(workload.name, {})[metric.key] = entry
    return ratios


# ============================================================== rendering


def fmt_num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if unit == "count":
        return f"{value:,.0f}"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_cell(cell: dict | None, metric: Metric, expected_runs: int) -> str:
    if cell is None:
        return "—"
    stats = cell["metrics"].get(metric.key)
    if cell["ok"] == 0:
        return "failed"
    if not stats or stats["median"] is None:
        return "—"
    text = fmt_num(stats["median"], metric.unit)
    if stats["n"] > 1 and stats["min"] != stats["max"]:
        text += f" ({fmt_num(stats['min'], metric.unit)}–{fmt_num(stats['max'], metric.unit)})"
    if cell["ok"] < cell["runs"]:
        text += f" [n={cell['ok']}/{cell['runs']}]"
    return text


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def render_table(summary: dict, ratios: dict, workloads: list[Workload], servers: list[ServerSpec],
                 repeats: int) -> str:
    """Rows: metrics; columns: servers, the best peer, and each fastsocks ÷ best peer / ÷ direct."""
    shown = [s for s in servers if any(s.name in summary.get(w.name, {}) for w in workloads)]
    fast = [s for s in shown if s.kind == "fastsocks"]
    labels = {s.name: s.label for s in servers}
    header = ["workload", "unit"] + [s.label for s in shown] + ["best peer"] + \
             [f"{s.label} ÷ best peer / ÷ direct" for s in fast]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for workload in workloads:
        if workload.name not in summary:
            continue
        for metric in workload.metrics:
            cells = summary[workload.name]
            if metric.key in ("errors", "unanswered") and not any(
                    (c["metrics"].get(metric.key) or {}).get("max") for c in cells.values()):
                continue   # an all-zero error row says nothing
            row = [metric.label, f"{metric.unit} {metric.arrow}"]
            for spec in shown:
                if spec.kind == "direct" and not metric.vs_direct:
                    row.append("—")
                else:
                    row.append(fmt_cell(cells.get(spec.name), metric, repeats))
            entry = ratios.get(workload.name, {}).get(metric.key, {})
            best = entry.get("best_peer")
            row.append(f"{labels.get(best, best)} {fmt_num(entry.get('best_peer_median'))}" if best else "—")
            for spec in fast:
                r = entry.get("fastsocks", {}).get(spec.name, {})
                row.append(f"{fmt_ratio(r.get('vs_best_peer'))} / {fmt_ratio(r.get('vs_direct'))}")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_busy_table(runs: list[dict], workloads: list[Workload], servers: list[ServerSpec]) -> str:
    """CPU cores busy during the runs, proxy / load side (medians): which side set the pace."""
    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    for run in runs:
        busy = run.get("busy_cores") or {}
        if not run["ok"]:
            continue
        cell = cells.setdefault((run["workload"], run["server"]), {"proxy": [], "load": []})
        for side in ("proxy", "load"):
            if busy.get(side) is not None:
                cell[side].append(busy[side])
    shown = [s for s in servers if any((w.name, s.name) in cells for w in workloads)]
    if not shown:
        return ""
    lines = ["| cores busy: proxy / load side | " + " | ".join(s.label for s in shown) + " |",
             "|" + "---|" * (len(shown) + 1)]
    for workload in workloads:
        if not any((workload.name, s.name) in cells for s in shown):
            continue
        row = [workload.title]
        for spec in shown:
            cell = cells.get((workload.name, spec.name))
            if not cell:
                row.append("—")
                continue
            sides = [fmt_num(statistics.median(cell[k])) if cell[k] else "—" for k in ("proxy", "load")]
            row.append(" / ".join(sides))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_markdown(doc: dict, table: str, busy: str = "") -> str:
    setup = doc["setup"]
    versions = ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v)
    out = [
        f"# SOCKS5 servers compared — {doc['started_at'][:10]}, {setup['host']}",
        "",
        f"`{doc['command']}`",
        "",
        f"{setup['cpus']} CPUs ({setup['cpu_model']}), Linux {setup['kernel']}, Python {setup['python']}; "
        f"{setup['pinning']}. Medians of {doc['repeats']} runs per cell, (min–max) when they differ, "
        f"`[n=k/m]` when only k of m runs succeeded. ↑ higher is better, ↓ lower is better; the ratios "
        f"are fastsocks' median ÷ the other's (on ↓ rows, below 1× is better). Each run had a freshly "
        f"started server; servers were interleaved round by round within each workload.",
        "",
        f"Versions: {versions}." if versions else "",
        "",
        table,
        "",
    ]
    if busy:
        out += ["Which side set the pace: CPU cores busy during the measured work (medians), the "
                "proxy's process tree / the load generator with its targets; a side near the number of "
                f"CPUs it had was the limit ({setup['pinning']}).", "", busy, ""]
    if doc.get("loadgen_saturated"):
        cells = ", ".join(f"{c['workload']}/{c['server']} ({c['loadgen_busy']:.0%})" for c in doc["loadgen_saturated"])
        out.append(f"- the load generator was ≥ 90% busy (it, not the proxy, may have set the pace): {cells}")
    for warn in doc.get("warnings", []):
        out.append(f"- bench warning, {warn['workload']} / {warn['server']} run {warn['repeat']}: {warn['warning']}")
    for skip in doc["skipped"]:
        out.append(f"- skipped {skip['server']}: {skip['reason']} (install: `{skip['install']}`)")
    for fail in doc["failures"]:
        out.append(f"- failed: {fail['workload']} / {fail['server']} run {fail['repeat']}: {fail['error']}")
    if doc.get("chart"):
        out += ["", f"![chart]({Path(doc['chart']).name})"]
    return "\n".join(line for line in out) + "\n"


COLORS = {"direct": "#c7c7c7", "fastsocks": ["#1f5fa8", "#5b9bd5", "#9cc3e8"],
          "peer": ["#d9822b", "#7e57a8", "#4f9a4f", "#b0413e", "#8c8c3a"]}


def server_colors(servers: list[ServerSpec]) -> dict[str, str]:
    colors, counts = {}, {"fastsocks": 0, "peer": 0}
    for spec in servers:
        if spec.kind == "direct":
            colors[spec.name] = COLORS["direct"]
        else:
            palette = COLORS[spec.kind]
            colors[spec.name] = palette[counts[spec.kind] % len(palette)]
            counts[spec.kind] += 1
    return colors


def render_chart(doc: dict, summary: dict, ratios: dict, workloads: list[Workload],
                 servers: list[ServerSpec], path: Path) -> Path | None:
    """One panel per workload: horizontal bars per server (median, whiskers min–max), each
    labelled with its value and the proxy's CPU (or memory) per unit of work."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("no chart: matplotlib is not installed (pip install matplotlib)")
        return None
    panels = [w for w in workloads if w.name in summary]
    if not panels:
        return None
    colors = server_colors(servers)
    labels = {s.name: s.label for s in servers}
    ncols = 3 if len(panels) + 1 > 4 else 2
    nrows = -(-(len(panels) + 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 3.6 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, workload in zip(flat, panels):
        metric = next(m for m in workload.metrics if m.key == workload.primary)
        cost = next((m for m in workload.metrics if m.key == workload.cost), None)
        names = [s.name for s in servers if s.name in summary[workload.name]]
        meds, lo, hi, notes = [], [], [], []
        for name in names:
            stats = summary[workload.name][name]["metrics"].get(metric.key) or {}
            med = stats.get("median")
            meds.append(med or 0.0)
            lo.append(med - stats["min"] if med is not None else 0.0)
            hi.append(stats["max"] - med if med is not None else 0.0)
            if med is None:
                notes.append("failed")
                continue
            note = f"{fmt_num(med)}"
            if cost is not None:
                c = _median(summary, workload.name, name, cost.key)
                if c is not None:
                    note += f"  · CPU {fmt_num(c)} {cost.unit}"
            notes.append(note)
        ypos = list(range(len(names)))[::-1]
        bars = ax.barh(ypos, meds, xerr=[lo, hi], capsize=3, color=[colors[n] for n in names],
                       edgecolor=["#555555" if n == "direct" else "none" for n in names],
                       hatch=None, error_kw={"elinewidth": 1, "ecolor": "#333333"})
        for bar, name in zip(bars, names):
            if name == "direct":
                bar.set_hatch("//")
        ax.set_yticks(ypos, [labels.get(n, n) for n in names])
        top = max((m + h for m, h in zip(meds, hi)), default=1.0) or 1.0
        positive = [m for m in meds if m > 0]
        # One server 20x off the others (Dante's idle memory) would flatten every other bar.
        log_scale = len(positive) > 1 and max(positive) / min(positive) > 20
        if log_scale:
            ax.set_xscale("log")
            ax.set_xlim(min(positive) / 2, top * 12)
        else:
            ax.set_xlim(0, top * 1.55)
            big = top >= 100   # bound now: the formatter runs at savefig, after this loop
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
                lambda x, _, big=big: f"{x:,.0f}" if big else f"{x:g}"))
        for y, med, h, note in zip(ypos, meds, hi, notes):
            x = (med + h) * 1.15 if log_scale else med + h + top * 0.02
            ax.text(x if med > 0 or not log_scale else min(positive), y, note, va="center", fontsize=8.5)
        better = "higher is better" if metric.higher_is_better else "lower is better"
        ax.set_title(f"{workload.title}\n{metric.unit}, {better}", fontsize=10.5)
        ax.set_xlabel(metric.unit + (" (log scale)" if log_scale else ""))
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    # The last panel: the verdict in words, fastsocks ÷ the best peer per workload.
    note_ax = flat[len(panels)]
    note_ax.axis("off")
    text = ["fastsocks ÷ best peer (median ÷ median)", ""]
    for workload in panels:
        entry = ratios.get(workload.name, {}).get(workload.primary, {})
        best = entry.get("best_peer")
        parts = [f"{labels.get(n, n)} {fmt_ratio(r.get('vs_best_peer'))}"
                 for n, r in entry.get("fastsocks", {}).items() if r.get("vs_best_peer") is not None]
        if parts:
            text.append(f"{workload.title} (vs {labels.get(best, best)}):")
            text.append("      " + ", ".join(parts))
    text += ["", "On memory a ratio below 1× is better.", "direct: the same load without a proxy.",
             "Labels: median · the proxy's CPU per unit of work.", "", doc["setup"]["pinning"],
             f"{doc['setup']['host']}, {doc['setup']['cpus']} CPUs, Linux {doc['setup']['kernel']}"]
    note_ax.text(0, 1, "\n".join(text), va="top", fontsize=9, wrap=True)
    for ax in flat[len(panels) + 1:]:
        ax.axis("off")
    runs = "1 run" if doc["repeats"] == 1 else f"{doc['repeats']} runs"
    fig.suptitle(f"SOCKS5 servers on loopback — median of {runs}, whiskers min–max "
                 f"({doc['started_at'][:10]})", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ============================================================== setup info and output


def machine_info(pinning: str) -> dict:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"host": socket.gethostname(), "kernel": platform.release(), "cpu_model": model,
            "cpus": os.cpu_count(), "python": platform.python_version(), "pinning": pinning}


def output_stem(directory: Path, date: str, host: str, quick: bool) -> Path:
    """results/<date>-<host>[-quick]; -2, -3 ... if a run of that day is already there."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", host) or "host"
    base = f"{date}-{host}{'-quick' if quick else ''}"
    stem, n = directory / base, 2
    while stem.with_suffix(".json").exists():
        stem, n = directory / f"{base}-{n}", n + 1
    return stem


def saturated_loadgen(runs: list[dict], threshold: float = 0.9) -> list[dict]:
    """Cells whose load generator used >= threshold of its CPUs (median over the runs)."""
    busy: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        if run["ok"] and run.get("loadgen_busy") is not None:
            busy.setdefault((run["workload"], run["server"]), []).append(run["loadgen_busy"])
    return [{"workload": w, "server": s, "loadgen_busy": statistics.median(v)}
            for (w, s), v in busy.items() if statistics.median(v) >= threshold]


def build_document(*, started_at: str, finished_at: str | None, command: str, params: Params, repeats: int,
                   setup: dict, versions: dict, workloads: list[Workload], servers: list[ServerSpec],
                   skipped: list[dict], runs: list[dict], interrupted: bool) -> dict:
    summary = summarize(runs, workloads)
    ratios = compute_ratios(summary, workloads, servers)
    return {
        "schema": SCHEMA,
        "tool": "benchmarks/compare.py",
        "started_at": started_at,
        "finished_at": finished_at,
        "interrupted": interrupted,
        "command": command,
        "repeats": repeats,
        "params": params.__dict__,
        "order": "per workload, rounds of every server in turn (A B C A B C ...); a fresh server per run",
        "setup": setup,
        "versions": versions,
        "workloads": [w.name for w in workloads],
        "servers": [{"name": s.name, "label": s.label, "kind": s.kind} for s in servers],
        "skipped": skipped,
        "failures": [{k: r[k] for k in ("workload", "server", "repeat", "error")} for r in runs if not r["ok"]],
        "loadgen_saturated": saturated_loadgen(runs),
        "warnings": [{"workload": r["workload"], "server": r["server"], "repeat": r["repeat"], "warning": w}
                     for r in runs for w in r.get("warnings") or []],
        "runs": runs,
        "summary": summary,
        "ratios": ratios,
    }


def write_outputs(doc: dict, workloads: list[Workload], servers: list[ServerSpec], stem: Path) -> str:
    stem.parent.mkdir(parents=True, exist_ok=True)
    table = render_table(doc["summary"], doc["ratios"], workloads, servers, doc["repeats"])
    chart = render_chart(doc, doc["summary"], doc["ratios"], workloads, servers, stem.with_suffix(".png"))
    doc["chart"] = str(chart) if chart else None
    doc["table"] = str(stem.with_suffix(".md"))
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    busy = render_busy_table(doc["runs"], workloads, servers)
    stem.with_suffix(".md").write_text(render_markdown(doc, table, busy))
    return table


def _primary_text(workload: Workload, record: dict) -> str:
    if not record["ok"]:
        return f"FAILED: {record['error'].splitlines()[0] if record['error'] else '?'}"
    metric = next(m for m in workload.metrics if m.key == workload.primary)
    return f"{fmt_num(record['metrics'][metric.key])} {metric.unit}"


def run_matrix(*, workloads: list[Workload], servers: list[ServerSpec], params: Params, repeats: int,
               bench_cmd: list[str], pin: str | None, out_dir: Path, quick: bool, run_timeout_s: float,
               command: str, skipped: list[dict] | None = None, settle_s: float = 0.3,
               log: Callable[[str], None] = print) -> tuple[dict, Path, str]:
    """Run every cell, write the JSON, Markdown and PNG; return (document, stem, table)."""
    proxy_prefix, load_prefix = pin_prefixes(pin)
    pinning = (f"proxy pinned to CPU {pin} (taskset), load generator and targets on the other CPUs"
               if pin else "not pinned: proxy, load generator and targets share all CPUs")
    started = dt.datetime.now(dt.timezone.utc)
    setup = machine_info(pinning)
    setup["pin"], setup["load_cpus"] = pin, load_cpus(load_prefix)
    versions = {s.name: s.version() for s in servers if s.kind != "direct"}
    stem = output_stem(out_dir, started.astimezone().strftime("%Y-%m-%d"), setup["host"], quick)
    order = schedule(workloads, servers, repeats)
    runs: list[dict] = []
    interrupted = False
    # Ctrl-C, kill and a closed terminal all end in the same clean-up; SIGINT explicitly too,
    # since a shell starts background jobs with it ignored.
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old_handlers = {sig: signal.signal(sig, _raise_interrupt) for sig in handled}
    workdir = Path(tempfile.mkdtemp(prefix="fastsocks-compare-"))
    try:
        for i, (workload, repeat, spec) in enumerate(order, 1):
            record = run_one(workload, repeat, spec, params, bench_cmd, workdir, proxy_prefix, load_prefix,
                             run_timeout_s)
            runs.append(record)
            log(f"[{i}/{len(order)}] {workload.name:<7} {spec.name:<13} #{repeat + 1}  "
                f"{_primary_text(workload, record)}  ({record['elapsed_s']:.1f} s)")
            time.sleep(settle_s)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping servers, writing what was measured")
    finally:
        _stop_all_live()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        shutil.rmtree(workdir, ignore_errors=True)
    doc = build_document(
        started_at=started.isoformat(timespec="seconds"),
        finished_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command=command, params=params, repeats=repeats, setup=setup, versions=versions,
        workloads=workloads, servers=servers, skipped=skipped or [], runs=runs, interrupted=interrupted)
    table = write_outputs(doc, workloads, servers, stem)
    return doc, stem, table


def rerender(path: Path) -> tuple[dict, Path, str]:
    """Rebuild the summary, table and chart of a results JSON from its raw runs."""
    old = json.loads(path.read_text())
    if old.get("schema") != SCHEMA:
        raise SystemExit(f"{path}: not a {SCHEMA} document")
    workloads = [WORKLOADS[w] for w in old["workloads"] if w in WORKLOADS]
    servers = [ServerSpec(s["name"], s["label"], s["kind"]) for s in old["servers"]]
    cpus = old["setup"].get("load_cpus") or old["setup"].get("cpus") or 1
    for run in old["runs"]:
        if isinstance(run.get("bench"), dict) and run["workload"] in WORKLOADS:
            derive(run, WORKLOADS[run["workload"]], cpus)
    doc = build_document(
        started_at=old["started_at"], finished_at=old.get("finished_at"), command=old["command"],
        params=Params(**old["params"]), repeats=old["repeats"], setup=old["setup"], versions=old["versions"],
        workloads=workloads, servers=servers, skipped=old["skipped"], runs=old["runs"],
        interrupted=old.get("interrupted", False))
    stem = path.with_suffix("")
    return doc, stem, write_outputs(doc, workloads, servers, stem)


def raise_fd_limit(wanted: int) -> None:
    """Idle runs hold thousands of sockets: lift the soft limit (inherited by children)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted))
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [s.name for s in default_servers()]
    parser.add_argument("--servers", default=",".join(names),
                        help=f"comma-separated, in this order (default: all: {','.join(names)})")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated (default: {','.join(WORKLOADS)})")
    parser.add_argument("--repeats", type=int, help="runs per cell (default 3; --quick: 1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 128 MiB bulk, 1 s cps/rr, 300 idle connections, 1 repeat")
    parser.add_argument("--pin", metavar="CPUS", help="run each proxy under `taskset -c CPUS`, the load on the rest")
    parser.add_argument("--bulk-bytes", type=int, help="bytes per bulk run, split over the 16 streams of bulk16")
    parser.add_argument("--duration", type=float, help="seconds per cps and rr run")
    parser.add_argument("--idle-connections", type=int)
    parser.add_argument("--run-timeout", type=float, help="seconds one run may take at most (default 180; quick 60)")
    parser.add_argument("--bench", default=None,
                        help="load generator command (default: python -m fastsocks bench)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--check", action="store_true", help="list installed servers and install hints, then exit")
    parser.add_argument("--render", type=Path, metavar="RESULTS.json",
                        help="run nothing: rebuild the table, Markdown and chart of an earlier results file")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def select(names: str, known: dict[str, Any], what: str) -> list:
    chosen = []
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        if name not in known:
            raise SystemExit(f"unknown {what} {name!r}; choose from {', '.join(known)}")
        chosen.append(known[name])
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        doc, stem, table = rerender(args.render)
        print(table)
        print(f"\nwrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')}"
              + (f", {doc['chart']}" if doc.get("chart") else ""))
        return 0
    servers_all = {s.name: s for s in default_servers()}
    servers = select(args.servers, servers_all, "server")
    workloads = select(args.workloads, WORKLOADS, "workload")
    ready, skipped = check_servers(servers)
    if args.check:
        for spec in ready:
            print(f"ok       {spec.name}" + (f" {spec.version()}" if spec.kind != "direct" else ""))
        return 0
    base = QUICK if args.quick else FULL
    params = Params(
        bulk_bytes=args.bulk_bytes or base.bulk_bytes,
        cps_duration_s=args.duration or base.cps_duration_s,
        rr_duration_s=args.duration or base.rr_duration_s,
        idle_connections=args.idle_connections or base.idle_connections,
        udp_duration_s=args.duration or base.udp_duration_s,
    )
    for cell in unsupported_cells(workloads, ready):
        print(f"skipping {cell['workload']} on {cell['server']}: {cell['reason']}")
    repeats = args.repeats or (1 if args.quick else 3)
    run_timeout = args.run_timeout or (60.0 if args.quick else 180.0)
    bench_cmd, why = resolve_bench_command(args.bench)
    if why:
        print(f"cannot run: the load generator is not available: {why}\n"
              f"(it is `fastsocks bench`: pip install . from the fastsocks checkout)", file=sys.stderr)
        return 2
    if not ready:
        print("nothing to run: no server is installed", file=sys.stderr)
        return 2
    try:
        pin_prefixes(args.pin)
    except ValueError as error:
        print(f"cannot run: {error}", file=sys.stderr)
        return 2
    raise_fd_limit(4 * params.idle_connections + 1024)
    command = shlex.join(["python", "benchmarks/compare.py", *(argv if argv is not None else sys.argv[1:])])
    doc, stem, table = run_matrix(workloads=workloads, servers=ready, params=params, repeats=repeats,
                                  bench_cmd=bench_cmd, pin=args.pin, out_dir=args.out_dir, quick=args.quick,
                                  run_timeout_s=run_timeout, command=command, skipped=skipped)
    print()
    print(table)
    for skip in skipped:
        print(f"(skipped {skip['server']}: install with {skip['install']})")
    print(f"\nwrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')}"
          + (f", {doc['chart']}" if doc.get("chart") else ""))
    if doc["interrupted"]:
        return 130
    return 1 if doc["runs"] and not any(run["ok"] for run in doc["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
