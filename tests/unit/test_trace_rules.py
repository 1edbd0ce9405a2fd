"""Semantic rules on decoded TraceEvents: each rule fires on exactly the rows that break it (table-driven)."""

from __future__ import annotations

import pyarrow as pa
import pytest
from trace_events import trace

from consumers.trace_rules import RULES, broken_rule
from schemas.arrow import arrow_schema
from schemas.registry import TRACE_EVENT


def batch(*records: dict) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(list(records), schema=arrow_schema(TRACE_EVENT))


def reasons(b: pa.RecordBatch) -> list[str | None]:
    return [None if i < 0 else RULES[i].reason for i in broken_rule(b)]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({}, None),
        ({"per_step_accepted": [], "per_step_drafted": []}, None),  # no speculation
        ({"per_step_accepted": [3, 0], "per_step_drafted": [3, 3]}, None),  # accepted == drafted is fine
        ({"event_id": ""}, "empty-event-id"),
        ({"per_step_accepted": [1], "per_step_drafted": [3, 3]}, "step-count-mismatch"),
        ({"per_step_accepted": [1, -1], "per_step_drafted": [3, 3]}, "negative-step-count"),
        ({"per_step_accepted": [1, 1], "per_step_drafted": [3, -3]}, "negative-step-count"),
        ({"per_step_accepted": [1, 4], "per_step_drafted": [3, 3]}, "accepted-exceeds-drafted"),
        ({"prompt_token_ids": [1, 2, -1]}, "negative-token-id"),
        ({"output_token_ids": [-(2**31)]}, "negative-token-id"),
        # a node's wrong clock is data, not a reason: partitions use the pipeline's time (ingest_time)
        ({"finish_time": 0}, None),  # 1970
        ({"finish_time": 915_148_800_000_000}, None),  # 1999
        ({"finish_time": 7_258_118_400_000_000}, None),  # 2200
        ({"arrival_time": 4_070_908_800_000_000, "first_token_time": None}, None),  # 2099
        # only what no reader can represent: years outside 1-9999
        ({"finish_time": 253_402_300_800_000_000}, "timestamp-out-of-range"),  # 10000-01-01
        ({"finish_time": 253_402_300_799_999_999}, None),  # the last microsecond of 9999
        ({"arrival_time": -62_135_596_800_000_001}, "timestamp-out-of-range"),  # before 0001-01-01
        ({"first_token_time": 2**62}, "timestamp-out-of-range"),
        ({"event_id": "", "prompt_token_ids": [-1]}, "empty-event-id"),  # first rule in RULES order wins
    ],
)
def test_rule(overrides, reason):
    assert reasons(batch(trace(7, **overrides))) == [reason]


def test_rules_work_row_by_row_on_sliced_batches():
    rows = [
        trace(0),
        trace(1, per_step_accepted=[2, 3, 4], per_step_drafted=[3, 3, 3]),
        trace(2, per_step_accepted=[1], per_step_drafted=[1, 1]),
        trace(3),
        trace(4, output_token_ids=[5, -5]),
        trace(5),
    ]
    full = batch(*rows)
    assert reasons(full) == [
        None,
        "accepted-exceeds-drafted",
        "step-count-mismatch",
        None,
        "negative-token-id",
        None,
    ]
    assert reasons(full.slice(1, 4)) == [
        "accepted-exceeds-drafted",
        "step-count-mismatch",
        None,
        "negative-token-id",
    ]
    assert reasons(full.slice(3, 3)) == [None, "negative-token-id", None]


def test_reasons_are_unique_short_codes():
    codes = [r.reason for r in RULES]
    assert len(set(codes)) == len(codes)
    assert all(c == c.lower() and " " not in c and len(c) <= 32 for c in codes)
