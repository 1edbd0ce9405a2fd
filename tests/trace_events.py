"""TraceEvents and poison messages for the consumer tests (importable from any test: tests/ is on sys.path).

Messages carry schema registry ids: tests that go through the registry (an ingest subprocess, a DAG) pass
the session's ``schema_ids`` fixture; decoding in-process without one uses ``OFFLINE_IDS``, a fixed table.
"""

from __future__ import annotations

import functools
import time
import uuid
from typing import Any

from confluent_kafka import Producer
from fastavro.utils import generate_many
from lakes import lake_env

from core.settings import KafkaSettings, LakeSettings
from producers.trace_record import ServingIdentity, build_trace_record
from schemas import codec
from schemas.registry import DRAFTER_PROMOTION, TRACE_EVENT, WINDOW_ANNOUNCEMENT, SchemaVersion, current
from schemas.schema_ids import SchemaIds, register_all, subject

IDENTITY = ServingIdentity("node-a", "SmolLM2-135M-Instruct", "7ef915c9bf9d94d8", "eagle3", 3, "eagle3")
BASE_S = 1_796_000_000.0  # 2026-11-30 00:53 UTC
OFFLINE_IDS = SchemaIds(
    None, {1: current(TRACE_EVENT), 2: current(DRAFTER_PROMOTION), 3: current(WINDOW_ANNOUNCEMENT)}
)
UNREGISTERED_ID = 987_654  # an id no registry of the suite gives out
_TOPICS = {TRACE_EVENT: KafkaSettings().traces_topic, DRAFTER_PROMOTION: KafkaSettings().promotions_topic}


def schema_id(ids: SchemaIds, version: SchemaVersion) -> int:
    """The id of ``version`` in ``ids`` (registered under the default topics' subjects)."""
    return ids.id_of(version, subject(_TOPICS[version.event]))


def trace(i: int, finish_time_s: float | None = None, **overrides: Any) -> dict[str, Any]:
    """A valid TraceEvent record; ``i`` varies lengths and contents."""
    finish = BASE_S + i if finish_time_s is None else finish_time_s
    steps = 1 + i % 5
    accepted = [(i + s) % 4 for s in range(steps)]
    output = [(i * 7 + t) % 49152 for t in range(1 + sum(a + 1 for a in accepted))]
    record = build_trace_record(
        IDENTITY,
        request_id=f"cmpl-{i}",
        arrival_time_s=finish - 1.5,
        first_token_time_s=None if i % 7 == 0 else finish - 1.0,
        finish_time_s=finish,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        seed=None if i % 3 else i,
        extra_args={"domain": ["code", "prose", "docs"][i % 3]} if i % 4 else None,
        prompt_token_ids=[1, 9690, 198] + [(i + t) % 49152 for t in range(i % 50)],
        output_token_ids=output,
        per_step_accepted=accepted,
        per_step_drafted=[3] * steps,
        finish_reason="stop" if i % 2 else "length",
        drafter_version=None,
    )
    record.update(overrides)
    return record


def register_topics(kafka: KafkaSettings) -> SchemaIds:
    """What `flywheel topics create` registers, for a test's own topic names (their producers look the
    schema id up under their topic's subject)."""
    ids = SchemaIds.connect(kafka)
    register_all(kafka, ids)
    return ids


def decode(kafka: KafkaSettings, value: bytes, expect: str) -> dict[str, Any]:
    """A message of the suite's topics, decoded through the registry ``kafka`` names."""
    return codec.decode(value, _registry(kafka.schema_registry_url).version_of, expect=expect)[1]


@functools.cache
def _registry(url: str) -> SchemaIds:
    return SchemaIds.connect(KafkaSettings(schema_registry_url=url))


