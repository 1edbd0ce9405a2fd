"""Commit a buffered batch to Delta with its Kafka offsets, on a writer thread next to the consume loop.

One ``CommitJob`` = rows + dead letters + the last offset per partition. ``DeltaCommitter.commit`` is the
whole exactly-once step, in this order:

1. refresh the snapshot and check that the log holds, for every partition in the job, exactly the offset
   the consumer based the job on (else ``OffsetMismatchError``: someone else wrote those offsets);
2. produce and flush the dead letters (``dead_letters`` explains why before the commit);
3. write the Parquet files and commit their add actions *and* one txn per partition in a single Delta
   commit, on the snapshot checked in 1, so a concurrent commit of the same txn ids fails with
   ``CommitFailedError`` instead of writing the rows twice.

``CommitWorker`` runs jobs one at a time on its own thread (Parquet encoding and the commit release the
GIL), so the consume loop keeps decoding the next batch meanwhile. It never decides anything: results,
successes or errors, go back to the consume loop, which owns all offset bookkeeping.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable, Transaction

from consumers.dead_letters import DeadLetter, DeadLetterProducer
from consumers.delta_log import OffsetMismatchError, offset_mismatches, txn_app_id
from consumers.lake_files import write_data_files
from consumers.table import refresh
from schemas.arrow import PARTITION_COLUMNS

log = logging.getLogger("flywheel.ingest.commit")


@dataclass
class CommitJob:
    rows: list[pa.RecordBatch]
    dead_letters: list[DeadLetter]
    txns: dict[int, int]  # partition -> last offset in this job (the txn version to commit)
    expected: dict[int, int | None]  # partition -> txn version the log must hold before this commit
    nbytes: int = 0  # message bytes buffered (for stats)
    created: float = field(default_factory=time.monotonic)

    @property
    def num_rows(self) -> int:
        return sum(b.num_rows for b in self.rows)


@dataclass
class CommitResult:
    job: CommitJob
    error: BaseException | None = None
    version: int | None = None  # Delta version committed
    seconds: float = 0.0


class DeltaCommitter:
    """Owns the writer's DeltaTable snapshot (never shared with the consume loop's thread)."""

    def __init__(self, table: DeltaTable, filesystem: pafs.FileSystem, dlq: DeadLetterProducer, app_id: str):
        self.table = table
        self.filesystem = filesystem
        self.dlq = dlq
        self.app_id = app_id

    def commit(self, job: CommitJob) -> int:
        """Commit ``job`` exactly once or raise; returns the new table version."""
        refresh(self.table)
        mismatches = offset_mismatches(
            job.expected, lambda p: self.table.transaction_version(txn_app_id(self.app_id, p))
        )
        if mismatches:
            raise OffsetMismatchError(mismatches)
        self.dlq.send(job.dead_letters)
        started = time.monotonic()
        rows = pa.Table.from_batches(job.rows) if job.rows else None
        actions = []
        if rows is not None and rows.num_rows:
            actions = write_data_files(rows, self.filesystem, now_ms=int(time.time() * 1000))
        written = time.monotonic()
        txns = [Transaction(txn_app_id(self.app_id, p), v) for p, v in sorted(job.txns.items())]
        self.table.create_write_transaction(
            actions,
            "append",
            self.table.schema(),
            partition_by=PARTITION_COLUMNS,
            commit_properties=CommitProperties(
                app_transactions=txns,
                custom_metadata={
                    "flywheel.rows": job.num_rows,
                    "flywheel.dead_letters": len(job.dead_letters),
                },
            ),
        )
        refresh(self.table)
        log.debug(
            "committed v%d: %d rows, %d dead letters; parquet %.2fs, commit %.2fs",
            self.table.version(),
            job.num_rows,
            len(job.dead_letters),
            written - started,
            time.monotonic() - written,
        )
        return self.table.version()


class CommitWorker:
    """A single writer thread with a one-job hand-off: at most one commit in flight at any time."""

    def __init__(self, committer: DeltaCommitter):
        self.committer = committer
        self._jobs: queue.Queue[CommitJob | None] = queue.Queue(maxsize=1)
        self._results: queue.Queue[CommitResult] = queue.Queue()
        self.pending = 0
        self._thread = threading.Thread(target=self._run, name="flywheel-delta-writer", daemon=True)
        self._thread.start()

    def submit(self, job: CommitJob) -> None:
        if self.pending:
            raise RuntimeError("a commit is already in flight: wait_idle() first")
        self.pending += 1
        self._jobs.put(job)

    def poll(self) -> list[CommitResult]:
        """Results that are ready, without waiting."""
        out = []
        while self.pending:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                break
            self.pending -= 1
        return out

    def wait_idle(self) -> list[CommitResult]:
        """Block until nothing is in flight; returns the results collected."""
        out = []
        while self.pending:
            out.append(self._results.get())
            self.pending -= 1
        return out

    def close(self) -> list[CommitResult]:
        out = self.wait_idle()
        self._jobs.put(None)
        self._thread.join()
        return out

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            started = time.monotonic()
            try:
                version = self.committer.commit(job)
                self._results.put(CommitResult(job, None, version, time.monotonic() - started))
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the consume loop
                self._results.put(CommitResult(job, e, None, time.monotonic() - started))
