"""From raw runs to the figures of the table: per cell the median with min-max of its
successful runs, the best peer per metric, fastsocks' ratios to it and to direct, and the
cells whose load generator was saturated. The statistics are fastsocks bench's own."""

from __future__ import annotations

from typing import Any

from fastsocks.bench import stats

from comparison.servers import ServerSpec
from comparison.workloads import Metric, Workload


def aggregate(values: list[float]) -> dict[str, Any]:
    """Median with min-max (and the values) of one cell's successful runs."""
    spread = stats.spread(values) or dict.fromkeys(("min", "median", "max"))
    return {"median": spread["median"], "min": spread["min"], "max": spread["max"],
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


def cell_median(summary: dict, workload: str, server: str, metric: str) -> float | None:
    """The median of one metric in one cell of a summary; None where there is none."""
    return summary.get(workload, {}).get(server, {}).get("metrics", {}).get(metric, {}).get("median")


def best_peer(summary: dict, workload: Workload, metric: Metric, servers: list[ServerSpec]) -> tuple[str, float] | None:
    """The best median among the peers (not fastsocks, not direct) for one metric."""
    best = None
    for spec in servers:
        if spec.kind != "peer":
            continue
        median = cell_median(summary, workload.name, spec.name, metric.key)
        if median is None:
            continue
        if best is None or (median > best[1] if metric.higher_is_better else median < best[1]):
            best = (spec.name, median)
    return best


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
            direct = cell_median(summary, workload.name, "direct", metric.key) if metric.vs_direct else None
            for spec in servers:
                if spec.kind != "fastsocks":
                    continue
                mine = cell_median(summary, workload.name, spec.name, metric.key)
                entry["fastsocks"][spec.name] = {
                    "vs_best_peer": _ratio(mine, best[1] if best else None),
                    "vs_direct": _ratio(mine, direct),
                }
            ratios.setdefault(workload.name, {})[metric.key] = entry
    return ratios


def saturated_loadgen(runs: list[dict], threshold: float = 0.9) -> list[dict]:
    """Cells whose load generator used >= threshold of its CPUs (median over the runs)."""
    busy: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        if run["ok"] and run.get("loadgen_busy") is not None:
            busy.setdefault((run["workload"], run["server"]), []).append(run["loadgen_busy"])
    medians = {cell: stats.median(values) for cell, values in busy.items()}
    return [{"workload": w, "server": s, "loadgen_busy": median}
            for (w, s), median in medians.items() if median >= threshold]
