"""The compiled batch decoder agrees with fastavro field by field and isolates every poison message exactly."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.utils import generate_many
from trace_events import OFFLINE_IDS, encoded, poison_messages, trace

from consumers import avro_kernels as k
from consumers.avro_program import ArrowProjection, FieldProgram, decode_rows
from consumers.trace_batch import MessageBatch, TraceBatchDecoder
from schemas import codec
from schemas.arrow import arrow_schema, arrow_type, traces_table_schema
from schemas.registry import TRACE_EVENT, SchemaVersion, current


@pytest.fixture(scope="module")
def decoder() -> TraceBatchDecoder:
    return TraceBatchDecoder(OFFLINE_IDS)


def fastavro_reference(payloads: list[bytes]) -> pa.Table:
    """What fastavro (schemas.codec) decodes, as the event's Arrow schema."""
    return pa.Table.from_pylist(
        [codec.decode(p, OFFLINE_IDS.version_of)[1] for p in payloads], schema=arrow_schema(TRACE_EVENT)
    )


def assert_columns_equal(got: pa.RecordBatch, want: pa.Table) -> None:
    assert got.num_rows == want.num_rows
    for name in want.column_names:
        assert got[name].equals(want[name].combine_chunks()), name


def test_generated_records_decode_like_fastavro(decoder):
    """Random values over the whole schema (extreme ints/longs, nulls, unicode, empty arrays)."""
    schema = current(TRACE_EVENT)
    payloads = encoded(list(generate_many(schema.parsed, 300)))
    events, index, rejected = decoder.decode_events(MessageBatch.from_values(payloads))
    assert rejected == [] and list(index) == list(range(300))
    assert_columns_equal(events, fastavro_reference(payloads))


def test_realistic_records_decode_like_fastavro_with_lake_columns(decoder):
    records = [trace(i) for i in range(200)]
    payloads = encoded(records)
    partitions, offsets = np.arange(200) % 3, np.arange(1000, 1200)
    # observed by the pipeline a day and a bit later, in steps of 17 min: several hours and two dates
    observed = np.array(
        [r["finish_time"] + 86_400_000_000 + i * 1_020_000_000 for i, r in enumerate(records)]
    )
    decoded = decoder.decode(MessageBatch.from_values(payloads, partitions, offsets, observed=observed))
    assert decoded.rejected == []
    assert decoded.rows.schema.equals(traces_table_schema(), check_metadata=True)
    assert_columns_equal(decoded.rows, fastavro_reference(payloads))
    assert decoded.rows["kafka_partition"].to_pylist() == partitions.tolist()
    assert decoded.rows["kafka_offset"].to_pylist() == offsets.tolist()
    assert decoded.rows["ingest_time"].cast(pa.int64()).to_pylist() == observed.tolist()
    seen = [datetime.fromtimestamp(us / 1e6, UTC) for us in observed.tolist()]
    assert decoded.rows["date"].to_pylist() == [f"{t:%Y-%m-%d}" for t in seen]
    assert decoded.rows["hour"].to_pylist() == [t.hour for t in seen]
    assert len(set(decoded.rows["date"].to_pylist())) >= 2


class Stamped:
    """The part of a confluent_kafka.Message that MessageBatch.from_messages reads."""

    def __init__(self, value: bytes, offset: int, timestamp: tuple[int, int]):
        self._value, self._offset, self._timestamp = value, offset, timestamp

    def value(self) -> bytes:
        return self._value

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return self._timestamp


def test_ingest_time_is_the_brokers_append_time_else_the_ingests_clock_never_the_producers(decoder):
    from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_LOG_APPEND_TIME, TIMESTAMP_NOT_AVAILABLE

    payloads = encoded([trace(i, finish_time_s=4_084_000_000.0) for i in range(3)])  # the node says 2099
    broker_ms, producer_ms, clock_us = 1_796_100_000_123, 4_084_000_000_000, 1_796_200_000_000_456
    messages = [
        Stamped(payloads[0], 0, (TIMESTAMP_LOG_APPEND_TIME, broker_ms)),
        Stamped(payloads[1], 1, (TIMESTAMP_CREATE_TIME, producer_ms)),  # the node's own (wrong) clock
        Stamped(payloads[2], 2, (TIMESTAMP_NOT_AVAILABLE, -1)),
    ]
    rows = decoder.decode(MessageBatch.from_messages(messages, clock_us)).rows
    assert rows["ingest_time"].cast(pa.int64()).to_pylist() == [broker_ms * 1000, clock_us, clock_us]
    assert rows["date"].to_pylist() == ["2026-12-01", "2026-12-02", "2026-12-02"]
    assert rows["finish_time"].cast(pa.int64()).to_pylist() == [4_084_000_000_000_000] * 3  # kept as data


def test_every_poison_kind_is_rejected_with_its_reason_and_neighbours_survive(decoder):
    good = encoded([trace(i) for i in range(10)])
    poison = poison_messages(good[0])
    values = [good[0]] + [v for _, _, v in poison] + good[1:]
    decoded = decoder.decode(MessageBatch.from_values(values))
    got = {r.index: r.reason for r in decoded.rejected}
    assert got == {1 + i: reason for i, (_, reason, _) in enumerate(poison)}
    assert decoded.rows.num_rows == 10
    expected_offsets = [0] + list(range(len(poison) + 1, len(values)))
    assert decoded.rows["kafka_offset"].to_pylist() == expected_offsets
    assert all(r.detail for r in decoded.rejected)


def _tiny(fields: list[dict]) -> FieldProgram:
    return FieldProgram.for_fields(parse_schema({"type": "record", "name": "T", "fields": fields})["fields"])


