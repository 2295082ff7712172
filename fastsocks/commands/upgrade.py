"""``fastsocks upgrade``: start the code installed now as a new master on the running
one's sockets (SIGUSR2; see fastsocks/upgrade.py), and say how it went.

The pid file (``--pid-file``, or ``[server] pid_file`` of ``--config``) names the master.
After the signal it is written again, by the new master once it serves (its own pid) or
by the old one when the new one failed (the old pid): whichever comes is the answer.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from fastsocks.commands.config_files import load
from fastsocks.upgrade import UPGRADE_TIMEOUT_S

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
POLL_S = 0.05


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fastsocks upgrade",
        description="Replace a running fastsocks master by one started from the code installed now, "
                    "on the same listening sockets: new connections go to the new workers, the old "
                    "ones finish their sessions and exit. Nothing is dropped; if the new master "
                    "fails, the old one goes on serving.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--pid-file", metavar="FILE", help="the server's --pid-file")
    where.add_argument("--config", "-c", metavar="FILE", help="the server's config file (its [server] pid_file)")
    parser.add_argument("--timeout", type=float, default=UPGRADE_TIMEOUT_S + 5, metavar="S",
                        help="how long to wait for the answer")
    args = parser.parse_args(argv)
    path = args.pid_file
    if path is None:
        settings = load(args.config)  # None: its error is printed
        if settings is None:
            return EXIT_USAGE
        path = settings.pid_file
        if path is None:
            return fail(f"{args.config} sets no [server] pid_file", EXIT_USAGE)
    try:
        before = snapshot(path)
        old_pid = int(before[1])
    except OSError as exc:
        return fail(f"{path}: cannot read it: {exc.strerror}", EXIT_USAGE)
    except ValueError:
        return fail(f"{path}: expected a process id, found {before[1]!r}", EXIT_USAGE)
    try:
        os.kill(old_pid, signal.SIGUSR2)
    except ProcessLookupError:
        return fail(f"no process {old_pid} (from {path}): is fastsocks running?")
    except PermissionError:
        return fail(f"not allowed to signal process {old_pid} (from {path}): run as its user or root")
    return await_answer(path, before, old_pid, time.monotonic() + args.timeout)


def await_answer(path: str, before: tuple, old_pid: int, deadline_s: float) -> int:
    while time.monotonic() < deadline_s:
        time.sleep(POLL_S)
        try:
            now = snapshot(path)
        except OSError:
            continue  # being written, or removed by an old master exiting after the new one wrote
        if now == before or not now[1]:
            if not alive(old_pid):
                return fail(f"the master (pid {old_pid}) exited, and no new one wrote {path}")
            continue
        if now[1] == str(old_pid):
            return fail(f"the new master failed to start; pid {old_pid} goes on serving (its log says why)")
        print(f"fastsocks upgrade: master pid {old_pid} -> {now[1]}; pid {old_pid} finishes its "
              f"sessions and exits")
        return EXIT_OK
    return fail(f"no answer in {path} within the timeout; see the server's log")


def snapshot(path: str) -> tuple:
    """(when and which file, its pid text): a rewrite with the same pid still shows."""
    stat = os.stat(path)
    with open(path) as file:
        return (stat.st_ino, stat.st_mtime_ns), file.read().strip()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"fastsocks upgrade: {message}", file=sys.stderr)
    return code
