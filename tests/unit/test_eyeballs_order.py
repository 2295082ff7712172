"""eyeballs.order: RFC 8305 §4's interleaving of the resolver's addresses, IPv6 first."""

from __future__ import annotations

import socket

from fastsocks.eyeballs import order

V6 = [(socket.AF_INET6, (f"2001:db8::{i}", 80, 0, 0)) for i in range(1, 4)]
V4 = [(socket.AF_INET, (f"192.0.2.{i}", 80)) for i in range(1, 3)]


def test_families_alternate_from_ipv6_and_each_keeps_its_order():
    assert order(V4 + V6) == [V6[0], V4[0], V6[1], V4[1], V6[2]]


def test_one_family_or_one_address_stays_as_it_is():
    assert order(V4) == V4 and order(V6[:1]) == V6[:1] and order([]) == []


def test_more_ipv4_than_ipv6():
    assert order(V4 + V6[:1]) == [V6[0], V4[0], V4[1]]
