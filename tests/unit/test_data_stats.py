"""Token-length statistics: exact values, nearest-rank percentiles, the histogram cut at cutoff_len."""

from __future__ import annotations

from engine.data import length_stats
from engine.data.stats import Bucket, length_histogram
from engine.data.preview import Preview, histogram_lines


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


def test_histogram_cuts_a_bucket_boundary_right_after_cutoff_len():
    assert length_histogram([5, 1, 9, 3, 7, 2, 8, 4, 6, 10], cutoff_len=7, buckets=5) == [
        Bucket(1, 1, 1, False), Bucket(2, 4, 3, False), Bucket(5, 7, 3, False), Bucket(8, 10, 3, True)]


def test_histogram_without_the_cutoff_among_the_lengths_spans_them_evenly():
    lengths = list(range(1, 101))
    assert [(b.low, b.high, b.count) for b in length_histogram(lengths, cutoff_len=1024, buckets=4)] == [
        (1, 25, 25), (26, 50, 25), (51, 75, 25), (76, 100, 25)]
    assert all(not b.over_cutoff for b in length_histogram(lengths, cutoff_len=100, buckets=4))
    assert all(b.over_cutoff for b in length_histogram(lengths, cutoff_len=0, buckets=4))


def test_histogram_keeps_to_the_bucket_count_and_counts_every_length():
    lengths = [(n * 37) % 2000 + 30 for n in range(999)]
    for cutoff_len in (10, 64, 512, 1024, 2028, 4096):
        buckets = length_histogram(lengths, cutoff_len, buckets=10)
        assert len(buckets) <= 10 and sum(b.count for b in buckets) == 999
        assert buckets[0].low == min(lengths) and buckets[-1].high == max(lengths)
        assert sum(b.count for b in buckets if b.over_cutoff) == length_stats(lengths, cutoff_len)["over_cutoff"]


def test_histogram_of_one_length_and_of_none():
    assert length_histogram([12, 12, 12], cutoff_len=8) == [Bucket(12, 12, 3, True)]
    assert length_histogram([], cutoff_len=8) == []


def test_histogram_lines_draw_eighth_block_bars_and_mark_the_cutoff_between_buckets():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 10, 10]
    preview = Preview("default", [], length_stats(lengths, 7), [], 7, length_histogram(lengths, 7, buckets=5), None)
    assert histogram_lines(preview, bar_width=8) == [
        (" 1–1  █▋       1", "within"),
        (" 2–4  ████▊    3", "within"),
        (" 5–7  ████▊    3", "within"),
        ("┄┄┄┄┄ cutoff_len 7: 5 of 12 longer ┄┄┄", "cutoff"),
        (" 8–10 ████████ 5", "over"),
    ]


def test_histogram_lines_put_the_cutoff_last_when_every_sample_fits():
    preview = Preview("default", [], length_stats([3, 4], 64), [], 64, length_histogram([3, 4], 64), None)
    assert [kind for _, kind in histogram_lines(preview)] == ["within", "within", "cutoff"]
    assert histogram_lines(Preview("default", [], length_stats([], 64), [], 64, [], None)) == []
