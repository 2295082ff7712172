"""fastsocks bench: percentiles, medians and the merging of several processes' samples,
on data whose answers are known."""

from __future__ import annotations

import random
from array import array

import pytest

from fastsocks.bench._loadgen import sort_samples
from fastsocks.bench.shares import merge, split
from fastsocks.bench.stats import latency_summary_us, median, percentile, spread

HUNDRED = list(range(1, 101))


@pytest.mark.parametrize(("q", "expected"), [(0, 1), (1, 1), (50, 50), (90, 90), (99, 99), (99.5, 100), (100, 100)])
def test_nearest_rank_on_one_to_hundred(q, expected):
    assert percentile(HUNDRED, q) == expected


@pytest.mark.parametrize(("q", "expected"), [(5, 15), (30, 20), (40, 20), (50, 35), (100, 50)])
def test_nearest_rank_textbook_example(q, expected):
    # The worked example of the nearest-rank method: 15, 20, 35, 40, 50.
    assert percentile([15, 20, 35, 40, 50], q) == expected


def test_rank_is_exact_not_a_float_accident():
    # 0.99 * 100 is 98.99999999999999 in binary floating point: the rank must still be 99.
    assert percentile(list(range(1, 1001)), 99.9) == 999
    assert percentile(HUNDRED, 29) == 29


def test_percentile_of_one_value_and_bad_input():
    assert percentile([7], 0) == percentile([7], 50) == percentile([7], 100) == 7
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1, 2], 101)


def test_median_odd_even_and_spread():
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 3, 2]) == 2.5
    assert spread([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0}
    assert spread([]) is None


def test_latency_summary_in_microseconds():
    ns = [i * 1000 for i in HUNDRED]  # 1 .. 100 µs
    assert latency_summary_us(ns) == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    # Decimated samples: the exact maximum comes from the counters, not the samples.
    assert latency_summary_us(ns, ("p50", "max"), max_ns=250_400) == {"p50": 50.0, "max": 250.4}
    assert latency_summary_us([]) is None
    with pytest.raises(ValueError):
        latency_summary_us(ns, ("mean",))


def test_percentile_is_a_sample_and_grows_with_q():
    rng = random.Random(1928)  # seeded: the same 300 cases every run
    for _ in range(300):
        values = sorted(rng.randrange(10**9) for _ in range(rng.randint(1, 200)))
        low, high = sorted((rng.uniform(0, 100), rng.uniform(0, 100)))
        assert percentile(values, low) in values
        assert percentile(values, low) <= percentile(values, high)


def test_split_is_even_and_adds_up():
    assert split(10, 3) == [4, 3, 3]
    assert split(2, 2) == [1, 1]
    assert sum(split(1_000_003, 7)) == 1_000_003


def test_sort_samples_sorts_uint32_in_place():
    samples = array("I", [5, 4_000_000_000, 0, 7, 7, 1])
    sort_samples(samples)
    assert list(samples) == [0, 1, 5, 7, 7, 4_000_000_000]


def _share(ok, lat, t_go, t_last, errors=None, max_ns=None):
    counters = {
        "ok": ok, "ok_at_go": 0, "started": ok, "errors_at_go": 0, "bytes_up": ok, "bytes_down": ok,
        "parked": 0, "connections": 2, "latency_count": len(lat), "latency_sum_ns": sum(lat),
        "latency_samples": len(lat), "t_go_ns": t_go, "t_last_ns": t_last,
        "latency_max_ns": max_ns or max(lat), "latency_stride": 1, "errors": errors or {},
        "last_error": "timeout" if errors else None, "last_errno": 0, "last_reply": 0,
    }
    return {"counters": counters, "latencies": array("I", sorted(lat)).tobytes(), "stream_s": [float(ok)]}


def test_merging_processes_sums_counts_and_sorts_latencies():
    counters, latencies, streams = merge([
        _share(3, [30, 10, 20], t_go=100, t_last=500),
        _share(2, [25, 5], t_go=90, t_last=450, errors={"timeout": 2}, max_ns=999),
    ])
    assert counters["ok"] == 5 and counters["bytes_up"] == 5 and counters["latency_count"] == 5
    assert counters["errors"] == {"timeout": 2} and counters["last_error"] == "timeout"
    assert (counters["t_go_ns"], counters["t_last_ns"], counters["latency_max_ns"]) == (90, 500, 999)
    assert list(latencies) == [5, 10, 20, 25, 30]
    assert streams == [3.0, 2.0]


def test_merging_one_share_keeps_it_as_is():
    share = _share(3, [30, 10, 20], t_go=1, t_last=2)
    counters, latencies, _ = merge([share])
    assert counters is share["counters"] and list(latencies) == [10, 20, 30]
