"""What a bench run is asked to do: the proxy URL, HOST:PORT endpoints, byte sizes, and
the checked, frozen ``Plan`` built from them. Pure: no I/O; bad input raises ValueError
with a message meant for the user.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import unquote

MODES = ("bulk", "cps", "rr", "idle", "udp")
DIRECTIONS = ("download", "upload", "both")
DEFAULT_SOCKS_PORT = 1080

# Hard caps: every run is bounded in work and in time.
MAX_DURATION_S = 600.0
MAX_TIME_S = 3600.0
MAX_COUNT = 100_000_000
MAX_CONNECTIONS = {"cps": 10_000, "rr": 10_000, "idle": 200_000, "bulk": 1024, "udp": 1024}
MAX_INFLIGHT = 4096
UDP_MIN_SIZE = 12      # the slot and sequence number every udp payload starts with
UDP_MAX_SIZE = 65000   # payload bytes; the SOCKS5 UDP header comes on top
MAX_BYTES = 1 << 40
MAX_SIZE = 64 << 20
MAX_PROCS = 64

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str  # an IP literal (IPv6 without brackets) or a name
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


class Address(NamedTuple):
    """A resolved endpoint, ready to connect to."""

    family: int  # socket.AF_INET or AF_INET6
    ip: str
    port: int


@dataclass(frozen=True, slots=True)
class ProxyURL:
    endpoint: Endpoint
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def has_credentials(self) -> bool:
        return self.username is not None

    def __str__(self) -> str:
        """The URL with the password hidden: safe for reports and logs."""
        user = f"{self.username}:***@" if self.has_credentials else ""
        return f"socks5://{user}{self.endpoint}"


@dataclass(frozen=True, slots=True)
class Plan:
    """One run, every default filled in and every limit checked (see ``check_plan``)."""

    mode: str
    proxy: ProxyURL | None            # None: --direct
    target: Endpoint | None           # None: the built-in loopback target
    connections: int                  # cps: concurrent clients; rr, idle: connections; bulk: streams
    size: int = 64                    # cps, rr: request (= echo) bytes; idle: ping bytes
    bytes_per_stream: int = 1 << 30   # bulk
    direction: str = "download"       # bulk
    verify: bool = False              # bulk: compare every byte (cps/rr/idle always do)
    duration_s: float | None = None   # cps, rr: run this long; idle: hold this long
    count: int | None = None          # cps: connections; rr: transactions
    proxy_pid: int | None = None
    timeout_s: float = 10.0           # per operation: a connection stuck this long is an error
    max_time_s: float = 660.0         # the whole run, whatever happens
    procs: int = 1                    # load generator processes
    source_addresses: int = 32        # clients of an IPv4 loopback peer bind 127.0.0.1..N
    json_path: str | None = None
    quiet: bool = False
    inflight: int = 32                # udp: datagrams in flight per association
    rate: float = 0.0                 # udp: datagrams/s, paced (0: closed loop, as fast as echoes come)

    @property
    def direct(self) -> bool:
        return self.proxy is None


def parse_endpoint(text: str, what: str = "HOST:PORT", default_port: int | None = None,
                   min_port: int = 1) -> Endpoint:
    """``HOST:PORT``, ``[IPV6]:PORT`` or a name; the port may be left out if there is a
    default. ``min_port=0`` allows port 0 (to listen on any free port)."""
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close:
            raise ValueError(f"{what} {text!r}: missing ']' after the IPv6 address")
        if not _is_ip(host, 6):
            raise ValueError(f"{what} {text!r}: {host!r} is not an IPv6 address")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{what} {text!r}: expected [IPV6]:PORT")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, None
        if ":" in host:
            raise ValueError(f"{what} {text!r}: write IPv6 addresses as [ADDR]:PORT")
    if not host:
        raise ValueError(f"{what} {text!r}: the host is empty")
    if not _is_ip(host, 4) and not _is_ip(host, 6):
        _check_name(host, what, text)
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{what} {text!r}: expected HOST:PORT")
        return Endpoint(host, default_port)
    if not port_text.isdigit() or not min_port <= int(port_text) <= 65535:
        raise ValueError(f"{what} {text!r}: expected a port {min_port}-65535")
    return Endpoint(host, int(port_text))


def parse_proxy_url(text: str) -> ProxyURL:
    """``socks5://[USER:PASS@]HOST[:PORT]`` (``socks5h://`` too); USER and PASS may be
    percent-encoded and are 1-255 bytes each (RFC 1929 §2). Error messages never show
    the password."""
    scheme, sep, rest = text.partition("://")
    userinfo, at, hostport = rest.rpartition("@")
    shown = f"{scheme}{sep}{'USER:***@' if at else ''}{hostport}"
    if not sep:
        raise ValueError(f"proxy {shown!r}: expected socks5://[USER:PASS@]HOST:PORT")
    if scheme.lower() not in ("socks5", "socks5h"):
        raise ValueError(f"proxy {shown!r}: only socks5:// proxies can be measured")
    hostport = hostport[:-1] if hostport.endswith("/") else hostport
    if any(ch in hostport for ch in "/?#"):
        raise ValueError(f"proxy {shown!r}: expected no path, query or fragment")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if not colon:
            raise ValueError(f"proxy {shown!r}: expected USER:PASS@ before the host")
        username, password = unquote(user), unquote(secret)
        for name, value in (("user name", username), ("password", password)):
            if not 1 <= len(value.encode()) <= 255:
                raise ValueError(f"proxy {shown!r}: the {name} must be 1-255 bytes (RFC 1929)")
    return ProxyURL(parse_endpoint(hostport, "proxy", DEFAULT_SOCKS_PORT), username, password)


def parse_size(text: str) -> int:
    """Bytes: ``65536``, ``64k``, ``1M``, ``1.5G``, ``2GiB`` (k, M, G, T are powers of 1024)."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r}: expected a size such as 65536, 64k, 1M or 1G")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value != int(value) or value < 1:
        raise ValueError(f"{text!r}: expected a whole number of bytes >= 1")
    return int(value)


