"""fastsocks bench: the JSON document of each mode (keys and types, which compare.py and
other tools read), the per-unit CPU figures, the verdict, and the table."""

from __future__ import annotations

import json
from array import array

import pytest

from fastsocks.bench.params import Endpoint, Plan, parse_proxy_url
from fastsocks.bench.proctree import Sample
from fastsocks.bench.report import document, table
from fastsocks.bench.runner import Outcome

PROXY = parse_proxy_url("socks5://alice:s3cret@127.0.0.1:1080")
TARGET = Endpoint("127.0.0.1", 40000)
NUMBER = (int, float)
OPTIONAL_NUMBER = (int, float, type(None))
TOP = {"tool": str, "version": str, "mode": str, "proxy": (str, type(None)), "params": dict,
       "started_at": str, "duration_s": float, "results": dict, "cpu": dict, "ok": bool,
       "problems": list, "warnings": list, "notes": list, "wall_s": float}
RESULTS = {
    "bulk": {"bytes": int, "gbit_s": float, "streams": int},
    "cps": {"connections": int, "errors": int, "conn_per_s": float, "latency_us": dict},
    "rr": {"transactions": int, "txn_per_s": float, "latency_us": dict},
    "idle": {"connections": int, "answered": int, "rss_per_conn_kb": OPTIONAL_NUMBER,
             "pss_per_conn_kb": OPTIONAL_NUMBER},
}
LATENCY_KEYS = {"cps": {"p50", "p90", "p99", "p99.9", "max"}, "rr": {"p50", "p99", "max"}}
PER_UNIT = {"bulk": "proxy_s_per_gb", "cps": "proxy_ms_per_1000_conn", "rr": "proxy_us_per_txn",
            "idle": "proxy_ms_per_1000_conn"}


def counters(ok: int, errors: dict | None = None, up: int = 0, down: int = 0, seconds: float = 2.0,
             latencies: list[int] = ()) -> dict:
    return {
        "ok": ok, "ok_at_go": 0, "started": ok + sum((errors or {}).values()), "errors_at_go": 0,
        "errors": errors or {}, "last_error": next(iter(errors), None) if errors else None,
        "last_errno": 104 if errors else 0, "last_reply": 0, "bytes_up": up, "bytes_down": down,
        "t_go_ns": 10**9, "t_last_ns": 10**9 + int(seconds * 1e9), "parked": 0, "connections": 4,
        "latency_count": len(latencies), "latency_sum_ns": sum(latencies),
        "latency_max_ns": max(latencies, default=0), "latency_samples": len(latencies), "latency_stride": 1,
    }


def outcome(mode: str, proxy=PROXY, **kw) -> Outcome:
    plans = {
        "bulk": Plan("bulk", proxy, None, connections=2, bytes_per_stream=1 << 30, direction="both"),
        "cps": Plan("cps", proxy, None, connections=16, duration_s=5.0),
        "rr": Plan("rr", proxy, TARGET, connections=32, count=1000),
        "idle": Plan("idle", proxy, None, connections=1000, duration_s=1.0),
    }
    lat = sorted(range(100_000, 200_000, 1000))  # 100 samples, 100-199 µs
    data = {
        "bulk": counters(2, up=2 << 30, down=2 << 30),
        "cps": counters(9_000, {"reset": 3}, latencies=lat),
        "rr": counters(1000, latencies=lat),
        "idle": counters(1000, latencies=lat),
    }[mode]
    fields = dict(
        plan=plans[mode], started_at="2026-11-28T05:00:00+00:00", target=TARGET,
        proxy_pids=[10, 11] if proxy else [], counters=data,
        latencies_ns=array("I", lat if mode != "bulk" else []), stream_s=[1.5, 2.0] if mode == "bulk" else [],
        established=None if mode == "cps" else plans[mode].connections, measured_s=2.0, wall_s=3.25,
        loadgen_cpu_s=1.5, proxy_cpu_s=1.8 if proxy else None, target_cpu_s=0.5,
        memory_before=Sample((10, 11), 1.0, 10 << 20, 8 << 20) if mode == "idle" and proxy else None,
        memory_after=Sample((10, 11), 1.2, 14 << 20, 11 << 20) if mode == "idle" and proxy else None,
    )
    fields.update(kw)
    return Outcome(**fields)


def check_types(obj: dict, schema: dict) -> None:
    for key, kind in schema.items():
        assert key in obj, key
        assert isinstance(obj[key], kind), (key, obj[key])


