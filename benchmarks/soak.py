"""A soak run: fastsocks under mixed load for a while, its memory and fds sampled all along.

    python benchmarks/soak.py                  # 10 minutes, a sample every 10 s
    python benchmarks/soak.py --minutes 2 --interval 5 --out /tmp/soak

One server (2 workers, username/password on, a short failed-login block) takes, round after
round until the time is up, through `fastsocks bench` and a login loop:
    cps 16 clients for 5 s; 16 download streams of 32 MB; rr 32 connections for 5 s;
    UDP 4 associations x 32 in flight for 5 s; 1000 idle connections held 5 s;
    40 wrong passwords from 127.0.0.200 (blocked after 10, the block ends after 5 s).
Every --interval seconds each process's PSS and open fds are sampled (psutil). The result
is benchmarks/results/<date>-soak.json and, with matplotlib, .png: PSS and fds per process
over time. A flat line after the first rounds is what a server that gives back what each
round took looks like; this is not a CI test (it takes minutes), tests/integration/test_bursts.py is.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import bursts
import psutil

RESULTS_DIR = Path(__file__).resolve().parent / "results"
USER, PASSWORD = "alice", "soak-password"


def rounds(proxy_url: str, until_s: float, log) -> int:
    """Load rounds until ``until_s`` (monotonic); the number of rounds done."""
    bench = [sys.executable, "-m", "fastsocks", "bench"]
    steps = [
        ["cps", "--connections", "16", "--duration", "5", "--source-addresses", "16"],
        ["bulk", "--streams", "16", "--bytes", "32M"],
        ["rr", "--connections", "32", "--duration", "5"],
        ["udp", "--connections", "4", "--inflight", "32", "--duration", "5"],
        ["idle", "--connections", "1000", "--duration", "5", "--source-addresses", "16"],
    ]
    done = 0
    while time.monotonic() < until_s:
        for step in steps:
            if time.monotonic() >= until_s:
                return done
            out = subprocess.run([*bench, *step, "--proxy", proxy_url, "--quiet"], capture_output=True, text=True,
                                 timeout=300, check=False)
            if out.returncode != 0:
                log(f"bench {step[0]} failed ({out.returncode}): {out.stderr.strip()[-300:]}")
        done += 1
        log(f"round {done} done")
    return done


def failed_logins(address, stop: threading.Event) -> None:
    while not stop.is_set():
        for i in range(40):
            bursts.login(address, b"wrong %d" % i, source="127.0.0.200")
        stop.wait(5.0)


def sample(root: psutil.Process, started_s: float) -> dict:
    procs = {}
    for proc in [root, *root.children()]:
        try:
            with proc.oneshot():
                procs[str(proc.pid)] = {"role": "master" if proc.pid == root.pid else "worker",
                                        "pss_bytes": proc.memory_full_info().pss, "fds": proc.num_fds()}
        except psutil.NoSuchProcess:
            continue
    return {"t_s": round(time.monotonic() - started_s, 1), "processes": procs}


def plot(doc: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install '.[bench]'): no chart", file=sys.stderr)
        return None
    fig, (pss_ax, fd_ax) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    pids = sorted({pid for s in doc["samples"] for pid in s["processes"]})
    for pid in pids:
        points = [(s["t_s"] / 60, s["processes"][pid]) for s in doc["samples"] if pid in s["processes"]]
        label = f"{points[0][1]['role']} {pid}"
        pss_ax.plot([t for t, _ in points], [p["pss_bytes"] / 2**20 for _, p in points], label=label)
        fd_ax.plot([t for t, _ in points], [p["fds"] for _, p in points], label=label)
    pss_ax.set_ylabel("PSS, MiB")
    fd_ax.set_ylabel("open fds")
    fd_ax.set_xlabel("minutes under mixed load (cps, streams, rr, UDP, idle holds, failed logins)")
    pss_ax.set_ylim(bottom=0)
    fd_ax.set_ylim(bottom=0)
    pss_ax.legend(fontsize=8)
    pss_ax.set_title(f"fastsocks soak: {doc['rounds']} rounds in {doc['minutes']} min, sampled every "
                     f"{doc['interval_s']:.0f} s under load", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--out", help="output stem (default benchmarks/results/<date>-soak)")
    args = parser.parse_args(argv)
    stem = Path(args.out) if args.out else RESULTS_DIR / f"{dt.date.today().isoformat()}-soak"
    with tempfile.TemporaryDirectory() as tmp:
        users, config = Path(tmp) / "users.txt", Path(tmp) / "fastsocks.toml"
        from fastsocks.users import hash_password
        users.write_text(f"{USER}:{hash_password(PASSWORD)}\n")
        config.write_text(f'[auth]\nusers_file = "{users}"\nmax_failures = 10\nblock_s = 5\n')
        proxy = bursts.Proxy([sys.executable, "-m", "fastsocks"], ["--workers", "2", "--config", str(config)])
        stop = threading.Event()
        samples: list[dict] = []
        try:
            proxy.workers(2)
            root = psutil.Process(proxy.proc.pid)
            started = time.monotonic()
            until = started + args.minutes * 60

            def sampler():
                while not stop.is_set():
                    samples.append(sample(root, started))
                    stop.wait(args.interval)

            threads = [threading.Thread(target=sampler, daemon=True),
                       threading.Thread(target=failed_logins, args=(proxy.address, stop), daemon=True)]
            for t in threads:
                t.start()
            url = f"socks5://{USER}:{PASSWORD}@{proxy.address[0]}:{proxy.address[1]}"
            done = rounds(url, until, lambda line: print(line, flush=True))
            stop.set()
            for t in threads:
                t.join(30)
            samples.append(sample(root, started))
        finally:
            stop.set()
            proxy.stop()
    doc = {"tool": "benchmarks/soak.py", "started_at": dt.datetime.now(dt.timezone.utc).isoformat(),
           "minutes": args.minutes, "interval_s": args.interval, "rounds": done, "samples": samples}
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    chart = plot(doc, stem.with_suffix(".png"))
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    for pid, p in last["processes"].items():
        was = first["processes"].get(pid)
        if was:
            print(f"{p['role']} {pid}: PSS {was['pss_bytes'] / 2**20:.1f} -> {p['pss_bytes'] / 2**20:.1f} MiB, "
                  f"fds {was['fds']} -> {p['fds']}")
    print(f"wrote {stem.with_suffix('.json')}" + (f" and {chart}" if chart else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
