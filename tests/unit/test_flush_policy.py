"""Flush policy: a pure function of buffered count, bytes and age (table-driven)."""

from __future__ import annotations

import pytest

from consumers.flush_policy import FlushPolicy, FlushReason, should_flush

P = FlushPolicy(max_events=100, max_bytes=1000, max_age_s=5.0)


@pytest.mark.parametrize(
    ("events", "nbytes", "age_s", "stopping", "expected"),
    [
        (0, 0, 0.0, False, None),  # nothing buffered
        (0, 0, 99.0, True, None),  # nothing to flush even when stopping
        (1, 10, 0.1, False, None),  # below every limit
        (99, 999, 4.99, False, None),  # just below every limit
        (100, 10, 0.1, False, FlushReason.EVENTS),
        (150, 10, 0.1, False, FlushReason.EVENTS),
        (5, 1000, 0.1, False, FlushReason.BYTES),
        (5, 10, 5.0, False, FlushReason.AGE),
        (100, 1000, 5.0, False, FlushReason.EVENTS),  # events win ties
        (5, 1000, 5.0, False, FlushReason.BYTES),  # then bytes
        (1, 1, 0.0, True, FlushReason.SHUTDOWN),
        (100, 1000, 5.0, True, FlushReason.SHUTDOWN),
    ],
)
def test_should_flush(events, nbytes, age_s, stopping, expected):
    assert should_flush(P, events, nbytes, age_s, stopping) is expected


@pytest.mark.parametrize("bad", [dict(max_events=0), dict(max_bytes=0), dict(max_age_s=0.0)])
def test_limits_must_be_positive(bad):
    with pytest.raises(ValueError):
        FlushPolicy(**bad)