@pytest.mark.parametrize("mode", ["bulk", "cps", "rr", "idle"])
@pytest.mark.parametrize("proxied", [True, False], ids=["proxy", "direct"])
def test_document_schema(mode, proxied):
    doc = document(outcome(mode, PROXY if proxied else None))
    assert json.loads(json.dumps(doc)) == doc  # plain JSON all the way down
    check_types(doc, TOP)
    assert doc["tool"] == "fastsocks bench" and doc["mode"] == mode
    check_types(doc["results"], RESULTS[mode])
    if mode in LATENCY_KEYS:
        assert LATENCY_KEYS[mode] <= set(doc["results"]["latency_us"])
        assert all(isinstance(v, float) for v in doc["results"]["latency_us"].values())
    check_types(doc["cpu"], {"loadgen_s": float, "proxy_s": OPTIONAL_NUMBER, PER_UNIT[mode]: OPTIONAL_NUMBER})
    check_types(doc["params"], {"direct": bool, "target": str, "target_builtin": bool})
    assert doc["proxy"] == ("socks5://alice:***@127.0.0.1:1080" if proxied else None)
    assert "s3cret" not in json.dumps(doc)
    if proxied:
        assert isinstance(doc["cpu"][PER_UNIT[mode]], float)
    else:
        assert doc["cpu"]["proxy_s"] is None and doc["cpu"][PER_UNIT[mode]] is None
    assert isinstance(table(doc), str)


def test_figures():
    bulk = document(outcome("bulk"))
    assert bulk["results"]["bytes"] == 4 << 30 and bulk["results"]["streams"] == 2
    assert bulk["results"]["gbit_s"] == round((4 << 30) * 8 / 2.0 / 1e9, 3)
    assert bulk["results"]["stream_gbit_s"]["max"] == round((2 << 30) * 8 / 1.5 / 1e9, 3)
    assert bulk["cpu"]["proxy_s_per_gb"] == round(1.8 / ((4 << 30) / 1e9), 4)
    cps = document(outcome("cps"))
    assert (cps["results"]["connections"], cps["results"]["errors"], cps["results"]["conn_per_s"]) == (9000, 3, 4500.0)
    assert cps["results"]["latency_us"] == {"p50": 149.0, "p90": 189.0, "p99": 198.0, "p99.9": 199.0, "max": 199.0}
    assert cps["cpu"]["proxy_ms_per_1000_conn"] == 200.0 and cps["cpu"]["proxy_cores"] == 0.9
    rr = document(outcome("rr"))
    assert rr["results"]["txn_per_s"] == 500.0 and rr["cpu"]["proxy_us_per_txn"] == 1800.0
    idle = document(outcome("idle"))["results"]
    assert (idle["connections"], idle["answered"]) == (1000, 1000)
    assert idle["rss_per_conn_kb"] == 4.1 and idle["pss_per_conn_kb"] == 3.07


def test_verdict():
    assert document(outcome("cps"))["ok"] is True
    assert "3 connections failed: reset 3" in document(outcome("cps"))["warnings"][0]
    corrupt = document(outcome("rr", counters=counters(10, {"mismatch": 1})))
    assert corrupt["ok"] is False and "corrupts data" in corrupt["problems"][0]
    nothing = document(outcome("cps", counters=counters(0, {"connect": 5})))
    assert nothing["ok"] is False and nothing["problems"][0].startswith("nothing completed: connect 5")
    lost = document(outcome("bulk", counters=counters(1, {"eof": 1}, up=1 << 30, down=1 << 30)))
    assert lost["ok"] is False and "1 of 2 streams failed" in lost["problems"][0]
    cut = document(outcome("rr", complete=False))
    assert cut["ok"] is False and "--max-time" in cut["problems"][0]
    quiet_proxy = document(outcome("idle", established=995, counters=counters(990, {"timeout": 10}, latencies=[1000])))
    assert quiet_proxy["ok"] is True
    assert quiet_proxy["warnings"] == ["5 of 1,000 connections could not be opened",
                                       "5 of the 995 connections held did not answer the ping",
                                       "errors: timeout 10; last ECONNRESET (Connection reset by peer)"]


def test_no_samples_and_no_memory_are_nulls_not_crashes():
    doc = document(outcome("idle", latencies_ns=array("I"), memory_before=None, memory_after=None))
    assert doc["results"]["rss_per_conn_kb"] is None and doc["results"]["pss_per_conn_kb"] is None
    assert doc["results"]["ping_latency_us"] == {"p50": None, "p99": None, "max": None}
    assert "not measured" in table(doc)


def test_table_reads_like_the_results():
    text = table(document(outcome("cps")))
    assert "fastsocks bench cps: socks5://alice:***@127.0.0.1:1080 -> 127.0.0.1:40000 (built-in)" in text
    for expected in ("4,500 connections/s", "9,000 in 2.00 s, 3 errors", "p99 198", "200.000 ms/1000 connections",
                     "warning: 3 connections failed"):
        assert expected in text
