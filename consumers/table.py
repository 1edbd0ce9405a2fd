"""The Delta table ``traces``: created on first use with documented properties, schema checked on open.

The schema is never written by hand: it is ``schemas.arrow.traces_table_schema()`` (Avro TraceEvent + lake
columns). Delta's type system maps every column of it back to the identical Arrow type (int -> integer,
long -> long, float -> float, string -> string, timestamp[us, UTC] -> timestamp, list<int32 not null> ->
array<integer, containsNull=false>), so the check compares names, types and nullability with no
normalisation; field docs travel as Delta column metadata.

A table written before the lake had ``ingest_time`` (partitioned by the node's ``finish_time``) is rewritten
once, on open, by ``migrate_to_ingest_time`` (docs/data-contract.md, "Migration").

The table follows the TraceEvent schema forward: a newer version adds fields with defaults (the BACKWARD
promise), and a consumer upgraded to it adds them to the table on open as nullable columns
(``add_new_columns``), so rows written before read as null. Column order does not matter (Delta and every
reader match columns by name); a column that changed type or that a newer schema removed is an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import CommitFailedError, DeltaError

from consumers.lake_files import STATS_COLUMNS, write_data_files
from consumers.trace_batch import lake_columns
from core.settings import LakeSettings
from schemas.arrow import PARTITION_COLUMNS, TRUSTED_TIME_COLUMN, traces_table_schema

log = logging.getLogger("flywheel.table")

# Why each property (all are Delta protocol properties; delta-rs and Spark honour them):
TABLE_PROPERTIES: dict[str, str] = {
    # Log entries (and the time travel they allow) are kept a week, then dropped when a checkpoint is
    # written; checkpoints keep the txn offsets, so dropping old log entries never loses them.
    "delta.logRetentionDuration": "interval 7 days",
    # Files removed by retention or compaction stay on disk two days before vacuum deletes them, so a reader
    # (trainer, Spark) still on an older snapshot finishes its scan. Bounds the storage overhead of
    # compaction to ~2 days of data. Time travel to data files is therefore guaranteed for 2 days.
    "delta.deletedFileRetentionDuration": "interval 2 days",
    # A checkpoint every 100 commits (delta-rs' default, made explicit): the ingest commits every few
    # seconds, so opening the table replays at most 100 small JSON entries.
    "delta.checkpointInterval": "100",
    "delta.enableExpiredLogCleanup": "true",
    # Stats only where readers filter (time range, source offsets); never on the token lists.
    "delta.dataSkippingStatsColumns": ",".join(STATS_COLUMNS),
    # Compaction target: one file per closed hour at today's volumes.
    "delta.targetFileSize": str(256 * 1024 * 1024),
    # NOT delta.setTransactionRetentionDuration: once it passes, snapshots drop old txn actions, i.e. the
    # Kafka offsets exactly-once depends on (a quiet partition would be re-ingested from the start).
}


class SchemaMismatchError(RuntimeError):
    """The live table does not have the schema derived from schemas/ (names, types, nullability)."""


def schema_problems(actual: pa.Schema, expected: pa.Schema) -> list[str]:
    """Differences that matter (field docs/metadata and column order are ignored). Empty: they agree."""
    problems = []
    missing = [n for n in expected.names if n not in actual.names]
    extra = [n for n in actual.names if n not in expected.names]
    if missing or extra:
        problems.append(f"columns differ: table lacks {missing}, schemas/ lacks {extra}")
    for f in expected:
        if f.name in actual.names:
            g = actual.field(f.name)
            if not g.type.equals(f.type) or g.nullable != f.nullable:
                problems.append(
                    f"{f.name}: table {g.type} nullable={g.nullable}, expected {f.type} nullable={f.nullable}"
                )
    return problems


def add_new_columns(dt: DeltaTable, expected: pa.Schema) -> list[str]:
    """Add the columns a newer TraceEvent version brought, if all are nullable (earlier rows have no value
    for them; anything else is another table, left to the schema check). Returns the names added; a
    concurrent consumer adding them first is fine."""
    from deltalake import Field

    have = set(table_schema(dt).names)
    new = [f for f in expected if f.name not in have]
    if not new:
        return []
    if not all(f.nullable for f in new):
        return []  # not an earlier version of this table (rows in it would have no value): the check says so
    try:
        dt.alter.add_columns([Field.from_arrow(f) for f in new])
    except CommitFailedError:
        log.info("another consumer added columns first; re-reading")
        return []
    log.warning("traces table: added columns %s (a newer TraceEvent schema)", [f.name for f in new])
    return [f.name for f in new]


def table_schema(dt: DeltaTable) -> pa.Schema:
    return pa.schema(dt.schema().to_arrow())


def legacy_schema() -> pa.Schema:
    """The table's schema before ``ingest_time`` existed (its partitions came from ``finish_time``)."""
    return pa.schema([f for f in traces_table_schema() if f.name != TRUSTED_TIME_COLUMN])


