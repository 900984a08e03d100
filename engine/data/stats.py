"""Token-length statistics of a dataset, to choose cutoff_len and see how many samples it would truncate."""

from __future__ import annotations

import math


def length_stats(lengths: list[int], cutoff_len: int) -> dict:
    """count, mean, p50, p95, max and over_cutoff (lengths > cutoff_len); percentiles by nearest rank, so each is
    a length that occurs."""
    if not lengths:
        return {"count": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0, "over_cutoff": 0}
    ordered = sorted(lengths)
    return {
        "count": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "p50": _percentile(ordered, 50),
        "p95": _percentile(ordered, 95),
        "max": ordered[-1],
        "over_cutoff": sum(length > cutoff_len for length in ordered),
    }


def _percentile(ordered: list[int], percent: int) -> int:
    return ordered[max(math.ceil(percent / 100 * len(ordered)), 1) - 1]
