"""Pure helpers for the Kafka offsets kept in the Delta log (the kafka-delta-ingest scheme).

Each source partition p has a ``txn`` action with ``appId = f"{app_id}-{p}"`` whose ``version`` is the
last Kafka offset whose message is in the table (as a row or as a dead letter). It is committed in the same
Delta commit as the rows, so the table and its offsets can never disagree. delta-rs records txn actions
but does not skip a replay, so before every commit the writer checks that the log still holds exactly the
offsets this consumer last saw (``offset_mismatches``); anything else means another writer got there first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from confluent_kafka import OFFSET_BEGINNING


class OffsetMismatchError(RuntimeError):
    """The Delta log moved under us (another consumer wrote some partition): drop buffers and re-seek.

    Used as control flow, like KDI's ``AlreadyProcessedPartitionOffset``: never a crash.
    """

    def __init__(self, mismatches: dict[int, tuple[int | None, int | None]]):
        self.mismatches = mismatches  # partition -> (expected version, version in the log)
        super().__init__(
            "Delta log offsets moved: "
            + ", ".join(f"p{p}: expected {e}, log has {a}" for p, (e, a) in sorted(mismatches.items()))
        )


def txn_app_id(app_id: str, partition: int) -> str:
    return f"{app_id}-{partition}"


def seek_offset(txn_version: int | None) -> int:
    """Where to resume a partition: after the last offset in the table, or the beginning if none is."""
    return OFFSET_BEGINNING if txn_version is None else txn_version + 1


def offset_mismatches(
    expected: Mapping[int, int | None], logged: Callable[[int], int | None]
) -> dict[int, tuple[int | None, int | None]]:
    """Partitions whose logged txn version (``logged(p)``) differs from what we expect it to be."""
    out = {}
    for partition, want in expected.items():
        have = logged(partition)
        if have != want:
            out[partition] = (want, have)
    return out


def last_offsets(partitions: np.ndarray, offsets: np.ndarray) -> dict[int, int]:
    """Highest offset per partition of a batch (equal-length arrays)."""
    return {int(p): int(offsets[partitions == p].max()) for p in np.unique(partitions)}
