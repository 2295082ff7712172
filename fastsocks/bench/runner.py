"""One bench run: from a checked Plan to an Outcome, the raw figures that report.py turns
into a table and a JSON document.

Theory of operation
-------------------
::

    built-in target up (child process) ─> address resolved ─> preflight: one exchange
    over the whole path in plain Python ─> the proxy's processes found ─> shares built
      ─> [idle: memory of the proxy's tree]
      ─> establish (bulk, rr, idle): every connection opened and parked
      ─> [idle: hold for --duration, then memory again]
      ─> CPU sampled ─> go: the measured work, started at one instant ─> CPU sampled

The CPU window is the go phase (for idle: everything from the first connection to the
last ping), and ``measured_s`` is that window as the load generator timed it: from go()
to the last completed unit. Phases are driven in slices of SLICE_S; between slices the
progress bar is drawn and --max-time is enforced: past it every share aborts what is in
flight and the outcome is marked incomplete. Everything started here is stopped in
``finally``, in reverse order: shares, then the target.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psutil

from fastsocks.bench import wire
from fastsocks.bench._loadgen import Pattern
from fastsocks.bench.params import Address, Endpoint, Plan
from fastsocks.bench.preflight import PreflightError, check_path, check_udp_path
from fastsocks.bench.progress import ProgressBar
from fastsocks.bench.proctree import ProcessTree, Sample, pids_listening_on
from fastsocks.bench.shares import SLICE_S, ForkedShare, LocalShare, ShareError, merge, own_cpu_s, split
from fastsocks.bench.targets import TargetProcess, lift_fd_limit
from fastsocks.errors import FastSocksError


UDP_LOSS_TIMEOUT_S = 1.0  # udp: a datagram unanswered this long is lost (and replaced)


class BenchError(FastSocksError):
    """The run could not be made; the message says why and, where it can, what to do."""


@dataclass
class Outcome:
    plan: Plan
    started_at: str
    target: Endpoint
    proxy_pids: list[int]
    counters: dict
    latencies_ns: Sequence[int]      # sorted
    stream_s: list[float]            # bulk: each stream's time from go to its last byte
    established: int | None          # connections parked by the establish phase
    measured_s: float
    wall_s: float
    loadgen_cpu_s: float
    proxy_cpu_s: float | None
    target_cpu_s: float | None
    memory_before: Sample | None = None
    memory_after: Sample | None = None
    complete: bool = True            # False: cut short by --max-time
    notes: list[str] = field(default_factory=list)


@dataclass
class _CpuMark:
    wall_s: float
    own_s: float
    children_s: float
    proxy_s: float | None
    target_s: float | None


def run(plan: Plan, bar: ProgressBar) -> Outcome:
    wall0 = time.monotonic()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    _check_fd_budget(plan)
    pattern = Pattern()
    target_proc = TargetProcess(pattern) if plan.target is None else None
    shares: list = []
    try:
        target = target_proc.start() if target_proc else plan.target
        address = resolve(plan.proxy.endpoint if plan.proxy else target)
        try:
            if plan.mode == "udp":
                check_udp_path(address, plan.proxy, target, plan.timeout_s)
            else:
                check_path(address, plan.proxy, target, plan.mode == "bulk", plan.timeout_s)
        except PreflightError as exc:
            raise BenchError(str(exc)) from None
        notes: list[str] = []
        tree = _proxy_tree(plan, address, notes, exclude={os.getpid(), target_proc.pid if target_proc else 0})
        keep_closed = [target_proc.stop_fd] if target_proc else []
        _make_shares(plan, pattern, address, target, keep_closed, into=shares)
        outcome = _measure(plan, shares, tree, target_proc, bar, wall0 + plan.max_time_s)
        outcome.started_at, outcome.target, outcome.notes = started_at, target, notes + outcome.notes
        outcome.wall_s = time.monotonic() - wall0
        return outcome
    except ShareError as exc:
        raise BenchError(str(exc)) from None
    finally:
        bar.close()
        for share in shares:
            share.close()
        if target_proc:
            target_proc.stop()
        pattern.close()


def resolve(endpoint: Endpoint) -> Address:
    """The first address of ``endpoint``."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise BenchError(f"cannot resolve {endpoint.host!r}: {exc.strerror}") from None
    return Address(family, sockaddr[0], endpoint.port)


