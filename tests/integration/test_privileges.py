"""--user/--group: bound as root, then the master and every worker run as that user."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile

import psutil
import pytest
from support import echo_handler, fastsocks_command, socks5_connect, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

NOBODY = pwd.getpwnam("nobody")


def low_port() -> int:
    """A free loopback port below 1024: only root may bind it."""
    for port in range(1023, 600, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024 on 127.0.0.1")


@pytest.fixture
def shared_dir():
    """A directory the user can read (pytest's tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix="fastsocks-priv-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def ids(pid: int) -> tuple:
    proc = psutil.Process(pid)
    return tuple(proc.uids()), tuple(proc.gids())


def test_bound_below_1024_as_root_then_everyone_runs_as_the_user(start_server, localhost_target, shared_dir):
    config = os.path.join(shared_dir, "fastsocks.toml")
    with open(config, "w") as f:
        f.write('[[rules]]\naction = "allow"\n')
    os.chmod(config, 0o644)
    target = localhost_target(echo_handler)
    port = low_port()
    server = start_server("--listen", f"127.0.0.1:{port}", "--workers", "2", "--user", "nobody",
                          "--config", config)
    server.wait_for_log(r"running as user nobody \(uid 65534\), group nogroup \(gid 65534\)")
    nobody = ((NOBODY.pw_uid,) * 3, (NOBODY.pw_gid,) * 3)
    assert ids(server.pid) == nobody
    workers = server.wait_workers(2)
    assert [ids(pid) for pid in workers] == [nobody, nobody]
    assert psutil.Process(workers[0]).gids().real == NOBODY.pw_gid
    # An address (the engine), a name (the resolver, the IDNA codec), both after the drop.
    for host in ("127.0.0.1", "localhost"):
        sock, (code, _, _) = socks5_connect(server.address, host, target.port)
        with sock:
            assert code == 0
            sock.sendall(b"as nobody")
            assert sock.recv(64) == b"as nobody"
    # SIGHUP re-reads the file as the user; a killed worker comes back as the user too.
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log(r"worker \d: reloaded \(1 rules\)")
    os.kill(workers[0], signal.SIGKILL)
    server.wait_for_log(rf"worker \d \(pid {workers[0]}\) killed by SIGKILL")
    respawned = wait_until(lambda: (w := server.workers()) and len(w) == 2 and workers[0] not in w and w,
                           what="the respawned worker")
    assert [ids(pid) for pid in respawned] == [nobody, nobody]
    assert server.stop() == 0
    # The master could still read its workers (/proc): their peak of open fds is known.
    stop_line = server.wait_for_log(r"peak open fds \[(\d+), (\d+)\]")
    assert int(stop_line.group(1)) > 0 and int(stop_line.group(2)) > 0


def test_a_users_file_the_user_cannot_read_stops_the_start(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text(subprocess.run(fastsocks_command() + ["hash-password", "--user", "alice"], input="pw\n",
                                    capture_output=True, text=True, timeout=60, check=True).stdout)
    users.chmod(0o600)
    out = subprocess.run(fastsocks_command() + ["--listen", "127.0.0.1:0", "--workers", "1", "--user", "nobody",
                                                "--users", str(users)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert f"{users}: cannot read it as nobody: Permission denied" in out.stderr
    assert "listening on" not in out.stderr


@pytest.mark.parametrize(("config", "error"), [
    (None, "command line: user: no such user 'no-such-user-here'"),
    ('[server]\nuser = "no-such-user-here"\n', "fastsocks.toml:2: server.user: no such user 'no-such-user-here'"),
    ('[server]\nuser = "nobody"\ngroup = "no-such-group-here"\n',
     "fastsocks.toml:3: server.group: no such group 'no-such-group-here'"),
], ids=["flag", "config user", "config group"])
def test_an_unknown_user_or_group_is_named_before_anything_starts(tmp_path, config, error):
    argv = ["--listen", "127.0.0.1:0"]
    if config is None:
        argv += ["--user", "no-such-user-here"]
    else:
        (tmp_path / "fastsocks.toml").write_text(config)
        argv += ["--config", str(tmp_path / "fastsocks.toml")]
    out = subprocess.run(fastsocks_command() + argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert error in out.stderr


def test_an_upgrade_of_a_master_that_dropped_root_runs_as_the_user_on_the_low_port(start_server, shared_dir,
                                                                                     echo_target):
    """The new master starts as the user (it cannot bind port 1023 itself): it serves on
    the inherited socket and writes the pid file the root master made the user's."""
    try:  # exec'd as the user, as the upgrade's new master is
        probe = subprocess.run([*fastsocks_command(), "--help"], user=NOBODY.pw_uid, group=NOBODY.pw_gid,
                               extra_groups=[], capture_output=True, timeout=60)
        why = probe.stderr.decode(errors="replace").strip()[-200:] if probe.returncode else ""
    except OSError as exc:
        why = str(exc)
    if why:
        pytest.skip(f"nobody cannot run this installation ({fastsocks_command()[0]}): {why}")
    pid_file = os.path.join(shared_dir, "fastsocks.pid")
    port = low_port()
    server = start_server("--listen", f"127.0.0.1:{port}", "--workers", "2", "--user", "nobody",
                          "--pid-file", pid_file)
    out = subprocess.run(fastsocks_command() + ["upgrade", "--pid-file", pid_file],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    new_pid = int(open(pid_file).read())
    try:
        assert server.proc.wait(30) == 0
        nobody = ((NOBODY.pw_uid,) * 3, (NOBODY.pw_gid,) * 3)
        assert ids(new_pid) == nobody
        sock, (code, _, _) = socks5_connect(("127.0.0.1", port), "127.0.0.1", echo_target.port)
        with sock:
            assert code == 0
            sock.sendall(b"upgraded as nobody")
            assert sock.recv(64) == b"upgraded as nobody"
    finally:
        psutil.Process(new_pid).terminate()
        psutil.Process(new_pid).wait(15)
