"""--access-log FILE: the access lines go to the file (the rest of the log stays on stderr),
and SIGUSR1 reopens it by name, as logrotate expects."""

from __future__ import annotations

import os
import signal

from support import socks5_connect, wait_until


def one_session(server, target) -> None:
    sock, (code, _, _) = socks5_connect(server.address, *target.address)
    with sock:
        assert code == 0


def lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_access_lines_go_to_the_file_and_sigusr1_reopens_it(start_server, tmp_path, echo_target):
    log = tmp_path / "access.log"
    server = start_server("--workers", "2", "--access-log", str(log))
    one_session(server, echo_target)
    wait_until(lambda: any("reply=succeeded" in line for line in lines(log)), what="the access line in the file")
    assert server.count_log("reply=succeeded") == 0  # not on stderr
    assert all("fastsocks.access" in line and "[worker " in line for line in lines(log))
    log.rename(tmp_path / "access.log.1")  # logrotate's move
    os.kill(server.pid, signal.SIGUSR1)
    wait_until(log.exists, what="the log file made anew")  # the master's own is reopened at once
    workers = server.wait_workers(2)

    def all_reopened():  # each worker holds the new file, not the rotated one
        return all(any(os.path.realpath(f"/proc/{pid}/fd/{fd}") == str(log) for fd in os.listdir(f"/proc/{pid}/fd"))
                   for pid in workers)
    wait_until(all_reopened, what="every worker writing to the new file")
    for _ in range(4):
        one_session(server, echo_target)
    wait_until(lambda: sum("reply=succeeded" in line for line in lines(log)) == 4, what="four lines in the new file")
    assert sum("reply=succeeded" in line for line in lines(tmp_path / "access.log.1")) == 1
    assert server.wait_workers(2) == workers  # SIGUSR1 killed no worker


def test_an_access_log_that_cannot_be_opened_stops_the_start(tmp_path):
    import subprocess

    from support import fastsocks_command
    out = subprocess.run(fastsocks_command() + ["--listen", "127.0.0.1:0", "--access-log",
                                                str(tmp_path / "missing" / "access.log")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "access_log: cannot open it: No such file or directory" in out.stderr
