"""Arrow schemas derived from the Avro schemas: the lake's columns are never written by hand.

Avro int -> int32 (token ids stay 4 bytes before encoding), long -> int64, float -> float32,
timestamp-micros -> timestamp[us, UTC], ["null", T] -> nullable T, array<T> -> list<T>.
Each field's Avro ``doc`` travels as Arrow field metadata.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from schemas.registry import TRACE_EVENT, current

_PRIMITIVES = {
    "int": pa.int32(),
    "long": pa.int64(),
    "float": pa.float32(),
    "double": pa.float64(),
    "boolean": pa.bool_(),
    "string": pa.string(),
    "bytes": pa.binary(),
}
_LOGICAL = {
    "timestamp-micros": pa.timestamp("us", tz="UTC"),
    "timestamp-millis": pa.timestamp("ms", tz="UTC"),
    "date": pa.date32(),
}

# The lake's trusted time: when the pipeline observed the event (the broker's LogAppendTime of the message,
# else the ingest's clock). Partitions, windows, drift checks and retention all use it; the node's own
# times (arrival_time, first_token_time, finish_time) are kept as data. docs/data-contract.md says why.
TRUSTED_TIME_COLUMN = "ingest_time"

# Columns the lake adds to every trace: where the row came from, when it was observed, its partition.
LAKE_COLUMNS = [
    pa.field(
        "kafka_partition", pa.int32(), nullable=False, metadata={"doc": "source partition of spec.traces.v1"}
    ),
    pa.field(
        "kafka_offset",
        pa.int64(),
        nullable=False,
        metadata={"doc": "source offset: (partition, offset) is unique"},
    ),
    pa.field(
        TRUSTED_TIME_COLUMN,
        pa.timestamp("us", tz="UTC"),
        nullable=False,
        metadata={
            "doc": "when the pipeline observed the event: the broker's LogAppendTime of the message "
            "(the ingest's clock if the message has none); partitions, windows and retention use this "
            "time, never the serving node's clock"
        },
    ),
    pa.field(
        "date", pa.string(), nullable=False, metadata={"doc": "partition: ingest_time's UTC date, YYYY-MM-DD"}
    ),
    pa.field("hour", pa.int32(), nullable=False, metadata={"doc": "partition: ingest_time's UTC hour, 0-23"}),
]
PARTITION_COLUMNS = ["date", "hour"]


def arrow_type(avro: Any) -> tuple[pa.DataType, bool]:
    """(Arrow type, nullable) for an Avro type."""
    if isinstance(avro, list):
        branches = [b for b in avro if b != "null"]
        if len(branches) != 1:
            raise TypeError(f"only ['null', T] unions map to Arrow, got {avro}")
        return arrow_type(branches[0])[0], "null" in avro
    if isinstance(avro, str):
        return _PRIMITIVES[avro], False
    if logical := avro.get("logicalType"):
        return _LOGICAL[logical], False
    kind = avro["type"]
    if kind == "array":
        item, item_nullable = arrow_type(avro["items"])
        return pa.list_(pa.field("element", item, nullable=item_nullable)), False
    if kind == "enum":
        return pa.string(), False
    if isinstance(kind, (str, dict, list)) and kind not in ("record", "map", "fixed"):
        return arrow_type(kind)
    raise TypeError(f"Avro type {kind} has no Arrow mapping here")


def arrow_schema(event: str) -> pa.Schema:
    """The Arrow schema of an event's current Avro version, field order and docs preserved."""
    fields = []
    for f in current(event).raw["fields"]:
        typ, nullable = arrow_type(f["type"])
        fields.append(pa.field(f["name"], typ, nullable=nullable, metadata={"doc": f.get("doc", "")}))
    return pa.schema(fields)


def traces_table_schema() -> pa.Schema:
    """Columns of the Delta table ``traces``: every TraceEvent field plus LAKE_COLUMNS."""
    return pa.schema([*arrow_schema(TRACE_EVENT), *LAKE_COLUMNS])
