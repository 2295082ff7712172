"""How a decision scales with the number of rules (pytest-benchmark); a plain ``pytest``
runs it once, unmeasured.

    pytest benchmarks/test_policy_bench.py --benchmark-only --benchmark-columns=min,median,ops

10,000 rules of the shapes a large deployment writes (a client network, a destination
network or name pattern, port ranges, a few user rules) against the same rules read
linearly (``Rule.mismatch``, what explain uses and what a naive server does per request).
The request matches late (rule ~9,990) so the linear walk pays for nearly every rule.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from fastsocks.policy import Destination, Policy, Query, Rule

N_RULES = 10_000


def make_rules(n: int) -> tuple[Rule, ...]:
    rng = random.Random(7)
    rules = []
    for i in range(n - 10):
        a, b = rng.randrange(11, 200), rng.randrange(256)
        kind = i % 4
        if kind == 0:
            rules.append(Rule("deny", dests=(Destination.parse(f"{a}.{b}.0.0/16"),)))
        elif kind == 1:
            rules.append(Rule("allow", clients=(ipaddress.ip_network(f"10.{b}.{i % 256}.0/24"),),
                              dests=(Destination.parse(f"*.site{i}.test"),)))
        elif kind == 2:
            lo = rng.randrange(1024, 60000)
            rules.append(Rule("deny", ports=((lo, lo + 10),), dests=(Destination.parse(f"host{i}.test"),)))
        else:
            rules.append(Rule("allow", users=(f"user{i}".encode(),), dests=(Destination.parse(f"{a}.{b}.{i % 256}.0/24"),)))
    rules += [Rule("allow", clients=(ipaddress.ip_network("192.168.0.0/16"),), ports=((443, 443),))] * 10
    return tuple(rules)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy(make_rules(N_RULES), default_allow=False)


QUERY = Query(ipaddress.ip_address("192.168.1.2"), "connect", 443, b"", "www.example.test")
ADDRESS = ipaddress.ip_address("203.0.113.5")


def linear(policy: Policy, query: Query, ip) -> int | None:
    for i, rule in enumerate(policy.rules):
        if rule.mismatch(query, ip) is None:
            return i
    return None


@pytest.mark.benchmark(group="policy-10k")
def test_compiled_decision_10k_rules(benchmark, policy):
    verdict = benchmark(policy.decide, QUERY, ADDRESS)
    assert verdict.rule == linear(policy, QUERY, ADDRESS) == N_RULES - 10


@pytest.mark.benchmark(group="policy-10k")
def test_linear_decision_10k_rules(benchmark, policy):
    assert benchmark.pedantic(linear, args=(policy, QUERY, ADDRESS), rounds=20) == N_RULES - 10


@pytest.mark.benchmark(group="policy-10k")
def test_compiled_decision_no_rules(benchmark):
    assert benchmark(Policy().decide, QUERY, ADDRESS).allowed


@pytest.mark.benchmark(group="policy-10k")
def test_compile_10k_rules(benchmark):
    rules = make_rules(N_RULES)
    benchmark.pedantic(Policy, args=(rules,), rounds=3)
