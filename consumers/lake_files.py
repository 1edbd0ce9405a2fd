"""Parquet data files of the ``traces`` table: encoding choices, partition split, Delta add actions.

The ingest writes its Parquet with pyarrow and commits the files itself (``create_write_transaction`` on the
snapshot it checked, like ``write_deltalake(dt, ...)`` would): with the same encodings, pyarrow's writer
took ~20% less CPU than delta-rs' ``write_deltalake`` and wrote ~9% smaller files on bench events
(bench/ingest.py reports both rates), and Parquet encoding is the largest CPU cost of the whole ingest.
Encodings, measured on real-text token ids (bench corpus):

- token ids: PLAIN + zstd-3, no dictionary. zstd keeps the long matches of real text (chat templates,
  repeated passages) that a dictionary breaks: 0.55 vs 0.85 B/token on 20k realistic traces.
  BYTE_STREAM_SPLIT is 2.5% smaller still (0.535), but Spark's vectorized reader cannot decode it in
  nested columns, and the lake must open in stock Spark for the teams that read it.
- per-step accept counts and low-cardinality strings: dictionary (values 0..K, a handful of names).
- Parquet statistics only on scalar columns readers filter on; min/max over millions of list items buys
  nothing and costs CPU.

Every write passes zstd explicitly (delta-rs and pyarrow defaults are Snappy).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import WriterProperties
from deltalake.transaction import AddAction
from deltalake.writer.properties import ColumnProperties

from schemas.arrow import PARTITION_COLUMNS, TRUSTED_TIME_COLUMN

ZSTD_LEVEL = 3
TOKEN_COLUMNS = ("prompt_token_ids", "output_token_ids")
STEP_COLUMNS = ("per_step_accepted", "per_step_drafted")
DICTIONARY_COLUMNS = (
    "serving_node",
    "target_model_id",
    "target_revision",
    "drafter_id",
    "drafter_version",
    "spec_method",
    "finish_reason",
    "domain",
    "tenant",
)
# Columns with min/max statistics, in Parquet and in the Delta log (also set as
# delta.dataSkippingStatsColumns so compaction by delta-rs keeps the same ones).
STATS_COLUMNS = (TRUSTED_TIME_COLUMN, "arrival_time", "finish_time", "kafka_partition", "kafka_offset")
US_PER_HOUR = 3_600_000_000


def _leaf(column: str) -> str:
    return f"{column}.list.element"


def parquet_options() -> dict:
    """Keyword arguments for ``pyarrow.parquet.write_table`` (the ingest's writer)."""
    return {
        "compression": "zstd",
        "compression_level": ZSTD_LEVEL,
        "use_dictionary": [*DICTIONARY_COLUMNS, *(_leaf(c) for c in STEP_COLUMNS)],
        "column_encoding": {_leaf(c): "PLAIN" for c in TOKEN_COLUMNS},
        "write_statistics": list(STATS_COLUMNS),
    }


def delta_writer_properties() -> WriterProperties:
    """The same choices for delta-rs writes (compaction by ``optimize.compact``)."""
    plain = ColumnProperties(dictionary_enabled=False, statistics_enabled="NONE")
    columns = {
        c: ColumnProperties(dictionary_enabled=True, statistics_enabled="NONE") for c in DICTIONARY_COLUMNS
    }
    columns |= {
        _leaf(c): ColumnProperties(dictionary_enabled=True, statistics_enabled="NONE") for c in STEP_COLUMNS
    }
    columns |= {
        _leaf(c): ColumnProperties(dictionary_enabled=False, encoding="PLAIN", statistics_enabled="NONE")
        for c in TOKEN_COLUMNS
    }
    columns |= {
        c: ColumnProperties(dictionary_enabled=False, statistics_enabled="CHUNK") for c in STATS_COLUMNS
    }
    return WriterProperties(
        compression="ZSTD",
        compression_level=ZSTD_LEVEL,
        default_column_properties=plain,
        column_properties=columns,
    )


def _stat_value(value: object) -> object:
    if isinstance(value, datetime):  # Delta stats: ISO-8601, millisecond precision, UTC
        return f"{value:%Y-%m-%dT%H:%M:%S}.{value.microsecond // 1000:03d}Z"
    return value


def delta_stats(table: pa.Table) -> str:
    """The ``stats`` JSON of an add action: row count, and min/max/null count of STATS_COLUMNS."""
    mins, maxs, nulls = {}, {}, {}
    for name in STATS_COLUMNS:
        col = table[name]
        bounds = pc.min_max(col)
        mins[name], maxs[name] = _stat_value(bounds["min"].as_py()), _stat_value(bounds["max"].as_py())
        nulls[name] = col.null_count
    return json.dumps(
        {"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}
    )


def split_by_partition(table: pa.Table) -> list[tuple[dict[str, str], pa.Table]]:
    """(partition values, rows without the partition columns) per (date, hour) of ``ingest_time``."""
    hours = table[TRUSTED_TIME_COLUMN].cast(pa.int64()).to_numpy() // US_PER_HOUR
    data = table.drop_columns(PARTITION_COLUMNS)
    first, last = hours.min(), hours.max()
    keys = [first] if first == last else np.unique(hours)
    out = []
    for key in keys:
        rows = data if len(keys) == 1 else data.filter(pa.array(hours == key))
        moment = datetime.fromtimestamp(int(key) * 3600, tz=UTC)
        out.append(({"date": f"{moment:%Y-%m-%d}", "hour": str(moment.hour)}, rows))
    return out


def write_data_files(table: pa.Table, filesystem: pa.fs.FileSystem, now_ms: int) -> list[AddAction]:
    """Write one Parquet file per (date, hour) of ``table`` under the table root; return their add actions.

    Files are not part of the table until the actions are committed; a crash before that leaves orphans
    that ``vacuum`` removes once they are older than the deleted-file retention.
    """
    actions = []
    options = parquet_options()
    for values, rows in split_by_partition(table):
        folder = f"date={values['date']}/hour={values['hour']}"
        filesystem.create_dir(folder, recursive=True)  # local disks need it; object stores ignore it
        path = f"{folder}/part-{uuid.uuid4()}.zstd.parquet"
        with filesystem.open_output_stream(path) as sink:
            pq.write_table(rows, sink, **options)
            size = sink.tell()
        actions.append(AddAction(path, size, values, now_ms, True, delta_stats(rows)))
    return actions
