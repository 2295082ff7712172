"""The figures of an Outcome, twice: a JSON document with stable keys (compare.py and other
tools read it) and a table for people. Pure: no I/O.

Document::

    {"tool": "fastsocks bench", "version", "mode", "proxy" (password hidden, null when
     direct), "params", "started_at" (ISO 8601, UTC), "duration_s" (the measured window),
     "results" (per mode, below), "cpu", "ok", "problems", "warnings", "notes", "wall_s"}

    bulk   {"bytes", "gbit_s", "streams", ...}     bytes moved, both directions counted
    cps    {"connections", "errors", "conn_per_s", "latency_us": {p50, p90, p99, p99.9, max}, ...}
    rr     {"transactions", "txn_per_s", "latency_us": {p50, p90, p99, max}, ...}
    idle   {"connections", "answered", "rss_per_conn_kb", "pss_per_conn_kb", ...}
    cpu    {"loadgen_s", "proxy_s", ... and per unit: proxy_s_per_gb (bulk),
            proxy_ms_per_1000_conn (cps, idle), proxy_us_per_txn (rr), same for loadgen_}

``problems`` make the run a failure (exit status 1): corrupted bytes, nothing completed,
a bulk stream lost, --max-time reached. ``warnings`` are findings about the proxy
(connections that failed, pings unanswered): the figures stand, with them.
"""

from __future__ import annotations

import errno as errno_names
import os

from fastsocks import __version__
from fastsocks.bench import wire
from fastsocks.bench.runner import Outcome
from fastsocks.bench.stats import latency_summary_us, spread

TOOL = "fastsocks bench"
CPS_KEYS = ("p50", "p90", "p99", "p99.9", "max")
RR_KEYS = ("p50", "p90", "p99", "max")
UDP_KEYS = ("p50", "p99", "max")
UDP_LOSS_WARN_PCT = 1.0


def document(outcome: Outcome) -> dict:
    results = RESULTS[outcome.plan.mode](outcome)
    problems, warnings = _judge(outcome, results)
    return {
        "tool": TOOL,
        "version": __version__,
        "mode": outcome.plan.mode,
        "proxy": str(outcome.plan.proxy) if outcome.plan.proxy else None,
        "params": _params(outcome),
        "started_at": outcome.started_at,
        "duration_s": round(outcome.measured_s, 6),
        "results": results,
        "cpu": _cpu(outcome, results),
        "ok": not problems,
        "problems": problems,
        "warnings": warnings,
        "notes": list(outcome.notes),
        "wall_s": round(outcome.wall_s, 3),
    }


# --------------------------------------------------------------------- results per mode


def _bulk(o: Outcome) -> dict:
    c, plan = o.counters, o.plan
    moved = c["bytes_up"] + c["bytes_down"]
    per_stream = plan.bytes_per_stream * (2 if plan.direction == "both" else 1)
    stream_rates = [per_stream * 8 / s / 1e9 for s in o.stream_s if s > 0]
    rates = spread(stream_rates)
    return {
        "bytes": moved,
        "gbit_s": _round(_rate(moved * 8 / 1e9, o.measured_s), 3),
        "streams": plan.connections,
        "streams_ok": c["ok"],
        "bytes_per_stream": plan.bytes_per_stream,
        "direction": plan.direction,
        "bytes_down": c["bytes_down"],
        "bytes_up": c["bytes_up"],
        "verified": plan.verify,
        "stream_gbit_s": {k: round(v, 3) for k, v in rates.items()} if rates else None,
        "errors": _error_total(c),
        "error_kinds": c["errors"],
    }


def _cps(o: Outcome) -> dict:
    c = o.counters
    return {
        "connections": c["ok"],
        "errors": _error_total(c),
        "conn_per_s": _round(_rate(c["ok"], o.measured_s), 1),
        "latency_us": _latency(o, CPS_KEYS),
        "latency_mean_us": _mean_us(c),
        "attempts": c["started"],
        "clients": o.plan.connections,
        "error_kinds": c["errors"],
        "latency_samples": c["latency_samples"],
    }


def _rr(o: Outcome) -> dict:
    c = o.counters
    return {
        "transactions": c["ok"],
        "txn_per_s": _round(_rate(c["ok"], o.measured_s), 1),
        "latency_us": _latency(o, RR_KEYS),
        "latency_mean_us": _mean_us(c),
        "connections": o.established,
        "size": o.plan.size,
        "errors": _error_total(c),
        "error_kinds": c["errors"],
        "latency_samples": c["latency_samples"],
    }


