"""Compact each closed hour of ``traces`` as it closes, next to the live ingest.

The ingest commits every few seconds, one small Parquet file per commit and hour partition: the live hour
holds dozens to hundreds of files, and each small file costs a footer, its own dictionary pages and a
log entry (the last full demo held 13.3 bytes/token live in 175 files against 0.86 once compacted; on an
object store every file is also a request). The daily ``trace_maintenance`` compaction leaves a day of
that behind, so the ingest compacts an hour itself once it is closed (its end + ``grace`` passed on the
ingest's clock): the live table stays near the compacted size, and only the open hour is fragmented.

A pass runs on its own thread with its own table handle, so the consume loop never waits for it; only
closed hours are rewritten, which the ingest no longer appends to (``ingest_time`` is the broker's append
time), so the compaction's rewrite and the ingest's appends never conflict. A pass that loses a commit race
(another compaction, retention) is logged and left to the next one. The plan is retention's
(``plan_retention``): the same closed-hour rule and file threshold.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError

from consumers.lake_files import delta_writer_properties
from consumers.retention import partitions_of, plan_retention
from core.settings import LakeSettings

log = logging.getLogger("flywheel.ingest.compaction")


class HourCompactor:
    def __init__(
        self, lake: LakeSettings, clock: Callable[[], float], grace: timedelta = timedelta(minutes=5)
    ):
        self.lake = lake
        self.clock = clock
        self.grace = grace
        self.passes = 0
        self.files_removed = 0
        self.failures = 0
        self._compacted_through: int | None = None  # hours since the epoch, last closed hour handled
        self._thread: threading.Thread | None = None

    def after_commit(self) -> None:
        """Called by the ingest after each successful commit: start a pass when an hour closed since the
        last one (at most one pass at a time; a busy pass makes this a no-op)."""
        now = self.clock()
        closed_through = int((now - self.grace.total_seconds()) // 3600) - 1
        if self._compacted_through is not None and closed_through <= self._compacted_through:
            return
        if self._thread is not None and self._thread.is_alive():
            return
        self._compacted_through = closed_through
        self._thread = threading.Thread(
            target=self._pass, args=(now,), name="flywheel-hour-compaction", daemon=True
        )
        self._thread.start()

    def close(self, timeout_s: float = 600) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _pass(self, now_s: float) -> None:
        try:
            dt = DeltaTable(self.lake.traces_uri, storage_options=self.lake.delta_options())
            now = datetime.fromtimestamp(now_s, UTC)
            plan = plan_retention(partitions_of(dt), now, self.lake.retention_days, grace=self.grace)
            for p in plan.compact:
                metrics = dt.optimize.compact(
                    partition_filters=[("date", "=", p.date), ("hour", "=", str(p.hour))],
                    writer_properties=delta_writer_properties(),
                )
                removed = int(metrics.get("numFilesRemoved", 0))
                self.files_removed += removed
                log.info("compacted closed hour %s/%02d: %d files into one", p.date, p.hour, removed)
            self.passes += 1
        except CommitFailedError as e:
            self.failures += 1
            self._compacted_through = None  # the next commit tries again
            log.info("hour compaction lost a commit race (%s); the next pass retries", e)
        except Exception:  # never takes the ingest down: the daily maintenance compacts what is left
            self.failures += 1
            self._compacted_through = None
            log.exception("hour compaction failed; the next pass retries")
