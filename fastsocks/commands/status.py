"""``fastsocks status``: a running server at a glance, from its metrics endpoint.

Two scrapes a second apart (``--interval``) give the rates; everything else is the second
scrape's. The endpoint is ``--metrics HOST:PORT``, or the ``metrics`` key of ``--config``.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from fastsocks.commands.config_files import load
from fastsocks.errors import ConfigError
from fastsocks.settings import parse_listen

EXIT_OK, EXIT_DOWN, EXIT_USAGE = 0, 1, 2


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastsocks status",
                                     description="Workers, sessions, rates and restarts of a running "
                                                 "fastsocks, read from its --metrics endpoint.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--metrics", metavar="HOST:PORT", help="the server's --metrics address")
    where.add_argument("--config", "-c", metavar="FILE", help="the server's config file (its [server] metrics)")
    parser.add_argument("--interval", type=float, default=1.0, metavar="S", help="between the two scrapes")
    args = parser.parse_args(argv)
    if args.metrics:
        try:
            address = parse_listen(args.metrics)
        except ConfigError as exc:
            print(f"fastsocks status: --metrics: {exc.msg}", file=sys.stderr)
            return EXIT_USAGE
    else:
        settings = load(args.config)  # None: its error is printed
        if settings is None:
            return EXIT_USAGE
        address = settings.metrics
    if address is None:
        print(f"fastsocks status: {args.config} sets no [server] metrics address", file=sys.stderr)
        return EXIT_USAGE
    url = f"http://{address}/metrics"
    try:
        first = scrape(url)
        time.sleep(args.interval)
        second = scrape(url)
    except (OSError, urllib.error.URLError) as exc:
        print(f"fastsocks status: cannot read {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return EXIT_DOWN
    print(render(first, second, args.interval))
    return EXIT_OK


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples, name: str, **labels) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def render(first, second, interval_s: float) -> str:
    def rate(name: str, **labels) -> float:
        return (total(second, name, **labels) - total(first, name, **labels)) / interval_s

    workers = sorted({dict(ls)["worker"] for (n, ls) in second if n == "fastsocks_worker_rss_bytes"}, key=int)
    lines = [
        f"workers        {total(second, 'fastsocks_workers'):.0f} live, "
        f"{total(second, 'fastsocks_worker_restarts_total'):.0f} restarted",
        f"sessions       {total(second, 'fastsocks_sessions_active'):.0f} active, "
        f"{total(second, 'fastsocks_sessions_total'):.0f} in all",
        f"rates          {rate('fastsocks_connections_accepted_total'):.0f} conn/s, "
        f"up {rate('fastsocks_bytes_total', direction='up') / 1e6:.2f} MB/s, "
        f"down {rate('fastsocks_bytes_total', direction='down') / 1e6:.2f} MB/s",
        f"refused        {total(second, 'fastsocks_policy_denials_total'):.0f} by rules, "
        f"{total(second, 'fastsocks_cap_refusals_total'):.0f} by caps, "
        f"{total(second, 'fastsocks_auth_failures_total'):.0f} failed logins",
        f"reloads        {total(second, 'fastsocks_config_reloads_total', result='ok'):.0f} ok, "
        f"{total(second, 'fastsocks_config_reloads_total', result='error'):.0f} refused",
    ]
    for worker in workers:
        rss = total(second, "fastsocks_worker_rss_bytes", worker=worker) / (1 << 20)
        fds = total(second, "fastsocks_worker_open_fds", worker=worker)
        cpu = rate("fastsocks_worker_cpu_seconds_total", worker=worker) * 100
        lines.append(f"worker {worker:<7} {rss:.1f} MiB, {fds:.0f} fds, {cpu:.0f}% CPU")
    return "\n".join(lines)
