"""One exchange over the whole path, in plain blocking Python, before any load: a wrong
port, a refused login or a target that does not echo is then one clear sentence instead
of a table full of errors.
"""

from __future__ import annotations

import contextlib
import socket

from fastsocks.bench import wire
from fastsocks.bench._loadgen import pattern_bytes
from fastsocks.bench.params import Address, Endpoint, ProxyURL

PROBE_BYTES = 16


class PreflightError(Exception):
    """The path does not work; the message says where and why."""


def check_path(address: Address, proxy: ProxyURL | None, target: Endpoint, bulk: bool,
               timeout_s: float) -> None:
    """Connect to ``address`` (the proxy's, or the target's when direct), go through the
    proxy to ``target`` and check that the target answers as the mode needs."""
    with _explained(proxy, target, timeout_s), \
            socket.create_connection((address.ip, address.port), timeout=timeout_s) as sock:
        if proxy:
            _socks5_connect(sock, proxy, target)
        if bulk:
            _probe_bulk(sock, target)
        else:
            _probe_echo(sock, target)


@contextlib.contextmanager
def _explained(proxy: ProxyURL | None, target: Endpoint, timeout_s: float):
    """Socket errors of a probe as one PreflightError that says which side failed."""
    where = f"proxy {proxy.endpoint}" if proxy else f"target {target}"
    try:
        yield
    except PreflightError:
        raise
    except socket.timeout:
        raise PreflightError(f"{where}: no answer within {timeout_s:g} s") from None
    except OSError as exc:
        raise PreflightError(f"{where}: {exc.strerror or exc}") from None


def check_udp_path(address: Address, proxy: ProxyURL | None, target: Endpoint, timeout_s: float) -> None:
    """udp: one datagram to the echo at ``target``, through a UDP ASSOCIATE when proxied."""
    where = f"proxy {proxy.endpoint}" if proxy else f"target {target}"
    probe = pattern_bytes(0, PROBE_BYTES)
    header = wire.udp_header(target.host, target.port) if proxy else b""
    with _explained(proxy, target, timeout_s), contextlib.ExitStack() as stack:
        relay = (address.family, address.ip, address.port)
        if proxy:
            tcp = stack.enter_context(socket.create_connection((address.ip, address.port), timeout=timeout_s))
            relay = _socks5_associate(tcp, proxy, address)
        udp = stack.enter_context(socket.socket(relay[0], socket.SOCK_DGRAM))
        udp.settimeout(min(timeout_s, 2.0))
        udp.connect(relay[1:])
        for _ in range(3):  # UDP may drop one; three tries before we call it dead
            udp.send(header + probe)
            try:
                answer = udp.recv(65536)
            except socket.timeout:
                continue
            if answer != header + probe:
                raise PreflightError(f"target {target} does not echo datagrams as sent"
                                     f"{' (or the proxy rewrites the UDP header)' if proxy else ''}")
            return
        raise PreflightError(f"{where}: no UDP echo from {target} within 3 tries"
                             f"{'' if proxy else ' (is a UDP echo listening there?)'}")


def _socks5_associate(sock: socket.socket, proxy: ProxyURL, address: Address) -> tuple:
    _negotiate(sock, proxy)
    sock.sendall(wire.udp_associate_request())
    head = _recv_exact(sock, 5, "the UDP ASSOCIATE reply")
    if head[1] != 0:
        raise PreflightError(f"proxy {proxy.endpoint} refused UDP ASSOCIATE: {wire.reply_name(head[1])} "
                             f"(does it support UDP?)")
    length = wire.reply_length(head)
    if length is None or head[3] == 3:
        raise PreflightError(f"proxy {proxy.endpoint} named its UDP relay with address type {head[3]}")
    rest = head + _recv_exact(sock, length - 5, "the UDP ASSOCIATE reply")
    if head[3] == 1:
        family, ip = socket.AF_INET, socket.inet_ntop(socket.AF_INET, rest[4:8])
    else:
        family, ip = socket.AF_INET6, socket.inet_ntop(socket.AF_INET6, rest[4:20])
    if ip in ("0.0.0.0", "::"):
        ip, family = address.ip, address.family
    return family, ip, int.from_bytes(rest[-2:], "big")


def _negotiate(sock: socket.socket, proxy: ProxyURL) -> None:
    sock.sendall(wire.greeting(proxy.has_credentials))
    version, method = _recv_exact(sock, 2, "the method selection")
    if version != wire.SOCKS_VERSION:
        raise PreflightError(f"proxy {proxy.endpoint} does not speak SOCKS5 (version byte {version})")
    if method == 0x02 and proxy.has_credentials:
        sock.sendall(wire.auth_request(proxy.username, proxy.password))
        if _recv_exact(sock, 2, "the authentication status")[1] != 0:
            raise PreflightError(f"proxy {proxy.endpoint} refused the user name and password")
    elif method != 0x00:
        offered = "username/password" if proxy.has_credentials else "no authentication"
        hint = "" if proxy.has_credentials else " (give socks5://USER:PASS@HOST:PORT)"
        raise PreflightError(f"proxy {proxy.endpoint} does not accept {offered}{hint}")


def _socks5_connect(sock: socket.socket, proxy: ProxyURL, target: Endpoint) -> None:
    _negotiate(sock, proxy)
    sock.sendall(wire.connect_request(target.host, target.port))
    head = _recv_exact(sock, 5, "the CONNECT reply")
    if head[1] != 0:
        raise PreflightError(f"proxy {proxy.endpoint} refused CONNECT {target}: "
                             f"{wire.reply_name(head[1])}")
    length = wire.reply_length(head)
    if length is None:
        raise PreflightError(f"proxy {proxy.endpoint} sent a reply with address type {head[3]}")
    _recv_exact(sock, length - 5, "the CONNECT reply")


def _probe_echo(sock: socket.socket, target: Endpoint) -> None:
    probe = pattern_bytes(0, PROBE_BYTES)
    sock.sendall(probe)
    if _recv_exact(sock, len(probe), f"the echo from {target}") != probe:
        raise PreflightError(f"target {target} does not echo what it receives")


def _probe_bulk(sock: socket.socket, target: Endpoint) -> None:
    # An upload of zero bytes: the sink answers with its result at once.
    sock.sendall(wire.bulk_header(wire.FLAG_UPLOAD, 0, 0))
    answer = _recv_exact(sock, wire.RESULT_SIZE, f"the bulk result from {target}")
    if wire.parse_result(answer)[0] != 0:
        raise PreflightError(f"target {target} does not speak the bench protocol: "
                             f"run `fastsocks bench serve` there")


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise PreflightError(f"the connection closed while waiting for {what}")
        data += chunk
    return data
