"""The Avro schemas are the contract: documented, fingerprint-pinned, BACKWARD compatible, Arrow-derived.

BACKWARD is judged by the Avro project's own checker (``avro.compatibility``, the Java library's port);
the registry enforces the same rule on every registration (tests/integration/test_schema_registry.py).
"""

from __future__ import annotations

import json
import uuid

import avro.schema
import pyarrow as pa
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType
from fastavro.utils import generate_many
from trace_events import OFFLINE_IDS, UNREGISTERED_ID

from schemas import codec
from schemas.arrow import LAKE_COLUMNS, arrow_schema, traces_table_schema
from schemas.registry import (
    AVRO_DIR,
    DRAFTER_PROMOTION,
    TRACE_EVENT,
    WINDOW_ANNOUNCEMENT,
    current,
    events,
    versions,
)

REQUIRED_TRACE_FIELDS = {
    "event_id",
    "request_id",
    "arrival_time",
    "first_token_time",
    "finish_time",
    "serving_node",
    "target_model_id",
    "target_revision",
    "drafter_id",
    "drafter_version",
    "spec_method",
    "num_spec_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "prompt_token_ids",
    "output_token_ids",
    "per_step_accepted",
    "per_step_drafted",
    "finish_reason",
    "domain",
    "tenant",
    "schema_version",
}


def sample_trace(**overrides) -> dict:
    rec = {
        "schema_version": 1,
        "event_id": str(uuid.uuid4()),
        "request_id": "cmpl-1",
        "arrival_time": 1_796_000_000_000_000,
        "first_token_time": 1_796_000_000_100_000,
        "finish_time": 1_796_000_001_000_000,
        "serving_node": "node-a",
        "target_model_id": "SmolLM2-135M-Instruct",
        "target_revision": "7ef915c9bf9d94d8",
        "drafter_id": "eagle3",
        "drafter_version": "initial",
        "spec_method": "eagle3",
        "num_spec_tokens": 3,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "seed": None,
        "prompt_token_ids": [1, 2, 3, 49151],
        "output_token_ids": [5, 6, 7, 8, 9],
        "per_step_accepted": [2, 1],
        "per_step_drafted": [3, 3],
        "finish_reason": "length",
        "domain": "code",
        "tenant": None,
        "capture_sample_rate": 1.0,
    }
    rec.update(overrides)
    return rec


def test_trace_event_carries_the_contract_fields_and_each_is_documented():
    fields = current(TRACE_EVENT).raw["fields"]
    assert {f["name"] for f in fields} >= REQUIRED_TRACE_FIELDS
    for schema in (current(TRACE_EVENT), current(DRAFTER_PROMOTION), current(WINDOW_ANNOUNCEMENT)):
        undocumented = [f["name"] for f in schema.raw["fields"] if len(f.get("doc", "")) < 10]
        assert not undocumented, f"{schema.event}: fields without a doc: {undocumented}"


def test_released_versions_are_immutable():
    pinned = json.loads((AVRO_DIR / "fingerprints.json").read_text())
    actual = {f"{e}/v{v.version}": v.fingerprint.hex() for e in events() for v in versions(e)}
    assert {k: actual[k] for k in pinned} == pinned, "a released schema version was edited: add a new version"
    assert set(actual) == set(pinned), "new schema versions must be pinned in fingerprints.json"


def backward_problems(reader: dict, writer: dict) -> list[str]:
    """Why a reader with ``reader`` cannot read data written with ``writer`` (empty: it can)."""
    result = ReaderWriterCompatibilityChecker().get_compatibility(
        avro.schema.parse(json.dumps(reader)), avro.schema.parse(json.dumps(writer))
    )
    return [] if result.compatibility is SchemaCompatibilityType.compatible else sorted(result.messages)


def roundtrip_ids(schema) -> int:
    return OFFLINE_IDS.id_of(schema, "offline")


@pytest.mark.parametrize("event", [TRACE_EVENT, DRAFTER_PROMOTION, WINDOW_ANNOUNCEMENT])
def test_every_version_reads_all_older_versions(event):
    """BACKWARD (transitive): the newest reader resolves every released writer, structurally and on data."""
    history = versions(event)
    newest = history[-1]
    for old in history:
        assert backward_problems(newest.raw, old.raw) == [], (
            f"{event} v{newest.version} cannot read v{old.version}"
        )
        for record in generate_many(old.parsed, 20):
            payload = codec.encode_with(old, record, roundtrip_ids(old))
            _, decoded = codec.decode(payload, OFFLINE_IDS.version_of)
            assert set(decoded) == {f["name"] for f in newest.raw["fields"]}


def test_round_trip_trace():
    rec = sample_trace()
    payload = codec.encode(TRACE_EVENT, rec, 1234567, check=True)
    schema, decoded = codec.decode(payload, {1234567: current(TRACE_EVENT)}.get, expect=TRACE_EVENT)
    assert schema.version == 1 and decoded == rec
    assert payload[:5] == b"\x00\x00\x12\xd6\x87"  # Confluent framing: magic 0, the id big-endian


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "not-confluent-avro"),
        (b"random bytes that are not avro at all", "not-confluent-avro"),
        (b"\x00\x00\x00\x01", "not-confluent-avro"),  # the header cut short
        (b"\xc3\x01" + current(TRACE_EVENT).fingerprint + b"\x02", "not-confluent-avro"),  # single-object
        (codec.header(UNREGISTERED_ID) + b"\x02", "unknown-schema"),
    ],
)
def test_decode_errors_have_stable_reasons(payload, reason):
    with pytest.raises(codec.DecodeError) as e:
        codec.decode(payload, OFFLINE_IDS.version_of)
    assert e.value.reason == reason