def _idle(o: Outcome) -> dict:
    c = o.counters
    held = o.established or 0
    before, after = o.memory_before, o.memory_after
    rss_kb = pss_kb = None
    if before and after:
        rss_kb = (after.rss_bytes - before.rss_bytes) / 1024
        if before.pss_bytes is not None and after.pss_bytes is not None:
            pss_kb = (after.pss_bytes - before.pss_bytes) / 1024
    return {
        "connections": held,
        "answered": c["ok"],
        "rss_per_conn_kb": _round(rss_kb / held, 2) if rss_kb is not None and held else None,
        "pss_per_conn_kb": _round(pss_kb / held, 2) if pss_kb is not None and held else None,
        "requested": o.plan.connections,
        "rss_growth_kb": _round(rss_kb, 1),
        "pss_growth_kb": _round(pss_kb, 1),
        "hold_s": o.plan.duration_s,
        "ping_latency_us": _latency(o, ("p50", "p99", "max")),
        "errors": _error_total(c),
        "error_kinds": c["errors"],
    }


def _udp(o: Outcome) -> dict:
    c = o.counters
    sent, received = c["started"], c["ok"]
    lost = max(sent - received, 0)
    return {
        "datagrams": received,
        "lost": lost,
        "loss_pct": round(100.0 * lost / sent, 3) if sent else 0.0,
        "dgram_per_s": _round(_rate(received, o.measured_s), 1),
        "latency_us": _latency(o, UDP_KEYS),
        "latency_mean_us": _mean_us(c),
        "sent": sent,
        "late": c.get("udp_late", 0),
        "timed_out": c.get("udp_timeouts", 0),
        "bytes_compared": c.get("udp_compared", 0),
        "associations": o.established,
        "inflight": o.plan.inflight,
        "rate": o.plan.rate or None,        # paced datagrams/s asked for (None: closed loop)
        "unsent": c.get("udp_unsent", 0),   # paced ones not sent: every slot was in flight
        "size": o.plan.size,
        "errors": _error_total(c),
        "error_kinds": c["errors"],
        "latency_samples": c["latency_samples"],
    }


RESULTS = {"bulk": _bulk, "cps": _cps, "rr": _rr, "idle": _idle, "udp": _udp}


# --------------------------------------------------------------------- params, cpu, verdict


def _params(o: Outcome) -> dict:
    plan = o.plan
    params = {
        "direct": plan.direct,
        "target": str(o.target) if o.target else None,
        "target_builtin": plan.target is None,
        "proxy_pid": plan.proxy_pid,
        "timeout_s": plan.timeout_s,
        "max_time_s": plan.max_time_s,
        "clients_procs": plan.procs,
        "source_addresses": plan.source_addresses,
    }
    if plan.mode == "bulk":
        params.update(streams=plan.connections, bytes_per_stream=plan.bytes_per_stream,
                      direction=plan.direction, verify=plan.verify)
    elif plan.mode == "idle":
        params.update(connections=plan.connections, size=plan.size, hold_s=plan.duration_s)
    elif plan.mode == "udp":
        params.update(connections=plan.connections, inflight=plan.inflight, rate=plan.rate or None,
                      size=plan.size, count=plan.count, duration_s=plan.duration_s)
    else:
        params.update(connections=plan.connections, size=plan.size, count=plan.count,
                      duration_s=plan.duration_s)
    return params


def _cpu(o: Outcome, results: dict) -> dict:
    cpu = {
        "loadgen_s": round(o.loadgen_cpu_s, 3),
        "proxy_s": _round(o.proxy_cpu_s, 3),
        "target_s": _round(o.target_cpu_s, 3),
        "loadgen_cores": _round(_rate(o.loadgen_cpu_s, o.measured_s), 2),
        "proxy_cores": _round(_rate(o.proxy_cpu_s, o.measured_s), 2),
        "proxy_pids": list(o.proxy_pids),
        "loadgen_procs": o.plan.procs,
    }
    mode = o.plan.mode
    if mode == "bulk":
        units, suffix, scale = results["bytes"] / 1e9, "s_per_gb", 1.0
    elif mode == "rr":
        units, suffix, scale = results["transactions"], "us_per_txn", 1e6
    elif mode == "udp":
        units, suffix, scale = results["datagrams"], "us_per_dgram", 1e6
    else:
        units, suffix, scale = (results["connections"] or 0) / 1000, "ms_per_1000_conn", 1e3
    for who, seconds in (("proxy", o.proxy_cpu_s), ("loadgen", o.loadgen_cpu_s)):
        cpu[f"{who}_{suffix}"] = _round(_rate(seconds * scale if seconds is not None else None, units), 4)
    return cpu


