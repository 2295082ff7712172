"""The matrix: which CPUs each side runs on (--pin), the order of the runs, the load
generator's command, and one cell run (run_one) with the figures derived from its bench
document (derive, also when re-rendering)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from comparison.servers import LOOPBACK, ServerSpec
from comparison.supervise import ServerError, Supervisor, log_tail, start_server
from comparison.workloads import Params, Workload, dig, extract


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
            workdir: Path, proxy_prefix: list[str], load_prefix: list[str], run_timeout_s: float,
            supervisor: Supervisor) -> dict:
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
            proc, port, log = start_server(spec, workdir, proxy_prefix, supervisor)
            record["server_argv"] = [str(a) for a in proc.args]
            record["server_pid"] = proc.pid
            target = ["--proxy", f"socks5://{LOOPBACK}:{port}", "--proxy-pid", str(proc.pid)]
        out_json = workdir / f"{workload.name}-{spec.name}-{repeat}.json"
        argv = load_prefix + bench_cmd + [workload.mode, *target, *workload.args(params),
                                          "--json", str(out_json), "--quiet"]
        record["bench_argv"] = argv
        bench_log = workdir / f"bench-{workload.name}-{spec.name}-{repeat}.log"
        bench = supervisor.spawn(argv, bench_log)
        try:
            code = bench.wait(run_timeout_s)
        except subprocess.TimeoutExpired:
            raise ServerError(f"bench run exceeded --run-timeout {run_timeout_s:g} s") from None
        finally:
            supervisor.stop_process(bench, grace_s=2)   # also whatever it started in its process group
        try:
            data = json.loads(out_json.read_text())
        except (OSError, ValueError) as error:
            data = None
            unreadable = f"bench wrote no readable JSON: {error}"
        if isinstance(data, dict):
            record["bench"] = data
            derive(record, workload, load_cpus(load_prefix))
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"{spec.name} died during the run (exit {proc.returncode}): {log_tail(log, 5)}")
        if isinstance(data, dict) and (data.get("ok") is False or data.get("problems")):
            raise ServerError("bench: " + "; ".join(str(p) for p in data.get("problems") or ["not ok"]))
        if code != 0:
            raise ServerError(f"bench exited {code}: {log_tail(bench_log, 5)}")
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
            supervisor.stop_process(proc)
        record["elapsed_s"] = round(time.monotonic() - start, 3)
    return record
