"""The UDP relay (UdpRelay/UdpFlow): the compiled batch loop and its pure-Python twin, driven
through real loopback sockets with the hooks of a UdpAssociation recorded by a fake owner.

Each case runs on both implementations and asserts the bytes that arrived: batches larger
than one pump takes, mixed destinations in one batch, malformed headers and FRAG != 0 amid
good datagrams, foreign sources amid the client's, the verdict cache, the restricted cone
of the way down, runs of datagrams the compiled relay joins with UDP GSO, and run() over
the epoll set of several flows.
"""

from __future__ import annotations

import select
import socket

import pytest

from fastsocks import _relay, _relay_py
from support import needs_ipv6

RELAYS = {"cython": _relay.UdpRelay, "python": _relay_py.UdpRelay}
TIMEOUT_S = 5
IPV4, DOMAIN, IPV6 = 1, 3, 4


@pytest.fixture(params=sorted(RELAYS))
def relay_cls(request):
    return RELAYS[request.param]


def udp_socket(host: str = "127.0.0.1", *, blocking: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    if ":" in host:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, 0))
    if blocking:
        sock.settimeout(TIMEOUT_S)
    else:
        sock.setblocking(False)
    return sock


def header(host: str, port: int, *, frag: int = 0, rsv: bytes = b"\0\0") -> bytes:
    """RSV FRAG ATYP DST.ADDR DST.PORT (RFC 1928 §7)."""
    for family, atyp in ((socket.AF_INET, IPV4), (socket.AF_INET6, IPV6)):
        try:
            address = socket.inet_pton(family, host)
        except OSError:
            continue
        return rsv + bytes([frag, atyp]) + address + port.to_bytes(2, "big")
    name = host.encode("ascii")
    return rsv + bytes([frag, DOMAIN, len(name)]) + name + port.to_bytes(2, "big")


def unwrap(datagram: bytes) -> tuple[str, int, bytes]:
    assert datagram[:3] == b"\0\0\0", datagram[:8]
    if datagram[3] == IPV4:
        return socket.inet_ntop(socket.AF_INET, datagram[4:8]), int.from_bytes(datagram[8:10], "big"), datagram[10:]
    assert datagram[3] == IPV6
    return socket.inet_ntop(socket.AF_INET6, datagram[4:20]), int.from_bytes(datagram[20:22], "big"), datagram[22:]


def receive(sock: socket.socket, count: int) -> list[tuple[bytes, tuple]]:
    """``count`` datagrams, each with its source's (host, port)."""
    return [(data, source[:2]) for data, source in (sock.recvfrom(65536) for _ in range(count))]


def nothing_more(sock: socket.socket, wait_s: float = 0.05) -> bool:
    return not select.select([sock], [], [], wait_s)[0]


class Owner:
    """The hooks of a UdpAssociation, recorded; the client-facing socket and the flow."""

    def __init__(self, relay, *, client_ip: str = "127.0.0.1", client_port: int = 0,
                 relay_host: str = "127.0.0.1") -> None:
        self.relay = relay
        self.relay_sock = udp_socket(relay_host, blocking=False)
        self.address = self.relay_sock.getsockname()[:2]
        self.remote_socks: dict[int, socket.socket] = {}
        self.asked: list[tuple[int, tuple]] = []
        self.denied: set[tuple] = set()
        self.names: list[tuple[str, int, bytes]] = []
        self.foreign: list[tuple] = []
        self.flow = relay.new_flow(self, self.relay_sock, client_ip, client_port)

    def allowed(self, family: int, sockaddr: tuple) -> bool:
        self.asked.append((family, sockaddr))
        return sockaddr not in self.denied

    def remote_socket(self, family: int) -> socket.socket:
        sock = udp_socket("0.0.0.0" if family == socket.AF_INET else "::", blocking=False)
        self.remote_socks[family] = sock
        return sock

    def send_to_name(self, name: str, port: int, payload: bytes) -> None:
        self.names.append((name, port, payload))

    def warn_foreign(self, source: tuple) -> None:
        self.foreign.append(source)

    def remote_address(self, family: int = socket.AF_INET) -> tuple[str, int]:
        """Where the remote-facing socket of ``family`` sends from (on loopback)."""
        port = self.remote_socks[family].getsockname()[1]
        return ("127.0.0.1" if family == socket.AF_INET else "::1", port)

    def pump_up(self) -> int:
        assert select.select([self.relay_sock], [], [], TIMEOUT_S)[0], "nothing to relay"
        return self.flow.pump_up()

    def pump_down(self, family: int = socket.AF_INET) -> int:
        assert select.select([self.remote_socks[family]], [], [], TIMEOUT_S)[0], "nothing to relay"
        return self.flow.pump_down(family)

    def close(self) -> None:
        self.flow.close()
        for sock in (self.relay_sock, *self.remote_socks.values()):
            sock.close()


