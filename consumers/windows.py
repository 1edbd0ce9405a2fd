"""Windows of the ``traces`` table: what a flywheel cycle trains on, and the live figures the watchers read.

A window is a snapshot version of the table narrowed to a range of ``ingest_time``, the lake's trusted time
(when the pipeline observed each event; the serving node's ``finish_time`` is data, its clock can be
wrong): a trace is in the window of the time it arrived, whatever its node's clock said. Nothing here reads
the wall clock: a window ends 1 µs after the newest trace of its table version, so the same version always
yields the same window. Readers open only the (date, hour) partitions their span can be in and only the
columns they use: the newest trace is found in the newest partition alone, and a window or a drift check
reads its own hours (tests/integration/test_retention.py counts the bytes). No table yet reads as none.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from pydantic import BaseModel, ConfigDict

from core.settings import LakeSettings
from core.tau import tau
from schemas.arrow import TRUSTED_TIME_COLUMN

TIME = TRUSTED_TIME_COLUMN  # the column every window, live figure and retention decision uses
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class TraceWindow(BaseModel):
    """The contract between the window, train and evaluate steps (one XCom value in the DAG)."""

    model_config = ConfigDict(frozen=True)

    key: str  # stable id: table version + time range; a cycle is keyed on it (retries never train twice)
    table: str | None = None
    version: int | None = None
    start: datetime | None = None
    end: datetime | None = None
    rows: int | None = None
    domains: dict[str, int] = {}  # traces per domain label ("unlabelled" for none)


def _micros(ts: datetime) -> int:
    return int((ts - EPOCH) / timedelta(microseconds=1))


def open_traces(lake: LakeSettings, version: int | None = None) -> DeltaTable | None:
    """The traces table at ``version`` (latest when None); None while it does not exist yet."""
    options = lake.delta_options()
    if version is None and not DeltaTable.is_deltatable(lake.traces_uri, storage_options=options):
        return None
    return DeltaTable(lake.traces_uri, version=version, storage_options=options)


def _hours_since(start: datetime) -> pc.Expression:
    """The (date, hour) partitions that can hold an ingest_time at or after ``start`` (partition pruning:
    the dataset never opens a file of an older hour)."""
    start = start.astimezone(UTC)
    day, date, hour = start.strftime("%Y-%m-%d"), pc.field("date"), pc.field("hour")
    return (date > day) | ((date == day) & (hour >= start.hour))


def newest_time(table: DeltaTable) -> datetime | None:
    """The newest ingest_time in ``table``: only its newest (date, hour) partition is read, one column (the
    partition is ingest_time's own hour, so the newest trace is in it). None for an empty table."""
    files = pa.table(table.get_add_actions(flatten=True))
    if files.num_rows == 0:
        return None
    newest = max(zip(files["partition.date"].to_pylist(), files["partition.hour"].to_pylist(), strict=True))
    where = (pc.field("date") == newest[0]) & (pc.field("hour") == int(newest[1]))
    times = table.to_pyarrow_dataset().to_table(columns=[TIME], filter=where)[TIME]
    return pc.max(times).as_py() if len(times) else None


def read_since(
    table: DeltaTable, columns: list[str], start: datetime, where: pc.Expression | None = None
) -> pa.Table:
    """``columns`` of the rows with ingest_time >= ``start`` (and ``where``), reading only the partitions
    and columns that can hold them."""
    start = start.astimezone(UTC)
    keep = _hours_since(start) & (pc.field(TIME) >= pa.scalar(start, pa.timestamp("us", tz="UTC")))
    if where is not None:
        keep &= where
    return table.to_pyarrow_dataset().to_table(columns=columns, filter=keep)


def pick_window(
    lake: LakeSettings,
    minutes: float,
    min_rows: int,
    version: int | None = None,
    start: datetime | None = None,
) -> TraceWindow | None:
    """``minutes`` of traces (by ingest_time) up to the newest one at table ``version`` (or from ``start``,
    when given). None if the window holds fewer than ``min_rows`` traces. Reads the ingest_time and domain
    of the window's hours only.
    """
    table = open_traces(lake, version)
    newest = newest_time(table) if table is not None else None
    if newest is None:
        return None
    end = newest + timedelta(microseconds=1)
    start = start.astimezone(UTC) if start is not None else end - timedelta(minutes=minutes)
    in_window = read_since(table, [TIME, "domain"], start)
    if in_window.num_rows < min_rows:
        return None
    counts = {
        d["values"] or "unlabelled": d["counts"] for d in pc.value_counts(in_window["domain"]).to_pylist()
    }
    v = table.version()
    return TraceWindow(
        key=f"v{v}-{_micros(start)}-{_micros(end)}",
        table=lake.traces_uri,
        version=v,
        start=start,
        end=end,
        rows=in_window.num_rows,
        domains=counts,
    )


def live_tau_by_domain(
    lake: LakeSettings, minutes: float, drafter_version: str
) -> tuple[datetime | None, dict[str, tuple[float | None, int]]]:
    """(newest ingest_time, {domain: (tau, verify steps)}) of the last ``minutes`` of traces (by
    ingest_time) served by ``drafter_version``: the hours of that span only, four columns."""
    table = open_traces(lake)
    end = newest_time(table) if table is not None else None
    if end is None:
        return None, {}
    live = read_since(
        table,
        ["domain", "per_step_accepted"],
        end - timedelta(minutes=minutes),
        pc.field("drafter_version") == drafter_version,
    )
    out = {}
    for domain in set(live["domain"].to_pylist()):
        steps = pc.list_flatten(live.filter(pc.equal(live["domain"], domain))["per_step_accepted"])
        out[domain] = (tau(pc.sum(steps).as_py() or 0, len(steps)), len(steps))
    return end, out
