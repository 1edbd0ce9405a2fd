"""The window and drift readers open only the hours and columns they need (consumers/windows.py).

A real Delta table with an old hour and a recent one; every read goes through a filesystem that records the
files opened and the bytes read. A reader that scanned the whole table, or every column (the token lists
and ``per_step_accepted`` of every trace), would open the old hour's file and read several times the bytes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow.fs as pafs
import pytest
from deltalake import DeltaTable
from fsspec.implementations.local import LocalFileSystem
from trace_events import trace

from bench.offline_traces import lake_rows, write_traces
from consumers import windows
from core.settings import LakeSettings

NOW = datetime(2026, 3, 2, 12, 30, tzinfo=UTC)
OLD, RECENT = 40, 30


class _CountingFile:
    def __init__(self, raw, reads: list[int]):
        self._raw, self._reads = raw, reads

    def read(self, n=-1):
        data = self._raw.read(n)
        self._reads.append(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self._raw, name)


class _CountingFS(LocalFileSystem):
    """fsspec's local filesystem, recording every data file opened and every byte read from it."""

    cachable = False  # fsspec would hand back an earlier test's instance, lists and all

    def __init__(self, opened: list[str], reads: list[int]):
        super().__init__()
        self.opened_paths, self.reads = opened, reads

    def _open(self, path, mode="rb", **kwargs):
        raw = super()._open(path, mode, **kwargs)
        if path.endswith(".parquet"):
            self.opened_paths.append(path)
            return _CountingFile(raw, self.reads)
        return raw


def _prompt(i: int) -> list[int]:
    """Long prompts that do not compress: the columns a window never needs are most of each file (the
    parquet reader reads small files whole, footer and all)."""
    return [(i * 7919 + t * 104729) % 49152 for t in range(4000)]


@pytest.fixture
def lake(tmp_path):
    lake = LakeSettings(root=str(tmp_path / "lake"))
    old = NOW - timedelta(hours=3)
    records = [trace(i, finish_time_s=old.timestamp() + i, prompt_token_ids=_prompt(i)) for i in range(OLD)]
    recent = (NOW - timedelta(minutes=5)).timestamp()
    records += [
        trace(
            100 + i, finish_time_s=recent + i, prompt_token_ids=_prompt(i), domain="code", drafter_version="3"
        )
        for i in range(RECENT)
    ]
    write_traces(lake.traces_uri, lake_rows(records))  # offline rows: ingest_time = finish_time
    return lake


@pytest.fixture
def reads(lake, monkeypatch):
    """(files opened, bytes read) of every dataset the readers build from here on."""
    opened: list[str] = []
    chunks: list[int] = []
    root = lake.traces_uri

    class CountingTable(DeltaTable):
        def to_pyarrow_dataset(self, **kwargs):
            counting = pafs.PyFileSystem(pafs.FSSpecHandler(_CountingFS(opened, chunks)))
            return super().to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(root, counting), **kwargs)

    monkeypatch.setattr(windows, "DeltaTable", CountingTable)
    return opened, chunks


def _files(lake: LakeSettings) -> dict[str, int]:
    """Data file -> size, by hour partition."""
    dt = DeltaTable(lake.traces_uri)
    return {uri: dt_size for uri, dt_size in zip(dt.file_uris(), _sizes(dt), strict=True)}


def _sizes(dt: DeltaTable) -> list[int]:
    import pyarrow as pa

    return pa.table(dt.get_add_actions(flatten=True))["size_bytes"].to_pylist()


def test_a_window_reads_its_own_hour_and_two_columns(lake, reads):
    opened, chunks = reads
    files = _files(lake)
    recent = {f for f in files if f"hour={NOW.hour}" in f}
    assert len(recent) == 1 and len(files) == 2, files

    window = windows.pick_window(lake, minutes=60, min_rows=1)
    assert window is not None and window.rows == RECENT and window.domains == {"code": RECENT}
    assert {p.rsplit("/", 1)[-1] for p in opened} == {f.rsplit("/", 1)[-1] for f in recent}  # no old hour
    # two columns of one file (plus its footer): a fraction of the file, not all of it
    assert 0 < sum(chunks) < 0.5 * sum(files[f] for f in recent) * len(opened), (sum(chunks), files)

    # a start given by the run reaches back into the old hour, and only then is it read
    opened.clear()
    since = windows.pick_window(lake, 60, 1, start=NOW - timedelta(hours=4))
    assert since.rows == OLD + RECENT and len(set(opened)) == 2


def test_the_drift_check_reads_its_span_only(lake, reads):
    opened, chunks = reads
    files = _files(lake)
    end, live = windows.live_tau_by_domain(lake, 10, "3")
    assert end == NOW - timedelta(minutes=5) + timedelta(seconds=RECENT - 1)
    assert set(live) == {"code"} and live["code"][1] > 0  # verify steps of the recent traces
    assert all(f"hour={NOW.hour}" in p for p in opened), opened
    recent = sum(size for f, size in files.items() if f"hour={NOW.hour}" in f)
    assert sum(chunks) < 0.6 * recent * len(opened), (sum(chunks), recent)  # not the token lists
    assert windows.live_tau_by_domain(lake, 10, "another drafter")[1] == {}