def _judge(o: Outcome, results: dict) -> tuple[list[str], list[str]]:
    c, plan = o.counters, o.plan
    problems, warnings = [], []
    if not o.complete:
        problems.append(f"stopped by --max-time {plan.max_time_s:g} s before the end: "
                        f"the figures cover what finished")
    if c["errors"].get("mismatch"):
        what = "datagrams came back" if plan.mode == "udp" else "connections got bytes"
        problems.append(f"{c['errors']['mismatch']:,} {what} other than those sent "
                        f"(or the sink counted wrong): the proxy corrupts data")
    if c["ok"] == 0:
        problems.append(f"nothing completed: {_describe_errors(c) or 'no error recorded'}")
    elif plan.mode == "bulk" and c["ok"] < plan.connections:
        problems.append(f"{plan.connections - c['ok']} of {plan.connections} streams failed: "
                        f"{_describe_errors(c)}")
    elif plan.mode == "idle" and _error_total(c):
        held = o.established or 0
        if held < plan.connections:
            warnings.append(f"{plan.connections - held:,} of {plan.connections:,} connections could not be opened")
        if c["ok"] < held:
            warnings.append(f"{held - c['ok']:,} of the {held:,} connections held did not answer the ping")
        warnings.append(f"errors: {_describe_errors(c)}")
    elif plan.mode == "udp":
        if o.established is not None and o.established < plan.connections:
            problems.append(f"{plan.connections - o.established} of {plan.connections} associations "
                            f"failed: {_describe_errors(c)}")
        elif _error_total(c):
            warnings.append(f"{_error_total(c):,} errors: {_describe_errors(c)}")
        if results["loss_pct"] > UDP_LOSS_WARN_PCT:
            warnings.append(f"{results['loss_pct']:.2f}% of the datagrams were lost (unanswered "
                            f"within the loss timeout); fewer --inflight may help")
    elif _error_total(c):
        warnings.append(f"{_error_total(c):,} connections failed: {_describe_errors(c)}")
    return problems, warnings


def _describe_errors(c: dict) -> str:
    kinds = ", ".join(f"{kind} {n:,}" for kind, n in sorted(c["errors"].items()))
    last = ""
    if c.get("last_error") == "socks_reply" and c.get("last_reply"):
        last = f"; last reply {wire.reply_name(c['last_reply'])}"
    elif c.get("last_errno"):
        name = errno_names.errorcode.get(c["last_errno"], str(c["last_errno"]))
        last = f"; last {name} ({os.strerror(c['last_errno'])})"
    return kinds + last


# --------------------------------------------------------------------- helpers


def _latency(o: Outcome, keys) -> dict:
    summary = latency_summary_us(o.latencies_ns, keys, max_ns=o.counters["latency_max_ns"])
    return summary or dict.fromkeys(keys)


def _mean_us(c: dict) -> float | None:
    return round(c["latency_sum_ns"] / c["latency_count"] / 1000, 1) if c["latency_count"] else None


def _error_total(c: dict) -> int:
    return sum(c["errors"].values())


def _rate(amount: float | None, seconds: float | None) -> float | None:
    if amount is None or not seconds:
        return None
    return amount / seconds


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# --------------------------------------------------------------------- the table


def table(doc: dict) -> str:
    """The document as a few aligned lines for a terminal."""
    p, r = doc["params"], doc["results"]
    where = f"{doc['proxy']}" if doc["proxy"] else "direct (no proxy)"
    target = f"{p['target']}{' (built-in)' if p['target_builtin'] else ''}"
    lines = [f"fastsocks bench {doc['mode']}: {where} -> {target}", "  " + _setup(doc)]
    rows = ROWS[doc["mode"]](r, doc)
    rows.append(("CPU", _cpu_text(doc)))
    width = max(len(label) for label, _ in rows)
    lines += [f"  {label:<{width}}  {text}" for label, text in rows]
    for key, prefix in (("problems", "problem"), ("warnings", "warning"), ("notes", "note")):
        lines += [f"  {prefix}: {text}" for text in doc[key]]
    return "\n".join(lines)


def _setup(doc: dict) -> str:
    p = doc["params"]
    mode = doc["mode"]
    if mode == "bulk":
        plural = "s" if p["streams"] != 1 else ""
        return (f"{p['streams']} stream{plural} x {_bytes(p['bytes_per_stream'])} {p['direction']}"
                f"{', every byte verified' if p['verify'] else ''}")
    if mode == "udp":
        amount = f"{p['count']:,} datagrams" if p["count"] else f"{p['duration_s']:g} s"
        via = "direct to the echo" if p["direct"] else "through UDP ASSOCIATE"
        load = (f"paced at {p['rate']:,g}/s (at most {p['inflight']} in flight each)" if p.get("rate")
                else f"{p['inflight']} in flight")
        return (f"{p['connections']:,} association{'s' if p['connections'] != 1 else ''} x "
                f"{load}, {p['size']}-byte datagrams {via}, every byte compared; {amount}")
    if mode == "idle":
        return (f"{p['connections']:,} connections held {p['hold_s']:g} s, then a {p['size']}-byte "
                f"ping on each")
    amount = f"{p['count']:,} {'connections' if mode == 'cps' else 'transactions'}" if p["count"] \
        else f"{p['duration_s']:g} s"
    if mode == "rr":
        return f"{p['connections']:,} connections, {p['size']}-byte request/response, {amount}"
    socks = "" if p["direct"] else "SOCKS5 handshake, "
    return f"{p['connections']:,} clients, each: connect, {socks}{p['size']}-byte request and echo, close; {amount}"