def engine_configs(plan: Plan, address: Address, target: Endpoint) -> list[dict]:
    """One LoadGen configuration per share: connections and count split evenly."""
    base = dict(mode=plan.mode, family=address.family, host=address.ip, port=address.port, size=plan.size,
                bulk_bytes=plan.bytes_per_stream, download=plan.direction in ("download", "both"),
                upload=plan.direction in ("upload", "both"), verify=plan.verify, timeout_s=plan.timeout_s,
                source_addresses=plan.source_addresses)
    if plan.proxy:
        proxy = plan.proxy
        base.update(greeting=wire.greeting(proxy.has_credentials),
                    auth=wire.auth_request(proxy.username, proxy.password) if proxy.has_credentials else None,
                    request=wire.connect_request(target.host, target.port))
    if plan.mode == "udp":
        base.update(inflight=plan.inflight, loss_timeout_s=min(plan.timeout_s, UDP_LOSS_TIMEOUT_S),
                    rate=plan.rate / plan.procs,
                    udp_header=wire.udp_header(target.host, target.port) if plan.proxy else None)
        if plan.proxy:
            base.update(request=wire.udp_associate_request())
    counts = split(plan.count, plan.procs) if plan.count else [0] * plan.procs
    return [dict(base, connections=n, limit=count) for n, count in zip(split(plan.connections, plan.procs), counts)]


def _make_shares(plan: Plan, pattern: Pattern, address: Address, target: Endpoint, keep_closed: list[int],
                 into: list) -> None:
    """Fill ``into`` as we go, so that a failure halfway still leaves every share to close."""
    configs = engine_configs(plan, address, target)
    if plan.procs == 1:
        into.append(LocalShare(pattern, configs[0]))
        return
    for config in configs:
        # A child must not hold the parent's end of the target's or another child's pipe.
        into.append(ForkedShare(pattern, config, keep_closed + [share.fileno() for share in into]))


def _measure(plan: Plan, shares: list, tree: ProcessTree | None, target_proc: TargetProcess | None,
             bar: ProgressBar, deadline: float) -> Outcome:
    idle = plan.mode == "idle"
    memory_before = memory_after = None
    established = None
    complete = True
    if idle:
        memory_before = tree.sample(memory=True) if tree else None
        cpu0 = _cpu_mark(shares, tree, target_proc)
    if plan.mode != "cps":
        complete = _drive(plan, shares, "establish", deadline, bar)
        established = sum(share.progress()[0] for share in shares)
    if idle and complete:
        _hold(plan, established, deadline, bar)
        memory_after = tree.sample(memory=True) if tree else None
    if not idle:
        cpu0 = _cpu_mark(shares, tree, target_proc)
    if complete:
        complete = _drive(plan, shares, "run", deadline, bar)
    cpu1 = _cpu_mark(shares, tree, target_proc)
    counters, latencies, stream_s = merge([share.collect() for share in shares])
    if idle:
        measured_s = cpu1.wall_s - cpu0.wall_s
    else:
        measured_s = max(counters["t_last_ns"] - counters["t_go_ns"], 0) / 1e9
    outcome = Outcome(
        plan=plan, started_at="", target=plan.target, proxy_pids=tree.pids() if tree else [],
        counters=counters, latencies_ns=latencies, stream_s=stream_s, established=established,
        measured_s=measured_s, wall_s=0.0,
        loadgen_cpu_s=(cpu1.own_s - cpu0.own_s) + (cpu1.children_s - cpu0.children_s),
        proxy_cpu_s=_diff(cpu0.proxy_s, cpu1.proxy_s), target_cpu_s=_diff(cpu0.target_s, cpu1.target_s),
        memory_before=memory_before, memory_after=memory_after, complete=complete,
    )
    return outcome


