"""Token-length statistics of a dataset, to choose cutoff_len and see how many samples it would truncate."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    """Samples whose token length lies in ``low..high`` (both inclusive); ``over_cutoff``: the whole bucket is longer
    than cutoff_len, as the buckets are cut there."""

    low: int
    high: int
    count: int
    over_cutoff: bool


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


def length_histogram(lengths: list[int], cutoff_len: int, buckets: int = 10) -> list[Bucket]:
    """At most ``buckets`` equal-width buckets from the shortest length to the longest, none empty at either end.

    When cutoff_len falls among the lengths a bucket starts right after it, so each bucket lies wholly within or
    wholly over the cutoff; the first and last buckets are trimmed to the lengths that occur.
    """
    if not lengths:
        return []
    shortest, longest = min(lengths), max(lengths)
    span = longest - shortest + 1
    if shortest <= cutoff_len < longest:
        width = math.ceil(span / max(buckets - 1, 1))
        start = cutoff_len + 1 - width * math.ceil((cutoff_len + 1 - shortest) / width)
    else:
        width = math.ceil(span / buckets)
        start = shortest
    counts = [0] * math.ceil((longest - start + 1) / width)
    for length in lengths:
        counts[(length - start) // width] += 1
    return [Bucket(max(low, shortest), min(low + width - 1, longest), count, low > cutoff_len)
            for low, count in ((start + i * width, count) for i, count in enumerate(counts))]


@dataclass(frozen=True)
class Lengths:
    """Token lengths of the training samples, after truncation."""

    mean: float
    longest: int

    @classmethod
    def of(cls, lengths: list[int]) -> "Lengths":
        return cls(sum(lengths) / len(lengths), max(lengths))
