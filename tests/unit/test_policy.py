"""The rules: first match, names vs resolved addresses, IPv4-mapped, and the compiled
matcher checked against the plain linear reading of each rule (Rule.mismatch)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsocks.policy import (Destination, Policy, Query, Rule, forbidden_destination, parse_ports,
                              unmapped)

ip = ipaddress.ip_address
net = ipaddress.ip_network


def rule(action="allow", clients=(), users=(), commands=(), dests=(), ports=(), origin=""):
    return Rule(action, tuple(net(c) for c in clients), tuple(u.encode() for u in users), tuple(commands),
                tuple(Destination.parse(d) for d in dests), tuple(parse_ports(p) for p in ports), origin)


def q(client="10.0.0.1", command="connect", port=443, user="", name=None):
    return Query(ip(client), command, port, user.encode(), name)


EXAMPLE = Policy((
    rule("deny", dests=["127.0.0.0/8", "::1/128", "169.254.169.254/32"], origin="f:1"),
    rule("deny", clients=["192.0.2.0/24"], origin="f:2"),
    rule("allow", users=["alice"], origin="f:3"),
    rule("allow", clients=["10.0.0.0/8"], commands=["connect"], dests=["*.example.com", "example.org"],
         ports=["443", "8000-8999"], origin="f:4"),
    rule("deny", dests=["evil.example"], origin="f:5"),
    rule("allow", clients=["10.0.0.0/8"], dests=["203.0.113.0/24"], origin="f:6"),
), default_allow=False)


@pytest.mark.parametrize("query, address, expected", [
    (q(name="www.example.com"), "198.51.100.7", 3),       # name rule, any address but denied nets
    (q(name="www.example.com"), "127.0.0.1", 0),          # the name resolved into 127/8: denied
    (q(name="localhost"), "127.0.0.1", 0),                # localhost is 127.0.0.1
    (q(), "::ffff:127.0.0.1", 0),                         # IPv4-mapped is unmapped
    (q(), "::1", 0),
    (q(name="example.com"), "198.51.100.7", None),        # *.example.com: subdomains only
    (q(name="EXAMPLE.ORG."), None, None),                 # names are normalised by the session, not here
    (q(name="example.org"), "198.51.100.7", 3),
    (q(name="example.org", port=8080), "198.51.100.7", 3),
    (q(name="example.org", port=9000), "198.51.100.7", None),
    (q(name="example.org", command="bind"), "198.51.100.7", None),
    (q(client="192.0.2.9", user="alice"), "198.51.100.7", 1),  # the client deny comes first
    (q(user="alice"), "198.51.100.7", 2),
    (q(user="alice"), "169.254.169.254", 0),
    (q(name="evil.example"), "203.0.113.5", 4),
    (q(), "203.0.113.5", 5),
    (q(client="::ffff:10.1.2.3"), "203.0.113.5", 5),      # a mapped client is its IPv4 address
    (q(client="11.0.0.1"), "203.0.113.5", None),
])
def test_first_matching_rule_decides(query, address, expected):
    verdict = EXAMPLE.decide(query, ip(address) if address else None)
    assert verdict.rule == expected
    assert verdict.allowed == (EXAMPLE.rules[expected].action == "allow" if expected is not None else False)


def test_verdict_names_the_rule_and_where_it_was_written():
    assert str(EXAMPLE.decide(q(), ip("127.0.0.1"))) == "denied by rule #1 (f:1)"
    assert str(EXAMPLE.decide(q(client="11.0.0.1"), ip("198.51.100.1"))) == "denied by the default action"


def test_at_accept_denies_only_a_client_that_every_path_denies():
    assert EXAMPLE.at_accept(ip("192.0.2.1")).rule == 1
    assert EXAMPLE.at_accept(ip("10.0.0.1")) is None      # may be allowed by rules 4 and 6
    assert EXAMPLE.at_accept(ip("11.0.0.1")) is None      # alice (rule 3) may log in from anywhere
    only_lan = Policy((rule("allow", clients=["10.0.0.0/8"]),), default_allow=False)
    assert only_lan.at_accept(ip("11.0.0.1")) is not None
    assert only_lan.at_accept(ip("10.9.9.9")) is None


def test_before_resolve_spares_dns_only_when_no_address_could_change_the_verdict():
    assert EXAMPLE.before_resolve(q(name="www.example.com")) is None  # rule 1 is about addresses
    names_first = Policy((rule("deny", dests=["*.bad.test"]), rule("deny", dests=["10.0.0.0/8"]),
                          rule("allow")))
    assert names_first.before_resolve(q(name="x.bad.test")).rule == 0
    assert names_first.before_resolve(q(name="good.test")) is None


def test_for_any_destination_refuses_udp_only_when_no_rule_could_allow_it():
    no_udp = Policy((rule("allow", commands=["connect"]),), default_allow=False)
    assert no_udp.for_any_destination(q(command="udp")) is not None
    some_udp = Policy((rule("allow", commands=["udp"], dests=["10.0.0.0/8"]),), default_allow=False)
    assert some_udp.for_any_destination(q(command="udp")) is None


def test_no_rules_allows_everything_and_a_deny_default_nothing():
    assert Policy().decide(q(), ip("10.0.0.1")).allowed
    assert not Policy((), default_allow=False).decide(q(), ip("10.0.0.1")).allowed


@pytest.mark.parametrize("address, forbidden", [
    ("0.0.0.0", True), ("0.1.2.3", True), ("::", True), ("::ffff:0.0.0.0", True),
    ("127.0.0.1", False), ("10.0.0.1", False), ("::1", False),
])
def test_this_host_addresses_are_never_destinations(address, forbidden):
    assert (forbidden_destination(ip(address)) is not None) == forbidden


@pytest.mark.parametrize("text, error", [
    ("10.0.0.1/8", "is not a network"),
    ("300.1.1.1", "is not a network"),
    ("a.*.example.com", "a wildcard may only open the pattern"),
    ("", "expected a network, a name or a *.suffix pattern"),
    ("a..b", "empty label"),
])
def test_bad_destinations_say_why(text, error):
    with pytest.raises(ValueError, match=error.replace("*", r"\*")):
        Destination.parse(text)


@pytest.mark.parametrize("text, expected", [(443, (443, 443)), ("443", (443, 443)), ("8000-8999", (8000, 8999))])
def test_ports(text, expected):
    assert parse_ports(text) == expected


@pytest.mark.parametrize("text, error", [("70000", "0-65535"), ("9-1", "ends before"), ("x", "expected a port"),
                                         (True, "expected a port")])
def test_bad_ports(text, error):
    with pytest.raises(ValueError, match=error):
        parse_ports(text)


# ---------------------------------------------------------------- compiled == linear

ADDRESSES = ["10.0.0.1", "10.1.2.3", "127.0.0.1", "192.0.2.7", "203.0.113.9", "::1", "2001:db8::5",
             "::ffff:10.0.0.1"]
NETWORKS = ["10.0.0.0/8", "10.1.0.0/16", "127.0.0.0/8", "192.0.2.0/24", "0.0.0.0/0", "::/0",
            "2001:db8::/32", "::1/128", "203.0.113.9/32"]
NAMES = ["a.test", "b.a.test", "c.test", "x.b.a.test"]
PATTERNS = ["a.test", "*.a.test", "*.test", "c.test"]

rules_st = st.lists(st.builds(
    rule,
    action=st.sampled_from(["allow", "deny"]),
    clients=st.lists(st.sampled_from(NETWORKS), max_size=2, unique=True),
    users=st.lists(st.sampled_from(["alice", "bob"]), max_size=1),
    commands=st.lists(st.sampled_from(["connect", "bind", "udp"]), max_size=2, unique=True),
    dests=st.lists(st.sampled_from(NETWORKS + PATTERNS), max_size=3, unique=True),
    ports=st.lists(st.sampled_from(["80", "443", "1-1024", "8000-8999", "443-8080"]), max_size=2),
), max_size=12)
query_st = st.builds(q, client=st.sampled_from(ADDRESSES), command=st.sampled_from(["connect", "bind", "udp"]),
                     port=st.sampled_from([22, 80, 443, 1024, 1025, 8080, 8500, 9000]),
                     user=st.sampled_from(["", "alice", "bob"]), name=st.sampled_from([None] + NAMES))


def reference(policy: Policy, query: Query, address) -> int | None:
    for i, r in enumerate(policy.rules):
        if r.mismatch(query, unmapped(address) if address is not None else None) is None:
            return i
    return None


@settings(max_examples=400, deadline=None)
@given(rules=rules_st, query=query_st, address=st.sampled_from([None] + ADDRESSES), default=st.booleans())
def test_compiled_matcher_agrees_with_the_linear_reading(rules, query, address, default):
    policy = Policy(tuple(rules), default_allow=default)
    address = ip(address) if address else None
    assert policy.decide(query, address).rule == reference(policy, query, address)


@settings(max_examples=300, deadline=None)
@given(rules=rules_st, query=query_st, default=st.booleans())
def test_early_answers_never_contradict_the_full_one(rules, query, default):
    policy = Policy(tuple(rules), default_allow=default)
    early = policy.before_resolve(query) if query.name else None
    at_accept = policy.at_accept(query.client)
    any_dest = policy.for_any_destination(query)
    for address in ADDRESSES:
        full = policy.decide(query, ip(address))
        if early is not None:
            assert early.allowed == full.allowed and early.rule == full.rule
        if at_accept is not None:
            assert not full.allowed
        if any_dest is not None:
            assert not full.allowed