@pytest.fixture
def owners(relay_cls):
    made: list[Owner] = []

    def make(*, batch: int = 64, max_verdicts: int = 4096, max_peers: int = 4096, relay=None, **kwargs) -> Owner:
        relay = relay or relay_cls(batch=batch, max_verdicts=max_verdicts, max_peers=max_peers)
        made.append(Owner(relay, **kwargs))
        return made[-1]

    yield make
    for owner in made:
        owner.close()
        owner.relay.close()


@pytest.fixture
def sockets():
    made: list[socket.socket] = []

    def make(host: str = "127.0.0.1") -> socket.socket:
        made.append(udp_socket(host))
        return made[-1]

    yield make
    for sock in made:
        sock.close()


# --------------------------------------------------------------------- up: client -> remote


def test_a_batch_larger_than_one_pump_arrives_whole_and_in_order(owners, sockets):
    owner, client, sink = owners(batch=8), sockets(), sockets()
    payloads = [i.to_bytes(2, "big") * (1 + i % 7) for i in range(50)]
    for payload in payloads:
        client.sendto(header(*sink.getsockname()) + payload, owner.address)
    assert owner.pump_up() == 8  # one pump reads one batch: a flood cannot starve the loop
    sent = 8
    while sent < len(payloads):
        relayed = owner.pump_up()
        assert 0 < relayed <= 8
        sent += relayed
    remote = owner.remote_address()
    assert receive(sink, 50) == [(payload, remote) for payload in payloads]
    flow = owner.flow
    assert (flow.datagrams_up, flow.bytes_up, flow.dropped) == (50, sum(map(len, payloads)), 0)
    assert owner.asked == [(socket.AF_INET, sink.getsockname())]  # one destination, asked once


@needs_ipv6
def test_ipv4_ipv6_mapped_and_domain_destinations_in_one_batch(owners, sockets):
    owner, client, sink4, sink6 = owners(), sockets(), sockets(), sockets("::1")
    port4, port6 = sink4.getsockname()[1], sink6.getsockname()[1]
    client.sendto(header("127.0.0.1", port4) + b"four", owner.address)
    client.sendto(header("::1", port6) + b"six", owner.address)
    client.sendto(header("::ffff:127.0.0.1", port4) + b"mapped", owner.address)
    client.sendto(header("localhost", 53) + b"by name", owner.address)
    client.sendto(header("::1", port6) + b"six again", owner.address)
    assert owner.pump_up() == 4
    assert receive(sink4, 2) == [(b"four", owner.remote_address()), (b"mapped", owner.remote_address())]
    remote6 = owner.remote_address(socket.AF_INET6)
    assert receive(sink6, 2) == [(b"six", remote6), (b"six again", remote6)]
    assert owner.names == [("localhost", 53, b"by name")]
    # The mapped destination is the IPv4 one, unmapped: one verdict for both.
    assert owner.asked == [(socket.AF_INET, ("127.0.0.1", port4)), (socket.AF_INET6, ("::1", port6))]
    assert (owner.flow.datagrams_up, owner.flow.dropped) == (4, 0)


