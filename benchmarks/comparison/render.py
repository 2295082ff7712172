"""What a person reads: numbers formatted for the table, the Markdown table of medians and
ratios, the table of CPU cores busy on each side, the Markdown page, and the chart (PNG,
when matplotlib is installed)."""

from __future__ import annotations

from pathlib import Path

from fastsocks.bench.stats import median

from comparison.servers import ServerSpec
from comparison.summary import cell_median
from comparison.workloads import Metric, Workload


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


def fmt_primary(workload: Workload, record: dict) -> str:
    """One run's primary figure (or why it failed), for the progress line."""
    if not record["ok"]:
        return f"FAILED: {record['error'].splitlines()[0] if record['error'] else '?'}"
    metric = next(m for m in workload.metrics if m.key == workload.primary)
    return f"{fmt_num(record['metrics'][metric.key])} {metric.unit}"


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
            sides = [fmt_num(median(cell[k])) if cell[k] else "—" for k in ("proxy", "load")]
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
                c = cell_median(summary, workload.name, name, cost.key)
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