def _bulk_rows(r: dict, doc: dict) -> list[tuple[str, str]]:
    spread_text = ""
    if r["stream_gbit_s"] and r["streams"] > 1:
        s = r["stream_gbit_s"]
        spread_text = f"   (per stream {s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f} min/median/max)"
    return [
        ("throughput", f"{_num(r['gbit_s'], 2)} Gbit/s{spread_text}"),
        ("moved", f"{r['bytes']:,} bytes in {doc['duration_s']:.3f} s"),
        ("streams", f"{r['streams_ok']} of {r['streams']} complete"),
    ]


def _cps_rows(r: dict, doc: dict) -> list[tuple[str, str]]:
    return [
        ("rate", f"{_num(r['conn_per_s'], 0)} connections/s"),
        ("connections", f"{r['connections']:,} in {doc['duration_s']:.2f} s, {r['errors']:,} errors"),
        ("latency", _latency_text(r["latency_us"])),
    ]


def _rr_rows(r: dict, doc: dict) -> list[tuple[str, str]]:
    return [
        ("rate", f"{_num(r['txn_per_s'], 0)} transactions/s"),
        ("transactions", f"{r['transactions']:,} in {doc['duration_s']:.2f} s on {r['connections']} "
                         f"connections, {r['errors']:,} errors"),
        ("latency", _latency_text(r["latency_us"])),
    ]


def _idle_rows(r: dict, doc: dict) -> list[tuple[str, str]]:
    memory = "not measured"
    if r["rss_per_conn_kb"] is not None:
        memory = f"RSS {r['rss_per_conn_kb']:+.2f} KiB per connection ({r['rss_growth_kb']:+,.0f} KiB)"
        if r["pss_per_conn_kb"] is not None:
            memory += f", PSS {r['pss_per_conn_kb']:+.2f} KiB per connection ({r['pss_growth_kb']:+,.0f} KiB)"
    return [
        ("connections", f"{r['connections']:,} of {r['requested']:,} held, {r['answered']:,} answered the ping"),
        ("proxy memory", memory),
        ("ping latency", _latency_text(r["ping_latency_us"])),
    ]


def _udp_rows(r: dict, doc: dict) -> list[tuple[str, str]]:
    return [
        ("rate", f"{_num(r['dgram_per_s'], 0)} datagrams/s"),
        ("datagrams", f"{r['datagrams']:,} echoed of {r['sent']:,} sent in {doc['duration_s']:.2f} s, "
                      f"{r['bytes_compared']:,} bytes compared"),
        ("loss", f"{r['lost']:,} lost ({r['loss_pct']:.3f}%), {r['late']:,} late, {r['errors']:,} errors"),
        ("latency", _latency_text(r["latency_us"])),
    ]


ROWS = {"bulk": _bulk_rows, "cps": _cps_rows, "rr": _rr_rows, "idle": _idle_rows, "udp": _udp_rows}


def _cpu_text(doc: dict) -> str:
    cpu = doc["cpu"]
    unit = {"bulk": ("s_per_gb", "s/GB"), "rr": ("us_per_txn", "µs/transaction"),
            "udp": ("us_per_dgram", "µs/datagram")}.get(
        doc["mode"], ("ms_per_1000_conn", "ms/1000 connections"))
    parts = [f"load generator {cpu['loadgen_s']:.2f} s ({_num(cpu['loadgen_cores'], 2)} cores, "
             f"{_num(cpu['loadgen_' + unit[0]], 3)} {unit[1]})"]
    if cpu["proxy_s"] is not None:
        parts.append(f"proxy {cpu['proxy_s']:.2f} s ({_num(cpu['proxy_cores'], 2)} cores, "
                     f"{_num(cpu['proxy_' + unit[0]], 3)} {unit[1]}, {_count(len(cpu['proxy_pids']), 'process')})")
    if cpu["target_s"] is not None:
        parts.append(f"target {cpu['target_s']:.2f} s")
    return "; ".join(parts)


def _latency_text(latency: dict) -> str:
    if all(v is None for v in latency.values()):
        return "no samples"
    return "   ".join(f"{key} {_num(value, 0)}" for key, value in latency.items()) + " µs"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith("s") else f"{n} {noun}s"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n:,} bytes"
