"""systemd.py with real sockets: a fake service manager (an AF_UNIX datagram socket bound
to a path, or to a name in the abstract namespace) receives exactly the datagrams a
notifier sends; activated_sockets() wraps a real listening TCP socket and refuses others.
The passed fd is the test socket's own number (``start=``): fds 3, 4, ... stay untouched."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import time

import pytest

from fastsocks import systemd

PID = 4242


@pytest.fixture(params=["path", "abstract"])
def manager(request, tmp_path):
    """(receiving socket, $NOTIFY_SOCKET value) of a fake service manager."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = value = str(tmp_path / "notify")
    else:
        name = f"fastsocks-test-{os.getpid()}-{os.urandom(4).hex()}"
        address, value = "\0" + name, "@" + name
    sock.bind(address)
    sock.settimeout(5)
    yield sock, value
    sock.close()


@pytest.fixture
def notifier(manager):
    notifier = systemd.Notifier.from_environ({"NOTIFY_SOCKET": manager[1]})
    yield notifier
    notifier.close()


def received(manager) -> list[bytes]:
    """Every datagram queued at the fake manager."""
    sock = manager[0]
    sock.setblocking(False)
    datagrams = []
    try:
        while True:
            datagrams.append(sock.recv(4096))
    except BlockingIOError:
        return datagrams
    finally:
        sock.settimeout(5)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_each_call_is_one_datagram_on_one_reused_socket(manager, notifier) -> None:
    before = open_fds()
    assert notifier.ready("serving on 127.0.0.1:1080")
    assert notifier.status("draining\n3 sessions")
    assert notifier.mainpid(1234)
    assert notifier.stopping()
    assert notifier.watchdog()
    assert notifier.send("STATUS=x", "ERRNO=0")
    assert open_fds() == before + 1
    assert received(manager) == [
        b"READY=1\nSTATUS=serving on 127.0.0.1:1080\n",
        b"STATUS=draining 3 sessions\n",
        b"MAINPID=1234\n",
        b"STOPPING=1\n",
        b"WATCHDOG=1\n",
        b"STATUS=x\nERRNO=0\n",
    ]


def test_reloading_carries_the_monotonic_clock_in_microseconds(manager, notifier) -> None:
    low = time.monotonic_ns() // 1000
    assert notifier.reloading("re-reading /etc/fastsocks/fastsocks.toml")
    high = time.monotonic_ns() // 1000
    [datagram] = received(manager)
    reloading, usec, status = datagram.decode().splitlines()
    assert (reloading, status) == ("RELOADING=1", "STATUS=re-reading /etc/fastsocks/fastsocks.toml")
    key, _, value = usec.partition("=")
    assert key == "MONOTONIC_USEC" and low <= int(value) <= high


def test_close_is_idempotent_and_frees_the_socket(manager) -> None:
    before = open_fds()
    with systemd.Notifier.from_environ({"NOTIFY_SOCKET": manager[1]}) as notifier:
        assert notifier.ready()
    assert open_fds() == before
    notifier.close()
    assert notifier.ready() is False
    assert received(manager) == [b"READY=1\n"]


def test_a_failed_send_answers_false_and_warns_once(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="fastsocks.systemd")
    with systemd.Notifier(str(tmp_path / "nobody-listens")) as notifier:
        assert notifier.ready() is False
        assert notifier.ready() is False
    levels = [r.levelno for r in caplog.records if r.name == "fastsocks.systemd"]
    assert levels == [logging.WARNING, logging.DEBUG]


def test_a_full_manager_queue_does_not_block_the_sender(manager, notifier) -> None:
    # Nobody reads: the kernel's queue fills (net.unix.max_dgram_qlen) and a send fails.
    assert not all(notifier.status(f"{i}") for i in range(10_000))


@pytest.fixture
def tcp_listener():
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


def activation(count: int = 1, names: str = "socks") -> dict[str, str]:
    return {"LISTEN_PID": str(PID), "LISTEN_FDS": str(count), "LISTEN_FDNAMES": names}