def test_malformed_headers_and_fragments_amid_good_datagrams_are_the_only_ones_dropped(owners, sockets):
    owner, client, sink = owners(), sockets(), sockets()
    dst = sink.getsockname()
    datagrams = [
        header(*dst) + b"good 1",
        header(*dst, frag=1) + b"fragment",
        header(*dst, frag=0x81) + b"last fragment",
        b"\0\0\0\x01\x7f",                        # truncated
        header(*dst, rsv=b"\0\1") + b"rsv",
        header(*dst) + b"good 2",
        b"\0\0\0\x05" + bytes(8),                 # unknown ATYP
        b"\0\0\0\x03\x00\x00\x35",                # empty name
        b"\0\0\0\x03\x03a\0b\x00\x35",            # NUL in a name
        header(*dst) + b"",                       # empty payload: a datagram like any other
        header(*dst) + b"good 3",
    ]
    for datagram in datagrams:
        client.sendto(datagram, owner.address)
    assert owner.pump_up() == 4
    remote = owner.remote_address()
    assert receive(sink, 4) == [(b"good 1", remote), (b"good 2", remote), (b"", remote), (b"good 3", remote)]
    assert (owner.flow.datagrams_up, owner.flow.bytes_up, owner.flow.dropped) == (4, 18, 7)
    assert owner.names == [] and nothing_more(sink)


def test_foreign_sources_amid_the_clients_datagrams(owners, sockets):
    owner, sink = owners(), sockets()
    client, neighbour, intruder = sockets(), sockets(), sockets("127.0.0.2")
    dst = sink.getsockname()
    intruder.sendto(header(*dst) + b"intruder first", owner.address)
    client.sendto(header(*dst) + b"client 1", owner.address)      # fixes the client's port
    neighbour.sendto(header(*dst) + b"same IP, other port", owner.address)
    client.sendto(header(*dst) + b"client 2", owner.address)
    intruder.sendto(header(*dst) + b"intruder again", owner.address)
    assert owner.pump_up() == 2
    assert [data for data, _ in receive(sink, 2)] == [b"client 1", b"client 2"]
    assert nothing_more(sink)
    assert owner.flow.dropped == 3
    assert owner.foreign == [intruder.getsockname()]  # warned once, about the first
    assert owner.flow.client_addr == client.getsockname()


def test_a_named_client_port_is_the_only_one_let_in(owners, sockets):
    client, other, sink = sockets(), sockets(), sockets()
    owner = owners(client_port=client.getsockname()[1])
    assert owner.flow.client_addr == client.getsockname()
    other.sendto(header(*sink.getsockname()) + b"not the named port", owner.address)
    client.sendto(header(*sink.getsockname()) + b"named", owner.address)
    assert owner.pump_up() == 1
    assert receive(sink, 1)[0][0] == b"named" and nothing_more(sink)
    assert owner.foreign == [other.getsockname()] and owner.flow.dropped == 1


def test_verdicts_are_asked_once_per_destination_and_denied_ones_receive_nothing(owners, sockets):
    owner, client, allowed, denied = owners(), sockets(), sockets(), sockets()
    owner.denied.add(denied.getsockname())
    for i in range(5):
        client.sendto(header(*allowed.getsockname()) + b"yes %d" % i, owner.address)
        client.sendto(header(*denied.getsockname()) + b"no %d" % i, owner.address)
    assert owner.pump_up() == 5
    client.sendto(header(*denied.getsockname()) + b"no, in another batch", owner.address)
    client.sendto(header(*allowed.getsockname()) + b"yes, in another batch", owner.address)
    assert owner.pump_up() == 1
    assert [data for data, _ in receive(allowed, 6)] == [b"yes %d" % i for i in range(5)] + [b"yes, in another batch"]
    assert nothing_more(denied)
    assert owner.asked == [(socket.AF_INET, allowed.getsockname()), (socket.AF_INET, denied.getsockname())]
    assert (owner.flow.datagrams_up, owner.flow.dropped) == (6, 6)


def test_forget_verdicts_asks_again(owners, sockets):
    owner, client, sink = owners(), sockets(), sockets()
    client.sendto(header(*sink.getsockname()) + b"one", owner.address)
    owner.pump_up()
    owner.denied.add(sink.getsockname())        # the rules change...
    client.sendto(header(*sink.getsockname()) + b"two", owner.address)
    owner.pump_up()                             # ...but the cached verdict stands
    owner.flow.forget_verdicts()                # until they are reloaded
    client.sendto(header(*sink.getsockname()) + b"three", owner.address)
    assert owner.pump_up() == 0
    assert [data for data, _ in receive(sink, 2)] == [b"one", b"two"] and nothing_more(sink)
    assert len(owner.asked) == 2 and owner.flow.dropped == 1


