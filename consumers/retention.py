"""Keep the ``traces`` table bounded: drop expired days, compact closed hours, vacuum, trim the log.

``plan_retention`` is pure (partitions + ``now`` in, decisions out) so it is tested without waiting days;
``apply_retention`` carries a plan out in this order:

1. delete partitions whose ``date`` is before the cutoff: a partition-only predicate, so delta-rs commits
   remove actions without rewriting a row;
2. compact every closed hour (its end + ``grace`` is past) that has several files, with the ingest's
   encodings (``lake_files.delta_writer_properties``); safe next to a streaming writer, which only appends;
3. vacuum (``dry_run=False``; delta-rs defaults to a dry run), ``full=True`` so Parquet files orphaned by
   a crash between writing and committing are reclaimed too. Files go once they are older than
   ``delta.deletedFileRetentionDuration``; ``vacuum_retention_hours`` overrides that for tests and must
   not be used below the age of an in-flight ingest file while an ingest is running;
4. checkpoint + ``cleanup_metadata``: log entries older than ``delta.logRetentionDuration`` go; the
   checkpoint keeps the txn offsets.

A day is kept while any of it is within ``retention_days``: with retention 7 at 2026-01-10 12:00 the cutoff is
2026-01-03, so at least 7 days of traces always remain. Days are days of ``ingest_time``, the lake's trusted
time (the partitions derive from it), so a row is deleted between ``retention_days`` and
``retention_days`` + 1 after the pipeline observed it, whatever the serving node's clock said.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError

from consumers.lake_files import delta_writer_properties
from core.settings import LakeSettings

log = logging.getLogger("flywheel.retention")


@dataclass(frozen=True, order=True)
class PartitionInfo:
    date: str  # YYYY-MM-DD
    hour: int
    files: int = 0
    bytes: int = 0

    @property
    def start(self) -> datetime:
        return datetime.fromisoformat(self.date).replace(hour=self.hour, tzinfo=UTC)


@dataclass(frozen=True)
class RetentionPlan:
    now: datetime
    cutoff_date: str  # partitions with date < cutoff_date are deleted
    expired: list[PartitionInfo]
    compact: list[PartitionInfo]


def plan_retention(
    partitions: list[PartitionInfo],
    now: datetime,
    retention_days: int,
    grace: timedelta = timedelta(minutes=5),
    min_files: int = 2,
) -> RetentionPlan:
    """Which partitions to delete and which closed hours to compact, as of ``now`` (timezone-aware)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    if retention_days < 1:
        raise ValueError("retention_days must be at least 1")
    cutoff = (now.astimezone(UTC) - timedelta(days=retention_days)).strftime("%Y-%m-%d")
    expired = sorted(p for p in partitions if p.date < cutoff)
    closed = [p for p in partitions if p.date >= cutoff and p.start + timedelta(hours=1) + grace <= now]
    return RetentionPlan(now, cutoff, expired, sorted(p for p in closed if p.files >= min_files))


def partitions_of(dt: DeltaTable) -> list[PartitionInfo]:
    """Live partitions with their file count and bytes, from the table's add actions."""
    actions = pa.table(dt.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return []
    groups = actions.group_by(["partition.date", "partition.hour"]).aggregate(
        [("size_bytes", "sum"), ("size_bytes", "count")]
    )
    return sorted(
        PartitionInfo(d, int(h), int(n), int(b))
        for d, h, b, n in zip(
            groups["partition.date"].to_pylist(),
            pc.cast(groups["partition.hour"], "int64").to_pylist(),
            groups["size_bytes_sum"].to_pylist(),
            groups["size_bytes_count"].to_pylist(),
            strict=True,
        )
    )


@dataclass
class RetentionReport:
    plan: RetentionPlan
    dry_run: bool
    deleted_files: int = 0
    compacted: dict[str, int] = field(default_factory=dict)  # "date/hour" -> files removed
    vacuumed: list[str] = field(default_factory=list)  # files deleted (or that would be, on a dry run)


def apply_retention(
    dt: DeltaTable,
    plan: RetentionPlan,
    *,
    dry_run: bool = False,
    vacuum_retention_hours: int | None = None,
) -> RetentionReport:
    """Carry out ``plan`` on ``dt`` (see the module docstring for the order and why)."""
    report = RetentionReport(plan, dry_run)
    if not dry_run and plan.expired:
        metrics = dt.delete(f"date < '{plan.cutoff_date}'")
        report.deleted_files = int(metrics.get("num_removed_files", 0))
    for p in plan.compact if not dry_run else []:
        metrics = dt.optimize.compact(
            partition_filters=[("date", "=", p.date), ("hour", "=", str(p.hour))],
            writer_properties=delta_writer_properties(),
        )
        report.compacted[f"{p.date}/{p.hour:02d}"] = int(metrics.get("numFilesRemoved", 0))
    report.vacuumed = dt.vacuum(
        retention_hours=vacuum_retention_hours,
        dry_run=dry_run,
        enforce_retention_duration=vacuum_retention_hours is None,
        full=True,
    )
    if not dry_run:
        dt.create_checkpoint()
        dt.cleanup_metadata()
    return report


def run_retention(
    lake: LakeSettings,
    now: datetime,
    *,
    retention_days: int | None = None,
    dry_run: bool = False,
    vacuum_retention_hours: int | None = None,
    attempts: int = 5,
) -> RetentionReport:
    """Plan and apply retention on the lake's ``traces`` table as of ``now`` (CLI and Airflow call this).
    No table yet (nothing ingested): an empty plan, nothing done. It runs next to a streaming ingest: a
    commit that loses a race with the ingest's (or a load whose log the ingest's log clean-up changed under
    it) is re-planned on the new table version and applied again (each step is idempotent), up to
    ``attempts`` times."""
    days = retention_days or lake.retention_days
    options = lake.delta_options()
    if not DeltaTable.is_deltatable(lake.traces_uri, storage_options=options):
        return RetentionReport(plan_retention([], now, days), dry_run)
    for attempt in range(1, attempts + 1):
        try:
            dt = DeltaTable(lake.traces_uri, storage_options=options)
            plan = plan_retention(partitions_of(dt), now, days)
            return apply_retention(dt, plan, dry_run=dry_run, vacuum_retention_hours=vacuum_retention_hours)
        except (CommitFailedError, FileNotFoundError) as e:
            # FileNotFoundError: a log file or checkpoint listed when the table was loaded was cleaned up
            # by the writer's log retention before it was read; the next load lists the log afresh
            if attempt == attempts:
                raise
            log.info("retention lost a race with a writer (%s); re-planning (attempt %d)", e, attempt)
    raise AssertionError("unreachable")