def test_an_activated_listening_socket_accepts(tcp_listener) -> None:
    fd = tcp_listener.fileno()
    os.set_inheritable(fd, True)
    [sock] = systemd.activated_sockets(activation(), PID, start=fd)
    try:
        assert sock.fileno() == fd and not os.get_inheritable(fd)
        assert (sock.family, sock.type) == (socket.AF_INET, socket.SOCK_STREAM)
        assert sock.getsockname() == tcp_listener.getsockname()
        with socket.create_connection(sock.getsockname(), timeout=5):
            sock.settimeout(5)
            accepted, _peer = sock.accept()
            accepted.close()
    finally:
        sock.detach()  # the fixture's object owns the fd


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), "is a TCP socket that is not listening"),
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "is a SOCK_DGRAM socket"),
        (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), "is an AF_UNIX socket"),
    ],
    ids=["unlistening TCP", "UDP", "AF_UNIX"],
)
def test_an_activated_fd_that_is_no_tcp_listener_is_an_error(make, what: str) -> None:
    with make() as other:
        if other.family == socket.AF_UNIX:
            other.bind("\0" + f"fastsocks-test-{os.getpid()}-{os.urandom(4).hex()}")
            other.listen()
        fd = other.fileno()
        with pytest.raises(ValueError, match=f"passed fd {fd} \\(socks\\) {what}"):
            systemd.activated_sockets(activation(), PID, start=fd)
        assert other.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)  # still open: not closed on error


def test_a_bad_second_fd_leaves_the_first_open(tcp_listener) -> None:
    """The listener and then a UDP socket, dup'ed to consecutive free fd numbers from 300."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        first = fcntl.fcntl(tcp_listener.fileno(), fcntl.F_DUPFD_CLOEXEC, 300)
        second = fcntl.fcntl(udp.fileno(), fcntl.F_DUPFD_CLOEXEC, first + 1)
        try:
            if second != first + 1:
                pytest.skip(f"fd {first + 1} is taken")
            with pytest.raises(ValueError, match=f"passed fd {second} \\(udp\\) is a SOCK_DGRAM socket"):
                systemd.activated_sockets(activation(2, "socks:udp"), PID, start=first)
            os.fstat(first)  # the socket object made for it was detached, not closed
        finally:
            os.close(first)
            os.close(second)


def test_an_activated_fd_that_is_no_socket_is_an_error() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(ValueError, match=f"passed fd {read_end} \\(socks\\) is not a socket"):
            systemd.activated_sockets(activation(), PID, start=read_end)
        os.fstat(read_end)  # still open
    finally:
        os.close(read_end)
        os.close(write_end)


def test_not_activated_means_no_sockets() -> None:
    assert systemd.activated_sockets({}, PID) == []


# ---------------------------------------------------------------- the master under Type=notify


def test_the_master_tells_a_service_manager_ready_reloading_and_stopping(start_server, tmp_path, echo_target):
    from support import socks5_connect

    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(15)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    with manager:
        server = start_server("--workers", "2", env=env)

        def message() -> dict[str, str]:
            lines = manager.recv(4096).decode().splitlines()
            return dict(line.split("=", 1) for line in lines)

        ready = message()
        assert ready["READY"] == "1" and ready["MAINPID"] == str(server.pid)
        assert "with 2 workers" in ready["STATUS"]
        sock, (code, _, _) = socks5_connect(server.address, *echo_target.address)  # serving once READY
        sock.close()
        assert code == 0
        os.kill(server.pid, signal.SIGHUP)
        reloading = message()
        assert reloading["RELOADING"] == "1"
        assert abs(int(reloading["MONOTONIC_USEC"]) - time.monotonic_ns() // 1000) < 15_000_000
        assert message()["READY"] == "1"
        server.stop()
        assert message()["STOPPING"] == "1"
        # Only the master spoke: the workers never saw NOTIFY_SOCKET.
        manager.settimeout(0.5)
        with pytest.raises(TimeoutError):
            manager.recv(4096)


def test_socket_activation_serves_on_the_sockets_systemd_passed(start_server, echo_target):
    """As systemd does: the listening socket at fd 3, LISTEN_PID the server's own pid,
    LISTEN_FDNAMES its name; fastsocks binds nothing and serves on it."""
    from support import socks5_connect

    passed = socket.create_server(("127.0.0.1", 0))
    port = passed.getsockname()[1]
    fd = passed.fileno()
    wrapper = ["bash", "-c", f'exec 3<&{fd} {fd}<&-; export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=socks; exec "$@"',
               "activated"]
    try:
        server = start_server("--listen", "127.0.0.1:1", "--workers", "2", prefix=wrapper, listen=False,
                              pass_fds=(fd,))
    finally:
        passed.close()  # the server holds its own copy now
    assert server.address == ("127.0.0.1", port)
    server.wait_for_log("socket activation: 1 listening sockets from systemd")
    assert server.wait_for_log(r"accept mode shared")
    for _ in range(4):
        sock, (code, _, _) = socks5_connect(("127.0.0.1", port), *echo_target.address)
        sock.close()
        assert code == 0
