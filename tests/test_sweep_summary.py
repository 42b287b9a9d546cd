"""benchmarks/sweep.py's per-group summary: the ratios' range, the points over 1 (a tie at 1.0 is not
over) and the longest point."""

from __future__ import annotations

from benchmarks import sweep


def point(length: int, seconds: float, rss: float) -> dict:
    summary = {"ortseq-int8": dict(seconds=seconds, peak_rss_mb=rss), "ct2-int8": dict(seconds=1.0, peak_rss_mb=100.0)}
    ratios = dict(seconds=seconds, peak_rss_mb=rss / 100.0)
    return dict(precision="int8", mode="greedy", batch=1, length=length, new_tokens=16, systems=list(summary),
                summary=summary, ratios=ratios)  # fmt: skip


def test_the_summary_gives_each_groups_range_its_points_over_1_and_its_longest_point():
    lines = sweep.group_summary(
        [point(1024, 0.5, 90.0), point(64, 1.2, 99.0), point(256, 0.8, 95.0), point(512, 1.0, 100.0)]
    )
    assert (
        lines[2] == "| int8 | greedy | 1 | 0.50 – 1.20 (1) | 0.90 – 1.00 | 0.50 / 1.00 s at 1024 in, 16 out, 90 / 100 |"
    )