def test_the_verdict_cache_is_bounded_and_forgets_the_least_recently_used(owners, sockets):
    owner, client = owners(max_verdicts=4), sockets()  # two generations of two
    sinks = [sockets() for _ in range(4)]
    order = [0, 1, 2, 0, 3, 1, 0]
    for i in order:
        client.sendto(header(*sinks[i].getsockname()) + b"to %d" % i, owner.address)
        assert owner.pump_up() == 1
    # 0 1 2: asked; 0: kept (old generation, moved back); 3: asked, the generation of 1 goes;
    # 1: asked again; 0: still known.
    assert [sockaddr for _, sockaddr in owner.asked] == [sinks[i].getsockname() for i in (0, 1, 2, 3, 1)]
    for i, sink in enumerate(sinks):
        assert [data for data, _ in receive(sink, order.count(i))] == [b"to %d" % i] * order.count(i)


def test_a_hook_that_raises_costs_its_datagram_not_the_batch(owners, sockets):
    owner, client, good, bad = owners(), sockets(), sockets(), sockets()

    def allowed(family, sockaddr):
        if sockaddr == bad.getsockname():
            raise RuntimeError("a bug in the rules")
        return True

    owner.allowed = allowed
    client.sendto(header(*bad.getsockname()) + b"to the bug", owner.address)
    client.sendto(header(*good.getsockname()) + b"fine", owner.address)
    with pytest.raises(RuntimeError, match="a bug in the rules"):
        owner.pump_up()
    assert receive(good, 1)[0][0] == b"fine" and nothing_more(bad)
    assert (owner.flow.datagrams_up, owner.flow.dropped) == (1, 1)
    client.sendto(header(*good.getsockname()) + b"still fine", owner.address)
    assert owner.pump_up() == 1  # nothing was left half done


def test_a_remote_socket_that_cannot_be_opened_drops_the_datagram(owners, sockets):
    owner, client, sink = owners(), sockets(), sockets()
    owner.remote_socket = lambda family: None
    client.sendto(header(*sink.getsockname()) + b"nowhere to send from", owner.address)
    assert owner.pump_up() == 0
    assert owner.flow.dropped == 1 and nothing_more(sink)


def test_the_flow_holds_the_sockets_it_sends_on(owners, sockets):
    owner, client, sink = owners(), sockets(), sockets()
    opened_socks = []

    def remote_socket(family):  # an owner that keeps no reference of its own
        sock = udp_socket(blocking=False)
        opened_socks.append(sock.getsockname())
        return sock

    owner.remote_socket = remote_socket
    for i in range(2):
        client.sendto(header(*sink.getsockname()) + b"%d" % i, owner.address)
        assert owner.pump_up() == 1
    assert [receive(sink, 1)[0] for _ in range(2)] == [(b"0", opened_socks[0]), (b"1", opened_socks[0])]


def test_datagrams_the_kernel_refuses_are_dropped_and_the_rest_go_on(owners, sockets):
    owner, client, sink = owners(), sockets(), sockets()
    client.sendto(header(*sink.getsockname()) + b"before", owner.address)
    client.sendto(header("127.0.0.1", 0) + b"to port 0", owner.address)  # EINVAL
    client.sendto(header(*sink.getsockname()) + b"after", owner.address)
    assert owner.pump_up() == 2
    assert [data for data, _ in receive(sink, 2)] == [b"before", b"after"]
    assert owner.flow.dropped == 1


# --------------------------------------------------------------------- GSO runs (and the twin)


@pytest.mark.parametrize("sizes", [
    [100] * 5 + [50] + [100] * 3,      # a shorter one ends a run: GSO cuts every segment at 100
    [600] * 70,                        # more than one GSO message holds
    [1, 2, 3, 3, 3, 2, 2, 1, 1, 1],
    [0, 10, 10, 0, 10],
    [30000, 30000, 30000],             # more than 64 KiB together
])
def test_runs_of_datagrams_keep_their_boundaries(owners, sockets, sizes):
    owner, client, sink = owners(batch=128), sockets(), sockets()
    payloads = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    for payload in payloads:
        client.sendto(header(*sink.getsockname()) + payload, owner.address)
    sent = 0
    while sent < len(payloads):
        sent += owner.pump_up()
    assert [data for data, _ in receive(sink, len(payloads))] == payloads
    assert owner.flow.bytes_up == sum(sizes)