def poison_messages(good_payload: bytes, ids: SchemaIds = OFFLINE_IDS) -> list[tuple[str, str, bytes]]:
    """(kind, expected DLQ reason, value): every kind of undecodable or invalid message."""
    promo = current(DRAFTER_PROMOTION)
    header, body = good_payload[: codec.HEADER_LEN], good_payload[codec.HEADER_LEN :]
    bad = lambda i, **o: encoded([trace(i, **o)], ids)[0]  # noqa: E731
    return [
        ("random bytes", "not-confluent-avro", b"random bytes \x00\xff that are not avro"),
        ("empty value", "not-confluent-avro", b""),
        ("header cut short", "not-confluent-avro", b"\x00\x00\x01"),
        ("truncated avro", "malformed-avro", good_payload[: len(good_payload) // 2]),
        ("trailing bytes", "malformed-avro", good_payload + b"\x00\x02"),
        ("missing fields", "malformed-avro", header + body[:20]),
        ("unregistered schema id", "unknown-schema", codec.header(UNREGISTERED_ID) + body),
        (
            "wrong record",
            "wrong-event-type",
            codec.encode_with(promo, next(iter(generate_many(promo.parsed, 1))), schema_id(ids, promo)),
        ),
        ("steps differ", "step-count-mismatch", bad(1, per_step_accepted=[1, 2], per_step_drafted=[3])),
        (
            "accepted > drafted",
            "accepted-exceeds-drafted",
            bad(2, per_step_accepted=[3, 3], per_step_drafted=[3, 2]),
        ),
        ("negative count", "negative-step-count", bad(5, per_step_accepted=[-1], per_step_drafted=[3])),
        ("negative token id", "negative-token-id", bad(3, prompt_token_ids=[1, -5, 3])),
        ("empty event id", "empty-event-id", bad(4, event_id="")),
        ("finish time year 10000", "timestamp-out-of-range", bad(6, finish_time=253_402_300_800_000_000)),
    ]


def produce(
    kafka: KafkaSettings,
    topic: str,
    values: list[bytes],
    keys: list[bytes] | None = None,
    timestamps_ms: list[int] | None = None,
) -> None:
    """Produce values (key = request id style, spread over partitions by key) and wait for acks; every
    delivery must succeed. ``timestamps_ms``: the producer's CreateTime per message (0: its clock now)."""
    producer = Producer(
        kafka.client_config() | {"enable.idempotence": True, "linger.ms": 20, "compression.type": "zstd"}
    )
    failed: list[str] = []

    def delivered(err, _msg) -> None:
        if err is not None:
            failed.append(str(err))

    for i, value in enumerate(values):
        key = keys[i] if keys else str(uuid.uuid4()).encode()
        stamp = {"timestamp": timestamps_ms[i]} if timestamps_ms and timestamps_ms[i] else {}
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=delivered, **stamp)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(30) == 0
    assert not failed, f"{len(failed)} deliveries failed: {failed[:3]}"


def encoded(records: list[dict[str, Any]], ids: SchemaIds = OFFLINE_IDS) -> list[bytes]:
    """TraceEvent values in the wire format, with the current version's id in ``ids``."""
    sid = schema_id(ids, current(TRACE_EVENT))
    return [codec.encode(TRACE_EVENT, r, sid) for r in records]


def read_all(kafka: KafkaSettings, topic: str, partitions: int = 1, timeout_s: float = 30.0) -> list[Any]:
    """Every message of a topic (up to its high watermarks when called), partition by partition."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(kafka.client_config() | {"group.id": f"reader-{uuid.uuid4().hex[:6]}"})
    marks = [
        consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s) for p in range(partitions)
    ]
    consumer.assign([TopicPartition(topic, p, low) for p, (low, _) in enumerate(marks)])
    expected, out = sum(high - low for low, high in marks), []
    deadline = time.monotonic() + timeout_s
    while len(out) < expected and time.monotonic() < deadline:
        out.extend(m for m in consumer.consume(1000, timeout=0.5) if m.error() is None)
    consumer.close()
    assert len(out) == expected, f"{topic}: read {len(out)} of {expected} messages"
    return out


def read_dlq(kafka: KafkaSettings, topic: str) -> list[Any]:
    """Every message of a (single-partition) DLQ topic, oldest first."""
    return read_all(kafka, topic)


def ingest_env(
    kafka: KafkaSettings,
    traces_topic: str,
    dlq_topic: str,
    lake: str | LakeSettings,
    pycache: str | None = None,
) -> dict[str, str]:
    """Environment for a `flywheel ingest` subprocess pointed at the test's broker, topics and lake
    (``lake``: a local root, or the settings of a lake anywhere).

    ``pycache``: a private bytecode cache. Where PYTHONDONTWRITEBYTECODE is set, every restart would
    otherwise recompile numba, pyarrow & co. from source (seconds per start, times 11 starts).
    """
    import os

    env = (
        os.environ
        | {
            "FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "FLYWHEEL_KAFKA_TRACES_TOPIC": traces_topic,
            "FLYWHEEL_KAFKA_DLQ_TOPIC": dlq_topic,
        }
        | lake_env(LakeSettings(root=lake) if isinstance(lake, str) else lake)
    )
    if pycache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    return env
