"""fastsocks upgrade (SIGUSR2): a new master from the installed code takes over the running
one's sockets while connections open and stream; none fails, every byte is checked, the
old master drains and exits; a new master that cannot start leaves the old one serving."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request

import psutil
import pytest

from support import EchoLoad, fastsocks_command, socks5_connect, wait_until


def upgrade(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(fastsocks_command() + ["upgrade", *args], capture_output=True, text=True, timeout=90)


def echo_once(proxy, port: int) -> bytes:
    sock, (code, _, _) = socks5_connect(proxy, "127.0.0.1", port)
    with sock:
        assert code == 0
        sock.sendall(b"after the upgrade")
        return sock.recv(64)


def stop_by_pid(pid: int) -> None:
    """The new master is no child of the test's: stop it (and so its workers) by its pid."""
    try:
        process = psutil.Process(pid)
        process.terminate()
        process.wait(15)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        process.kill()


@pytest.fixture
def upgraded():
    """Pids of the new masters a test made: stopped at the end, also when it fails."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        stop_by_pid(pid)


def test_an_upgrade_while_connections_stream_drops_nothing(start_server, tmp_path, echo_target, upgraded):
    pid_file = tmp_path / "fastsocks.pid"
    server = start_server("--workers", "2", "--pid-file", str(pid_file), "--metrics", "127.0.0.1:0")
    assert pid_file.read_text() == f"{server.pid}\n"
    load = EchoLoad(server.address, echo_target.port, clients=4, streams=4)
    load.start()
    try:
        time.sleep(0.5)
        out = upgrade("--pid-file", str(pid_file))
        assert out.returncode == 0, out.stderr
        new_pid = int(pid_file.read_text())
        upgraded.append(new_pid)
        assert new_pid != server.pid
        assert f"master pid {server.pid} -> {new_pid}" in out.stdout
        before_overlap = load.attempted
        time.sleep(1.0)  # both generations on the same sockets: the new takes new connections
        assert load.attempted > before_overlap
    finally:
        load.finish()
    assert load.errors == [] and load.failed == 0
    assert load.bytes_checked > 8 * 16 * 1024
    # The streams ended: the old master has drained and exits by itself.
    assert server.proc.wait(30) == 0
    server.wait_for_log(rf"upgrade: new master pid {new_pid} serves; this one \(pid {server.pid}\) drains")
    assert server.count_log(r"ERROR|CRITICAL|Traceback") == 0
    # The new one serves alone now, on the same port, with its own two workers and metrics.
    assert psutil.pid_exists(new_pid) and len(psutil.Process(new_pid).children()) == 2
    assert echo_once(server.address, echo_target.port) == b"after the upgrade"
    host, port = server.wait_for_log(r"metrics on http://(\S+):(\d+)/metrics").groups()
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        assert "fastsocks_workers 2.0" in response.read().decode()
    assert pid_file.read_text() == f"{new_pid}\n"  # the old master left it to the new one
    print(f"upgrade under load: {load.attempted} sessions, {load.failed} failed, "
          f"{load.bytes_checked} bytes checked")


@pytest.mark.parametrize("change, why", [
    ("listen", r"upgrade: listen is 127\.0\.0\.1:\d+ in the configuration, and the running master listens "
               r"on 127\.0\.0\.1:\d+: that takes a restart"),
    ("broken", r"fastsocks\.toml:\d+: server\.bogus: unknown key"),
])
def test_a_new_master_that_cannot_start_leaves_the_old_one_serving(start_server, tmp_path, echo_target,
                                                                  upgraded, change, why):
    config = tmp_path / "fastsocks.toml"
    pid_file = tmp_path / "fastsocks.pid"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\npid_file = "{pid_file}"\n')
    server = start_server("--config", str(config), "--workers", "2", listen=False)
    held, (code, _, _) = socks5_connect(server.address, "127.0.0.1", echo_target.port)
    assert code == 0
    if change == "listen":
        config.write_text(config.read_text().replace(f":{port}", f":{port + 1 if port < 65535 else port - 1}"))
    else:
        config.write_text(config.read_text() + "bogus = 1\n")
    # A broken file is broken for the command too: it takes the pid file's name instead.
    out = upgrade("--config", str(config)) if change == "listen" else upgrade("--pid-file", str(pid_file))
    assert out.returncode == 1
    assert f"the new master failed to start; pid {server.pid} goes on serving" in out.stderr
    server.wait_for_log(why)
    server.wait_for_log(rf"upgrade failed: the new master \(pid \d+\) stopped before it served, exit code [12] "
                        rf".*this master \(pid {server.pid}\) goes on serving")
    with held:  # the session from before, and new ones, as if nothing happened
        held.sendall(b"still here")
        assert held.recv(64) == b"still here"
    assert echo_once(server.address, echo_target.port) == b"after the upgrade"
    assert len(server.workers()) == 2 and pid_file.read_text() == f"{server.pid}\n"


def test_an_activated_master_under_systemd_hands_over_its_main_pid(start_server, tmp_path, echo_target, upgraded):
    """Socket activation and Type=notify: the new master serves on systemd's socket, and the
    old one names it the service's main pid before it drains."""
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(30)
    passed = socket.create_server(("127.0.0.1", 0))
    fd = passed.fileno()
    wrapper = ["bash", "-c", f'exec 3<&{fd} {fd}<&-; export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=socks; '
               f'exec "$@"', "activated"]
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    with manager, passed:
        server = start_server("--workers", "2", listen=False, prefix=wrapper, env=env, pass_fds=(fd,))

        def message() -> dict[str, str]:
            return dict(line.split("=", 1) for line in manager.recv(4096).decode().splitlines())

        assert message()["READY"] == "1"
        os.kill(server.pid, signal.SIGUSR2)
        handed = message()
        new_pid = int(handed["MAINPID"])
        upgraded.append(new_pid)
        assert new_pid != server.pid and handed["READY"] == "1"
        assert server.proc.wait(30) == 0  # nothing to drain
        assert echo_once(("127.0.0.1", passed.getsockname()[1]), echo_target.port) == b"after the upgrade"
        os.kill(new_pid, signal.SIGHUP)  # the new main pid speaks to systemd from now on
        assert message()["RELOADING"] == "1"
        assert message()["READY"] == "1"
        wait_until(lambda: len(psutil.Process(new_pid).children()) == 2, what="the new master's workers")


def test_a_pid_file_that_cannot_be_written_stops_the_start_naming_it(start_server, tmp_path):
    missing = tmp_path / "no-such-dir" / "fastsocks.pid"
    with pytest.raises(AssertionError, match=rf"{missing}: pid_file: cannot write it: No such file or directory"):
        start_server("--pid-file", str(missing))