def is_legacy(dt: DeltaTable) -> bool:
    return not schema_problems(table_schema(dt), legacy_schema())


# How long after the broker appended a message the ingest can have written it: the traces topic's retention
# (a message the ingest had not read by then is gone from the topic). Bounds migrated ingest times below.
MIGRATION_MAX_LAG = timedelta(days=3)


def migrated_ingest_time(finish_us: np.ndarray, written_us: int, max_lag_us: int) -> np.ndarray:
    """ingest_time of rows written before the column existed (their arrival was never recorded): their
    finish_time, clipped into [written - max_lag, written] where ``written`` is when their file was written.
    A row cannot have arrived after its file was written, nor (by the topic's retention) much before it was
    ingested; inside those bounds the node's finish time is the best estimate left. A node ahead of time
    moves to ``written``; one far behind to ``written - max_lag`` (which a compacted file, written later
    than its rows, makes later still)."""
    return np.clip(finish_us, written_us - max_lag_us, written_us)


def _legacy_rows(dt: DeltaTable, max_lag: timedelta) -> Iterator[pa.RecordBatch]:
    """Every row of a legacy table with ingest_time, date and hour (re)computed, one file at a time."""
    schema = traces_table_schema()
    columns = [n for n in legacy_schema().names if n not in PARTITION_COLUMNS]
    adds = pa.table(dt.get_add_actions(flatten=True))
    written_ms = dict(
        zip(
            adds["path"].to_pylist(),
            adds["modification_time"].cast(pa.int64()).to_pylist(),
            strict=True,
        )
    )
    root = dt.table_uri.removeprefix("file://").rstrip("/") + "/"
    max_lag_us = max_lag // timedelta(microseconds=1)
    dataset = dt.to_pyarrow_dataset()
    for fragment in dataset.get_fragments():
        path = fragment.path.removeprefix("file://").removeprefix(root)
        written_us = written_ms[path] * 1000
        for batch in fragment.to_batches(schema=dataset.schema, columns=columns, batch_size=65_536):
            if not batch.num_rows:
                continue
            finish = batch["finish_time"].cast(pa.int64()).to_numpy()
            observed = migrated_ingest_time(finish, written_us, max_lag_us)
            lake = lake_columns(
                observed, batch["kafka_partition"].to_numpy(), batch["kafka_offset"].to_numpy()
            )
            event = [batch[n] for n in columns if n not in ("kafka_partition", "kafka_offset")]
            yield pa.RecordBatch.from_arrays([*event, *lake], names=schema.names).cast(schema)