@pytest.mark.parametrize(
    ("fields", "body", "status"),
    [
        ([{"name": "a", "type": "int"}], b"\x02", k.OK),
        ([{"name": "a", "type": "int"}], b"", k.TRUNCATED),
        ([{"name": "a", "type": "int"}], b"\x02\x00", k.TRAILING),
        ([{"name": "a", "type": "int"}], b"\xfe\xff\xff\xff\x1f", k.INT_RANGE),  # zigzag 2**32 - 1
        ([{"name": "a", "type": "long"}], b"\xff" * 10 + b"\x01", k.VARINT_OVERFLOW),
        ([{"name": "a", "type": ["null", "string"]}], b"\x04", k.BAD_UNION),
        ([{"name": "a", "type": "string"}], b"\x03", k.BAD_LENGTH),  # length -2
        ([{"name": "a", "type": "string"}], b"\x04\xc3\x28", k.BAD_UTF8),
        ([{"name": "a", "type": "string"}], b"\x04\xed\xa0", k.BAD_UTF8),  # cut-off sequence
        ([{"name": "a", "type": "string"}], b"\x06\xed\xa0\x80", k.BAD_UTF8),  # surrogate
        ([{"name": "a", "type": "boolean"}], b"\x02", k.BAD_BOOL),
        ([{"name": "a", "type": {"type": "enum", "name": "E", "symbols": ["X"]}}], b"\x02", k.BAD_ENUM),
        ([{"name": "a", "type": {"type": "array", "items": "int"}}], b"\x06\x02", k.TRUNCATED),
        (
            [{"name": "a", "type": {"type": "array", "items": "int"}}],
            b"\x03\x04\x02\x04\x00",
            k.OK,
        ),  # sized block
        ([{"name": "a", "type": "float"}], b"\x00\x00", k.TRUNCATED),
    ],
)
def test_kernel_status_codes(fields, body, status):
    program = _tiny(fields)
    buf = np.frombuffer(codec.header(1) + body, dtype=np.uint8)
    rows = decode_rows(program, buf, np.array([0]), np.array([len(buf)]), np.array([0]))
    assert rows.status[0] == status


def test_older_writer_version_is_projected_onto_the_current_schema():
    """A writer version without tenant/capture_sample_rate reads as the current schema, with defaults."""
    reader = current(TRACE_EVENT)
    dropped = {"tenant", "capture_sample_rate"}
    old_parsed = parse_schema(
        dict(reader.parsed, fields=[f for f in reader.parsed["fields"] if f["name"] not in dropped]),
        _force=True,
    )
    records = [{k: v for k, v in trace(i).items() if k not in dropped} for i in range(50)]
    payloads = []
    for r in records:
        buf = io.BytesIO()
        schemaless_writer(buf, old_parsed, r)
        payloads.append(codec.header(1) + buf.getvalue())
    batch = MessageBatch.from_values(payloads)
    rows = decode_rows(
        FieldProgram.for_fields(old_parsed["fields"]), batch.buf, batch.starts, batch.ends, np.arange(50)
    )
    assert (rows.status == k.OK).all()
    got = pa.RecordBatch.from_arrays(
        ArrowProjection(reader, arrow_schema(TRACE_EVENT)).columns(rows, np.arange(50)),
        schema=arrow_schema(TRACE_EVENT),
    )
    want = [schemaless_reader(io.BytesIO(p[codec.HEADER_LEN :]), old_parsed, reader.parsed) for p in payloads]
    assert_columns_equal(got, pa.Table.from_pylist(want, schema=arrow_schema(TRACE_EVENT)))
    assert got["capture_sample_rate"].to_pylist() == [1.0] * 50 and got["tenant"].null_count == 50


def test_type_promotions_follow_avro_resolution():
    writer = {
        "type": "record",
        "name": "P",
        "fields": [
            {"name": "a", "type": "int"},
            {"name": "b", "type": {"type": "array", "items": "int"}},
            {"name": "f", "type": "float"},
        ],
    }
    reader_raw = {
        "type": "record",
        "name": "P",
        "fields": [
            {"name": "a", "type": "long"},
            {"name": "b", "type": {"type": "array", "items": "long"}},
            {"name": "f", "type": "double"},
            {"name": "c", "type": "string", "default": "x"},
        ],
    }
    reader = SchemaVersion("p", 2, reader_raw, parse_schema(reader_raw), b"\x00" * 8)
    reader_arrow = pa.schema(
        [pa.field(f["name"], arrow_type(f["type"])[0], nullable=False) for f in reader_raw["fields"]]
    )
    record = {"a": -7, "b": [1, 2**31 - 1], "f": 1.5}
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(writer), record)
    payload = codec.header(1) + buf.getvalue()
    batch = MessageBatch.from_values([payload])
    rows = decode_rows(
        FieldProgram.for_fields(parse_schema(writer)["fields"]),
        batch.buf,
        batch.starts,
        batch.ends,
        np.array([0]),
    )
    got = pa.RecordBatch.from_arrays(
        ArrowProjection(reader, reader_arrow).columns(rows, np.array([0])), schema=reader_arrow
    )
    assert got.to_pylist() == [{"a": -7, "b": [1, 2**31 - 1], "f": 1.5, "c": "x"}]
    assert got.schema.field("b").type == pa.list_(pa.field("element", pa.int64(), nullable=False))


def test_batches_with_only_poison_or_nothing(decoder):
    assert decoder.decode(MessageBatch.from_values([])).rows.num_rows == 0
    only_bad = decoder.decode(MessageBatch.from_values([b"x", None]))
    assert only_bad.rows.num_rows == 0 and [r.reason for r in only_bad.rejected] == ["not-confluent-avro"] * 2
    assert only_bad.rows.schema.equals(traces_table_schema())
