"""What is measured: the sizes of the matrix (Params), the workloads that `fastsocks bench`
runs, and the metrics read from its JSON document."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    from comparison.servers import ServerSpec


@dataclass(frozen=True)
class Params:
    """Sizes and durations of the matrix; `QUICK` is the smoke-run preset."""

    bulk_bytes: int = 1 << 30        # total per run; split over the streams of bulk16
    bulk_streams: int = 16
    cps_clients: int = 16
    cps_duration_s: float = 5.0
    rr_connections: int = 32
    rr_size: int = 64
    rr_duration_s: float = 5.0
    idle_connections: int = 3000
    udp_associations: int = 4
    udp_inflight: int = 32
    udp_size: int = 512
    udp_duration_s: float = 5.0


FULL = Params()
QUICK = Params(bulk_bytes=128 << 20, cps_duration_s=1.0, rr_duration_s=1.0, idle_connections=300,
               udp_duration_s=1.0)


@dataclass(frozen=True)
class Metric:
    key: str                      # name in the summary and the JSON
    label: str                    # row label in the table
    unit: str
    path: tuple[str, ...]         # where it is in the bench JSON
    higher_is_better: bool
    vs_direct: bool = True        # a ratio to direct makes sense (direct measures it too)

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    mode: str
    args: Callable[[Params], list[str]]
    metrics: tuple[Metric, ...]
    primary: str                  # the metric the chart shows
    cost: str | None = None       # the CPU (or memory) per unit of work, annotated on the chart
    direct: bool = True           # whether `direct` can run it
    unsupported: tuple[tuple[str, str], ...] = ()  # (server name, why it cannot run this)

    def skip_reason(self, server: str) -> str | None:
        return dict(self.unsupported).get(server)


def _udp_metrics(tag: str, rate_label: str, latency: str) -> tuple[Metric, ...]:
    return (
        Metric("dgram_per_s", rate_label, "dgram/s", ("results", "dgram_per_s"), True),
        Metric(f"{latency}_us", f"{tag} round trip {latency}", "µs", ("results", "latency_us", latency), False),
        Metric("loss_pct", f"{tag} datagrams lost", "%", ("results", "loss_pct"), False, False),
        Metric("proxy_us_per_dgram", f"{tag}: proxy CPU", "µs/dgram", ("cpu", "proxy_us_per_dgram"), False, False),
    )


UDP_UNSUPPORTED = (
    ("microsocks", "microsocks has no UDP ASSOCIATE"),
    ("pproxy", "pproxy's socks5 listener does not answer UDP ASSOCIATE on its TCP port "
               "(it relays UDP only on a separate -ul listener)"),
)


def _bulk_metrics(tag: str) -> tuple[Metric, ...]:
    return (
        Metric("gbit_s", f"{tag} download", "Gbit/s", ("results", "gbit_s"), True),
        Metric("proxy_s_per_gb", f"{tag}: proxy CPU", "s/GB", ("cpu", "proxy_s_per_gb"), False, False),
    )


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload(
        "bulk1", "1 stream download", "bulk",
        lambda p: ["--streams", "1", "--bytes", str(p.bulk_bytes), "--direction", "download"],
        _bulk_metrics("1 stream"), primary="gbit_s", cost="proxy_s_per_gb",
    ),
    Workload(
        "bulk16", "16 streams download", "bulk",
        lambda p: ["--streams", str(p.bulk_streams), "--bytes", str(max(1, p.bulk_bytes // p.bulk_streams)),
                   "--direction", "download"],
        _bulk_metrics("16 streams"), primary="gbit_s", cost="proxy_s_per_gb",
    ),
    Workload(
        "cps", "new connections, 16 clients", "cps",
        lambda p: ["--connections", str(p.cps_clients), "--duration", f"{p.cps_duration_s:g}"],
        (
            Metric("conn_per_s", "connections/s, 16 clients", "conn/s", ("results", "conn_per_s"), True),
            Metric("p50_us", "connection latency p50", "µs", ("results", "latency_us", "p50"), False),
            Metric("p99_us", "connection latency p99", "µs", ("results", "latency_us", "p99"), False),
            Metric("p999_us", "connection latency p99.9", "µs", ("results", "latency_us", "p99.9"), False),
            Metric("max_us", "worst connection of a run", "µs", ("results", "latency_us", "max"), False),
            Metric("proxy_ms_per_1000_conn", "connections: proxy CPU", "ms/1000 conn",
                   ("cpu", "proxy_ms_per_1000_conn"), False, False),
            Metric("errors", "connections: errors per run", "count", ("results", "errors"), False, False),
        ),
        primary="conn_per_s", cost="proxy_ms_per_1000_conn",
    ),
    Workload(
        "cps1", "new connections, one client", "cps",
        lambda p: ["--connections", "1", "--duration", f"{p.cps_duration_s:g}"],
        (
            Metric("p50_us", "one client: connection latency p50", "µs", ("results", "latency_us", "p50"), False),
            Metric("p99_us", "one client: connection latency p99", "µs", ("results", "latency_us", "p99"), False),
            Metric("proxy_ms_per_1000_conn", "one client: proxy CPU", "ms/1000 conn",
                   ("cpu", "proxy_ms_per_1000_conn"), False, False),
        ),
        primary="p50_us", cost="proxy_ms_per_1000_conn",
    ),
    Workload(
        "rr1", "64 B request/response, one connection", "rr",
        lambda p: ["--connections", "1", "--size", str(p.rr_size), "--duration", f"{p.rr_duration_s:g}"],
        (
            Metric("txn_per_s", "64 B req/resp, 1 conn", "txn/s", ("results", "txn_per_s"), True),
            Metric("p50_us", "one connection: req/resp latency p50", "µs", ("results", "latency_us", "p50"), False),
            Metric("proxy_us_per_txn", "one connection: proxy CPU", "µs/txn", ("cpu", "proxy_us_per_txn"), False, False),
        ),
        primary="txn_per_s", cost="proxy_us_per_txn",
    ),
    Workload(
        "rr", "64 B request/response, 32 connections", "rr",
        lambda p: ["--connections", str(p.rr_connections), "--size", str(p.rr_size),
                   "--duration", f"{p.rr_duration_s:g}"],
        (
            Metric("txn_per_s", "64 B req/resp, 32 conns", "txn/s", ("results", "txn_per_s"), True),
            Metric("p99_us", "req/resp latency p99", "µs", ("results", "latency_us", "p99"), False),
            Metric("proxy_us_per_txn", "req/resp: proxy CPU", "µs/txn", ("cpu", "proxy_us_per_txn"), False, False),
        ),
        primary="txn_per_s", cost="proxy_us_per_txn",
    ),
    Workload(
        "idle", "memory per idle connection", "idle",
        lambda p: ["--connections", str(p.idle_connections)],
        (
            Metric("pss_per_conn_kb", "idle connection: PSS growth", "KB/conn",
                   ("results", "pss_per_conn_kb"), False, False),
            Metric("rss_per_conn_kb", "idle connection: RSS growth", "KB/conn",
                   ("results", "rss_per_conn_kb"), False, False),
            Metric("unanswered", "idle connections not answering", "count", (), False, False),
        ),
        primary="pss_per_conn_kb", direct=False,
    ),
    Workload(
        "udp", "UDP datagrams, 4 associations x 32 in flight", "udp",
        lambda p: ["--connections", str(p.udp_associations), "--inflight", str(p.udp_inflight),
                   "--size", str(p.udp_size), "--duration", f"{p.udp_duration_s:g}"],
        _udp_metrics("UDP", "512 B UDP datagrams", "p99"),
        primary="dgram_per_s", cost="proxy_us_per_dgram", unsupported=UDP_UNSUPPORTED,
    ),
    Workload(
        "udp_paced", "UDP paced at 10,000 datagrams/s, 4 associations", "udp",
        lambda p: ["--connections", str(p.udp_associations), "--rate", "10000",
                   "--size", str(p.udp_size), "--duration", f"{p.udp_duration_s:g}"],
        _udp_metrics("paced UDP", "UDP paced at 10,000/s: delivered", "p50"),
        primary="dgram_per_s", cost="proxy_us_per_dgram",  # the same rate for all: the cost is the row
        unsupported=UDP_UNSUPPORTED,
    ),
)}


def unsupported_cells(workloads: list[Workload], servers: list[ServerSpec]) -> list[dict]:
    """The (workload, server) pairs that cannot run, each with its reason."""
    return [{"workload": w.name, "server": s.name, "reason": why}
            for w in workloads for s in servers if (why := w.skip_reason(s.name))]


def dig(data: Any, path: Iterable[str]) -> float | None:
    """The number at ``path`` in nested dicts; None when a key is missing or it is no number."""
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    if isinstance(data, bool) or not isinstance(data, (int, float)):
        return None
    return float(data)


def extract(workload: Workload, bench: dict) -> dict[str, float | None]:
    """The workload's metrics from one `fastsocks bench --json` document."""
    out: dict[str, float | None] = {}
    for m in workload.metrics:
        if m.key == "unanswered":
            conns = dig(bench, ("results", "connections"))
            answered = dig(bench, ("results", "answered"))
            out[m.key] = None if conns is None or answered is None else conns - answered
        else:
            out[m.key] = dig(bench, m.path)
    return out