def test_truncated_and_padded_payloads_are_malformed():
    payload = codec.encode(TRACE_EVENT, sample_trace(), roundtrip_ids(current(TRACE_EVENT)))
    for bad in (payload[: len(payload) // 2], payload + b"\x00\x00"):
        with pytest.raises(codec.DecodeError) as e:
            codec.decode(bad, OFFLINE_IDS.version_of)
        assert e.value.reason == "malformed-avro"


def test_wrong_event_type_is_rejected():
    promo = current(DRAFTER_PROMOTION)
    payload = codec.encode_with(promo, next(iter(generate_many(promo.parsed, 1))), roundtrip_ids(promo))
    with pytest.raises(codec.DecodeError) as e:
        codec.decode(payload, OFFLINE_IDS.version_of, expect=TRACE_EVENT)
    assert e.value.reason == "wrong-event-type"


def test_a_pending_value_is_framed_with_its_schemas_id_once_known():
    """What the serving spill holds while the registry is away becomes the same message, id and all."""
    rec = sample_trace()
    pending = codec.encode_pending(TRACE_EVENT, rec)
    assert pending[:2] == b"\xc3\x01" and pending[2:10] == current(TRACE_EVENT).fingerprint
    framed = codec.frame(pending, lambda v: roundtrip_ids(v))
    assert framed == codec.encode(TRACE_EVENT, rec, roundtrip_ids(current(TRACE_EVENT)))
    assert codec.frame(framed, lambda v: 1 / 0) == framed  # already a message: left as it is


# --- compatibility rules, table-driven ---------------------------------------------------------------

BASE = {"type": "record", "name": "E", "fields": [{"name": "a", "type": "int"}]}


def _with(*fields) -> dict:
    return {"type": "record", "name": "E", "fields": [{"name": "a", "type": "int"}, *fields]}


@pytest.mark.parametrize(
    ("reader", "writer", "compatible"),
    [
        (_with({"name": "b", "type": ["null", "string"], "default": None}), BASE, True),  # added with default
        (_with({"name": "b", "type": "string"}), BASE, False),  # added without default
        (BASE, _with({"name": "b", "type": "string"}), True),  # removed field
        (
            {"type": "record", "name": "E", "fields": [{"name": "a", "type": "long"}]},
            BASE,
            True,
        ),  # int -> long
        (
            BASE,
            {"type": "record", "name": "E", "fields": [{"name": "a", "type": "long"}]},
            False,
        ),  # narrowing
        ({"type": "record", "name": "E", "fields": [{"name": "a", "type": ["null", "int"]}]}, BASE, True),
        (BASE, {"type": "record", "name": "E", "fields": [{"name": "a", "type": ["null", "int"]}]}, False),
        ({"type": "record", "name": "E", "fields": [{"name": "a", "type": "string"}]}, BASE, False),
        (
            {
                "type": "record",
                "name": "E",
                "fields": [{"name": "a", "type": {"type": "array", "items": "long"}}],
            },
            {
                "type": "record",
                "name": "E",
                "fields": [{"name": "a", "type": {"type": "array", "items": "int"}}],
            },
            True,
        ),
        (
            {"type": "enum", "name": "K", "symbols": ["A"]},
            {"type": "enum", "name": "K", "symbols": ["A", "B"]},
            False,
        ),
        (
            {"type": "enum", "name": "K", "symbols": ["A", "B", "C"]},
            {"type": "enum", "name": "K", "symbols": ["A", "B"]},
            True,
        ),
        ({"type": "record", "name": "F", "fields": [{"name": "a", "type": "int"}]}, BASE, False),  # renamed
    ],
)
def test_backward_rules(reader, writer, compatible):
    assert (backward_problems(reader, writer) == []) is compatible


# --- Arrow derivation ----------------------------------------------------------------------------------


def test_arrow_schema_is_derived_field_by_field():
    schema = arrow_schema(TRACE_EVENT)
    assert schema.names == [f["name"] for f in current(TRACE_EVENT).raw["fields"]]
    assert schema.field("prompt_token_ids").type == pa.list_(pa.field("element", pa.int32(), nullable=False))
    assert schema.field("finish_time").type == pa.timestamp("us", tz="UTC")
    assert schema.field("drafter_version").nullable and not schema.field("request_id").nullable
    assert schema.field("temperature").type == pa.float32()
    assert schema.field("event_id").metadata[b"doc"].startswith(b"UUID")


def test_table_schema_appends_lake_columns():
    table = traces_table_schema()
    assert table.names[-len(LAKE_COLUMNS) :] == [
        "kafka_partition",
        "kafka_offset",
        "ingest_time",
        "date",
        "hour",
    ]
    assert table.field("ingest_time").type == pa.timestamp("us", tz="UTC")
    assert not table.field("ingest_time").nullable
    assert table.names[: -len(LAKE_COLUMNS)] == arrow_schema(TRACE_EVENT).names
