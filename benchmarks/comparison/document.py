"""The result document and its files: the machine's setup, where the files of a run go
(results/<date>-<host>[-quick][-N]), the JSON document of every run with its summary and
ratios, and writing it out with its Markdown page and chart."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import socket
from pathlib import Path

from comparison.render import render_busy_table, render_chart, render_markdown, render_table
from comparison.servers import ServerSpec
from comparison.summary import compute_ratios, saturated_loadgen, summarize
from comparison.workloads import Params, Workload

SCHEMA = "fastsocks-compare/1"


def machine_info(pinning: str) -> dict:
    """The setup line of the document: host, kernel, CPU model and count, Python, pinning."""
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



def build_document(*, started_at: str, finished_at: str | None, command: str, params: Params, repeats: int,
                   setup: dict, versions: dict, workloads: list[Workload], servers: list[ServerSpec],
                   skipped: list[dict], runs: list[dict], interrupted: bool) -> dict:
    """The results document: the setup, every raw run, and the summary and ratios made from them."""
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
    """Write <stem>.json, .md and (with matplotlib) .png; return the Markdown table."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    table = render_table(doc["summary"], doc["ratios"], workloads, servers, doc["repeats"])
    chart = render_chart(doc, doc["summary"], doc["ratios"], workloads, servers, stem.with_suffix(".png"))
    doc["chart"] = str(chart) if chart else None
    doc["table"] = str(stem.with_suffix(".md"))
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    busy = render_busy_table(doc["runs"], workloads, servers)
    stem.with_suffix(".md").write_text(render_markdown(doc, table, busy))
    return table
