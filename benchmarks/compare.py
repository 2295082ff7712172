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

Servers: fastsocks with 1 and 2 workers (at the default log level: one access line per
session, into the run's log file), Dante (`danted`, Debian package dante-server, run with
a loopback-only config written here), hev-socks5-server and 3proxy with splice and without (built
from source: on PATH or in $FASTSOCKS_PEERS_BIN), microsocks (Debian package
microsocks), pproxy (PyPI), and `direct` (the same work without a proxy: the physical
reference). A server that is not installed is skipped with one line saying how to
install it. Any other server joins from a command template:
    --server 'NAME=my-proxy --port {port}'                       # a peer
    --server 'before:fastsocks=/old/venv/bin/fastsocks --listen {host}:{port}'
                                  # another fastsocks build, shown beside it, no "peer"

Load: `fastsocks bench` in a subprocess (`python -m fastsocks bench`, else
`python -m fastsocks.bench`; `--bench CMD` for another), one run per cell:
    bulk1   1 stream download               Gbit/s,  proxy CPU s/GB
    bulk16  16 parallel streams download    Gbit/s,  proxy CPU s/GB
    cps     16 clients: connect, SOCKS5, 64 B echo, close; conn/s, latency p50/p99/p99.9,
            the worst connection, CPU ms/1000 conn
    cps1    the same with one client: latency of one connection at a time
    rr      32 connections, 64 B request/response; txn/s, p99, CPU us/txn
    rr1     one connection, 64 B request/response; txn/s, p50
    idle    N connections held open; the proxy's PSS/RSS growth per connection
    udp     4 UDP associations x 32 in flight, 512 B; dgram/s, p99, CPU us/dgram
    udp_paced  the same sent at 10,000 datagrams/s (--rate): the proxy's CPU per datagram

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

This file is the command line; the parts are in benchmarks/comparison/ (its __init__
lists them).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from fastsocks import rlimit

from comparison.document import SCHEMA, build_document, machine_info, output_stem, write_outputs
from comparison.matrix import derive, load_cpus, pin_prefixes, resolve_bench_command, run_one, schedule
from comparison.render import fmt_primary
from comparison.servers import ServerSpec, check_servers, default_servers, template_server
from comparison.supervise import Supervisor, signals_interrupt
from comparison.workloads import FULL, QUICK, WORKLOADS, Params, Workload, unsupported_cells

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run_matrix(*, workloads: list[Workload], servers: list[ServerSpec], params: Params, repeats: int,
               bench_cmd: list[str], pin: str | None, out_dir: Path, quick: bool, run_timeout_s: float,
               command: str, skipped: list[dict] | None = None, settle_s: float = 0.3,
               log: Callable[[str], None] = print, supervisor: Supervisor | None = None) -> tuple[dict, Path, str]:
    """Run every cell, write the JSON, Markdown and PNG; return (document, stem, table).
    Every process started is stopped before the files are written (by ``supervisor``'s
    stop_all, a Supervisor of its own if none is given)."""
    supervisor = supervisor or Supervisor()
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
    workdir = Path(tempfile.mkdtemp(prefix="fastsocks-compare-"))
    with signals_interrupt():
        try:
            for i, (workload, repeat, spec) in enumerate(order, 1):
                record = run_one(workload, repeat, spec, params, bench_cmd, workdir, proxy_prefix, load_prefix,
                                 run_timeout_s, supervisor)
                runs.append(record)
                log(f"[{i}/{len(order)}] {workload.name:<7} {spec.name:<13} #{repeat + 1}  "
                    f"{fmt_primary(workload, record)}  ({record['elapsed_s']:.1f} s)")
                time.sleep(settle_s)
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: stopping servers, writing what was measured")
        finally:
            supervisor.stop_all()
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [s.name for s in default_servers()]
    parser.add_argument("--servers", default=",".join(names),
                        help=f"comma-separated, in this order (default: all: {','.join(names)})")
    parser.add_argument("--server", action="append", default=[], metavar="NAME[:KIND]=COMMAND",
                        help="one more server, from a command template with {host}, {port} and {workdir} "
                             "(KIND peer, the default, or fastsocks: another build shown beside it); "
                             "repeatable, run after those of --servers")
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
    for text in args.server:
        try:
            extra = template_server(text)
        except ValueError as error:
            raise SystemExit(f"--server {error}") from None
        if extra.name in servers_all or extra.name in {s.name for s in servers}:
            raise SystemExit(f"--server {extra.name}: that name is taken")
        servers.append(extra)
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
    # Idle runs hold thousands of sockets: lift the soft limit (the children inherit it).
    with contextlib.suppress(ValueError, OSError):
        rlimit.raise_fd_limit(4 * params.idle_connections + 1024)
    command = shlex.join(["python", "benchmarks/compare.py", *(argv if argv is not None else sys.argv[1:])])
    with Supervisor() as supervisor:
        doc, stem, table = run_matrix(workloads=workloads, servers=ready, params=params, repeats=repeats,
                                      bench_cmd=bench_cmd, pin=args.pin, out_dir=args.out_dir, quick=args.quick,
                                      run_timeout_s=run_timeout, command=command, skipped=skipped,
                                      supervisor=supervisor)
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
