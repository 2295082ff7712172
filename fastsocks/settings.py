"""Server settings: one frozen value built once from the command line, passed down.

Every check happens here, before anything is bound or forked, and a bad value raises
ConfigError naming the field.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from fastsocks import privileges
from fastsocks.errors import ConfigError
from fastsocks.policy import Policy

DEFAULT_PORT = 1080
ACCEPT_MODES = ("reuseport", "shared")
PROTOCOLS = ("socks4", "socks5", "http")  # what the port speaks: the first byte tells them apart
EGRESS_ROTATIONS = ("round-robin", "sticky-client", "sticky-user")
# Limits shared by all sessions of one user, or of one client address, in every worker
# (the same names in [limits] and in a rule; accounts.py keeps their buckets).
SHARED_RATES = ("user_rate_up_bytes_per_s", "user_rate_down_bytes_per_s",
                "client_rate_up_bytes_per_s", "client_rate_down_bytes_per_s")
QUOTA_PERIODS = ("day", "month")


UPSTREAM_SCHEMES = ("socks5", "socks4", "socks4a", "http")  # protocol/client.py speaks each
UPSTREAM_PORTS = {"socks5": 1080, "socks4": 1080, "socks4a": 1080, "http": 8080}


@dataclass(frozen=True, slots=True)
class Upstream:
    """A parent proxy, from ``[[upstreams]]``: ``url`` like socks5://user:pass@host:port."""
    name: str
    scheme: str
    host: str
    port: int
    username: bytes = b""
    password: bytes = field(default=b"", repr=False)  # never in a log line

    @classmethod
    def parse(cls, name: str, url: str) -> Upstream:
        """ValueError saying what is wrong with ``url``."""
        parts = urlsplit(url)
        if parts.scheme not in UPSTREAM_SCHEMES:
            raise ValueError(f"{url!r}: expected a scheme of {', '.join(s + '://' for s in UPSTREAM_SCHEMES)}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"{url!r}: expected scheme://[user:password@]host[:port] and nothing after")
        try:
            port = parts.port or UPSTREAM_PORTS[parts.scheme]
        except ValueError:
            raise ValueError(f"{url!r}: the port is not 1-65535") from None
        if not parts.hostname:
            raise ValueError(f"{url!r}: no host")
        username = unquote(parts.username or "").encode()
        password = unquote(parts.password or "").encode()
        if len(username) > 255 or len(password) > 255:
            raise ValueError(f"{url!r}: a user name or password longer than 255 bytes")
        if parts.scheme.startswith("socks4") and password:
            raise ValueError(f"{url!r}: SOCKS4 has no password (a user name is its USERID)")
        return cls(name, parts.scheme, parts.hostname, port, username, password)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.name} ({self.scheme}://{host}:{self.port})"


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int
    proxy_protocol: bool = False  # each connection opens with a PROXY header (v1 or v2) from trusted_proxies

    @property
    def family_is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        text = f"[{self.host}]:{self.port}" if self.family_is_ipv6 else f"{self.host}:{self.port}"
        return text + " (PROXY protocol)" if self.proxy_protocol else text


@dataclass(frozen=True, slots=True)
class Settings:
    listen: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", DEFAULT_PORT),)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    accept_mode: str = "reuseport"
    backlog: int = 4096
    graceful_timeout_s: float = 30.0
    handshake_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    bind_timeout_s: float = 120.0
    bind_any_peer: bool = False         # BIND: accept the first peer from any address
    advertise: str | None = None        # address put in BIND / UDP ASSOCIATE replies (NAT)
    udp_idle_timeout_s: float = 120.0
    max_udp_per_client: int = 8      # UDP associations per client IP, per worker
    max_udp_per_worker: int = 1024
    worker_timeout_s: float = 30.0
    splice: bool = True
    pipe_size: int = 1 << 20
    max_pipes: int = 1024
    buffer_size: int = 65536
    resolver_threads: int = 4
    dns_cache_ttl_s: float = 60.0
    dns_cache_size: int = 4096
    log_level: str = "info"
    users_file: str | None = None       # enables SOCKS5 username/password (RFC 1929)
    auth_methods: tuple[str, ...] = ()  # in order of preference; () -> userpass with users, else none
    protocols: tuple[str, ...] = PROTOCOLS  # socks4 (and 4a), socks5, http (CONNECT and forward requests)
    upstreams: tuple[Upstream, ...] = ()    # parent proxies, by name: rules send sessions via them
    egress: tuple[str, ...] = ()            # connect from these addresses (none: the kernel's choice)
    egress_rotation: str = "round-robin"    # or sticky-client, sticky-user: which one a session takes
    auth_max_failures: int = 10         # failed logins from one client IP within the window...
    auth_failure_window_s: float = 60.0
    auth_block_s: float = 300.0         # ...block it this long (0: never block)
    max_sessions: int = 0               # caps, 0 = none: all workers together,
    max_sessions_per_worker: int = 0    # one worker,
    max_sessions_per_client: int = 0    # one client IP (all workers),
    max_sessions_per_user: int = 0      # one user name (all workers)
    rate_up_bytes_per_s: int = 0        # each relayed session's limit, client -> destination (0: none)
    rate_down_bytes_per_s: int = 0      # ... and destination -> client; a rule's own overrides these
    # Shared by all of a user's (a client address's) sessions, in every worker (accounts.py):
    user_rate_up_bytes_per_s: int = 0
    user_rate_down_bytes_per_s: int = 0
    client_rate_up_bytes_per_s: int = 0
    client_rate_down_bytes_per_s: int = 0
    quota_bytes: int = 0                # bytes (both ways) per user per quota_period (0: none)
    quota_period: str = "day"           # or "month": calendar periods in UTC
    quota_db: str | None = None         # the SQLite file the counts survive restarts in
    policy: Policy = field(default_factory=Policy)
    allow_open_proxy: bool = False
    user: str | None = None             # run as this user once the sockets are bound (privileges.py)
    group: str | None = None            # ...and group (default: the user's own)
    # Balancers whose PROXY headers are believed (listeners with proxy_protocol): networks.
    access_log: str | None = None       # the access lines go to this file (else with the log, on stderr)
    access_log_format: str = "text"     # or "json": one JSON object per line (access.py)
    metrics: ListenAddress | None = None  # serve Prometheus metrics here (the master)
    pid_file: str | None = None         # the serving master's pid, for 'fastsocks upgrade' and init scripts
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    config_path: str | None = None

    def upstream(self, name: str) -> Upstream:
        """The [[upstreams]] entry of this name (config.py checked that each via names one)."""
        return next(u for u in self.upstreams if u.name == name)

    def session_rates(self, rule: int) -> tuple[int, int]:
        """(up, down) bytes/s limits of a session that ``rule`` allowed (an index into the
        policy's rules; negative: the default action or none): the rule's own, else [limits]."""
        own = self.policy.rules[rule] if rule >= 0 else None
        up = own.rate_up_bytes_per_s if own is not None and own.rate_up_bytes_per_s is not None else None
        down = own.rate_down_bytes_per_s if own is not None and own.rate_down_bytes_per_s is not None else None
        return (self.rate_up_bytes_per_s if up is None else up, self.rate_down_bytes_per_s if down is None else down)

    def shared_rates(self, rule: int) -> tuple[int, int, int, int]:
        """The limits that all sessions of one user (up, down) and of one client address (up,
        down) share, for a session ``rule`` allowed: the rule's own, else [limits]'s."""
        own = self.policy.rules[rule] if rule >= 0 else None
        return tuple(getattr(self, name) if own is None or getattr(own, name) is None else getattr(own, name)
                     for name in SHARED_RATES)

    @property
    def methods(self) -> tuple[str, ...]:
        """The SOCKS5 methods offered, in order of preference."""
        if self.auth_methods:
            return self.auth_methods
        return ("userpass",) if self.users_file else ("none",)

    def __post_init__(self) -> None:
        checks = [
            ("listen", bool(self.listen), "at least one address is needed"),
            ("workers", 1 <= self.workers <= 1024, "expected 1-1024"),
            ("accept_mode", self.accept_mode in ACCEPT_MODES, f"expected one of {', '.join(ACCEPT_MODES)}"),
            ("protocols", bool(self.protocols) and set(self.protocols) <= set(PROTOCOLS),
             f"expected a list of {', '.join(PROTOCOLS)}"),
            ("egress_rotation", self.egress_rotation in EGRESS_ROTATIONS,
             f"expected one of {', '.join(EGRESS_ROTATIONS)}"),
            ("backlog", 1 <= self.backlog <= 65535, "expected 1-65535"),
            ("graceful_timeout", self.graceful_timeout_s >= 0, "expected a number of seconds >= 0"),
            ("handshake_timeout", self.handshake_timeout_s > 0, "expected a number of seconds > 0"),
            ("connect_timeout", self.connect_timeout_s > 0, "expected a number of seconds > 0"),
            ("idle_timeout", self.idle_timeout_s >= 0, "expected a number of seconds >= 0 (0: never)"),
            ("bind_timeout", self.bind_timeout_s > 0, "expected a number of seconds > 0"),
            ("advertise", self.advertise is None or _is_ip(self.advertise), "expected an IP address"),
            ("udp_idle_timeout", self.udp_idle_timeout_s >= 0, "expected a number of seconds >= 0 (0: never)"),
            ("max_udp_per_client", self.max_udp_per_client >= 1, "expected >= 1"),
            ("max_udp_per_worker", self.max_udp_per_worker >= 1, "expected >= 1"),
            ("worker_timeout", self.worker_timeout_s >= 2, "expected a number of seconds >= 2"),
            ("pipe_size", 4096 <= self.pipe_size <= 1 << 30, "expected 4096 bytes to 1 GiB"),
            ("max_pipes", 0 <= self.max_pipes, "expected >= 0"),
            ("buffer_size", 1024 <= self.buffer_size <= 1 << 24, "expected 1 KiB to 16 MiB"),
            ("resolver_threads", 1 <= self.resolver_threads <= 256, "expected 1-256"),
            ("log_level", self.log_level in ("debug", "info", "warning", "error"),
             "expected debug, info, warning or error"),
            ("access_log_format", self.access_log_format in ("text", "json"), "expected text or json"),
            ("auth_methods", "userpass" not in self.methods or self.users_file is not None,
             "userpass needs a users file (--users, or users_file in [auth])"),
            ("auth_max_failures", self.auth_max_failures >= 1, "expected >= 1"),
            ("auth_failure_window_s", self.auth_failure_window_s > 0, "expected a number of seconds > 0"),
            ("auth_block_s", self.auth_block_s >= 0, "expected a number of seconds >= 0 (0: never block)"),
            ("max_sessions", self.max_sessions >= 0, "expected >= 0 (0: no cap)"),
            ("max_sessions_per_worker", self.max_sessions_per_worker >= 0, "expected >= 0 (0: no cap)"),
            ("max_sessions_per_client", self.max_sessions_per_client >= 0, "expected >= 0 (0: no cap)"),
            ("max_sessions_per_user", self.max_sessions_per_user >= 0, "expected >= 0 (0: no cap)"),
            ("rate_up_bytes_per_s", self.rate_up_bytes_per_s >= 0, "expected bytes per second >= 0 (0: no limit)"),
            ("rate_down_bytes_per_s", self.rate_down_bytes_per_s >= 0, "expected bytes per second >= 0 (0: no limit)"),
            *((name, getattr(self, name) >= 0, "expected bytes per second >= 0 (0: no limit)") for name in SHARED_RATES),
            ("quota_bytes", self.quota_bytes >= 0, "expected bytes >= 0 (0: no quota)"),
            ("quota_period", self.quota_period in QUOTA_PERIODS, f"expected one of {', '.join(QUOTA_PERIODS)}"),
            ("quota_bytes", not self.quota_bytes or bool(self.quota_db),
             "a quota needs a file to keep its counts in: set quota_db in [limits]"),
        ]
        ports = [(a.host, a.port) for a in self.listen if a.port]
        checks += [
            ("listen", len(ports) == len(set(ports)), "the same address is named twice"),
            ("listen", self.trusted_proxies or not any(a.proxy_protocol for a in self.listen),
             "a listener takes PROXY headers: name the networks of the balancers allowed to send them "
             "in trusted_proxies (--trusted-proxy)"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise ConfigError(None, None, name, msg)
        try:
            privileges.resolve(self.user, self.group)
        except KeyError as exc:
            raise ConfigError(None, None, "group" if "group" in exc.args[0] else "user", exc.args[0]) from None
        problem = self.open_proxy_problem()
        if problem is not None and not self.allow_open_proxy:
            raise ConfigError(None, None, "listen", problem + "; add authentication or a client rule, "
                              "or set allow_open_proxy = true (--allow-open-proxy) if you mean it")

    @property
    def identity(self) -> privileges.Identity | None:
        """Who the server runs as after binding (--user/--group), or None: as started."""
        return privileges.resolve(self.user, self.group)

    def open_proxy_problem(self) -> str | None:
        """Why this configuration is an open proxy, or None: anyone who reaches a public
        address could use it (open-proxy scanners find one within hours)."""
        public = [str(a) for a in self.listen if not ipaddress.ip_address(a.host).is_loopback]
        if not public or "none" not in self.methods or any(rule.clients for rule in self.policy.rules):
            return None
        return (f"{', '.join(public)} is reachable from other hosts, with no authentication "
                f"and no client rule: an open proxy")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_networks(items) -> tuple:
    """``trusted_proxies``: addresses or networks (``10.0.0.0/8``, ``::1``), each checked."""
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(None, None, "trusted_proxies", f"{item!r}: expected an address or a network like 10.0.0.0/8") from None
    return tuple(dict.fromkeys(networks))


def parse_listen(text: str, proxy_protocol: bool = False) -> ListenAddress:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all IPv4 interfaces) into a ListenAddress."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ConfigError(None, None, "listen", f"{text!r}: expected HOST:PORT or [IPv6]:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        family_ok = ":" in host
    else:
        host = host or "0.0.0.0"
        family_ok = ":" not in host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(None, None, "listen", f"{text!r}: the host must be an IP address") from None
    if not family_ok:
        raise ConfigError(None, None, "listen", f"{text!r}: write IPv6 addresses as [ADDR]:PORT")
    # Port 0 lets the kernel pick a free port; the first log line says which.
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(None, None, "listen", f"{text!r}: expected a port 0-65535")
    return ListenAddress(host, int(port_text), proxy_protocol)
