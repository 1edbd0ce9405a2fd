"""``refresh``: a snapshot refresh that lost a race with log clean-up lists the log again."""

from __future__ import annotations

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from consumers.table import refresh


def _table_at_v0_with_later_commits(tmp_path, later: int) -> tuple[DeltaTable, int]:
    uri = str(tmp_path / "t")
    write_deltalake(uri, pa.table({"a": [0]}))
    stale = DeltaTable(uri)
    for i in range(later):
        write_deltalake(uri, pa.table({"a": [i + 1]}), mode="append")
    return stale, DeltaTable(uri).version()


def _gone_then(real, times: int):
    """update_incremental that first fails as when clean-up deleted a listed entry, then works."""
    left = {"n": times}

    def update_incremental():
        if left["n"]:
            left["n"] -= 1
            raise FileNotFoundError("Object at location _delta_log/00000000000000000001.json not found")
        return real()

    return update_incremental


def test_a_log_entry_deleted_under_the_reader_is_listed_again(tmp_path):
    stale, latest = _table_at_v0_with_later_commits(tmp_path, 3)
    stale.update_incremental = _gone_then(stale.update_incremental, 2)
    assert refresh(stale) is stale
    assert stale.version() == latest == 3


def test_a_log_that_stays_unreadable_is_an_error(tmp_path):
    stale, _ = _table_at_v0_with_later_commits(tmp_path, 1)
    stale.update_incremental = _gone_then(stale.update_incremental, 10)
    with pytest.raises(FileNotFoundError):
        refresh(stale, attempts=3)
    assert stale.version() == 0
