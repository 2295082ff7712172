"""Access rules: values in, verdicts out. No sockets, no clock, no logging (DESIGN §3).

Theory of operation
-------------------
A ``Policy`` is an ordered list of ``Rule``s and a default action; the first rule whose
every condition holds decides. A rule's conditions are optional fields, each a list whose
items are alternatives: client networks, users (the SOCKS5 user name, or the SOCKS4 USERID),
commands, destinations (networks, exact names, ``*.suffix`` patterns) and port ranges.

Names and addresses are judged apart, because a name is only a promise about addresses:
name patterns match the name the client asked for, network patterns match the address the
server is about to use — the literal in the request, or each address the name resolved to.
``localhost`` thus meets a ``127.0.0.0/8`` rule, and IPv4-mapped IPv6 addresses
(``::ffff:127.0.0.1``) are unmapped before matching.

The session asks three times, each answer as final as the facts allow:
``at_accept(client)`` — only the client address is known; a client that every rule path
denies is closed at once. ``before_resolve(query)`` — the name is known, not its addresses;
a verdict that no address could change spares a DNS query (a denied name is never looked up).
``decide(query)`` — everything is known, always a verdict.

Compiled for thousands of rules: each condition kind is indexed (networks by prefix
length in hash tables, names and suffixes in hash tables, ports as sorted elementary
intervals), and each index answers with a bit mask of the rules that admit the value. The
AND of the masks holds the matching rules; its lowest set bit is the first match. A query
costs a few dozen dictionary lookups and big-integer ANDs, whatever the number of rules.
"""

from __future__ import annotations

import bisect
import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

ACTIONS = ("allow", "deny")
BALANCES = ("failover", "round-robin")
DIRECT = "direct"  # in a rule's via: connect directly (a last resort after the parents, say)
COMMANDS = ("connect", "bind", "udp")
MAX_NAME_BYTES = 255


def unmapped(ip: IPAddress) -> IPAddress:
    """``::ffff:a.b.c.d`` is the IPv4 address it carries."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def normal_name(name: str) -> str:
    """Names compare case-insensitively and without the root's trailing dot."""
    return name.rstrip(".").lower()


def forbidden_destination(ip: IPAddress) -> str | None:
    """Addresses no rule may open, or None. Connecting to 0.0.0.0 (or ::) reaches this host
    on Linux, so an "unspecified" destination is a way around rules about 127.0.0.0/8."""
    ip = unmapped(ip)
    if ip.is_unspecified or (ip.version == 4 and ip in _THIS_NETWORK):
        return f"{ip} means this host"
    return None


_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")


def own_addresses(endpoints: Iterable[tuple[str, int]]) -> dict[int, set]:
    """port -> the addresses a proxy listening on ``endpoints`` answers there ("*" for a
    wildcard address)."""
    own: dict[int, set] = {}
    for host, port in endpoints:
        ip = unmapped(ipaddress.ip_address(host.partition("%")[0]))
        own.setdefault(port, set()).add("*" if ip.is_unspecified else ip)
    return own


def reaches_listener(own: dict[int, set], ip: IPAddress, port: int, is_local) -> bool:
    """Whether ip:port is one of these listeners (a loop through the proxy itself, which
    would eat a session per round until the fds run out). ``is_local(ip)``: whether an
    address belongs to this host, asked only for a wildcard listener."""
    addresses = own.get(port)
    if addresses is None:
        return False
    return ip in addresses or ip.is_loopback or ("*" in addresses and is_local(ip))  # RFC 1122 §3.2.1.3: "this host on this network"


