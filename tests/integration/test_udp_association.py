"""UdpAssociation (udp.py) in this process, on real loopback sockets and the worker's real
Loop: a real Session answers a real client's UDP ASSOCIATE to a fake host (support.FakeHost),
and the association is made of its StartUdp as the worker makes it; once over the compiled
UdpRelay and once over the pure-Python twin, which is the fallback udp.py keeps working on.

What a server subprocess cannot show: the policy hook's contract (``allowed`` asked once
per destination, with resolved and unmapped addresses; denied datagrams dropped and
counted; ``reload()``), names held while they resolve, every fd closed at the end, and the
kernel refusing UDP GSO (a smaller MTU in a private network namespace).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
from support import FakeHost, read_socks5_reply, recv_exact

from fastsocks import _relay, _relay_py
from fastsocks.access import format_peer
from fastsocks.host import Environment, StartUdp
from fastsocks.session import Session
from fastsocks.settings import Settings
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


UDP_ASSOCIATE_ANY = b"\x05\x01\x00" + b"\x05\x03\x00\x01" + bytes(6)  # greeting; from 0.0.0.0:0
SETTINGS = Settings(workers=1, udp_idle_timeout_s=0)


class Association:
    """A started association (of ``cls``), its client's TCP and UDP sockets, its host."""

    def __init__(self, relay, cls=UdpAssociation) -> None:
        self.host = FakeHost()
        with socket.create_server(("127.0.0.1", 0)) as server:
            self.control = socket.create_connection(server.getsockname())
            accepted, address = server.accept()
        accepted.setblocking(False)
        env = Environment(SETTINGS, {}, lambda ip, port: False)
        session = Session(self.host, env, 1, accepted, format_peer(address))
        self.control.sendall(UDP_ASSOCIATE_ANY)
        session.start()
        self.host.run_until(lambda: self.host.outcomes)
        (start,) = self.host.outcomes
        assert isinstance(start, StartUdp), start
        self.control.settimeout(TIMEOUT_S)
        assert recv_exact(self.control, 2) == b"\x05\x00"
        reply, host, port = read_socks5_reply(self.control)
        assert reply == 0 and (host, port) == start.relay_sock.getsockname()
        self.relay_address = (host, port)
        self.described = session.describe()
        self.host.loop.add_reader(relay, relay.run)  # as the worker does, for its first association
        self.association = cls(start, sid=session.sid, described=self.described, started_s=session.started_s,
                               loop=self.host.loop, resolver=self.host.resolver, relay=relay,
                               settings=SETTINGS, on_end=lambda a, how: self.host.ended.append((a, how)))
        self.association.start()
        self.relay = relay
        self.client = udp_socket()

    def send(self, host: str, port: int, payload: bytes) -> None:
        self.client.sendto(header(host, port) + payload, self.relay_address)

    def close(self) -> None:
        self.association.end("eof")
        self.control.close()
        self.client.close()
        self.host.loop.remove(self.relay)
        self.host.loop.close()


@pytest.fixture
def associations(relay_cls):
    made: list[Association] = []

    def make(cls=UdpAssociation) -> Association:
        made.append(Association(relay_cls(), cls))
        return made[-1]

    yield make
    for association in made:
        association.close()
        association.relay.close()


def test_a_round_trip_and_every_fd_closed_at_the_end(relay_cls):
    relay = relay_cls()                     # the worker's: it outlives its associations
    before = set(os.listdir("/proc/self/fd"))
    a = Association(relay)
    with udp_socket() as echo:
        a.send(*echo.getsockname(), b"ping")
        a.host.run_until(lambda: a.association.datagrams_up == 1)
        data, proxy_side = echo.recvfrom(100)
        assert data == b"ping"
        echo.sendto(b"pong", proxy_side)
        a.host.run_until(lambda: a.association.datagrams_down == 1)
        assert a.client.recv(100) == header(*echo.getsockname()) + b"pong"
    association = a.association
    assert (association.bytes_up, association.bytes_down, association.dropped) == (4, 4, 0)
    assert association.client_addr == a.client.getsockname()
    a.control.close()                       # the association ends with its TCP connection (§6)
    a.host.run_until(lambda: a.host.ended)
    assert a.host.ended == [(association, "eof")]
    assert association.datagrams_up == 1    # the access line still has its counters
    a.client.close()
    a.host.loop.remove(relay)
    a.host.loop.close()
    assert set(os.listdir("/proc/self/fd")) == before
    relay.close()