def test_runs_to_different_destinations_are_not_mixed(owners, sockets):
    owner, client, a, b = owners(), sockets(), sockets(), sockets()
    order = "aabbbabaa"
    for i, name in enumerate(order):
        sink = a if name == "a" else b
        client.sendto(header(*sink.getsockname()) + b"%s%d" % (name.encode(), i), owner.address)
    assert owner.pump_up() == len(order)
    assert [data for data, _ in receive(a, 5)] == [b"a0", b"a1", b"a5", b"a7", b"a8"]
    assert [data for data, _ in receive(b, 4)] == [b"b2", b"b3", b"b4", b"b6"]


# --------------------------------------------------------------------- down: remote -> client


def opened(owner: Owner, client: socket.socket, sink: socket.socket) -> None:
    """The client sends one datagram to ``sink``: its port is fixed and its IP is a peer."""
    client.sendto(header(*sink.getsockname()) + b"open", owner.address)
    assert owner.pump_up() == 1
    assert receive(sink, 1)[0][0] == b"open"


def test_replies_name_their_real_source(owners, sockets):
    owner, client, echo, other_port = owners(batch=16), sockets(), sockets(), sockets()
    opened(owner, client, echo)
    remote = owner.remote_address()
    payloads = [b"reply %d" % i for i in range(40)]
    for payload in payloads:
        echo.sendto(payload, remote)
    other_port.sendto(b"from another port of the same IP", remote)  # as TFTP servers answer
    sent = 0
    while sent < 41:
        relayed = owner.pump_down()
        assert 0 < relayed <= 16
        sent += relayed
    got = [unwrap(data) for data, source in receive(client, 41)]
    assert got == [(*echo.getsockname(), payload) for payload in payloads] + \
        [(*other_port.getsockname(), b"from another port of the same IP")]
    assert (owner.flow.datagrams_down, owner.flow.bytes_down) == (41, sum(map(len, payloads)) + 32)


def test_a_stranger_cannot_send_to_the_client(owners, sockets):
    owner, client, echo, stranger = owners(), sockets(), sockets(), sockets("127.0.0.3")
    opened(owner, client, echo)
    remote = owner.remote_address()
    stranger.sendto(b"injected", remote)
    echo.sendto(b"legit", remote)
    stranger.sendto(b"injected again", remote)
    assert owner.pump_down() == 1
    assert [unwrap(data)[2] for data, _ in receive(client, 1)] == [b"legit"]
    assert nothing_more(client) and owner.flow.dropped == 2


@pytest.mark.parametrize("sizes", [[512] * 64, [512] * 10 + [100] + [512] * 5, [9000] * 9, [0, 0, 7]])
def test_runs_down_keep_their_boundaries(owners, sockets, sizes):
    owner, client, echo = owners(batch=64), sockets(), sockets()
    opened(owner, client, echo)
    payloads = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    for payload in payloads:
        echo.sendto(payload, owner.remote_address())
    sent = 0
    while sent < len(payloads):
        sent += owner.pump_down()
    assert [unwrap(data) for data, _ in receive(client, len(payloads))] == \
        [(*echo.getsockname(), payload) for payload in payloads]


