"""Statistics of a finished run. Pure.

Percentiles are nearest-rank: the smallest sample that at least q% of the samples do not
exceed. The answer is always a latency that was observed, never an interpolation between
two, which is how latency tools (wrk, HdrHistogram) report them. The rank is computed in
exact arithmetic, so p99 of 100 samples is the 99th, not the 100th by a rounding error.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from fractions import Fraction

LATENCY_KEYS = ("p50", "p90", "p99", "max")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values; q in [0, 100]."""
    if not sorted_values:
        raise ValueError("no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0-100")
    rank = math.ceil(Fraction(str(q)) * len(sorted_values) / 100)
    return sorted_values[max(rank, 1) - 1]


def median(values: Sequence[float]) -> float:
    """The middle value; the mean of the two middle ones for an even count."""
    if not values:
        raise ValueError("no values")
    return statistics.median(values)


def spread(values: Sequence[float]) -> dict[str, float] | None:
    """{"min", "median", "max"}, or None without values."""
    if not values:
        return None
    return {"min": min(values), "median": median(values), "max": max(values)}


def latency_summary_us(sorted_ns: Sequence[int], keys: Sequence[str] = LATENCY_KEYS,
                       max_ns: int | None = None) -> dict[str, float] | None:
    """Percentiles ("p50", "p99.9", ...) and "max" of sorted nanosecond samples, in µs
    rounded to 0.1. ``max_ns`` is the exact maximum when the samples were decimated."""
    if not sorted_ns:
        return None
    out = {}
    for key in keys:
        if key == "max":
            value = max_ns if max_ns is not None else sorted_ns[-1]
        elif key.startswith("p"):
            value = percentile(sorted_ns, float(key[1:]))
        else:
            raise ValueError(f"unknown latency statistic {key!r}")
        out[key] = round(value / 1000, 1)
    return out
