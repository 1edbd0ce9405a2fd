"""Semantic checks on decoded TraceEvents: Avro-valid events that training could not use go to the DLQ.

Each rule is a pure, vectorised function of a record batch returning the rows that break it; a row's
reason is the first rule it breaks, in ``RULES`` order. Reasons are short stable codes (DLQ headers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# A serving node's clock can be wrong: its times are kept as data, whatever they say, because partitions and
# windows use the pipeline's own time (ingest_time, consumers/trace_batch.py). Only a time that no reader can
# represent is refused: Spark's timestamps, Python's datetime and Delta's statistics end at years 1 and 9999.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
TIMESTAMP_RANGE_US = (
    (datetime.min.replace(tzinfo=UTC) - _EPOCH) // _US,
    (datetime.max.replace(tzinfo=UTC) - _EPOCH) // _US + 1,
)
TIMESTAMP_FIELDS = ("arrival_time", "first_token_time", "finish_time")


@dataclass(frozen=True)
class Rule:
    reason: str
    detail: str
    broken: Callable[[pa.RecordBatch], np.ndarray]  # bool per row


def _lengths(col: pa.Array) -> np.ndarray:
    return pc.list_value_length(col).to_numpy(zero_copy_only=False)


def _items(col: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets rebased to 0, the items of this (possibly sliced) list array)."""
    offsets = col.offsets.to_numpy()
    return offsets - offsets[0], col.values.to_numpy()[offsets[0] : offsets[-1]]


def _any_per_row(offsets: np.ndarray, bad_items: np.ndarray) -> np.ndarray:
    """Rows (given by list offsets) holding at least one bad item; the common all-good case is one scan."""
    if not bad_items.any():
        return np.zeros(len(offsets) - 1, dtype=bool)
    bad_upto = np.concatenate([[0], np.cumsum(bad_items, dtype=np.int64)])
    return bad_upto[offsets[1:]] > bad_upto[offsets[:-1]]


def _rows_with_negative(col: pa.ListArray) -> np.ndarray:
    offsets, items = _items(col)
    return _any_per_row(offsets, items < 0)


def _empty_event_id(b: pa.RecordBatch) -> np.ndarray:
    return pc.equal(pc.binary_length(b["event_id"]), 0).to_numpy(zero_copy_only=False)


def _step_count_mismatch(b: pa.RecordBatch) -> np.ndarray:
    return _lengths(b["per_step_accepted"]) != _lengths(b["per_step_drafted"])


def _negative_step_count(b: pa.RecordBatch) -> np.ndarray:
    return _rows_with_negative(b["per_step_accepted"]) | _rows_with_negative(b["per_step_drafted"])


def _accepted_exceeds_drafted(b: pa.RecordBatch) -> np.ndarray:
    acc_off, acc = _items(b["per_step_accepted"])
    dr_off, dr = _items(b["per_step_drafted"])
    if np.array_equal(acc_off, dr_off):  # every row pairs its steps up: compare item by item
        return _any_per_row(acc_off, acc > dr)
    lengths = np.diff(acc_off)
    rows = np.flatnonzero(lengths == np.diff(dr_off))  # rows of unequal length break another rule
    n_items = lengths[rows]
    row_of_item = np.repeat(rows, n_items)
    item_in_row = np.arange(n_items.sum()) - np.repeat(np.cumsum(n_items) - n_items, n_items)
    bad = acc[acc_off[row_of_item] + item_in_row] > dr[dr_off[row_of_item] + item_in_row]
    out = np.zeros(len(lengths), dtype=bool)
    out[row_of_item[bad]] = True
    return out


def _negative_token_id(b: pa.RecordBatch) -> np.ndarray:
    return _rows_with_negative(b["prompt_token_ids"]) | _rows_with_negative(b["output_token_ids"])


def _timestamp_out_of_range(b: pa.RecordBatch) -> np.ndarray:
    lo, hi = TIMESTAMP_RANGE_US
    out = np.zeros(b.num_rows, dtype=bool)
    for name in TIMESTAMP_FIELDS:
        col = b[name]
        us = col.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)  # null: not out of range
        out |= (us < lo) | (us >= hi)
    return out


RULES: tuple[Rule, ...] = (
    Rule("empty-event-id", "event_id is empty", _empty_event_id),
    Rule(
        "step-count-mismatch", "per_step_accepted and per_step_drafted differ in length", _step_count_mismatch
    ),
    Rule("negative-step-count", "a per-step accepted/drafted count is negative", _negative_step_count),
    Rule(
        "accepted-exceeds-drafted", "a step accepted more tokens than it drafted", _accepted_exceeds_drafted
    ),
    Rule("negative-token-id", "a prompt or output token id is negative", _negative_token_id),
    Rule(
        "timestamp-out-of-range",
        "arrival_time, first_token_time or finish_time is outside the years 1-9999 (no reader represents it)",
        _timestamp_out_of_range,
    ),
)


def broken_rule(batch: pa.RecordBatch) -> np.ndarray:
    """Per row: index into RULES of the first rule it breaks, or -1 when the event is valid."""
    first = np.full(batch.num_rows, -1, dtype=np.int16)
    for i in reversed(range(len(RULES))):
        first[RULES[i].broken(batch)] = i
    return first