def test_peers_are_bounded_and_the_least_recently_used_forgotten(owners, sockets):
    owner, client = owners(max_peers=2), sockets()   # two generations of one
    sinks = {ip: sockets(ip) for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3")}
    client.sendto(header(*sinks["127.0.0.1"].getsockname()) + b"1", owner.address)
    client.sendto(header(*sinks["127.0.0.2"].getsockname()) + b"2", owner.address)
    client.sendto(header(*sinks["127.0.0.3"].getsockname()) + b"3", owner.address)
    assert owner.pump_up() == 3
    remote = owner.remote_address()
    for sink in sinks.values():
        receive(sink, 1)
        sink.sendto(b"reply", remote)
    assert owner.pump_down() == 2             # 127.0.0.1 is forgotten
    assert sorted(unwrap(data)[0] for data, _ in receive(client, 2)) == ["127.0.0.2", "127.0.0.3"]
    assert owner.flow.dropped == 1


@needs_ipv6
def test_an_ipv6_client_gets_ipv6_and_ipv4_replies(owners, sockets):
    owner = owners(client_ip="::1", relay_host="::1")
    client, echo6, echo4 = sockets("::1"), sockets("::1"), sockets()
    client.sendto(header(*echo6.getsockname()[:2]) + b"six", owner.address)
    client.sendto(header(*echo4.getsockname()) + b"four", owner.address)
    assert owner.pump_up() == 2
    receive(echo6, 1)
    receive(echo4, 1)
    echo6.sendto(b"back six", owner.remote_address(socket.AF_INET6))
    echo4.sendto(b"back four", owner.remote_address())
    assert owner.pump_down(socket.AF_INET6) == 1 and owner.pump_down() == 1
    assert [unwrap(data) for data, _ in receive(client, 2)] == [
        (*echo6.getsockname()[:2], b"back six"), (*echo4.getsockname(), b"back four")]


# --------------------------------------------------------------------- names, the slow path


def test_send_for_a_resolved_name_shares_the_checks_of_a_batch(owners, sockets):
    owner, client, sink = owners(), sockets(), sockets()
    client.sendto(header("localhost", sink.getsockname()[1]) + b"by name", owner.address)
    assert owner.pump_up() == 0
    (_, port, payload), = owner.names
    assert owner.flow.send(("::ffff:127.0.0.1", port), payload) == 1  # resolved: leaves as IPv4
    assert receive(sink, 1) == [(b"by name", owner.remote_address())]
    client.sendto(header(*sink.getsockname()) + b"by address", owner.address)
    assert owner.pump_up() == 1
    assert receive(sink, 1)[0][0] == b"by address"
    assert owner.asked == [(socket.AF_INET, sink.getsockname())]      # one verdict for both
    sink.sendto(b"answer", owner.remote_address())                     # the resolved IP is a peer
    assert owner.pump_down() == 1
    assert unwrap(receive(client, 1)[0][0]) == (*sink.getsockname(), b"answer")
    owner.denied.add(("127.0.0.1", 9))
    assert owner.flow.send(("127.0.0.1", 9), b"denied") == 0
    assert owner.flow.datagrams_up == 2 and owner.flow.dropped == 1
    with pytest.raises(ValueError):
        owner.flow.send(("not an address", 9), b"")


# --------------------------------------------------------------------- run(): the epoll set


def wait_for(relay, timeout_s: float = TIMEOUT_S) -> None:
    assert select.select([relay], [], [], timeout_s)[0], "the relay saw nothing ready"


def test_run_serves_every_ready_socket_of_every_flow(owners, sockets):
    first = owners(batch=4)
    second = owners(relay=first.relay)
    relay = first.relay
    client1, client2, echo = sockets(), sockets(), sockets()
    opened(first, client1, echo)
    opened(second, client2, echo)
    for i in range(3):
        client1.sendto(header(*echo.getsockname()) + b"1-%d" % i, first.address)
        client2.sendto(header(*echo.getsockname()) + b"2-%d" % i, second.address)
    echo.sendto(b"down to 1", first.remote_address())
    echo.sendto(b"down to 2", second.remote_address())
    wait_for(relay)
    relay.run()
    assert sorted(data for data, _ in receive(echo, 6)) == sorted(b"%d-%d" % (c, i) for c in (1, 2) for i in range(3))
    assert unwrap(receive(client1, 1)[0][0])[2] == b"down to 1"
    assert unwrap(receive(client2, 1)[0][0])[2] == b"down to 2"
    assert (first.flow.datagrams_up, first.flow.datagrams_down) == (4, 1)
    assert (second.flow.datagrams_up, second.flow.datagrams_down) == (4, 1)


def test_one_run_is_bounded_and_the_rest_waits_for_the_next(owners, sockets):
    owner, client, sink = owners(batch=4), sockets(), sockets()
    for i in range(40):
        client.sendto(header(*sink.getsockname()) + b"%d" % i, owner.address)
    wait_for(owner.relay)
    owner.relay.run()
    assert owner.flow.datagrams_up == 16  # four batches: one flood cannot starve the loop
    while owner.flow.datagrams_up < 40:
        wait_for(owner.relay)
        owner.relay.run()
    assert [data for data, _ in receive(sink, 40)] == [b"%d" % i for i in range(40)]


def test_a_closed_flow_leaves_the_epoll_set(owners, sockets):
    owner, client, sink = owners(), sockets(), sockets()
    opened(owner, client, sink)
    owner.flow.close()
    client.sendto(header(*sink.getsockname()) + b"after close", owner.address)
    sink.sendto(b"to a closed flow", owner.remote_address())
    assert not select.select([owner.relay], [], [], 0.05)[0]
    owner.relay.run()
    assert nothing_more(sink)


def test_run_raises_what_a_hook_raised_once_the_work_is_done(owners, sockets):
    owner, client, sink = owners(), sockets(), sockets()

    def broken(family, sockaddr):
        raise RuntimeError("a bug in the rules")

    owner.allowed = broken
    client.sendto(header(*sink.getsockname()) + b"x", owner.address)
    wait_for(owner.relay)
    with pytest.raises(RuntimeError, match="a bug in the rules"):
        owner.relay.run()
    assert owner.flow.dropped == 1
    owner.relay.run()  # nothing left over: the datagram was read and dropped


def test_a_closed_relay_runs_nothing(relay_cls):
    relay = relay_cls()
    assert relay.fileno() >= 0
    relay.close()
    relay.close()
    assert relay.fileno() == -1
    relay.run()
    with udp_socket(blocking=False) as sock, pytest.raises(ValueError):
        relay.new_flow(object(), sock, "127.0.0.1", 0)


# --------------------------------------------------------------------- lifecycle


def test_a_closed_flow_relays_nothing_and_keeps_its_counters(owners, sockets):
    owner, client, sink = owners(), sockets(), sockets()
    opened(owner, client, sink)
    owner.flow.close()
    owner.flow.close()
    client.sendto(header(*sink.getsockname()) + b"after close", owner.address)
    assert owner.flow.pump_up() == 0 and owner.flow.pump_down(socket.AF_INET) == 0
    assert nothing_more(sink) and owner.flow.datagrams_up == 1 and owner.flow.client_addr is None


def test_a_hook_may_not_pump_again(owners, sockets):
    owner, client = owners(), sockets()
    raised = []

    def name_hook(name, port, payload):
        try:
            owner.flow.pump_up()
        except RuntimeError as exc:
            raised.append(exc)

    owner.send_to_name = name_hook
    client.sendto(header("example.com", 53) + b"q", owner.address)
    owner.pump_up()
    assert len(raised) == 1


def test_bad_arguments(relay_cls):
    with pytest.raises(ValueError):
        relay_cls(batch=0)
    with pytest.raises(ValueError):
        relay_cls(max_peers=1)
    relay = relay_cls()
    with udp_socket(blocking=False) as sock:
        with pytest.raises(ValueError):
            relay.new_flow(object(), sock, "not an IP", 0)
        with pytest.raises(ValueError):
            relay.new_flow(object(), sock, "127.0.0.1", 65536)


def test_both_implementations_offer_the_same_names():
    assert {"UdpRelay", "UdpFlow"} <= set(_relay_py.__all__)
    counters = {"datagrams_up", "datagrams_down", "bytes_up", "bytes_down", "dropped", "last_active_s"}
    for cls in ("UdpRelay", "UdpFlow"):
        public = {name for name in dir(getattr(_relay, cls)) if not name.startswith("_")}
        assert public <= {name for name in dir(getattr(_relay_py, cls)) if not name.startswith("_")} | counters


ENGINES = {_relay.UdpRelay: _relay.RelayEngine, _relay_py.UdpRelay: _relay_py.RelayEngine}


def test_the_relay_engines_wait_runs_the_udp_relay_itself(owners, sockets, relay_cls):
    """The worker never calls UdpRelay.run(): the engine's wait() does, when the relay's fd
    is ready, and it stops with run_udp(None)."""
    owner, client, echo = owners(), sockets(), sockets()
    engine = ENGINES[relay_cls]()
    engine.run_udp(owner.relay)
    try:
        client.sendto(header(*echo.getsockname()) + b"through wait", owner.address)
        for _ in range(100):
            assert engine.wait(0.05) == []
            if not nothing_more(echo, 0):
                break
        assert receive(echo, 1)[0][0] == b"through wait"
        assert not engine.woke and owner.flow.datagrams_up == 1
        engine.run_udp(None)
        client.sendto(header(*echo.getsockname()) + b"not any more", owner.address)
        engine.wait(0.05)
        assert nothing_more(echo) and owner.flow.datagrams_up == 1
    finally:
        engine.close()
