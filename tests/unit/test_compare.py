"""The comparison suite's own logic (benchmarks/compare.py and its parts in
benchmarks/comparison/): statistics, run order, the result document, the Markdown table,
skipped peers and Dante's config; one whole matrix driven end to end by stand-ins (a tiny
SOCKS5 greeting server and a stand-in for `fastsocks bench` that writes JSON in its
format: tests/integration/test_compare_runs.py). No assertion on speed anywhere.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import compare  # benchmarks/compare.py (pyproject puts benchmarks/ on sys.path)
import pytest

from comparison.document import build_document, machine_info, output_stem, write_outputs
from comparison.matrix import pin_prefixes, schedule
from comparison.render import fmt_num, fmt_ratio, render_chart, render_table
from comparison.servers import (
    ServerSpec,
    _dante_argv,
    _which,
    check_servers,
    dante_config,
    default_servers,
    hev_config,
    template_server,
    three_proxy_config,
)
from comparison.summary import aggregate, compute_ratios, saturated_loadgen, summarize
from comparison.workloads import FULL, QUICK, WORKLOADS, extract, unsupported_cells

W = WORKLOADS


def spec(name: str, kind: str = "peer", **kw):
    return ServerSpec(name, name.capitalize(), kind, **kw)


def run(workload: str, server: str, repeat: int, ok: bool = True, **metrics):
    return {"workload": workload, "server": server, "repeat": repeat, "ok": ok,
            "metrics": metrics, "error": None if ok else "boom"}


# ------------------------------------------------------------------ statistics


def test_aggregate_median_min_max():
    assert aggregate([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3,
                                                   "values": [3.0, 1.0, 2.0]}
    assert aggregate([4.0, 1.0])["median"] == 2.5
    assert aggregate([]) == {"median": None, "min": None, "max": None, "n": 0, "values": []}


def test_summarize_ignores_failed_runs_and_missing_metrics():
    runs = [run("bulk1", "dante", 0, gbit_s=8.0, proxy_s_per_gb=0.9),
            run("bulk1", "dante", 1, ok=False),
            run("bulk1", "dante", 2, gbit_s=10.0, proxy_s_per_gb=None),
            run("bulk1", "direct", 0, gbit_s=28.0, proxy_s_per_gb=None)]
    summary = summarize(runs, [W["bulk1"]])
    dante = summary["bulk1"]["dante"]
    assert (dante["runs"], dante["ok"], dante["errors"]) == (3, 2, ["boom"])
    assert dante["metrics"]["gbit_s"]["median"] == 9.0
    assert dante["metrics"]["proxy_s_per_gb"]["values"] == [0.9]
    assert summary["bulk1"]["direct"]["metrics"]["proxy_s_per_gb"]["n"] == 0


def test_extract_reads_the_bench_json_format():
    bench = {"tool": "fastsocks bench", "mode": "cps",
             "results": {"connections": 900, "errors": 2, "conn_per_s": 4500.0,
                         "latency_us": {"p50": 300, "p90": 500, "p99": 900, "p99.9": 1500, "max": 2000}},
             "cpu": {"loadgen_s": 1.0, "proxy_s": 0.2, "proxy_ms_per_1000_conn": 222.2}}
    got = extract(W["cps"], bench)
    assert got == {"conn_per_s": 4500.0, "p50_us": 300.0, "p99_us": 900.0, "p999_us": 1500.0, "max_us": 2000.0,
                   "proxy_ms_per_1000_conn": 222.2, "errors": 2.0}
    idle = extract(W["idle"], {"results": {"connections": 300, "answered": 299,
                                           "rss_per_conn_kb": 9.5, "pss_per_conn_kb": 4.0}})
    assert idle == {"pss_per_conn_kb": 4.0, "rss_per_conn_kb": 9.5, "unanswered": 1.0}
    assert extract(W["bulk1"], {"results": {}})["gbit_s"] is None


def test_cells_whose_load_generator_was_saturated_are_flagged():
    runs = [dict(run("cps", "direct", r), loadgen_busy=b) for r, b in enumerate((0.95, 0.97, 0.5))]
    runs += [dict(run("cps", "dante", r), loadgen_busy=0.4) for r in range(3)]
    runs += [dict(run("cps", "pproxy", 0, ok=False), loadgen_busy=None)]
    assert saturated_loadgen(runs) == [{"workload": "cps", "server": "direct", "loadgen_busy": 0.95}]


def test_best_peer_and_ratios_follow_the_direction_of_each_metric():
    servers = [spec("direct", "direct"), spec("fastsocks-1w", "fastsocks"), spec("dante"), spec("microsocks")]
    runs = [run("bulk1", "direct", 0, gbit_s=20.0),
            run("bulk1", "fastsocks-1w", 0, gbit_s=10.0, proxy_s_per_gb=0.2),
            run("bulk1", "dante", 0, gbit_s=5.0, proxy_s_per_gb=0.9),
            run("bulk1", "microsocks", 0, gbit_s=2.0, proxy_s_per_gb=0.4)]
    summary = summarize(runs, [W["bulk1"]])
    ratios = compute_ratios(summary, [W["bulk1"]], servers)
    speed = ratios["bulk1"]["gbit_s"]
    assert (speed["best_peer"], speed["best_peer_median"]) == ("dante", 5.0)
    assert speed["fastsocks"]["fastsocks-1w"] == {"vs_best_peer": 2.0, "vs_direct": 0.5}
    cpu = ratios["bulk1"]["proxy_s_per_gb"]   # lower is better: microsocks is the best peer
    assert cpu["best_peer"] == "microsocks"
    assert cpu["fastsocks"]["fastsocks-1w"] == {"vs_best_peer": 0.5, "vs_direct": None}


# ------------------------------------------------------------------ run order


def test_schedule_interleaves_servers_round_by_round_within_each_workload():
    servers = [spec("direct", "direct"), spec("a", "fastsocks"), spec("b"), spec("c")]
    order = [(w.name, r, s.name) for w, r, s in schedule([W["bulk1"], W["idle"]], servers, 3)]
    bulk = [(r, s) for w, r, s in order if w == "bulk1"]
    assert bulk == [(r, s) for r in range(3) for s in ("direct", "a", "b", "c")]
    idle = [s for w, r, s in order if w == "idle"]
    assert idle == ["a", "b", "c"] * 3               # direct has nothing to measure there
    assert [w for w, _, _ in order] == ["bulk1"] * 12 + ["idle"] * 9


def test_pin_splits_cpus_between_proxy_and_load_generator():
    if not shutil.which("taskset"):
        pytest.skip("taskset not installed")
    proxy, load = pin_prefixes("1", available=[0, 1])
    assert proxy[1:] == ["-c", "1"] and load[1:] == ["-c", "0"]
    proxy, load = pin_prefixes("2-3", available=[0, 1, 2, 3])
    assert proxy[-1] == "2,3" and load[-1] == "0,1"
    assert pin_prefixes(None) == ([], [])
    with pytest.raises(ValueError, match="no CPU for the load generator"):
        pin_prefixes("0,1", available=[0, 1])
    with pytest.raises(ValueError, match="not available"):
        pin_prefixes("7", available=[0, 1])


# ------------------------------------------------------------------ peers and Dante


def test_missing_peer_is_skipped_with_its_install_hint(capsys):
    ghost = spec("ghost", requires=_which("no-such-socks-server-here"),
                 install_hint="apt-get install ghost-socks")
    here = spec("here", requires=lambda: None)
    ready, skipped = check_servers([ghost, here])
    assert [s.name for s in ready] == ["here"]
    assert skipped == [{"server": "ghost", "reason": "`no-such-socks-server-here` not found on PATH",
                        "install": "apt-get install ghost-socks"}]
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["skipping ghost: `no-such-socks-server-here` not found on PATH; "
                   "install it with: apt-get install ghost-socks"]


def test_every_peer_says_how_to_install_it():
    hints = {s.name: s.install_hint for s in default_servers()}
    assert hints["dante"] == "apt-get install dante-server"
    assert hints["microsocks"] == "apt-get install microsocks"
    assert hints["pproxy"] == "pip install pproxy"
    assert "pip install ." in hints["fastsocks-1w"]
    assert "FASTSOCKS_PEERS_BIN" in hints["hev"] and "-DWITHSPLICE" in hints["3proxy"]
    names = [s.name for s in default_servers()]
    assert names == ["direct", "fastsocks-1w", "fastsocks-2w", "dante", "hev", "3proxy", "3proxy-copy",
                     "microsocks", "pproxy"]


def test_hev_and_3proxy_configs_are_loopback_only_on_the_given_port():
    hev = hev_config(10801)
    assert "port: 10801" in hev and "listen-address: '127.0.0.1'" in hev and "workers: 1" in hev
    assert "auth" not in hev  # no authentication section: none
    proxy = three_proxy_config(10802).splitlines()
    assert "internal 127.0.0.1" in proxy and "external 127.0.0.1" in proxy and "auth none" in proxy
    assert "socks -s -i127.0.0.1 -e127.0.0.1 -p10802" in proxy  # -s: splice
    assert not any(line.startswith("daemon") for line in proxy)  # stays in the foreground, stopped by pid
    assert "socks -i127.0.0.1 -e127.0.0.1 -p10803" in three_proxy_config(10803, splice=False).splitlines()


def test_dante_config_is_loopback_only():
    conf = dante_config(10800, as_root=False)
    lines = [line.strip() for line in conf.splitlines()]
    assert "internal: 127.0.0.1 port = 10800" in lines
    assert "external: 127.0.0.1" in lines
    assert "socksmethod: none" in lines
    assert not any(line.startswith("user.") for line in lines)
    # Every pass rule is 127.0.0.0/8 -> 127.0.0.0/8; everything else is blocked.
    blocks = conf.split("}")
    passes = [b for b in blocks if " pass {" in b]
    assert len(passes) == 2
    for block in passes:
        assert "from: 127.0.0.0/8 to: 127.0.0.0/8" in block
        assert "0.0.0.0" not in block
    assert sum(" block {" in b for b in blocks) == 2
    assert "user.privileged: root" in dante_config(1, as_root=True)


def test_dante_argv_writes_its_config_into_the_work_dir(tmp_path):
    argv = _dante_argv(12345, tmp_path)
    assert argv[:2] == ["danted", "-f"] and argv[-2:] == ["-N", "1"]
    assert "port = 12345" in Path(argv[2]).read_text()
    assert Path(argv[2]).parent == tmp_path


# ------------------------------------------------------------------ rendering


def _table_fixture():
    servers = [spec("direct", "direct"), spec("fastsocks-1w", "fastsocks"), spec("dante"), spec("pproxy")]
    runs = []
    for r, (d, f, da, pp) in enumerate([(27.0, 14.7, 8.0, 3.0), (28.0, 13.9, 8.2, 4.0), (26.0, 15.1, 8.1, 5.0)]):
        runs += [run("bulk1", "direct", r, gbit_s=d, proxy_s_per_gb=None),
                 run("bulk1", "fastsocks-1w", r, gbit_s=f, proxy_s_per_gb=0.28),
                 run("bulk1", "dante", r, gbit_s=da, proxy_s_per_gb=0.9),
                 run("bulk1", "pproxy", r, gbit_s=pp, proxy_s_per_gb=1.7)]
        runs += [run("idle", "fastsocks-1w", r, pss_per_conn_kb=2.0, rss_per_conn_kb=3.0, unanswered=0),
                 run("idle", "dante", r, pss_per_conn_kb=319.0, rss_per_conn_kb=400.0, unanswered=0),
                 run("idle", "pproxy", r, ok=r != 2, pss_per_conn_kb=11.0, rss_per_conn_kb=12.0, unanswered=0)]
    workloads = [W["bulk1"], W["idle"]]
    summary = summarize(runs, workloads)
    return servers, workloads, runs, summary, compute_ratios(summary, workloads, servers)


def test_markdown_table_shows_medians_ranges_and_ratios():
    servers, workloads, _, summary, ratios = _table_fixture()
    table = render_table(summary, ratios, workloads, servers, repeats=3)
    lines = table.splitlines()
    assert lines[0] == ("| workload | unit | Direct | Fastsocks-1w | Dante | Pproxy | best peer "
                        "| Fastsocks-1w ÷ best peer / ÷ direct |")
    assert set(lines[1].replace("|", "")) == {"-"}
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ") for line in lines[2:]}
    assert rows["1 stream download"] == ["1 stream download", "Gbit/s ↑", "27.0 (26.0–28.0)", "14.7 (13.9–15.1)",
                                         "8.10 (8.00–8.20)", "4.00 (3.00–5.00)", "Dante 8.10", "1.81× / 0.54×"]
    assert rows["1 stream: proxy CPU"][2] == "—"          # direct has no proxy
    assert rows["1 stream: proxy CPU"][-1] == "0.31× / —"
    pss = rows["idle connection: PSS growth"]
    assert pss[2] == "—"                                   # direct did not run idle
    assert pss[5] == "11.0 [n=2/3]"                        # one of three pproxy runs failed
    assert pss[6] == "Pproxy 11.0"
    assert "idle connections not answering" not in rows    # all zero: no row
    assert len(lines) == 2 + 4


def test_table_marks_a_cell_whose_runs_all_failed():
    servers = [spec("fastsocks-1w", "fastsocks"), spec("microsocks")]
    runs = [run("cps", "fastsocks-1w", 0, conn_per_s=9000.0, errors=0.0),
            run("cps", "microsocks", 0, ok=False)]
    summary = summarize(runs, [W["cps"]])
    table = render_table(summary, compute_ratios(summary, [W["cps"]], servers),
                         [W["cps"]], servers, repeats=1)
    row = next(line for line in table.splitlines() if line.startswith("| connections/s"))
    assert row.split(" | ")[3] == "failed"
    assert row.rstrip(" |").endswith("— / —")               # no peer to compare with


def test_number_formatting():
    assert [fmt_num(v) for v in (15530.4, 319.0, 27.04, 0.284, None)] == ["15,530", "319", "27.0", "0.28", "—"]
    assert fmt_num(3.0, "count") == "3"
    assert fmt_ratio(1.8149) == "1.81×" and fmt_ratio(None) == "—"


def _document(runs, servers, workloads, skipped=()):
    return build_document(
        started_at="2026-11-28T04:00:00+00:00", finished_at="2026-11-28T04:10:00+00:00",
        command="python benchmarks/compare.py --quick", params=QUICK, repeats=3,
        setup=machine_info("not pinned"), versions={"dante": "1.4.2"}, workloads=workloads,
        servers=servers, skipped=list(skipped), runs=runs, interrupted=False)


def test_result_document_shape_and_files(tmp_path):
    servers, workloads, runs, _, _ = _table_fixture()
    skipped = [{"server": "microsocks", "reason": "not found", "install": "apt-get install microsocks"}]
    doc = _document(runs, servers, workloads, skipped)
    assert doc["schema"] == "fastsocks-compare/1"
    assert {"started_at", "finished_at", "interrupted", "command", "repeats", "params", "order", "setup",
            "versions", "workloads", "servers", "skipped", "failures", "runs", "summary", "ratios"} <= set(doc)
    assert doc["workloads"] == ["bulk1", "idle"]
    assert doc["servers"][0] == {"name": "direct", "label": "Direct", "kind": "direct"}
    assert doc["failures"] == [{"workload": "idle", "server": "pproxy", "repeat": 2, "error": "boom"}]
    assert len(doc["runs"]) == len(runs)
    assert doc["summary"]["bulk1"]["fastsocks-1w"]["metrics"]["gbit_s"]["median"] == 14.7
    assert doc["params"]["idle_connections"] == QUICK.idle_connections
    stem = output_stem(tmp_path, "2026-11-28", "my host", quick=True)
    assert stem.name == "2026-11-28-my_host-quick"
    table = write_outputs(doc, workloads, servers, stem)
    loaded = json.loads(stem.with_suffix(".json").read_text())
    assert loaded["summary"] == json.loads(json.dumps(doc["summary"]))
    markdown = stem.with_suffix(".md").read_text()
    assert table in markdown and "`python benchmarks/compare.py --quick`" in markdown
    assert "skipped microsocks: not found (install: `apt-get install microsocks`)" in markdown
    assert output_stem(tmp_path, "2026-11-28", "my host", quick=True).name == "2026-11-28-my_host-quick-2"


def test_chart_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    servers, workloads, runs, summary, ratios = _table_fixture()
    doc = _document(runs, servers, workloads)
    path = render_chart(doc, summary, ratios, workloads, servers, tmp_path / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_udp_workload_skips_servers_without_udp():
    udp = W["udp"]
    assert udp.mode == "udp" and "udp" in compare.parse_args([]).workloads.split(",")
    assert {m.key for m in udp.metrics} >= {"dgram_per_s", "proxy_us_per_dgram"}
    servers = [spec("direct", "direct"), spec("fastsocks-1w", "fastsocks"), spec("microsocks"), spec("pproxy"),
               spec("dante")]
    order = [s.name for w, r, s in schedule([udp], servers, 1)]
    assert order == ["direct", "fastsocks-1w", "dante"]   # Dante's config passes udpassociate
    skipped = unsupported_cells([udp, W["rr"]], servers)
    assert {c["server"] for c in skipped} == {"microsocks", "pproxy"}
    assert all(c["workload"] == "udp" and c["reason"] for c in skipped)
    assert QUICK.udp_duration_s < FULL.udp_duration_s
    args = udp.args(QUICK)
    assert args[args.index("--duration") + 1] == "1"


def test_a_command_template_names_a_server_and_fills_in_its_port(tmp_path):
    spec = template_server("before:fastsocks=/old/bin/fastsocks --listen {host}:{port} --log {workdir}/x.log")
    assert (spec.name, spec.kind) == ("before", "fastsocks")
    assert spec.argv(1234, tmp_path) == ["/old/bin/fastsocks", "--listen", "127.0.0.1:1234", "--log", f"{tmp_path}/x.log"]
    assert "not found on PATH" in spec.missing()
    assert template_server("mine=ls -p {port}").kind == "peer"
    for bad, why in [("mine", "NAME[:KIND]=COMMAND"), ("=ls {port}", "NAME[:KIND]=COMMAND"),
                     ("mine:best=ls {port}", "KIND must be"), ("mine=ls", "put {port} in it"),
                     ("mine=ls {prt}", "unknown placeholder"), ("my proxy=ls {port}", "NAME may hold")]:
        with pytest.raises(ValueError, match=re.escape(why)):
            template_server(bad)
