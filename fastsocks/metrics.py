"""Prometheus metrics: counters in shared memory, written by the workers, read at scrape time.

Theory of operation
-------------------
``SharedCounters`` is one anonymous shared map, made by the master before it forks, with a
row of 8-byte words per worker slot (the layout: ``LAYOUT``). A worker adds to its own row
only, one aligned store per count (as stats.py's slots), when a session gets its outcome:
by protocol, command and reply; a policy denial by the rule that decided (a number, as the
session or the engine carries it); a UDP association's datagrams; and the durations of its
handshake, DNS lookup and connect, each into a histogram of fixed ``BUCKETS_S`` (a count
per bucket, and the sum in nanoseconds: the words are integers). A cap refusal is counted
by its cap where Admission decides it. A respawned worker goes on adding to its slot's
row, so the totals survive it. Nothing else happens on the connection path.

The master serves ``--metrics HOST:PORT`` with prometheus_client's own HTTP server (a
thread of the master's): at each scrape ``MasterCollector`` sums the rows, reads the
stats slots (bytes, active sessions, splice pipes, auth failures) and asks psutil for each
live worker's RSS, CPU and open fds. There is no IPC per scrape and no lock: a reader
sees each word old or new, never torn.
"""

from __future__ import annotations

import bisect
import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from fastsocks._relay_types import RULE_DEFAULT, RULE_NONE
from fastsocks.protocol.socks5 import Reply

PROTOCOLS = ("socks4", "socks4a", "socks5", "http", "-")
COMMANDS = ("connect", "bind", "udp_associate", "-")
REPLIES = tuple(r.name.lower() for r in Reply) + ("none",)  # none: the client got no reply
CAPS = ("max_sessions", "max_sessions_per_worker", "max_sessions_per_client", "max_sessions_per_user",
        "max_udp_per_worker", "max_udp_per_client")
DENIAL_RULES = 256  # rules #1-#255 by number; a later rule counts as "#256+"
UDP_COUNTS = ("datagrams_up", "datagrams_down", "dropped")
# Upper bounds, in seconds: a loopback connect takes ~50 µs, a LAN one ~0.5 ms, a cached
# name nothing; a lookup or a connect across the world ~0.1-0.3 s; 10 s is the default
# timeout of both, past which only +Inf is left.
BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HISTOGRAMS = (("handshake", "fastsocks_handshake_seconds",
               "From accept to the request read (a login included), of the sessions that got that far"),
              ("dns", "fastsocks_dns_seconds", "Lookups of the names that requests asked for"),
              ("connect", "fastsocks_connect_seconds", "Outbound connects of CONNECT requests, to success or failure"))
HISTOGRAM_WORDS = len(BUCKETS_S) + 2  # a count per bucket, +Inf's, and the sum in ns


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each counter lives in a worker's row."""
    sessions: int = 0                                         # PROTOCOLS x COMMANDS
    replies: int = sessions + len(PROTOCOLS) * len(COMMANDS)  # REPLIES
    denied_default: int = replies + len(REPLIES)
    denied_rule: int = denied_default + 1                     # DENIAL_RULES
    caps: int = denied_rule + DENIAL_RULES                    # CAPS
    udp: int = caps + len(CAPS)                               # UDP_COUNTS
    histograms: int = udp + len(UDP_COUNTS)                   # HISTOGRAMS x HISTOGRAM_WORDS
    words: int = histograms + len(HISTOGRAMS) * HISTOGRAM_WORDS


LAYOUT = Layout()


class SharedCounters:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        size = 8 * LAYOUT.words * slots
        self._map = mmap.mmap(-1, max(size, mmap.PAGESIZE), flags=mmap.MAP_SHARED)
        self.words = memoryview(self._map).cast("q")

    def total(self, word: int) -> int:
        return sum(self.words[slot * LAYOUT.words + word] for slot in range(self.slots))

    def for_worker(self, slot: int) -> WorkerCounters:
        return WorkerCounters(self.words, slot * LAYOUT.words)

    def close(self) -> None:
        self.words.release()
        self._map.close()


