"""Parquet files of the traces table: partition split, Delta stats, encodings; dead-letter headers."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from trace_events import BASE_S, OFFLINE_IDS, encoded, trace

from consumers.dead_letters import DeadLetter, dead_letter_headers, parse_headers
from consumers.lake_files import TOKEN_COLUMNS, delta_stats, split_by_partition, write_data_files
from consumers.trace_batch import MessageBatch, TraceBatchDecoder
from schemas.arrow import PARTITION_COLUMNS, traces_table_schema


def rows_at(observed: list[float], finish: list[float] | None = None) -> pa.Table:
    """Decoded rows the pipeline observed at ``observed`` (s since the epoch), whose serving nodes stamped
    ``finish`` as their finish time (default: the same)."""
    finish = observed if finish is None else finish
    payloads = encoded([trace(i, finish_time_s=t) for i, t in enumerate(finish)])
    batch = MessageBatch.from_values(payloads, observed=[round(t * 1e6) for t in observed])
    return pa.Table.from_batches([TraceBatchDecoder(OFFLINE_IDS).decode(batch).rows])


def test_split_by_partition_follows_ingest_time_hours_not_the_nodes_clock():
    hour = 3600.0
    start = (BASE_S // hour + 1) * hour  # an hour boundary, UTC
    skewed = [4_084_000_000.0, 990_000_000.0, 946_000_000.0, BASE_S, 1.0]  # 2099, 2001, 1999, right, 1970
    table = rows_at([start - 1, start, start + 1, start + 2 * hour, start - 1], finish=skewed)
    parts = split_by_partition(table)
    assert [(v["date"], v["hour"], t.num_rows) for v, t in parts] == [
        ("2026-11-30", "0", 2),
        ("2026-11-30", "1", 2),
        ("2026-11-30", "3", 1),
    ]
    assert all(set(PARTITION_COLUMNS).isdisjoint(t.column_names) for _, t in parts)
    assert sorted(t for _, rows in parts for t in rows["finish_time"].cast(pa.int64()).to_pylist()) == sorted(
        round(t * 1e6) for t in skewed
    )  # the node's times are kept as data


def test_delta_stats_cover_the_filter_columns():
    table = rows_at([BASE_S + 60, BASE_S + 62.5], finish=[BASE_S, BASE_S + 2.5])
    stats = json.loads(delta_stats(table))
    assert stats["numRecords"] == 2
    assert stats["minValues"]["kafka_offset"] == 0 and stats["maxValues"]["kafka_offset"] == 1
    assert stats["minValues"]["finish_time"] == "2026-11-30T00:53:20.000Z"
    assert stats["maxValues"]["finish_time"] == "2026-11-30T00:53:22.500Z"
    assert stats["minValues"]["ingest_time"] == "2026-11-30T00:54:20.000Z"
    assert stats["maxValues"]["ingest_time"] == "2026-11-30T00:54:22.500Z"
    assert stats["nullCount"]["arrival_time"] == 0


def test_data_files_round_trip_with_zstd_and_token_encodings(tmp_path):
    table = rows_at([BASE_S + i for i in range(50)])
    actions = write_data_files(table, pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), now_ms=1)
    assert len(actions) == 1 and actions[0].partition_values == {"date": "2026-11-30", "hour": "0"}
    path = tmp_path / actions[0].path
    assert path.stat().st_size == actions[0].size
    back = pq.read_table(path)
    expected = table.drop_columns(PARTITION_COLUMNS)
    assert back.equals(expected.cast(back.schema))
    assert back.schema.equals(
        pa.schema([f for f in traces_table_schema() if f.name not in PARTITION_COLUMNS])
    )
    meta = pq.ParquetFile(path).metadata.row_group(0)
    columns = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    assert all(c.compression == "ZSTD" for c in columns.values())
    for name in TOKEN_COLUMNS:
        encodings = columns[f"{name}.list.element"].encodings
        assert (
            "PLAIN" in encodings
            and "RLE_DICTIONARY" not in encodings
            and "BYTE_STREAM_SPLIT" not in encodings
        )


def test_dead_letter_headers_round_trip():
    letter = DeadLetter(
        b"\x00", b"k", "malformed-avro", "truncated in field 'x'", "spec.traces.v1", 3, 42, 1700
    )
    headers = parse_headers(dead_letter_headers(letter) + [("other", b"kept out")])
    assert headers == {
        "dlq.reason": "malformed-avro",
        "dlq.detail": "truncated in field 'x'",
        "source.topic": "spec.traces.v1",
        "source.partition": "3",
        "source.offset": "42",
        "source.timestamp": "1700",
    }


def test_migrated_ingest_time_is_the_finish_time_within_what_the_file_allows():
    """Rows of a table from before ingest_time: finish_time, clipped to [file written - lag, file written]."""
    from consumers.table import migrated_ingest_time

    written, lag = 1_796_000_000_000_000, 3 * 86_400_000_000
    finish = np.array([written - 60_000_000, written + 10**15, written - 10**15, written - lag, written])
    got = migrated_ingest_time(finish, written, lag)
    assert got.tolist() == [written - 60_000_000, written, written - lag, written - lag, written]
