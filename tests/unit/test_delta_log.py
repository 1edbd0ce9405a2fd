"""Delta-log helpers for Kafka offsets (the kafka-delta-ingest txn scheme)."""

from __future__ import annotations

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING

from consumers.delta_log import OffsetMismatchError, last_offsets, offset_mismatches, seek_offset, txn_app_id


def test_txn_app_id_is_app_id_dash_partition():
    assert txn_app_id("traces-ingest", 0) == "traces-ingest-0"
    assert txn_app_id("traces-ingest", 11) == "traces-ingest-11"


@pytest.mark.parametrize(("version", "offset"), [(None, OFFSET_BEGINNING), (0, 1), (41, 42)])
def test_seek_offset_resumes_after_the_logged_offset(version, offset):
    assert seek_offset(version) == offset


@pytest.mark.parametrize(
    ("expected", "logged", "mismatches"),
    [
        ({}, {}, {}),
        ({0: None}, {}, {}),  # first commit of a partition: the log must hold nothing
        ({0: 9, 1: 4}, {0: 9, 1: 4}, {}),
        ({0: None}, {0: 3}, {0: (None, 3)}),  # someone else wrote p0 first
        ({0: 9}, {0: 12}, {0: (9, 12)}),  # another consumer moved ahead (rebalance race)
        ({0: 9}, {}, {0: (9, None)}),  # the log lost what we thought was there
        ({0: 9, 1: 4}, {0: 9, 1: 5, 2: 7}, {1: (4, 5)}),  # only the job's partitions are checked
    ],
)
def test_offset_mismatches(expected, logged, mismatches):
    assert offset_mismatches(expected, logged.get) == mismatches


def test_offset_mismatch_error_names_every_partition():
    err = OffsetMismatchError({1: (4, 5), 0: (None, 3)})
    assert "p0: expected None, log has 3" in str(err) and "p1: expected 4, log has 5" in str(err)


def test_last_offsets_per_partition():
    parts = np.array([0, 1, 0, 2, 1], dtype=np.int32)
    offs = np.array([10, 5, 12, 0, 3], dtype=np.int64)
    assert last_offsets(parts, offs) == {0: 12, 1: 5, 2: 0}
    assert last_offsets(parts[:0], offs[:0]) == {}