class WorkerCounters:
    """One worker's row: what it counts, each a single add (policy knows nothing of this:
    the worker counts what the outcome says)."""

    def __init__(self, words: memoryview, base: int) -> None:
        self.words = words
        self.base = base
        self._kind = {(p, c): base + LAYOUT.sessions + i * len(COMMANDS) + j
                      for i, p in enumerate(PROTOCOLS) for j, c in enumerate(COMMANDS)}
        self._reply = {name: base + LAYOUT.replies + i for i, name in enumerate(REPLIES)}

    def outcome(self, proto: str, command: str, reply: str, rule: int = RULE_NONE) -> None:
        """A session's answer: ``reply`` as the access log names it ("-": none was sent),
        and what decided it (_relay_types.RULE_*, or a rule's index)."""
        words = self.words
        words[self._kind.get((proto, command), self._kind["-", "-"])] += 1
        words[self._reply.get(reply, self._reply["none"])] += 1
        if reply == "connection_not_allowed":
            self.denied(rule)

    def denied(self, rule: int) -> None:
        """A denial, by the index of the rule that decided; the default action's, and a
        refusal no rule made (a destination that is this host or this proxy, SOCKS4 where
        passwords are required), count as "default"."""
        if rule in (RULE_DEFAULT, RULE_NONE):
            self.words[self.base + LAYOUT.denied_default] += 1
        else:
            self.words[self.base + LAYOUT.denied_rule + min(rule, DENIAL_RULES - 1)] += 1

    def cap_refused(self, cap: str) -> None:
        """A request refused by this cap (one of CAPS: admission.CapRefusal.cap)."""
        if cap in CAPS:
            self.words[self.base + LAYOUT.caps + CAPS.index(cap)] += 1

    def observe(self, handshake_s: float | None, dns_s: float | None, connect_s: float | None) -> None:
        """A session's phase durations, each into its histogram (None: not reached)."""
        at = self.base + LAYOUT.histograms
        for seconds in (handshake_s, dns_s, connect_s):
            if seconds is not None:
                self.words[at + bisect.bisect_left(BUCKETS_S, seconds)] += 1  # le: a bound is its own bucket's
                self.words[at + HISTOGRAM_WORDS - 1] += int(seconds * 1e9)
            at += HISTOGRAM_WORDS

    def udp(self, datagrams_up: int, datagrams_down: int, dropped: int) -> None:
        at = self.base + LAYOUT.udp
        self.words[at] += datagrams_up
        self.words[at + 1] += datagrams_down
        self.words[at + 2] += dropped


@dataclass(slots=True)
class MasterCounts:
    """What only the master knows; written by its loop, read by the scrape thread."""
    restarts: int = 0
    reloads: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0})


