"""UdpAssociation (udp.py) in this process, on real loopback sockets and the worker's real
Loop, with a fake worker and session around it: once over the compiled UdpRelay and once
over the pure-Python twin, which is the fallback udp.py keeps working on.

What a server subprocess cannot show: the policy hook's contract (``_allowed`` asked once
per destination, with resolved and unmapped addresses; denied datagrams dropped and
counted; ``forget_verdicts()``), names held while they resolve, every fd closed at the end,
and the kernel refusing UDP GSO (a smaller MTU in a private network namespace).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

from fastsocks import _relay, _relay_py
from fastsocks.loop import Loop
from fastsocks.protocol.socks5 import AddressType, Command, Reply, Request
from fastsocks.udp import HOLD_PER_NAME, UdpAssociation

RELAYS = {"cython": _relay.UdpRelay, "python": _relay_py.UdpRelay}
TIMEOUT_S = 5


@pytest.fixture(params=sorted(RELAYS))
def relay_cls(request):
    return RELAYS[request.param]


def header(host: str, port: int) -> bytes:
    try:
        return b"\0\0\0\x01" + socket.inet_pton(socket.AF_INET, host) + port.to_bytes(2, "big")
    except OSError:
        name = host.encode("ascii")
        return b"\0\0\0\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big")


def udp_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(TIMEOUT_S)
    return sock


class FakeResolver:
    """Answers from ``answers`` when told to (``release``), like the worker's from its pool."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple] = {}
        self.waiting: list = []

    def resolve(self, name: str, port: int, callback) -> None:
        self.waiting.append((name, port, callback))

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for name, port, callback in waiting:
            if name in self.answers:
                callback(((socket.AF_INET6, (self.answers[name], port, 0, 0)),), None)
            else:
                callback(None, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))


class FakeWorker:
    def __init__(self, relay) -> None:
        self.loop = Loop()
        self.settings = SimpleNamespace(max_udp_per_worker=8, max_udp_per_client=8, udp_idle_timeout_s=0,
                                        advertise=None)
        self.udp_associations: dict = {}
        self.udp_buffer = relay
        self.resolver = FakeResolver()
        self.ended: list[tuple[UdpAssociation, str]] = []

    def udp_ended(self, association, how: str) -> None:
        self.ended.append((association, how))

    def run_until(self, predicate) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not predicate():
            assert time.monotonic() < deadline, "the loop made no progress"
            self.loop.run_once(0.02)


class FakeSession:
    """What UdpAssociation.start() uses of a session: the accepted TCP socket and the reply."""

    def __init__(self, worker: FakeWorker, client: socket.socket) -> None:
        self.sid = 1
        self.worker = worker
        self.client = client
        self.request = Request(Command.UDP_ASSOCIATE, AddressType.IPV4, "0.0.0.0", 0)
        self.started_s = time.monotonic()
        self.conn = SimpleNamespace(send=lambda event: event)
        self.replies: list = []

    def describe(self) -> str:
        return "client=127.0.0.1 cmd=udp_associate dest=0.0.0.0:0"

    def reply_event(self, reply: Reply, host: str, port: int):
        return (reply, host, port)

    def send(self, reply) -> bool:
        self.replies.append(reply)
        return True

    def fail(self, reply, why: str) -> None:
        raise AssertionError(f"the association failed: {why}")


class Association:
    """A started association (of ``cls``), its client's TCP and UDP sockets, its worker."""

    def __init__(self, relay, cls=UdpAssociation) -> None:
        self.worker = FakeWorker(relay)
        with socket.create_server(("127.0.0.1", 0)) as server:
            self.control = socket.create_connection(server.getsockname())
            accepted, _ = server.accept()
        accepted.setblocking(False)
        self.session = FakeSession(self.worker, accepted)
        self.association = cls(self.worker, self.session)
        assert self.association.start(self.session)
        (reply, host, port), = self.session.replies
        assert reply == Reply.SUCCEEDED
        self.relay_address = (host, port)
        self.client = udp_socket()

    def send(self, host: str, port: int, payload: bytes) -> None:
        self.client.sendto(header(host, port) + payload, self.relay_address)

    def close(self) -> None:
        self.association.end("eof")
        self.control.close()
        self.client.close()
        self.worker.loop.close()


@pytest.fixture
def associations(relay_cls):
    made: list[Association] = []

    def make(cls=UdpAssociation) -> Association:
        made.append(Association(relay_cls(), cls))
        return made[-1]

    yield make
    for association in made:
        association.close()
        association.worker.udp_buffer.close()


def test_a_round_trip_and_every_fd_closed_at_the_end(relay_cls):
    relay = relay_cls()                     # the worker's: it outlives its associations
    before = set(os.listdir("/proc/self/fd"))
    a = Association(relay)
    with udp_socket() as echo:
        a.send(*echo.getsockname(), b"ping")
        a.worker.run_until(lambda: a.association.datagrams_up == 1)
        data, proxy_side = echo.recvfrom(100)
        assert data == b"ping"
        echo.sendto(b"pong", proxy_side)
        a.worker.run_until(lambda: a.association.datagrams_down == 1)
        assert a.client.recv(100) == header(*echo.getsockname()) + b"pong"
    association = a.association
    assert (association.bytes_up, association.bytes_down, association.dropped) == (4, 4, 0)
    assert association.client_addr == a.client.getsockname()
    a.control.close()                       # the association ends with its TCP connection (§6)
    a.worker.run_until(lambda: a.worker.ended)
    assert a.worker.ended == [(association, "eof")]
    assert association.datagrams_up == 1    # the access line still has its counters
    a.client.close()
    a.worker.loop.close()
    assert set(os.listdir("/proc/self/fd")) == before
    relay.close()