def check_plan(plan: Plan) -> None:
    """Raise ValueError naming the option when the plan is out of bounds."""
    top = MAX_CONNECTIONS[plan.mode]
    checks = [
        ("--connections" if plan.mode != "bulk" else "--streams", 1 <= plan.connections <= top,
         f"expected 1-{top}"),
        ("--size", 1 <= plan.size <= MAX_SIZE, f"expected 1 byte to {MAX_SIZE >> 20} MiB"),
        ("--bytes", 1 <= plan.bytes_per_stream <= MAX_BYTES, "expected 1 byte to 1 TiB"),
        ("--direction", plan.direction in DIRECTIONS, f"expected one of {', '.join(DIRECTIONS)}"),
        ("--duration", plan.duration_s is None or 0 < plan.duration_s <= MAX_DURATION_S,
         f"expected 0 < seconds <= {MAX_DURATION_S:g}"),
        ("--count", plan.count is None or 1 <= plan.count <= MAX_COUNT, f"expected 1-{MAX_COUNT}"),
        ("--timeout", 0 < plan.timeout_s <= 600, "expected 0 < seconds <= 600"),
        ("--max-time", 1 <= plan.max_time_s <= MAX_TIME_S, f"expected 1-{MAX_TIME_S:g} seconds"),
        ("--clients-procs", 1 <= plan.procs <= min(MAX_PROCS, plan.connections),
         f"expected 1-{MAX_PROCS}, and no more than the connections"),
        ("--proxy-pid", plan.proxy_pid is None or plan.proxy_pid > 0, "expected a process id"),
        ("--source-addresses", 1 <= plan.source_addresses <= 254, "expected 1-254"),
        ("--inflight", 1 <= plan.inflight <= MAX_INFLIGHT, f"expected 1-{MAX_INFLIGHT}"),
        ("--rate", 0 <= plan.rate <= 1e7, "expected 0-10000000 datagrams/s (0: closed loop)"),
    ]
    if plan.mode == "udp" and not UDP_MIN_SIZE <= plan.size <= UDP_MAX_SIZE:
        raise ValueError(f"--size: udp datagrams carry {UDP_MIN_SIZE}-{UDP_MAX_SIZE} bytes")
    for option, ok, msg in checks:
        if not ok:
            raise ValueError(f"{option}: {msg}")
    if plan.count is not None and plan.duration_s is not None:
        raise ValueError("--count and --duration exclude each other")
    if plan.count is not None and plan.mode not in ("cps", "rr", "udp"):
        raise ValueError(f"--count is for cps, rr and udp; {plan.mode} takes --connections")
    if plan.count is not None and plan.count < plan.procs:
        raise ValueError("--count must be at least --clients-procs (each process needs work)")
    if plan.direct and plan.proxy_pid is not None:
        raise ValueError("--proxy-pid needs --proxy")


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _check_name(host: str, what: str, text: str) -> None:
    # A SOCKS5 DOMAIN is one length octet long (RFC 1928 §5); no spaces or controls.
    if len(host.encode()) > 255 or not host.isprintable() or " " in host:
        raise ValueError(f"{what} {text!r}: {host!r} is not a host name or IP address")
