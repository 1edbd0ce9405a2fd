"""The Delta table ``traces``: created on first use with documented properties, schema checked on open.

The schema is never written by hand: it is ``schemas.arrow.traces_table_schema()`` (Avro TraceEvent + lake
columns). Delta's type system maps every column of it back to the identical Arrow type (int -> integer,
long -> long, float -> float, string -> string, timestamp[us, UTC] -> timestamp, list<int32 not null> ->
array<integer, containsNull=false>), so the check compares names, types and nullability with no
normalisation; field docs travel as Delta column metadata.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from consumers.lake_files import STATS_COLUMNS
from core.settings import LakeSettings
from schemas.arrow import PARTITION_COLUMNS, traces_table_schema

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
    """Differences that matter (field docs/metadata are ignored). Empty means the schemas agree."""
    problems = []
    if actual.names != expected.names:
        problems.append(f"columns differ: table {actual.names} vs schemas/ {expected.names}")
    for f in expected:
        if f.name in actual.names:
            g = actual.field(f.name)
            if not g.type.equals(f.type) or g.nullable != f.nullable:
                problems.append(
                    f"{f.name}: table {g.type} nullable={g.nullable}, expected {f.type} nullable={f.nullable}"
                )
    return problems


def table_schema(dt: DeltaTable) -> pa.Schema:
    return pa.schema(dt.schema().to_arrow())


def open_or_create(lake: LakeSettings, properties: dict[str, str] | None = None) -> DeltaTable:
    """Open ``lake.traces_uri`` or create it (idempotent across racing consumers); check its schema.

    ``properties`` overrides TABLE_PROPERTIES at creation only (tests shorten retention durations).
    """
    uri, options = lake.traces_uri, lake.storage_options or None
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

    return pafs.PyFileSystem(DeltaStorageHandler(uri, lake.storage_options or None))
