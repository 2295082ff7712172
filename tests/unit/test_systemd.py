"""systemd.py without a socket: $NOTIFY_SOCKET parsing, the assignments a notifier refuses
before it opens anything, and socket activation's environment, with pipes standing in for
the passed fds at a high, free fd number (the test process's own fds 3, 4, ... stay
untouched). tests/integration/test_systemd.py sends real datagrams and wraps real sockets."""

from __future__ import annotations

import fcntl
import os

import pytest

from fastsocks import systemd

PID = 4242


def test_no_notifier_without_notify_socket() -> None:
    assert systemd.Notifier.from_environ({}) is None
    assert systemd.Notifier.from_environ({"NOTIFY_SOCKET": ""}) is None


@pytest.mark.parametrize(
    ("value", "address"),
    [("/run/systemd/notify", b"/run/systemd/notify"), ("@/org/freedesktop/systemd1/notify",
                                                       b"\0/org/freedesktop/systemd1/notify")],
)
def test_notify_socket_path_or_abstract_name(value: str, address: bytes) -> None:
    notifier = systemd.Notifier.from_environ({"NOTIFY_SOCKET": value})
    assert notifier is not None and notifier.address == address


@pytest.mark.parametrize("value", ["run/notify", "@", "vsock:2:1234"])
def test_unreachable_notify_socket_is_an_error(value: str) -> None:
    with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
        systemd.Notifier.from_environ({"NOTIFY_SOCKET": value})


@pytest.mark.parametrize("assignments", [(), ("READY",), ("STATUS=two\nREADY=1",)])
def test_send_refuses_what_is_not_assignments(assignments: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        systemd.Notifier("/run/systemd/notify").send(*assignments)


def test_close_before_any_send_is_idempotent_and_ends_sending() -> None:
    notifier = systemd.Notifier("/run/systemd/notify")
    notifier.close()
    notifier.close()
    assert notifier.ready() is False  # closed: no socket is opened again


def test_clear_environ_stops_children_from_notifying() -> None:
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "PATH": "/usr/bin"}
    notifier = systemd.Notifier.from_environ(environ)
    systemd.clear_environ(environ)
    systemd.clear_environ(environ)
    assert environ == {"PATH": "/usr/bin"}
    assert systemd.Notifier.from_environ(environ) is None
    assert notifier is not None and notifier.address == b"/run/systemd/notify"  # the master's goes on


def free_fds(count: int, lowest: int = 200) -> int:
    """The first of ``count`` consecutive fd numbers, none of them open, from ``lowest``."""
    for first in range(lowest, lowest + 800):
        if not any(is_open(fd) for fd in range(first, first + count)):
            return first
    pytest.skip(f"no {count} free fds from {lowest}")


def is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


@pytest.fixture
def passed_fds():
    """``passed_fds(n)``: the first of n consecutive inheritable fds, as the manager hands them."""
    opened: list[int] = []

    def make(count: int) -> int:
        first = free_fds(count)
        for fd in range(first, first + count):
            read_end, write_end = os.pipe()
            os.dup2(read_end, fd)  # inheritable, like an fd that came through exec
            os.close(read_end)
            os.close(write_end)
            opened.append(fd)
        return first

    yield make
    for fd in opened:
        os.close(fd)


def activation(count: int | str, names: str | None = None, pid: int = PID) -> dict[str, str]:
    environ = {"LISTEN_PID": str(pid), "LISTEN_FDS": str(count)}
    if names is not None:
        environ["LISTEN_FDNAMES"] = names
    return environ


def test_passed_fds_with_their_names_made_close_on_exec(passed_fds) -> None:
    first = passed_fds(2)
    assert os.get_inheritable(first)
    fds = systemd.listen_fds(activation(2, "socks:proxied"), PID, start=first)
    assert fds == [(first, "socks"), (first + 1, "proxied")]
    assert not os.get_inheritable(first) and not os.get_inheritable(first + 1)


def test_passed_fds_without_names_are_unknown(passed_fds) -> None:
    first = passed_fds(2)
    assert systemd.listen_fds(activation(2), PID, start=first) == [(first, "unknown"), (first + 1, "unknown")]


def test_pid_defaults_to_this_process(passed_fds) -> None:
    first = passed_fds(1)
    assert systemd.listen_fds(activation(1, pid=os.getpid()), start=first) == [(first, "unknown")]


@pytest.mark.parametrize(
    "environ",
    [{}, {"LISTEN_FDS": "1"}, activation(1, pid=PID + 1), {"LISTEN_PID": str(PID)}, activation(0)],
    ids=["not activated", "no LISTEN_PID", "another process", "no LISTEN_FDS", "no fds"],
)
def test_no_fds_unless_activated_for_this_process(passed_fds, environ: dict[str, str]) -> None:
    first = passed_fds(1)
    assert systemd.listen_fds(environ, PID, start=first) == []
    assert os.get_inheritable(first)  # left alone


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (activation("two"), "LISTEN_FDS='two' is not a number"),
        (activation("-1"), "LISTEN_FDS='-1'"),
        (activation(" 1"), "LISTEN_FDS=' 1'"),
        ({"LISTEN_PID": "self", "LISTEN_FDS": "1"}, "LISTEN_PID='self' is not a process id"),
        (activation(2, "socks"), "names 1 fds, LISTEN_FDS=2"),
    ],
)
def test_malformed_activation_is_an_error(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        systemd.listen_fds(environ, PID, start=free_fds(2))


def test_an_fd_that_is_not_open_is_an_error(passed_fds) -> None:
    first = passed_fds(1)
    missing = first + 1
    assert not is_open(missing)
    with pytest.raises(ValueError, match=f"fd {missing} is not usable"):
        systemd.listen_fds(activation(2), PID, start=first)


def test_unset_listen_environ_removes_only_the_activation_variables() -> None:
    environ = activation(2, "a:b") | {"PATH": "/usr/bin"}
    systemd.unset_listen_environ(environ)
    systemd.unset_listen_environ(environ)
    assert environ == {"PATH": "/usr/bin"}
