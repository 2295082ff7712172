"""``fastsocks explain``: the policy as a dry run.

``explain`` answers what the server would answer, in the order the server asks (see
policy.py): the client at accept, the name before DNS, then every address the name
resolves to (or the ones given with ``--address``, so that no DNS query is needed), and
for the deciding rule, why each rule before it did not match.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket

from fastsocks.access import format_host
from fastsocks.commands.config_files import load
from fastsocks.policy import (COMMANDS, Query, forbidden_destination, normal_name, own_addresses,
                              reaches_listener, unmapped)
from fastsocks.settings import Settings

EXIT_ALLOWED, EXIT_DENIED, EXIT_USAGE = 0, 1, 2
MAX_REASONS = 20  # earlier rules explained, at most


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fastsocks explain",
        description="Say which rule of a configuration decides a request, and why; a dry run "
                    "that opens no connection. Exit status: 0 allowed, 1 denied, 2 usage.")
    parser.add_argument("--config", "-c", required=True, metavar="FILE")
    parser.add_argument("--client", required=True, metavar="IP", type=_ip, help="the client's address")
    parser.add_argument("--user", default="", help="SOCKS5 user name or SOCKS4 USERID (default: none)")
    parser.add_argument("--command", choices=COMMANDS, default="connect")
    parser.add_argument("--dest", required=True, metavar="HOST:PORT", type=_dest,
                        help="destination: IPv4:PORT, [IPv6]:PORT or NAME:PORT")
    parser.add_argument("--address", action="append", type=_ip, metavar="IP",
                        help="for a NAME: the addresses it resolves to (repeatable); "
                             "without it the name is resolved here")
    args = parser.parse_args(argv)
    settings = load(args.config)
    if settings is None:
        return EXIT_USAGE
    return explain(settings, args, print)


def explain(settings: Settings, args: argparse.Namespace, out) -> int:
    policy = settings.policy
    host, port = args.dest
    literal = _literal(host)
    name = None if literal is not None else normal_name(host)
    query = Query(args.client, args.command, port, args.user.encode("utf-8"), name)
    user = args.user or "(none)"
    out(f"request: client {args.client}, user {user}, {args.command} to {format_host(host)}:{port}")
    out(f"policy: {len(policy.rules)} rules, default {'allow' if policy.default_allow else 'deny'}")

    early = policy.at_accept(args.client)
    if early is not None and not early.allowed:
        out(f"at accept: client {args.client} {early}; closed before the handshake")
        _reasons(policy, query, None, early.rule, out)
        return EXIT_DENIED
    if literal is not None:
        return _judge_addresses(policy, query, [literal], out, settings)
    verdict = policy.before_resolve(query)
    if verdict is not None:
        out(f"name {name}: {verdict}, whatever it resolves to")
        out(f"  {_rule_text(policy, verdict)}")
        _reasons(policy, query, None, verdict.rule, out)
        if not verdict.allowed:
            out("verdict: denied (the name is not even resolved)")
            return EXIT_DENIED
    addresses = args.address or _resolve(host, port, out)
    if not addresses:
        out(f"verdict: denied ({name} resolves to nothing: the client would get host unreachable)")
        return EXIT_DENIED
    return _judge_addresses(policy, query, addresses, out, settings)


def _judge_addresses(policy, query: Query, addresses, out, settings: Settings) -> int:
    allowed = []
    own = own_addresses((a.host, a.port) for a in settings.listen)
    for ip in addresses:
        label = f"{ip} (IPv4-mapped {unmapped(ip)})" if unmapped(ip) != ip else str(ip)
        forbidden = forbidden_destination(ip)
        if forbidden is None and reaches_listener(own, unmapped(ip), query.port, lambda _ip: True):
            # (no probe of this host's addresses here: a wildcard listener counts all of them)
            forbidden = "that is this proxy itself"
        if forbidden is not None:
            out(f"{label}: denied, always: {forbidden}")
            continue
        verdict = policy.decide(query, ip)
        out(f"{label}: {verdict}")
        out(f"  {_rule_text(policy, verdict)}")
        _reasons(policy, query, ip, verdict.rule, out)
        if verdict.allowed:
            allowed.append(ip)
    if allowed:
        out(f"verdict: allowed; the server would connect to {', '.join(str(ip) for ip in allowed)}")
        return EXIT_ALLOWED
    out("verdict: denied (SOCKS5 reply 0x02, SOCKS4 0x5B)")
    return EXIT_DENIED


def _rule_text(policy, verdict) -> str:
    if verdict.rule is None:
        return "no rule matched: default " + ("allow" if policy.default_allow else "deny")
    return f"rule #{verdict.rule + 1}: {policy.rules[verdict.rule].describe()}"


def _reasons(policy, query: Query, ip, upto: int | None, out) -> None:
    upto = len(policy.rules) if upto is None else upto
    reasons = policy.why_not(query, ip, min(upto, MAX_REASONS))
    for i, why in reasons:
        out(f"    rule #{i + 1} ({policy.rules[i].origin}) skipped: {why}")
    if upto > MAX_REASONS:
        out(f"    ... and {upto - MAX_REASONS} more rules skipped")


def _resolve(host: str, port: int, out) -> list:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        out(f"{host}: cannot resolve: {exc}")
        return []
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].partition("%")[0]) for info in infos))
    out(f"{host} resolves to {', '.join(str(a) for a in addresses)}")
    return addresses


def _ip(text: str):
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _dest(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT, [IPv6]:PORT")
    return host.strip("[]"), int(port)


def _literal(host: str):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
