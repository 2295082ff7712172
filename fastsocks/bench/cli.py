"""``fastsocks bench``: measure any SOCKS5 proxy (or, with --direct, the machine without
one). The command line is checked whole before anything starts; runner.py does the run,
report.py says what came of it. Exit status: 0 measured, 1 the run failed (see the
"problem:" lines), 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fastsocks.bench import report, runner
from fastsocks.bench.params import (
    DIRECTIONS, MAX_DURATION_S, MODES, Endpoint, Plan, check_plan, parse_endpoint, parse_proxy_url,
    parse_size,
)
from fastsocks.bench.progress import ProgressBar

DESCRIPTION = """\
Load generator for any SOCKS5 proxy. MODE is one of:
  bulk   K parallel streams of B bytes (download, upload or both): Gbit/s
  cps    C concurrent clients each doing connect, SOCKS5 greeting, CONNECT, an S-byte
         request and its echo, close: connections/s and latency of the whole exchange
  rr     N long-lived connections doing S-byte request/response: transactions/s, latency
  idle   open N connections and hold them: the proxy's memory per connection (RSS and
         PSS of its process tree), then a ping on each
  udp    N UDP associations each keeping K datagrams of S bytes in flight to a UDP
         echo (or, with --rate, sending R datagrams/s evenly spaced): datagrams/s, loss,
         round-trip latency
  serve  run the target (echo, bulk source and sink) in the foreground, for --target

Targets: unless --target is given, a built-in echo/source/sink (and a UDP echo on the
same port) runs in a child process on 127.0.0.1. Next to the results: the load generator's CPU seconds and the proxy's (its
process tree, found by the listening port or --proxy-pid), per GB, per 1000 connections or
per transaction."""

EPILOG = """\
examples:
  fastsocks bench bulk --proxy socks5://127.0.0.1:1080 --streams 16 --bytes 256M
  fastsocks bench cps --proxy socks5://user:pass@127.0.0.1:1080 --connections 16 --duration 10
  fastsocks bench rr --direct --connections 32 --size 64 --count 1000000
  fastsocks bench idle --proxy 'socks5://[::1]:1080' --connections 3000 --json idle.json
  fastsocks bench udp --proxy socks5://127.0.0.1:1080 --connections 4 --inflight 32 --size 512
  fastsocks bench udp --proxy socks5://127.0.0.1:1080 --connections 16 --rate 10000 --duration 5
  fastsocks bench serve --listen 0.0.0.0:9000   # then --target THAT-HOST:9000 elsewhere"""

MODE_DEFAULTS = {
    "bulk": {"connections": 1},
    "cps": {"connections": 16, "duration_s": 5.0},
    "rr": {"connections": 32, "duration_s": 5.0},
    "idle": {"connections": 1000, "duration_s": 1.0},
    "udp": {"connections": 1, "duration_s": 5.0, "size": 512},
}

# Which modes each mode-specific option applies to (given elsewhere, it is an error).
APPLIES_TO = {
    "streams": ("bulk", "rr"),
    "connections": ("cps", "rr", "idle", "udp"),
    "bytes": ("bulk",),
    "direction": ("bulk",),
    "verify": ("bulk",),
    "size": ("cps", "rr", "idle", "udp"),
    "duration": ("cps", "rr", "idle", "udp"),
    "count": ("cps", "rr", "udp"),
    "inflight": ("udp",),
    "rate": ("udp",),
    "listen": ("serve",),
}
RUN_ONLY = ("proxy", "direct", "target", "proxy_pid", "json", "timeout", "max_time", "clients_procs",
            "source_addresses")
