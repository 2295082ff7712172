"""The configuration file: TOML (stdlib ``tomllib``) into one frozen ``Settings``.

Every key of the file maps to one ``Settings`` field (``FIELDS``); unknown tables and keys
are errors, so a typo never silently keeps a default. Values are checked for their type
here and for their range by ``Settings``; either way the error names the file, the line
and the field (``fastsocks.toml:12: rules[2].port: expected 1-65535``). tomllib reports no
line for a value, so ``_Lines`` finds it in the text: the line of ``key =`` inside the
table it belongs to (for ``[[rules]]``, the n-th of them).

Command-line flags override the file: ``load(path, overrides)`` takes them as ``Settings``
field values. A relative ``users_file`` is relative to the config file's directory.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from dataclasses import replace
from pathlib import Path

import psutil

from fastsocks.errors import ConfigError
from fastsocks.policy import ACTIONS, BALANCES, COMMANDS, DIRECT, Destination, Policy, Rule, parse_ports
from fastsocks.settings import PROTOCOLS, SHARED_RATES, Settings, Upstream, parse_listen, parse_networks

# (table, key) -> (Settings field, expected type). Types: int, float (int accepted), str,
# bool, "listen" (a string or a list of them, each a "HOST:PORT" or a table
# {address = "HOST:PORT", proxy_protocol = true}), "methods" (a list of method names),
# "protocols" (a list of what the port speaks: socks4, socks5, http),
# "networks" (a list of addresses or networks).
FIELDS: dict[tuple[str, str], tuple[str, object]] = {
    ("server", "listen"): ("listen", "listen"),
    ("server", "workers"): ("workers", int),
    ("server", "accept_mode"): ("accept_mode", str),
    ("server", "backlog"): ("backlog", int),
    ("server", "advertise"): ("advertise", str),
    ("server", "allow_open_proxy"): ("allow_open_proxy", bool),
    ("server", "log_level"): ("log_level", str),
    ("server", "access_log"): ("access_log", str),
    ("server", "access_log_format"): ("access_log_format", str),
    ("server", "user"): ("user", str),
    ("server", "trusted_proxies"): ("trusted_proxies", "networks"),
    ("server", "metrics"): ("metrics", "address"),
    ("server", "pid_file"): ("pid_file", str),
    ("server", "protocols"): ("protocols", "protocols"),
    ("server", "egress"): ("egress", "egress"),
    ("server", "egress_rotation"): ("egress_rotation", str),
    ("server", "group"): ("group", str),
    ("auth", "users_file"): ("users_file", str),
    ("auth", "methods"): ("auth_methods", "methods"),
    ("auth", "max_failures"): ("auth_max_failures", int),
    ("auth", "failure_window_s"): ("auth_failure_window_s", float),
    ("auth", "block_s"): ("auth_block_s", float),
    ("timeouts", "handshake_s"): ("handshake_timeout_s", float),
    ("timeouts", "connect_s"): ("connect_timeout_s", float),
    ("timeouts", "idle_s"): ("idle_timeout_s", float),
    ("timeouts", "bind_s"): ("bind_timeout_s", float),
    ("timeouts", "udp_idle_s"): ("udp_idle_timeout_s", float),
    ("timeouts", "graceful_s"): ("graceful_timeout_s", float),
    ("timeouts", "worker_s"): ("worker_timeout_s", float),
    ("limits", "max_sessions"): ("max_sessions", int),
    ("limits", "max_sessions_per_worker"): ("max_sessions_per_worker", int),
    ("limits", "max_sessions_per_client"): ("max_sessions_per_client", int),
    ("limits", "max_sessions_per_user"): ("max_sessions_per_user", int),
    ("limits", "max_udp_associations_per_client"): ("max_udp_per_client", int),
    ("limits", "max_udp_associations_per_worker"): ("max_udp_per_worker", int),
    ("limits", "rate_up_bytes_per_s"): ("rate_up_bytes_per_s", int),
    ("limits", "rate_down_bytes_per_s"): ("rate_down_bytes_per_s", int),
    ("limits", "user_rate_up_bytes_per_s"): ("user_rate_up_bytes_per_s", int),
    ("limits", "user_rate_down_bytes_per_s"): ("user_rate_down_bytes_per_s", int),
    ("limits", "client_rate_up_bytes_per_s"): ("client_rate_up_bytes_per_s", int),
    ("limits", "client_rate_down_bytes_per_s"): ("client_rate_down_bytes_per_s", int),
    ("limits", "quota_bytes"): ("quota_bytes", int),
    ("limits", "quota_period"): ("quota_period", str),
    ("limits", "quota_db"): ("quota_db", str),
    ("bind", "any_peer"): ("bind_any_peer", bool),
    ("relay", "splice"): ("splice", bool),
    ("relay", "pipe_size"): ("pipe_size", int),
    ("relay", "max_pipes"): ("max_pipes", int),
    ("relay", "buffer_size"): ("buffer_size", int),
    ("dns", "threads"): ("resolver_threads", int),
    ("dns", "cache_ttl_s"): ("dns_cache_ttl_s", float),
    ("dns", "cache_size"): ("dns_cache_size", int),
}
TABLES = sorted({table for table, _ in FIELDS} | {"policy"})
POLICY_KEYS = ("default",)
RULE_KEYS = ("action", "client", "user", "command", "dest", "port", "via", "balance", "egress",
             "rate_up_bytes_per_s", "rate_down_bytes_per_s", *SHARED_RATES)
UPSTREAM_KEYS = ("name", "url")
AUTH_METHODS = ("none", "userpass")


def load(path: str | Path, overrides: dict | None = None) -> Settings:
    """Settings from the file at ``path``, then ``overrides`` (flags) on top."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, "file", f"cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    return parse(text, str(path), overrides or {})