class MasterCollector(Collector):
    """Builds every metric family from the shared maps and psutil at scrape time."""

    def __init__(self, counters: SharedCounters, stats, facts: Callable[[], list], master: MasterCounts) -> None:
        self.counters = counters
        self.stats = stats      # stats.SharedStats
        self.facts = facts      # () -> [master.WorkerFacts]
        self.master = master

    def collect(self) -> Iterator[Metric]:
        yield from self.sessions()
        yield from self.slots()
        yield from self.workers()
        yield from self.master_counts()

    def sessions(self) -> Iterator[Metric]:
        total = self.counters.total
        outcomes = CounterMetricFamily("fastsocks_sessions", "Sessions by protocol and command, "
                                       "counted when they got their reply", labels=["protocol", "command"])
        for i, proto in enumerate(PROTOCOLS):
            for j, command in enumerate(COMMANDS):
                outcomes.add_metric([proto, command], total(LAYOUT.sessions + i * len(COMMANDS) + j))
        yield outcomes
        replies = CounterMetricFamily("fastsocks_replies", "Replies sent, by SOCKS5 reply name "
                                      "(SOCKS4's: succeeded or general_failure ...)", labels=["reply"])
        for i, name in enumerate(REPLIES):
            replies.add_metric([name], total(LAYOUT.replies + i))
        yield replies
        denials = CounterMetricFamily("fastsocks_policy_denials", "Requests denied by the rules, "
                                      "by rule number (as the logs and 'fastsocks explain' name them)",
                                      labels=["rule"])
        denials.add_metric(["default"], total(LAYOUT.denied_default))
        for i in range(DENIAL_RULES):
            if count := total(LAYOUT.denied_rule + i):
                denials.add_metric([f"#{i + 1}" if i + 1 < DENIAL_RULES else f"#{DENIAL_RULES}+"], count)
        yield denials
        caps = CounterMetricFamily("fastsocks_cap_refusals", "Requests refused by a cap", labels=["cap"])
        for i, name in enumerate(CAPS):
            caps.add_metric([name], total(LAYOUT.caps + i))
        yield caps
        udp = CounterMetricFamily("fastsocks_udp_datagrams", "UDP ASSOCIATE datagrams of the associations "
                                  "that ended", labels=["direction"])
        udp.add_metric(["up"], total(LAYOUT.udp))
        udp.add_metric(["down"], total(LAYOUT.udp + 1))
        yield udp
        yield CounterMetricFamily("fastsocks_udp_datagrams_dropped", "UDP datagrams dropped (refused by "
                                  "the rules, from a wrong source, or not sent)", value=total(LAYOUT.udp + 2))
        yield from self.histograms()

    def histograms(self) -> Iterator[Metric]:
        total = self.counters.total
        for i, (_phase, name, documentation) in enumerate(HISTOGRAMS):
            at = LAYOUT.histograms + i * HISTOGRAM_WORDS
            cumulative, buckets = 0, []
            for j, bound in enumerate((*(repr(b) for b in BUCKETS_S), "+Inf")):
                cumulative += total(at + j)
                buckets.append((bound, cumulative))
            yield HistogramMetricFamily(name, documentation, buckets=buckets,
                                        sum_value=total(at + HISTOGRAM_WORDS - 1) / 1e9)

    def slots(self) -> Iterator[Metric]:
        slots = [self.stats.read(slot) for slot in range(self.stats.slots)]
        yield CounterMetricFamily("fastsocks_connections_accepted", "Connections accepted",
                                  value=sum(s.accepted for s in slots))
        yield GaugeMetricFamily("fastsocks_sessions_active", "Sessions open now (handshaking, relayed "
                                "or associated)", value=sum(s.active for s in slots))
        traffic = CounterMetricFamily("fastsocks_bytes", "Payload bytes relayed", labels=["direction"])
        traffic.add_metric(["up"], sum(s.bytes_up for s in slots))
        traffic.add_metric(["down"], sum(s.bytes_down for s in slots))
        yield traffic
        yield CounterMetricFamily("fastsocks_auth_failures", "Failed username/password logins",
                                  value=sum(s.auth_failures for s in slots))
        yield GaugeMetricFamily("fastsocks_splice_pipes", "Splice pipes open, pooled ones included",
                                value=sum(s.splice_pipes for s in slots))

    def workers(self) -> Iterator[Metric]:
        rss = GaugeMetricFamily("fastsocks_worker_rss_bytes", "Resident memory of each worker", labels=["worker"])
        cpu = CounterMetricFamily("fastsocks_worker_cpu_seconds", "CPU time of each live worker",
                                  labels=["worker"])
        fds = GaugeMetricFamily("fastsocks_worker_open_fds", "Open file descriptors of each worker",
                                labels=["worker"])
        facts = self.facts()
        for fact in facts:
            label = [str(fact.slot)]
            rss.add_metric(label, fact.rss_bytes)
            cpu.add_metric(label, fact.cpu_s)
            fds.add_metric(label, fact.open_fds)
        yield GaugeMetricFamily("fastsocks_workers", "Live worker processes", value=len(facts))
        yield from (rss, cpu, fds)

    def master_counts(self) -> Iterator[Metric]:
        yield CounterMetricFamily("fastsocks_worker_restarts", "Workers respawned after they died",
                                  value=self.master.restarts)
        reloads = CounterMetricFamily("fastsocks_config_reloads", "SIGHUP reloads, by result", labels=["result"])
        for result, count in list(self.master.reloads.items()):
            reloads.add_metric([result], count)
        yield reloads