def test_the_policy_hook_is_asked_once_per_destination(associations):
    asked: list[tuple[int, tuple]] = []
    with udp_socket() as allowed, udp_socket() as denied:

        class Guarded(UdpAssociation):
            __slots__ = ()

            def allowed(self, family: int, sockaddr: tuple) -> bool:
                asked.append((family, sockaddr))
                return sockaddr != denied.getsockname()

        a = associations(Guarded)
        for i in range(3):
            a.send(*allowed.getsockname(), b"yes %d" % i)
            a.send(*denied.getsockname(), b"no %d" % i)
        a.host.run_until(lambda: a.association.datagrams_up + a.association.dropped == 6)
        assert [allowed.recv(100) for _ in range(3)] == [b"yes 0", b"yes 1", b"yes 2"]
        denied.settimeout(0.05)
        with pytest.raises(TimeoutError):
            denied.recv(100)
        assert asked == [(socket.AF_INET, allowed.getsockname()), (socket.AF_INET, denied.getsockname())]
        assert (a.association.datagrams_up, a.association.dropped) == (3, 3)

        a.association.reload(SETTINGS)        # the rules were reloaded
        a.send(*allowed.getsockname(), b"after the reload")
        a.host.run_until(lambda: a.association.datagrams_up == 4)
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
    resolver = a.host.resolver
    resolver.answers["echo.test"] = "::ffff:127.0.0.1"   # mapped: checked and sent as IPv4
    with udp_socket() as echo:
        port = echo.getsockname()[1]
        for i in range(HOLD_PER_NAME + 2):
            a.send("echo.test", port, b"held %d" % i)
        a.send("nowhere.test", port, b"lost")
        a.host.run_until(lambda: len(resolver.waiting) == 2)
        assert a.association.dropped == 2     # beyond what one name may hold
        resolver.release()
        assert [echo.recv(100) for _ in range(HOLD_PER_NAME)] == [b"held %d" % i for i in range(HOLD_PER_NAME)]
        assert asked == [("echo.test", "::ffff:127.0.0.1", port)]  # as resolved; _judge unmaps
        assert (a.association.datagrams_up, a.association.dropped) == (HOLD_PER_NAME, 3)
        for i in range(2):
            a.send("127.0.0.1", port, b"by address %d" % i)
        a.host.run_until(lambda: a.association.datagrams_up == HOLD_PER_NAME + 2)
        assert [echo.recv(100) for _ in range(2)] == [b"by address 0", b"by address 1"]
        assert asked[1:] == [(None, "127.0.0.1", port)]  # asked once, then cached


def test_a_foreign_source_is_warned_about_once(associations, caplog):
    a = associations()
    with udp_socket() as sink, udp_socket("127.0.0.2") as intruder:
        intruder_port = intruder.getsockname()[1]
        for _ in range(3):
            intruder.sendto(header(*sink.getsockname()) + b"intruder", a.relay_address)
        a.send(*sink.getsockname(), b"client")
        a.host.run_until(lambda: a.association.datagrams_up == 1)
        assert sink.recv(100) == b"client"
    assert a.association.dropped == 3
    warnings = [r.getMessage() for r in caplog.records if "dropped a datagram" in r.getMessage()]
    assert warnings == [(f"{a.described} UDP: dropped a datagram from "
                         f"127.0.0.2:{intruder_port}, the association is for 127.0.0.1:0")]


GSO_REFUSED = textwrap.dedent("""
    import socket
    from fastsocks._relay import UdpRelay

    class Owner:
        def allowed(self, family, sockaddr): return True
        def remote_socket(self, family):
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