DEFAULTED = ("timeout", "max_time", "clients_procs", "source_addresses")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsocks bench", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=(*MODES, "serve"), metavar="MODE", help="bulk, cps, rr, idle, udp or serve")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--proxy", type=_typed(parse_proxy_url), metavar="socks5://[USER:PASS@]HOST:PORT",
                       help="the proxy to measure (IPv6 as [::1]; USER:PASS uses RFC 1929 auth)")
    where.add_argument("--direct", action="store_true", help="the same work without a proxy")
    parser.add_argument("--target", type=_typed(parse_endpoint), metavar="HOST:PORT",
                        help="an echo server, or `fastsocks bench serve` for bulk (default: built-in)")
    parser.add_argument("--connections", type=int, metavar="N",
                        help="cps: concurrent clients (16); rr: connections (32); idle: connections (1000); "
                             "udp: associations (1)")
    parser.add_argument("--streams", type=int, metavar="K", help="bulk: parallel streams (1); rr: same as --connections")
    parser.add_argument("--bytes", type=_typed(parse_size), metavar="B",
                        help="bulk: bytes per stream and direction, e.g. 256M, 1G (default 1G)")
    parser.add_argument("--direction", choices=DIRECTIONS, help="bulk: download (default), upload or both")
    parser.add_argument("--verify", action="store_true",
                        help="bulk: compare every byte (costs load generator CPU; cps/rr/idle always do)")
    parser.add_argument("--size", type=_typed(parse_size), metavar="S",
                        help="cps, rr: request and echo bytes; idle: ping bytes (default 64); "
                             "udp: payload bytes per datagram (default 512)")
    parser.add_argument("--duration", type=float, metavar="S",
                        help=f"cps, rr: run this long (default 5); idle: hold this long (default 1); "
                             f"at most {MAX_DURATION_S:g}")
    parser.add_argument("--count", type=int, metavar="N",
                        help="cps: connections; rr: transactions; udp: datagrams sent (instead of --duration)")
    parser.add_argument("--inflight", type=int, metavar="K",
                        help="udp: datagrams in flight per association (default 32); one unanswered "
                             "for min(--timeout, 1 s) is lost and replaced")
    parser.add_argument("--rate", type=float, metavar="R",
                        help="udp: send R datagrams/s in all, evenly spaced, whatever the echoes do "
                             "(an open load: what many independent clients look like); default: closed "
                             "loop, each echo sends the next")
    parser.add_argument("--proxy-pid", type=int, metavar="PID",
                        help="the proxy's (master) process, for CPU and memory (default: found by its port)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="a connection stuck this long in one step is an error (default 10)")
    parser.add_argument("--max-time", type=float, default=660.0, metavar="S",
                        help="stop the whole run after this long, whatever happens (default 660)")
    parser.add_argument("--clients-procs", type=int, default=1, metavar="N",
                        help="load generator processes sharing the connections (default 1)")
    parser.add_argument("--source-addresses", type=int, default=32, metavar="N",
                        help="with an IPv4 loopback proxy or target, clients bind 127.0.0.1 to "
                             "127.0.0.N, so that their TIME_WAIT sockets do not make every "
                             "connect() search for a port; 1: 127.0.0.1 only (default 32)")
    parser.add_argument("--listen", type=_typed(lambda t: parse_endpoint(t, "--listen", min_port=0)),
                        metavar="HOST:PORT", help="serve: where to listen (default 127.0.0.1:0)")
    return parser


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The checked Plan, or ValueError with a message naming the option."""
    mode = args.mode
    _reject_foreign_options(args, mode)
    if not args.proxy and not args.direct:
        raise ValueError("give --proxy socks5://HOST:PORT, or --direct to measure without a proxy")
    defaults = MODE_DEFAULTS[mode]
    connections = args.streams if mode == "bulk" else args.connections
    if mode == "rr" and args.streams is not None:
        if args.connections is not None and args.connections != args.streams:
            raise ValueError("rr: --streams is another name for --connections; give one")
        connections = args.streams
    duration_s = args.duration
    if duration_s is None and args.count is None:
        duration_s = defaults.get("duration_s")
    plan = Plan(
        mode=mode, proxy=args.proxy, target=args.target,
        connections=connections if connections is not None else defaults["connections"],
        size=args.size or defaults.get("size", 64), inflight=args.inflight if args.inflight is not None else 32,
        rate=args.rate or 0.0, bytes_per_stream=args.bytes or 1 << 30,
        direction=args.direction or "download", verify=args.verify, duration_s=duration_s,
        count=args.count, proxy_pid=args.proxy_pid, timeout_s=args.timeout, max_time_s=args.max_time,
        procs=args.clients_procs, source_addresses=args.source_addresses, json_path=args.json,
        quiet=args.quiet,
    )
    check_plan(plan)
    if plan.json_path:
        folder = os.path.dirname(os.path.abspath(plan.json_path))
        if not os.access(folder, os.W_OK):
            raise ValueError(f"--json {plan.json_path}: cannot write in {folder}")
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mode == "serve":
        return _serve(parser, args)
    try:
        plan = plan_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        outcome = runner.run(plan, ProgressBar(enabled=not plan.quiet))
    except runner.BenchError as exc:
        print(f"fastsocks bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastsocks bench: interrupted", file=sys.stderr)
        return 130
    doc = report.document(outcome)
    print(report.table(doc), flush=True)
    if plan.json_path:
        with open(plan.json_path, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return 0 if doc["ok"] else 1


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from fastsocks.bench.targets import serve_forever

    try:
        _reject_foreign_options(args, "serve")
    except ValueError as exc:
        parser.error(str(exc))
    try:
        serve_forever(args.listen or Endpoint("127.0.0.1", 0), print)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"fastsocks bench serve: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _reject_foreign_options(args: argparse.Namespace, mode: str) -> None:
    given = [dest for dest in (*APPLIES_TO, *RUN_ONLY) if getattr(args, dest) not in (None, False)]
    for dest in given:
        if dest in DEFAULTED:
            continue  # they have defaults, which serve ignores
        allowed = APPLIES_TO.get(dest, MODES)
        if mode not in allowed:
            hint = {("connections", "bulk"): " (bulk takes --streams)",
                    ("count", "idle"): " (idle takes --connections)"}.get((dest, mode), "")
            raise ValueError(f"--{dest.replace('_', '-')} does not apply to {mode}{hint}")


def _typed(parse):
    """An argparse type from one of our parsers: ValueError becomes a usage error."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__ if hasattr(parse, "__name__") else "value"
    return convert