def _drive(plan: Plan, shares: list, phase: str, deadline: float, bar: ProgressBar) -> bool:
    """Run one phase on every share to its end; False when --max-time cut it short."""
    timed = phase == "run" and plan.mode in ("cps", "rr", "udp")
    duration_s = (plan.duration_s or 0.0) if timed else 0.0
    started = time.monotonic()
    for share in shares:
        share.begin(phase, duration_s)
    aborted = False
    while not all(share.done for share in shares):
        if not aborted and time.monotonic() >= deadline:
            for share in shares:
                share.abort()
            aborted = True
        for share in shares:
            if not share.done:
                share.step(SLICE_S / len(shares))
        _show_progress(plan, shares, phase, time.monotonic() - started, bar)
    return not aborted


def _show_progress(plan: Plan, shares: list, phase: str, elapsed_s: float, bar: ProgressBar) -> None:
    established, ok, errors, moved, _ = (sum(v) for v in zip(*(share.progress() for share in shares)))
    failed = f", {errors:,} errors" if errors else ""
    if phase == "establish":
        bar.update(established / plan.connections, f"opening {established:,}/{plan.connections:,} connections{failed}")
    elif plan.mode == "bulk":
        total = plan.connections * plan.bytes_per_stream * (2 if plan.direction == "both" else 1)
        bar.update(moved / total, f"{moved / 1e9:,.2f} of {total / 1e9:,.2f} GB{failed}")
    elif plan.mode == "idle":
        bar.update(None, f"pinged {ok:,} connections{failed}")
    else:
        unit = {"cps": "connections", "udp": "datagrams"}.get(plan.mode, "transactions")
        fraction = ok / plan.count if plan.count else elapsed_s / (plan.duration_s or 1.0)
        bar.update(fraction, f"{ok:,} {unit}{failed}")


def _hold(plan: Plan, established: int, deadline: float, bar: ProgressBar) -> None:
    """idle: keep the connections open for --duration before measuring memory."""
    hold_s = plan.duration_s or 0.0
    started = time.monotonic()
    end = min(started + hold_s, deadline)
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(SLICE_S, left))
        bar.update((time.monotonic() - started) / hold_s, f"holding {established:,} connections")


def _cpu_mark(shares: list, tree: ProcessTree | None, target_proc: TargetProcess | None) -> _CpuMark:
    return _CpuMark(
        wall_s=time.monotonic(), own_s=own_cpu_s(),
        children_s=sum(share.child_cpu_s for share in shares),
        proxy_s=tree.sample().cpu_s if tree else None,
        target_s=target_proc.cpu_s() if target_proc else None,
    )


def _diff(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _proxy_tree(plan: Plan, address: Address, notes: list[str], exclude: set[int]) -> ProcessTree | None:
    if plan.direct:
        return None
    if plan.proxy_pid is not None:
        if not psutil.pid_exists(plan.proxy_pid):
            raise BenchError(f"--proxy-pid {plan.proxy_pid}: no such process")
        return ProcessTree([plan.proxy_pid])
    if not ipaddress.ip_address(address.ip).is_loopback:
        notes.append(f"proxy CPU and memory not measured: {address.ip} is not loopback "
                     f"(give --proxy-pid if the proxy runs on this machine)")
        return None
    pids = pids_listening_on(address.port, exclude)
    if not pids:
        notes.append(f"proxy CPU and memory not measured: no process we may inspect listens on "
                     f"port {address.port} (give --proxy-pid)")
        return None
    return ProcessTree(pids)


def _check_fd_budget(plan: Plan) -> None:
    limit = lift_fd_limit()
    need = plan.connections * (3 if plan.mode == "bulk" else 1) + 100  # bulk: a pipe per stream
    if need > limit:
        raise BenchError(f"{plan.connections:,} connections need about {need:,} open files and the "
                         f"limit is {limit:,}: raise it (ulimit -n) or ask for fewer")