def migrate_to_ingest_time(
    dt: DeltaTable, filesystem: pafs.FileSystem, max_lag: timedelta = MIGRATION_MAX_LAG
) -> bool:
    """One-time rewrite of a legacy table (no ``ingest_time``, partitioned by ``finish_time``) into today's
    schema and partitions, in one overwrite commit; the Kafka offsets (txn actions) are kept, so the ingest
    resumes where it was. Returns False when ``dt`` is not a legacy table (nothing to do).

    Run it with no ingest of an older version writing to the table. Streaming readers of the table see the
    rewrite as a delete + re-add of every row (restart them from the new version). Memory stays at one
    record batch: rows stream from the old files (readable until vacuum) into new files written like the
    ingest's (``lake_files.write_data_files``, ``filesystem`` rooted at the table), committed at the end; a
    crash before the commit leaves the table as it was, plus orphan files vacuum removes.
    """
    if not is_legacy(dt):
        return False
    log.warning(
        "table %s has no %s: rewriting it once (partitions by the trusted time)",
        dt.table_uri,
        TRUSTED_TIME_COLUMN,
    )
    now_ms, actions = int(time.time() * 1000), []
    for batch in _legacy_rows(dt, max_lag):
        actions += write_data_files(pa.Table.from_batches([batch]), filesystem, now_ms)
    dt.create_write_transaction(
        actions,
        "overwrite",
        traces_table_schema(),
        partition_by=PARTITION_COLUMNS,
        commit_properties=CommitProperties(custom_metadata={"flywheel.migration": TRUSTED_TIME_COLUMN}),
    )
    refresh(dt)
    if is_legacy(dt):
        raise SchemaMismatchError(f"table {dt.table_uri}: the migration commit kept the old schema")
    stats = ",".join(STATS_COLUMNS)
    if dt.metadata().configuration.get("delta.dataSkippingStatsColumns") != stats:
        dt.alter.set_table_properties({"delta.dataSkippingStatsColumns": stats})
    return True


def refresh(dt: DeltaTable, attempts: int = 4) -> DeltaTable:
    """``dt.update_incremental()``, again when a log entry it listed was gone by the time it read it.

    Log clean-up (after a checkpoint, entries older than ``delta.logRetentionDuration``) may delete a
    commit file between a reader's listing and its read: the reader gets ``FileNotFoundError`` although
    the table is fine, and the next listing starts from the newer checkpoint. Rare at the table's 7 days,
    routine at the seconds tests use.
    """
    for attempt in range(attempts - 1):
        try:
            dt.update_incremental()
            return dt
        except FileNotFoundError as e:
            log.info("log entry gone while reading %s (%s); listing again", dt.table_uri, e)
            time.sleep(0.05 * 2**attempt)
    dt.update_incremental()  # the last try: its error is the caller's
    return dt


def open_or_create(lake: LakeSettings, properties: dict[str, str] | None = None) -> DeltaTable:
    """Open ``lake.traces_uri`` or create it (idempotent across racing consumers); check its schema.
    A legacy table (before ``ingest_time``) is migrated first (``migrate_to_ingest_time``).

    ``properties`` overrides TABLE_PROPERTIES at creation only (tests shorten retention durations).
    """
    uri, options = lake.traces_uri, lake.delta_options()
    if not DeltaTable.is_deltatable(uri, storage_options=options):
        try:
            DeltaTable.create(
                uri,
                traces_table_schema(),
                partition_by=PARTITION_COLUMNS,
                name=lake.traces_table,
                description="One row per served request (TraceEvent) from spec.traces.v1, exactly once.",
                configuration=TABLE_PROPERTIES | (properties or {}),
                storage_options=options,
            )
        except DeltaError:
            if not DeltaTable.is_deltatable(uri, storage_options=options):
                raise  # not the "another consumer created it first" race
    dt = DeltaTable(uri, storage_options=options)
    try:
        migrate_to_ingest_time(dt, table_filesystem(lake))
    except CommitFailedError:  # another consumer migrated it first: check what it wrote
        log.info("concurrent migration of %s; re-reading", uri)
    dt = DeltaTable(uri, storage_options=options)
    if add_new_columns(dt, traces_table_schema()):
        dt = DeltaTable(uri, storage_options=options)
    problems = schema_problems(table_schema(dt), traces_table_schema())
    if problems:
        raise SchemaMismatchError(f"table {uri}: " + "; ".join(problems))
    if dt.metadata().partition_columns != PARTITION_COLUMNS:
        raise SchemaMismatchError(f"table {uri} is partitioned by {dt.metadata().partition_columns}")
    return dt


def table_filesystem(lake: LakeSettings) -> pafs.FileSystem:
    """A pyarrow filesystem rooted at the table: local disk directly, anything else through delta-rs'
    object store (same URI schemes and ``storage_options`` as the Delta log itself)."""
    uri = lake.traces_uri
    if "://" not in uri or uri.startswith("file://"):
        return pafs.SubTreeFileSystem(uri.removeprefix("file://"), pafs.LocalFileSystem())
    from deltalake.fs import DeltaStorageHandler

    return pafs.PyFileSystem(DeltaStorageHandler(uri, lake.delta_options()))
