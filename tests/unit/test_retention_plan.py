"""Retention decisions as a pure function of partitions and `now` (no waiting days)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from consumers.retention import PartitionInfo, plan_retention

NOW = datetime(2026, 1, 10, 12, 30, tzinfo=UTC)


def p(date: str, hour: int, files: int = 3) -> PartitionInfo:
    return PartitionInfo(date, hour, files, files * 100)


@pytest.mark.parametrize(
    ("partitions", "days", "expired", "compact"),
    [
        ([], 7, [], []),
        # cutoff 2026-01-03: 01-02 goes, 01-03 stays (part of it is still inside the window)
        ([p("2026-01-02", 23), p("2026-01-03", 0)], 7, [("2026-01-02", 23)], [("2026-01-03", 0)]),
        ([p("2025-12-31", 5), p("2026-01-01", 0)], 7, [("2025-12-31", 5), ("2026-01-01", 0)], []),
        # the current hour and the previous one within the grace period stay open
        ([p("2026-01-10", 12), p("2026-01-10", 11), p("2026-01-10", 10)], 7, [], [("2026-01-10", 10)]),
        # a single-file hour has nothing to compact
        ([p("2026-01-09", 3, files=1), p("2026-01-09", 4, files=2)], 7, [], [("2026-01-09", 4)]),
        # retention of one day
        ([p("2026-01-08", 0), p("2026-01-09", 0)], 1, [("2026-01-08", 0)], [("2026-01-09", 0)]),
        # late events can create future-dated partitions: never expired, never compacted while open
        ([p("2026-01-11", 0)], 7, [], []),
    ],
)
def test_plan(partitions, days, expired, compact):
    plan = plan_retention(partitions, NOW, days, grace=timedelta(minutes=35))
    assert [(x.date, x.hour) for x in plan.expired] == expired
    assert [(x.date, x.hour) for x in plan.compact] == compact


def test_cutoff_and_validation():
    assert plan_retention([], NOW, 7).cutoff_date == "2026-01-03"
    with pytest.raises(ValueError):
        plan_retention([], NOW.replace(tzinfo=None), 7)
    with pytest.raises(ValueError):
        plan_retention([], NOW, 0)
