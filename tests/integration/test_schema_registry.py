"""The stack's schema registry (Apicurio, Confluent-compatible API) and the Confluent wire format end to end.

`flywheel topics create` registers every schema version with BACKWARD enforced by the registry; what the
serving emitter writes is read by Confluent's own ``AvroDeserializer``; while the registry is away the
emitter spills, and it replays with the right ids once the registry answers.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import typer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext
from trace_events import read_all, trace
from typer.testing import CliRunner
from user_state import OWN_PORTS

from core import process
from core.settings import KafkaSettings, StackSettings
from infra import stack
from infra.cli import register
from infra.stack.schema_registry import SchemaRegistry, registry_url
from producers.emitter import TraceEmitter
from producers.trace_record import TraceEncoder
from schemas import codec
from schemas.registry import TRACE_EVENT, current, versions
from schemas.schema_ids import COMPATIBILITY, SchemaIds, register_all, subject, topic_events

pytestmark = pytest.mark.integration


def _topics(kafka: KafkaSettings) -> KafkaSettings:
    tag = uuid.uuid4().hex[:8]
    return kafka.model_copy(
        update={
            "traces_topic": f"reg-traces-{tag}",
            "dlq_topic": f"reg-dlq-{tag}",
            "promotions_topic": f"reg-promotions-{tag}",
            "windows_topic": f"reg-windows-{tag}",
        }
    )


def _emit(
    kafka: KafkaSettings, encoder: TraceEncoder, topic: str, records: list[dict], spill
) -> TraceEmitter:
    emitter = TraceEmitter(kafka, topic, encoder, spill, probe_interval_s=0.3, frame=encoder.frame)
    for record in records:
        emitter.submit(record)
    return emitter


def _wait(what: str, condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_registry_answers_the_confluent_api_and_keeps_ids_across_a_restart(local_stack, schema_ids):
    row = {r.name: r for r in stack.status(local_stack)}["registry"]
    assert row.healthy and row.address == f"{local_stack.host}:{local_stack.registry_port}"
    trace_id = schema_ids.id_of(current(TRACE_EVENT), subject(KafkaSettings().traces_topic))
    registry = stack.service("registry", local_stack)
    assert process.stop(registry)
    process.start(registry, local_stack.start_timeout_s)
    client = SchemaRegistryClient({"url": registry_url(local_stack)})
    stored = json.loads(client.get_schema(trace_id).schema_str)  # the H2 file store kept it
    assert stored["name"] == "TraceEvent" and SchemaIds(client).version_of(trace_id) == current(TRACE_EVENT)


def test_topics_create_registers_every_version_under_value_subjects_with_backward(
    kafka_settings, topic_factory
):
    kafka = _topics(kafka_settings)
    env = {
        "FLYWHEEL_KAFKA_TRACES_TOPIC": kafka.traces_topic,
        "FLYWHEEL_KAFKA_DLQ_TOPIC": kafka.dlq_topic,
        "FLYWHEEL_KAFKA_PROMOTIONS_TOPIC": kafka.promotions_topic,
        "FLYWHEEL_KAFKA_WINDOWS_TOPIC": kafka.windows_topic,
        "COLUMNS": "200",
    }
    cli = typer.Typer()
    register(cli)
    out = CliRunner().invoke(cli, ["topics", "create"], env=env)
    assert out.exit_code == 0, out.output
    client = SchemaRegistryClient({"url": kafka.schema_registry_url})
    for topic, event in topic_events(kafka).items():
        name = subject(topic)
        assert name in out.output and client.get_compatibility(name) == COMPATIBILITY
        assert client.get_versions(name) == list(range(1, len(versions(event)) + 1))
    # BACKWARD is the registry's to enforce: a field without a default would make old data unreadable
    broken = dict(current(TRACE_EVENT).raw)
    broken["fields"] = [*broken["fields"], {"name": "new_required", "type": "string"}]
    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema(subject(kafka.traces_topic), Schema(json.dumps(broken), "AVRO"))
    assert refused.value.http_status_code == 409
    broken["fields"][-1]["default"] = ""
    assert client.test_compatibility(subject(kafka.traces_topic), Schema(json.dumps(broken), "AVRO"))
    again = register_all(kafka, SchemaIds.connect(kafka))  # idempotent: the same ids
    assert {r.schema_id for r in again} == {
        SchemaIds.connect(kafka).id_of(current(e), subject(t)) for t, e in topic_events(kafka).items()
    }
    from infra.topics import admin_client, delete_topics

    topics = [kafka.traces_topic, kafka.dlq_topic, kafka.promotions_topic, kafka.windows_topic]
    delete_topics(admin_client(kafka), topics)


def test_confluent_avro_deserializer_reads_what_the_emitter_writes(
    kafka_settings, schema_ids, topic_factory, tmp_path
):
    topic = topic_factory(partitions=2)
    records = [trace(i) for i in range(40)]
    encoder = TraceEncoder(SchemaIds.connect(kafka_settings), kafka_settings.traces_topic)
    emitter = _emit(kafka_settings, encoder, topic, records, tmp_path / "spill")
    _wait("deliveries", lambda: emitter.counts["sent"] == len(records))
    emitter.close()
    client = SchemaRegistryClient({"url": kafka_settings.schema_registry_url})
    deserialize = AvroDeserializer(
        client
    )  # Confluent's: magic byte, id lookup, writer schema from the registry
    got = {}
    for msg in read_all(kafka_settings, topic, partitions=2):
        value = deserialize(msg.value(), SerializationContext(topic, MessageField.VALUE))
        got[value["request_id"]] = value
    assert set(got) == {r["request_id"] for r in records}
    for record in records:
        value = got[record["request_id"]]
        assert value["finish_time"].timestamp() * 1_000_000 == pytest.approx(
            record["finish_time"]
        )  # logical type
        assert {k: v for k, v in value.items() if not k.endswith("_time")} == {
            k: v for k, v in record.items() if not k.endswith("_time")
        }


def test_the_emitter_spills_while_the_registry_is_away_and_replays_with_its_ids(
    kafka_settings, topic_factory, tmp_path
):
    """A registry of this module's own (own port, own store): nothing answers at first, so every event is
    spilled like in a broker outage; once it runs and knows the schemas, the spill replays with its ids."""
    own = StackSettings(state_dir=tmp_path / "stack", registry_port=OWN_PORTS["registry"])
    kafka = kafka_settings.model_copy(update={"schema_registry_url": registry_url(own)})
    topic = topic_factory(partitions=1)
    records = [trace(i) for i in range(25)]
    encoder = TraceEncoder(SchemaIds.connect(kafka, timeout_s=1.0), kafka.traces_topic)
    emitter = _emit(kafka, encoder, topic, records, tmp_path / "spill")
    _wait("spilling", lambda: emitter.counts["spilled"] == len(records))
    assert emitter.counts["sent"] == 0 and emitter.stats()["down"] == 1
    registry = SchemaRegistry(own)
    try:
        process.start(registry, own.start_timeout_s)
        register_all(kafka, SchemaIds.connect(kafka))
        _wait("replay", lambda: emitter.counts["replayed"] == len(records))
        emitter.submit(trace(99))  # and new events go straight to Kafka again
        _wait("a direct send", lambda: emitter.counts["sent"] == 1)
        emitter.close()
        ids = SchemaIds.connect(kafka)
        values = [m.value() for m in read_all(kafka, topic)]
        decoded = [codec.decode(v, ids.version_of, expect=TRACE_EVENT)[1] for v in values]
        assert [d["request_id"] for d in decoded] == [r["request_id"] for r in [*records, trace(99)]]
        assert {codec.schema_id(v) for v in values} == {
            ids.id_of(current(TRACE_EVENT), subject(kafka.traces_topic))
        }
    finally:
        emitter.close()
        process.stop(registry)
