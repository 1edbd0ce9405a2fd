"""Windows of the ``traces`` table: what a flywheel cycle trains on, and the live figures the watchers read.

A window is a snapshot version of the table narrowed to a range of ``ingest_time``, the lake's trusted time
(when the pipeline observed each event; the serving node's ``finish_time`` is data, its clock can be
wrong): a trace is in the window of the time it arrived, whatever its node's clock said. Nothing here reads
the wall clock: a window ends 1 µs after the newest trace of its table version, so the same version always
yields the same window. Readers ask only for the columns they need. No table yet reads as an empty one.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from pydantic import BaseModel, ConfigDict

from core.settings import LakeSettings
from core.tau import tau
from schemas.arrow import TRUSTED_TIME_COLUMN, traces_table_schema

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


def read_traces(lake: LakeSettings, columns: list[str], version: int | None = None):
    """(table, rows) of the traces table at ``version`` (latest when None), only ``columns``;
    (None, no rows) while the table does not exist yet."""
    options = lake.delta_options()
    if version is None and not DeltaTable.is_deltatable(lake.traces_uri, storage_options=options):
        return None, pa.table({c: pa.array([], traces_table_schema().field(c).type) for c in columns})
    table = DeltaTable(lake.traces_uri, version=version, storage_options=options)
    return table, table.to_pyarrow_dataset().to_table(columns=columns)


def pick_window(
    lake: LakeSettings,
    minutes: float,
    min_rows: int,
    version: int | None = None,
    start: datetime | None = None,
) -> TraceWindow | None:
    """``minutes`` of traces (by ingest_time) up to the newest one at table ``version`` (or from ``start``,
    when given). None if the window holds fewer than ``min_rows`` traces.
    """
    table, rows = read_traces(lake, [TIME, "domain"], version)
    if rows.num_rows == 0:
        return None
    end = pc.max(rows[TIME]).as_py() + timedelta(microseconds=1)
    start = start.astimezone(UTC) if start is not None else end - timedelta(minutes=minutes)
    in_window = rows.filter(pc.greater_equal(rows[TIME], start))
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


def rows_at(lake: LakeSettings, version: int) -> int:
    """Rows of the table at ``version``; 0 when that version was vacuumed away (all rows count as new).
    Counts without reading a column, so a version from before a schema change counts too."""
    try:
        table = DeltaTable(lake.traces_uri, version=version, storage_options=lake.delta_options())
        return table.to_pyarrow_dataset().count_rows()
    except Exception:
        return 0


def new_window(
    lake: LakeSettings, minutes: float, min_rows: int, announced_version: int | None
) -> TraceWindow | None:
    """A window worth training on, if ``min_rows`` traces arrived since the last announced table version."""
    table, rows = read_traces(lake, [TIME])
    if table is None:
        return None
    if announced_version is not None and rows.num_rows - rows_at(lake, announced_version) < min_rows:
        return None
    return pick_window(lake, minutes, min_rows, table.version())


def live_tau_by_domain(
    lake: LakeSettings, minutes: float, drafter_version: str
) -> tuple[datetime | None, dict[str, tuple[float | None, int]]]:
    """(newest ingest_time, {domain: (tau, verify steps)}) of the last ``minutes`` of traces (by
    ingest_time) served by ``drafter_version``."""
    _, rows = read_traces(lake, [TIME, "domain", "drafter_version", "per_step_accepted"])
    if rows.num_rows == 0:
        return None, {}
    end = pc.max(rows[TIME]).as_py()
    live = rows.filter(
        pc.and_(
            pc.greater_equal(rows[TIME], end - timedelta(minutes=minutes)),
            pc.equal(rows["drafter_version"], drafter_version),
        )
    )
    out = {}
    for domain in set(live["domain"].to_pylist()):
        steps = pc.list_flatten(live.filter(pc.equal(live["domain"], domain))["per_step_accepted"])
        out[domain] = (tau(pc.sum(steps).as_py() or 0, len(steps)), len(steps))
    return end, out