def parse(text: str, path: str, overrides: dict) -> Settings:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        raise ConfigError(path, int(line.group(1)) if line else None, "TOML", str(exc).split(" (at")[0]) from None
    reader = _Reader(path, _Lines(text), Path(path).parent)
    values = reader.settings_values(doc)
    values.update(overrides)
    try:
        return Settings(**values, config_path=path)
    except ConfigError as exc:
        raise reader.locate(exc, overrides) from None


class _Reader:
    """One document's values, checked, with the line of each."""

    def __init__(self, path: str, lines: _Lines, base_dir: Path) -> None:
        self.path, self.lines, self.base_dir = path, lines, base_dir
        self.origin: dict[str, tuple[str, int | None]] = {}  # Settings field -> (toml name, line)

    def error(self, table: str, key: str | None, msg: str, index: int | None = None) -> ConfigError:
        name = table if index is None else f"{table}[{index + 1}]"
        field = f"{name}.{key}" if key else name
        return ConfigError(self.path, self.lines.find(table, index, key), field, msg)

    def settings_values(self, doc: dict) -> dict:
        values: dict = {}
        for table, body in doc.items():
            if table in ("rules", "upstreams"):
                continue
            if table not in TABLES:
                raise self.error(table, None, f"unknown table; expected one of {', '.join(TABLES + ['rules', 'upstreams'])}")
            if not isinstance(body, dict):
                raise self.error(table, None, "expected a table, like [" + table + "]")
            for key, value in body.items():
                if table == "policy":
                    continue
                spec = FIELDS.get((table, key))
                if spec is None:
                    known = sorted(k for t, k in FIELDS if t == table)
                    raise self.error(table, key, f"unknown key; expected one of {', '.join(known)}")
                name, kind = spec
                values[name] = self.value(table, key, value, kind)
                self.origin[name] = (f"{table}.{key}", self.lines.find(table, None, key))
        upstreams = self.upstreams(doc)
        if upstreams:
            values["upstreams"] = upstreams
        values["policy"] = self.policy(doc, {u.name for u in upstreams})
        return values

    def upstreams(self, doc: dict) -> tuple[Upstream, ...]:
        raw = doc.get("upstreams", [])
        if not isinstance(raw, list) or not all(isinstance(u, dict) for u in raw):
            raise self.error("upstreams", None, "expected [[upstreams]] tables, each with a name and a url")
        out: dict[str, Upstream] = {}
        for i, body in enumerate(raw):
            for key in body:
                if key not in UPSTREAM_KEYS:
                    raise self.error("upstreams", key, f"unknown key; expected one of {', '.join(UPSTREAM_KEYS)}", i)
            name, url = body.get("name"), body.get("url")
            if not isinstance(name, str) or not name or name == DIRECT or not name.isprintable():
                raise self.error("upstreams", "name", f'expected a name (not "{DIRECT}", which means no parent)', i)
            if name in out:
                raise self.error("upstreams", "name", f"{name!r} is named twice", i)
            if not isinstance(url, str):
                raise self.error("upstreams", "url", "expected a URL like socks5://user:password@host:port", i)
            try:
                out[name] = Upstream.parse(name, url)
            except ValueError as exc:
                raise self.error("upstreams", "url", str(exc), i) from None
        return tuple(out.values())

    def value(self, table: str, key: str, value, kind):
        if kind == "listen":
            items = [value] if isinstance(value, (str, dict)) else value
            if not isinstance(items, list) or not items or not all(_is_listen_item(v) for v in items):
                raise self.error(table, key, 'expected "HOST:PORT", {address = "HOST:PORT", '
                                 'proxy_protocol = true} or a list of them')
            try:
                return tuple(dict.fromkeys(_listen_item(v) for v in items))
            except ConfigError as exc:
                raise self.error(table, key, exc.msg) from None
        if kind == "address":
            if not isinstance(value, str):
                raise self.error(table, key, f'expected "HOST:PORT", not {_toml_type(value)}')
            try:
                return parse_listen(value)
            except ConfigError as exc:
                raise self.error(table, key, exc.msg) from None
        if kind == "networks":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.error(table, key, 'expected a list of addresses or networks, like ["10.0.0.0/8"]')
            try:
                return parse_networks(value)
            except ConfigError as exc:
                raise self.error(table, key, exc.msg) from None
        if kind == "egress":
            try:
                return egress_addresses(value)
            except ValueError as exc:
                raise self.error(table, key, str(exc)) from None
        if kind == "protocols":
            if not isinstance(value, list) or not value or any(v not in PROTOCOLS for v in value):
                raise self.error(table, key, f"expected a list of {', '.join(repr(p) for p in PROTOCOLS)}")
            return tuple(dict.fromkeys(value))
        if kind == "methods":
            if not isinstance(value, list) or not value or any(v not in AUTH_METHODS for v in value):
                raise self.error(table, key, f"expected a list of {' and/or '.join(repr(m) for m in AUTH_METHODS)}")
            return tuple(dict.fromkeys(value))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(table, key, f"expected {_KIND_NAMES[kind]}, not {_toml_type(value)}")
        if key in ("users_file", "access_log", "pid_file", "quota_db"):
            return str(self.base_dir / value)
        return value

    def policy(self, doc: dict, upstreams: set[str] = frozenset()):
        body = doc.get("policy", {})
        for key in body:
            if key not in POLICY_KEYS:
                raise self.error("policy", key, f"unknown key; expected one of {', '.join(POLICY_KEYS)}")
        raw_rules = doc.get("rules", [])
        if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
            raise self.error("rules", None, "expected [[rules]] tables")
        rules = tuple(self.rule(i, body, upstreams) for i, body in enumerate(raw_rules))
        default = body.get("default", "deny" if rules else "allow")
        if default not in ACTIONS:
            raise self.error("policy", "default", f"expected {' or '.join(repr(a) for a in ACTIONS)}")
        return Policy(rules, default_allow=default == "allow")

    def rule(self, i: int, body: dict, upstreams: set[str] = frozenset()) -> Rule:
        for key in body:
            if key not in RULE_KEYS:
                raise self.error("rules", key, f"unknown key; expected one of {', '.join(RULE_KEYS)}", i)
        if "action" not in body:
            raise self.error("rules", "action", 'missing; expected "allow" or "deny"', i)
        action = body["action"]
        if action not in ACTIONS:
            raise self.error("rules", "action", f"expected {' or '.join(repr(a) for a in ACTIONS)}, not {action!r}", i)
        line = self.lines.find("rules", i, None)
        fields_ = dict(
            clients=self.items(i, body, "client", _client_network),
            users=self.items(i, body, "user", _user),
            commands=self.items(i, body, "command", _command),
            dests=self.items(i, body, "dest", Destination.parse),
            ports=self.items(i, body, "port", parse_ports),
        )
        via, balance = self.via(i, body, upstreams, action, fields_["commands"])
        egress = ()
        if "egress" in body:
            if action != "allow" or via:
                raise self.error("rules", "egress", "only an allow rule without via connects from somewhere", i)
            try:
                egress = egress_addresses(body["egress"])
            except ValueError as exc:
                raise self.error("rules", "egress", str(exc), i) from None
        rates = {key: self.rate(i, body, key, action)
                 for key in ("rate_up_bytes_per_s", "rate_down_bytes_per_s", *SHARED_RATES) if key in body}
        return Rule(action, origin=f"{self.path}:{line}" if line else self.path, via=via, balance=balance,
                    egress=egress, **fields_, **rates)

    def rate(self, i: int, body: dict, key: str, action: str) -> int:
        """A rule's own limit for the sessions it allows (0: none, whatever [limits] says)."""
        value = body[key]
        if action != "allow":
            raise self.error("rules", key, "only an allow rule's sessions move bytes", i)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self.error("rules", key, f"expected bytes per second >= 0 (0: no limit), not {value!r}", i)
        return value

    def via(self, i: int, body: dict, upstreams: set[str], action: str, commands: tuple) -> tuple[tuple, str]:
        """A rule's parents: names of [[upstreams]] (or "direct"), and how to pick among them."""
        if "via" not in body:
            if "balance" in body:
                raise self.error("rules", "balance", "only with via", i)
            return (), "failover"
        value = body["via"]
        names = value if isinstance(value, list) else [value]
        if not names or not all(isinstance(n, str) for n in names):
            raise self.error("rules", "via", "expected the name of an [[upstreams]] entry, or a list of them", i)
        for name in names:
            if name != DIRECT and name not in upstreams:
                known = ", ".join(sorted(upstreams)) or "none defined"
                raise self.error("rules", "via", f"no [[upstreams]] entry is named {name!r} ({known})", i)
        if action != "allow":
            raise self.error("rules", "via", "only an allow rule sends sessions anywhere", i)
        if set(commands) != {"connect"}:
            raise self.error("rules", "via", 'parents take CONNECT (SOCKS and HTTP) only: add command = "connect"', i)
        balance = body.get("balance", "failover")
        if balance not in BALANCES:
            raise self.error("rules", "balance", f"expected one of {', '.join(repr(b) for b in BALANCES)}", i)
        return tuple(dict.fromkeys(names)), balance

    def items(self, i: int, body: dict, key: str, parse) -> tuple:
        value = body.get(key, [])
        values = value if isinstance(value, list) else [value]
        if key in body and not values:
            raise self.error("rules", key, "empty list: leave the key out to match anything", i)
        out = []
        for item in values:
            try:
                out.append(parse(item))
            except (ValueError, TypeError) as exc:
                raise self.error("rules", key, str(exc), i) from None
        return tuple(dict.fromkeys(out))

    def locate(self, exc: ConfigError, overrides: dict) -> ConfigError:
        """A range error from Settings: name the file's key if the value came from it."""
        for name in (exc.field, f"{exc.field}_s", f"{exc.field}_timeout_s"):
            if name in self.origin and name not in overrides:
                toml_name, line = self.origin[name]
                return ConfigError(self.path, line, toml_name, exc.msg)
        return exc


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _toml_type(value) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def egress_addresses(value) -> tuple[str, ...]:
    """Egress entries (addresses, or interface names for each of their addresses) as the
    address texts outbound sockets bind to. ValueError naming what is wrong."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) for v in items):
        raise ValueError('expected addresses or interface names, like ["192.0.2.10", "eth1"]')
    out: list[str] = []
    for item in items:
        try:
            out.append(str(ipaddress.ip_address(item)))
            continue
        except ValueError:
            pass
        interfaces = psutil.net_if_addrs()
        if item not in interfaces:
            raise ValueError(f"{item!r} is neither an address nor an interface here ({', '.join(sorted(interfaces))})")
        found = [a.address for a in interfaces[item] if a.family in (socket.AF_INET, socket.AF_INET6)
                 and "%" not in a.address and not ipaddress.ip_address(a.address).is_link_local]
        if not found:
            raise ValueError(f"interface {item!r} has no address to connect from")
        out.extend(found)
    return tuple(dict.fromkeys(out))


def _client_network(text):
    if not isinstance(text, str):
        raise ValueError("expected a network like \"10.0.0.0/8\" or an address")
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a network: {exc}") from None


def _user(text):
    if not isinstance(text, str) or not 1 <= len(text.encode("utf-8")) <= 255:
        raise ValueError("expected a user name of 1-255 bytes")
    return text.encode("utf-8")


def _command(text):
    if text not in COMMANDS:
        raise ValueError(f"{text!r}: expected some of {', '.join(repr(c) for c in COMMANDS)}")
    return text


class _Lines:
    """Where each table header and key is written, for error messages."""

    HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?")
    KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")

    def __init__(self, text: str) -> None:
        self.headers: dict[tuple[str, int | None], int] = {}
        self.keys: dict[tuple[str, int | None, str], int] = {}
        counts: dict[str, int] = {}
        table, index = "", None
        depth = 0  # inside a multi-line array: keys there are not keys
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.split("#", 1)[0]
            if depth == 0:
                header = self.HEADER.match(stripped)
                if header:
                    table = header.group(2).strip().strip("\"'")
                    if header.group(1) == "[[":
                        index = counts.get(table, 0)
                        counts[table] = index + 1
                    else:
                        index = None
                    self.headers.setdefault((table, index), number)
                    continue
                key = self.KEY.match(stripped)
                if key:
                    self.keys.setdefault((table, index, key.group(1).strip('"')), number)
            depth = max(0, depth + stripped.count("[") - stripped.count("]"))

    def find(self, table: str, index: int | None, key: str | None) -> int | None:
        if key is not None and (table, index, key) in self.keys:
            return self.keys[(table, index, key)]
        return self.headers.get((table, index))


def _is_listen_item(value) -> bool:
    if isinstance(value, str):
        return True
    return (isinstance(value, dict) and isinstance(value.get("address"), str)
            and set(value) <= {"address", "proxy_protocol"} and isinstance(value.get("proxy_protocol", False), bool))


def _listen_item(value):
    if isinstance(value, str):
        return parse_listen(value)
    return parse_listen(value["address"], value.get("proxy_protocol", False))


# What a running server cannot change: sockets, processes and the engine are made at start.
RESTART_FIELDS = ("listen", "metrics", "workers", "accept_mode", "backlog", "splice", "pipe_size", "max_pipes",
                  "buffer_size", "resolver_threads", "dns_cache_ttl_s", "dns_cache_size", "log_level", "access_log",
                  "access_log_format", "user", "group", "pid_file")


def reloaded(old: Settings, load) -> tuple[Settings, list[str]]:
    """``load()`` again for SIGHUP, keeping what only a restart can change; also the names
    of such fields that the file changed, for a warning. Raises ConfigError."""
    new = load() if load is not None else old
    changed = [name for name in RESTART_FIELDS if getattr(new, name) != getattr(old, name)]
    if changed:
        new = replace(new, **{name: getattr(old, name) for name in changed})
    return new, changed
