"""Token-length statistics: exact values, nearest-rank percentiles."""

from __future__ import annotations

from engine.data import length_stats


def test_length_stats_exact_values():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10]
    assert length_stats(lengths, cutoff_len=7) == {
        "count": 10, "mean": 5.5, "p50": 5, "p95": 10, "max": 10, "over_cutoff": 3}


def test_length_equal_to_cutoff_is_not_over_it():
    assert length_stats([4, 4, 4], cutoff_len=4)["over_cutoff"] == 0


def test_percentiles_on_a_long_list_use_nearest_rank():
    stats = length_stats(list(range(1, 101)), cutoff_len=90)
    assert (stats["p50"], stats["p95"], stats["max"], stats["over_cutoff"]) == (50, 95, 100, 10)
    assert stats["mean"] == 50.5


def test_single_length_and_empty_list():
    assert length_stats([12], cutoff_len=8) == {
        "count": 1, "mean": 12.0, "p50": 12, "p95": 12, "max": 12, "over_cutoff": 1}
    assert length_stats([], cutoff_len=8) == {
        "count": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0, "over_cutoff": 0}