def test_the_policy_hook_is_asked_once_per_destination(associations):
    asked: list[tuple[int, tuple]] = []
    with udp_socket() as allowed, udp_socket() as denied:

        class Guarded(UdpAssociation):
            __slots__ = ()

            def _allowed(self, family: int, sockaddr: tuple) -> bool:
                asked.append((family, sockaddr))
                return sockaddr != denied.getsockname()

        a = associations(Guarded)
        for i in range(3):
            a.send(*allowed.getsockname(), b"yes %d" % i)
            a.send(*denied.getsockname(), b"no %d" % i)
        a.worker.run_until(lambda: a.association.datagrams_up + a.association.dropped == 6)
        assert [allowed.recv(100) for _ in range(3)] == [b"yes 0", b"yes 1", b"yes 2"]
        denied.settimeout(0.05)
        with pytest.raises(TimeoutError):
            denied.recv(100)
        assert asked == [(socket.AF_INET, allowed.getsockname()), (socket.AF_INET, denied.getsockname())]
        assert (a.association.datagrams_up, a.association.dropped) == (3, 3)

        a.association.forget_verdicts()       # the rules were reloaded
        a.send(*allowed.getsockname(), b"after the reload")
        a.worker.run_until(lambda: a.association.datagrams_up == 4)
        assert allowed.recv(100) == b"after the reload"
        assert len(asked) == 3


def test_names_are_resolved_held_and_checked_with_their_address(associations, monkeypatch):
    """A name is judged with its resolved address (name rules and network rules both
    apply); the address sent to directly is judged on its own, and cached."""
    asked: list[tuple] = []

    def judge(self, name, host: str, port: int) -> bool:
        asked.append((name, host, port))
        return True

    monkeypatch.setattr(UdpAssociation, "_judge", judge)
    a = associations()
    resolver = a.worker.resolver
    resolver.answers["echo.test"] = "::ffff:127.0.0.1"   # mapped: checked and sent as IPv4
    with udp_socket() as echo:
        port = echo.getsockname()[1]
        for i in range(HOLD_PER_NAME + 2):
            a.send("echo.test", port, b"held %d" % i)
        a.send("nowhere.test", port, b"lost")
        a.worker.run_until(lambda: len(resolver.waiting) == 2)
        assert a.association.dropped == 2     # beyond what one name may hold
        resolver.release()
        assert [echo.recv(100) for _ in range(HOLD_PER_NAME)] == [b"held %d" % i for i in range(HOLD_PER_NAME)]
        assert asked == [("echo.test", "::ffff:127.0.0.1", port)]  # as resolved; _judge unmaps
        assert (a.association.datagrams_up, a.association.dropped) == (HOLD_PER_NAME, 3)
        for i in range(2):
            a.send("127.0.0.1", port, b"by address %d" % i)
        a.worker.run_until(lambda: a.association.datagrams_up == HOLD_PER_NAME + 2)
        assert [echo.recv(100) for _ in range(2)] == [b"by address 0", b"by address 1"]
        assert asked[1:] == [(None, "127.0.0.1", port)]  # asked once, then cached


def test_a_foreign_source_is_warned_about_once(associations, caplog):
    a = associations()
    with udp_socket() as sink, udp_socket("127.0.0.2") as intruder:
        intruder_port = intruder.getsockname()[1]
        for _ in range(3):
            intruder.sendto(header(*sink.getsockname()) + b"intruder", a.relay_address)
        a.send(*sink.getsockname(), b"client")
        a.worker.run_until(lambda: a.association.datagrams_up == 1)
        assert sink.recv(100) == b"client"
    assert a.association.dropped == 3
    warnings = [r.getMessage() for r in caplog.records if "dropped a datagram" in r.getMessage()]
    assert warnings == [(f"{a.session.describe()} UDP: dropped a datagram from "
                         f"127.0.0.2:{intruder_port}, the association is for 127.0.0.1:0")]


GSO_REFUSED = textwrap.dedent("""
    import socket
    from fastsocks._relay import UdpRelay

    class Owner:
        def _allowed(self, family, sockaddr): return True
        def _remote_socket(self, family):
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
            sock.bind(("127.0.0.1", 0))
            return sock

    relay_sock, client, sink = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3))
    for sock in (relay_sock, client, sink):
        sock.bind(("127.0.0.1", 0))
    relay_sock.setblocking(False)
    sink.settimeout(5)
    flow = UdpRelay().new_flow(Owner(), relay_sock, "127.0.0.1", 0)
    sizes = [2000] * 5 + [1000] * 5 + [2000] * 3 + [1000] * 2  # GSO segments of 2000 B exceed the MTU
    header = b"\\0\\0\\0\\x01" + socket.inet_aton("127.0.0.1") + sink.getsockname()[1].to_bytes(2, "big")
    for i, size in enumerate(sizes):
        client.sendto(header + bytes([i]) * size, relay_sock.getsockname())
    sent = 0
    while sent < len(sizes):
        sent += flow.pump_up()
    got = [sink.recv(4000) for _ in sizes]
    assert got == [bytes([i]) * size for i, size in enumerate(sizes)], [len(d) for d in got]
    assert flow.dropped == 0
    print("ok")
""")


def test_datagrams_still_go_where_the_route_refuses_gso(netns_prefix):
    """In a namespace whose loopback has a 1500-byte MTU, a GSO message of 2000-byte
    datagrams is refused (EMSGSIZE): its datagrams go again one by one (as IP fragments),
    and shorter runs still go by GSO."""
    prefix, env = netns_prefix
    command = [*prefix, "sh", "-c", 'ip link set lo mtu 1500 && exec "$@"', "mtu",
               sys.executable, "-c", GSO_REFUSED]
    # The child imports fastsocks as this process does: the checkout, installed in place.
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