# ---------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class Destination:
    """One item of a rule's ``dest`` list, parsed."""

    network: IPNetwork | None = None
    name: str | None = None        # exact name
    suffix: str | None = None      # "*.example.com" -> "example.com": its subdomains only

    @classmethod
    def parse(cls, text: str) -> Destination:
        """An IP, a network, ``name.example`` or ``*.example``; ValueError says why not."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("expected a network, a name or a *.suffix pattern")
        text = text.strip()
        try:
            return cls(network=ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            if "/" in text or _looks_numeric(text):
                raise ValueError(f"{text!r} is not a network: {exc}") from None
        if text.startswith("*."):
            return cls(suffix=_check_name(text[2:], text))
        if "*" in text:
            raise ValueError(f"{text!r}: a wildcard may only open the pattern, as in *.example.com")
        return cls(name=_check_name(text, text))

    def __str__(self) -> str:
        if self.network is not None:
            return str(self.network)
        return self.name if self.name is not None else f"*.{self.suffix}"


def _looks_numeric(text: str) -> bool:
    return all(c in "0123456789.:abcdefABCDEF" for c in text) and any(c.isdigit() for c in text) \
        and (text.count(".") == 3 or ":" in text)


def _check_name(name: str, text: str) -> str:
    name = normal_name(name)
    if not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"{text!r}: expected a host name of 1-255 bytes")
    if any(not label for label in name.split(".")):
        raise ValueError(f"{text!r}: empty label in the name")
    return name


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[rules]]`` table. An empty field matches anything."""

    action: str
    clients: tuple[IPNetwork, ...] = ()
    users: tuple[bytes, ...] = ()
    commands: tuple[str, ...] = ()
    dests: tuple[Destination, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()   # inclusive ranges
    origin: str = ""                           # "fastsocks.toml:42", for logs and explain
    via: tuple[str, ...] = ()                  # allowed: leave through these parents (names), in order
    balance: str = "failover"                  # or "round-robin": each session starts at the next one
    egress: tuple[str, ...] = ()               # allowed: connect from one of these addresses
    rate_up_bytes_per_s: int | None = None     # allowed: each session's limit (0: none; None: [limits]'s)
    rate_down_bytes_per_s: int | None = None
    user_rate_up_bytes_per_s: int | None = None     # allowed: all sessions of its user share these...
    user_rate_down_bytes_per_s: int | None = None
    client_rate_up_bytes_per_s: int | None = None   # ...and of its client address (accounts.py)
    client_rate_down_bytes_per_s: int | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action: expected one of {', '.join(ACTIONS)}")
        if any(c not in COMMANDS for c in self.commands):
            raise ValueError(f"command: expected some of {', '.join(COMMANDS)}")
        if self.balance not in BALANCES:
            raise ValueError(f"balance: expected one of {', '.join(BALANCES)}")

    @property
    def only_client(self) -> bool:
        """Decidable from the client address alone."""
        return not (self.users or self.commands or self.dests or self.ports)

    def mismatch(self, query: Query, ip: IPAddress | None) -> str | None:
        """Why this rule does not match (the plain, linear check), or None if it does.
        ``explain`` prints it; tests use it as the reference for the compiled matcher."""
        client = unmapped(query.client)
        if self.clients and not any(client in net for net in self.clients if net.version == client.version):
            return f"client {client} is not in {_list(self.clients)}"
        if self.users and query.user not in self.users:
            user = query.user.decode("utf-8", "backslashreplace") if query.user else "(none)"
            return f"user {user} is not one of {_list(u.decode('utf-8', 'backslashreplace') for u in self.users)}"
        if self.commands and query.command not in self.commands:
            return f"command {query.command} is not one of {_list(self.commands)}"
        if self.ports and not any(lo <= query.port <= hi for lo, hi in self.ports):
            return f"port {query.port} is not in {_list(_port_text(r) for r in self.ports)}"
        if self.dests and not any(_dest_matches(d, query.name, ip) for d in self.dests):
            what = query.name if ip is None else (f"{query.name} ({ip})" if query.name else str(ip))
            return f"destination {what} is not in {_list(self.dests)}"
        return None

    def describe(self) -> str:
        parts = [self.action]
        for label, values in (("client", self.clients), ("user", [u.decode("utf-8", "backslashreplace") for u in self.users]),
                              ("command", self.commands), ("dest", self.dests),
                              ("port", [_port_text(r) for r in self.ports])):
            if values:
                parts.append(f"{label}={_list(values)}")
        if len(parts) == 1:
            parts.append("everything")
        return " ".join(parts)


def _dest_matches(dest: Destination, name: str | None, ip: IPAddress | None) -> bool:
    if dest.network is not None:
        return ip is not None and ip.version == dest.network.version and ip in dest.network
    if name is None:
        return False
    if dest.name is not None:
        return name == dest.name
    return name.endswith("." + dest.suffix)


def _port_text(r: tuple[int, int]) -> str:
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def _list(values: Iterable) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


@dataclass(frozen=True, slots=True)
class Query:
    """What the session knows about a request. ``name`` is the requested domain name
    (normalised), None for an address request; the address comes separately."""

    client: IPAddress
    command: str
    port: int
    user: bytes = b""
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    rule: int | None         # index into Policy.rules; None for the default action
    origin: str              # where that rule was written, or "default"

    def __str__(self) -> str:
        word = "allowed" if self.allowed else "denied"
        if self.rule is None:
            return f"{word} by the default action"
        return f"{word} by rule #{self.rule + 1} ({self.origin})"


# ---------------------------------------------------------------------------- indexes


class _NetworkIndex:
    """Rules by network: for each prefix length in use, a dict from the network's integer
    prefix to a mask. A lookup tries each length once (at most 33 or 129 lookups, usually
    a handful), instead of every rule."""

    def __init__(self) -> None:
        self._tables: dict[tuple[int, int], dict[int, int]] = {}
        self.levels: dict[int, tuple[tuple[int, dict[int, int]], ...]] = {4: (), 6: ()}

    def add(self, net: IPNetwork, bit: int) -> None:
        table = self._tables.setdefault((net.version, net.prefixlen), {})
        shift = net.max_prefixlen - net.prefixlen
        key = int(net.network_address) >> shift
        table[key] = table.get(key, 0) | bit

    def freeze(self) -> None:
        for version, max_len in ((4, 32), (6, 128)):
            self.levels[version] = tuple((max_len - plen, table) for (v, plen), table in sorted(self._tables.items())
                                         if v == version)

    def lookup(self, ip: IPAddress) -> int:
        value = int(ip)
        mask = 0
        for shift, table in self.levels[ip.version]:
            mask |= table.get(value >> shift, 0)
        return mask


class _PortIndex:
    """Rules by port: elementary intervals between every range edge, each with the mask of
    the rules that cover it, found by bisection."""

    def __init__(self, rules: list[Rule]) -> None:
        edges: dict[int, int] = {}  # port -> mask toggled there
        for i, rule in enumerate(rules):
            for lo, hi in _merged(rule.ports):
                edges[lo] = edges.get(lo, 0) ^ (1 << i)
                edges[hi + 1] = edges.get(hi + 1, 0) ^ (1 << i)
        self.starts: list[int] = sorted(edges)
        self.masks: list[int] = []
        running = 0
        for start in self.starts:
            running ^= edges[start]  # a rule's merged ranges are disjoint: XOR adds and removes
            self.masks.append(running)

    def lookup(self, port: int) -> int:
        i = bisect.bisect_right(self.starts, port) - 1
        return self.masks[i] if i >= 0 else 0


def _merged(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _lowest_bit(mask: int) -> int:
    return (mask & -mask).bit_length() - 1


# ---------------------------------------------------------------------------- the policy


@dataclass(frozen=True, eq=False)
class Policy:
    rules: tuple[Rule, ...] = ()
    default_allow: bool = True
    _index: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._index.update(_compile(self.rules))

    def __reduce__(self):
        """Pickled as its rules; the index is compiled again where it is loaded (handover.py)."""
        return (Policy, (self.rules, self.default_allow))

    @property
    def default_origin(self) -> str:
        return "default"

    def _verdict(self, index: int | None) -> Verdict:
        if index is None:
            return Verdict(self.default_allow, None, self.default_origin)
        rule = self.rules[index]
        return Verdict(rule.action == "allow", index, rule.origin)

    # -- the three questions

    def at_accept(self, client: IPAddress) -> Verdict | None:
        """A denial from the client address alone, or None if the client may get somewhere."""
        if not self.rules:
            return None if self.default_allow else self._verdict(None)
        ix = self._index
        base = ix["any_client"] | ix["clients"].lookup(unmapped(client))
        return self._surely_denied(base, ix["only_client"])

    def for_any_destination(self, query: Query) -> Verdict | None:
        """A denial that no destination or port could change (a UDP ASSOCIATE request,
        before its datagrams name any), or None."""
        ix = self._index
        base = ((ix["any_client"] | ix["clients"].lookup(unmapped(query.client)))
                & (ix["any_user"] | ix["users"].get(query.user, 0)) & ix["commands"].get(query.command, 0))
        return self._surely_denied(base, ix["any_dest"] & ix["any_port"])

    def _surely_denied(self, base: int, sure_mask: int) -> Verdict | None:
        """``base``: rules that may match; ``sure_mask``: those of them that surely do."""
        sure = base & sure_mask
        first = _lowest_bit(sure) if sure else None
        could_allow = base & ~sure_mask & self._index["allow"]
        if could_allow and (first is None or _lowest_bit(could_allow) < first):
            return None
        verdict = self._verdict(first)
        return None if verdict.allowed else verdict

    def before_resolve(self, query: Query) -> Verdict | None:
        """A verdict for a name request that its addresses cannot change, or None."""
        if not self.rules:
            return self._verdict(None)
        ix = self._index
        base = self._base(query)
        by_name = ix["any_dest"] | self._name_mask(query.name)
        sure = base & by_name
        maybe = base & ~by_name & ix["has_network"]
        first = _lowest_bit(sure) if sure else None
        if maybe and (first is None or _lowest_bit(maybe) < first):
            return None
        return self._verdict(first)

    def decide(self, query: Query, ip: IPAddress | None = None) -> Verdict:
        """The verdict for ``query`` using the address ``ip`` (None for a name that will not
        be resolved here, as in a BIND expecting any peer)."""
        if not self.rules:
            return self._verdict(None)
        ix = self._index
        dest = ix["any_dest"] | self._name_mask(query.name)
        if ip is not None:
            dest |= ix["dests"].lookup(unmapped(ip))
        matching = self._base(query) & dest
        return self._verdict(_lowest_bit(matching) if matching else None)

    def _base(self, query: Query) -> int:
        ix = self._index
        users = ix["users"]
        return ((ix["any_client"] | ix["clients"].lookup(unmapped(query.client)))
                & (ix["any_user"] | users.get(query.user, 0))
                & ix["commands"].get(query.command, 0)
                & (ix["any_port"] | ix["ports"].lookup(query.port)))

    def _name_mask(self, name: str | None) -> int:
        if not name:
            return 0
        ix = self._index
        mask = ix["names"].get(name, 0)
        suffixes = ix["suffixes"]
        if suffixes:
            dot = name.find(".")
            while dot != -1:
                mask |= suffixes.get(name[dot + 1:], 0)
                dot = name.find(".", dot + 1)
        return mask

    def why_not(self, query: Query, ip: IPAddress | None, upto: int) -> list[tuple[int, str]]:
        """For ``explain``: why each rule before ``upto`` did not match."""
        return [(i, self.rules[i].mismatch(query, ip) or "matches") for i in range(min(upto, len(self.rules)))]


def _compile(rules: tuple[Rule, ...]) -> dict:
    clients, dests = _NetworkIndex(), _NetworkIndex()
    ix = dict(any_client=0, any_user=0, any_dest=0, any_port=0, only_client=0, allow=0, has_network=0,
              users={}, names={}, suffixes={}, commands={c: 0 for c in COMMANDS})
    for i, rule in enumerate(rules):
        bit = 1 << i
        if rule.action == "allow":
            ix["allow"] |= bit
        if rule.only_client:
            ix["only_client"] |= bit
        for net in rule.clients:
            clients.add(net, bit)
        if not rule.clients:
            ix["any_client"] |= bit
        for user in rule.users:
            ix["users"][user] = ix["users"].get(user, 0) | bit
        if not rule.users:
            ix["any_user"] |= bit
        for command in rule.commands or COMMANDS:
            ix["commands"][command] |= bit
        for dest in rule.dests:
            if dest.network is not None:
                dests.add(dest.network, bit)
                ix["has_network"] |= bit
            elif dest.name is not None:
                ix["names"][dest.name] = ix["names"].get(dest.name, 0) | bit
            else:
                ix["suffixes"][dest.suffix] = ix["suffixes"].get(dest.suffix, 0) | bit
        if not rule.dests:
            ix["any_dest"] |= bit
        if not rule.ports:
            ix["any_port"] |= bit
    clients.freeze()
    dests.freeze()
    ix.update(clients=clients, dests=dests, ports=_PortIndex(list(rules)))
    return ix


def parse_ports(text: str | int) -> tuple[int, int]:
    """``443``, ``"443"`` or ``"8000-8999"`` into an inclusive range; ValueError says why not."""
    if isinstance(text, bool):
        raise ValueError("expected a port or a range like \"8000-8999\"")
    if isinstance(text, int):
        lo = hi = text
    elif isinstance(text, str):
        lo_text, sep, hi_text = text.strip().partition("-")
        if not lo_text.strip().isdigit() or (sep and not hi_text.strip().isdigit()):
            raise ValueError(f"{text!r}: expected a port or a range like \"8000-8999\"")
        lo = int(lo_text)
        hi = int(hi_text) if sep else lo
    else:
        raise ValueError("expected a port or a range like \"8000-8999\"")
    if not (0 <= lo <= 65535 and 0 <= hi <= 65535):
        raise ValueError(f"{text!r}: ports are 0-65535")
    if lo > hi:
        raise ValueError(f"{text!r}: the range ends before it starts")
    return lo, hi
