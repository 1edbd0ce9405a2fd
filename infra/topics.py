"""The project's Kafka topics, declared once with the configs we document, and created idempotently."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from core.settings import KafkaSettings


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    purpose: str = ""


def project_topics(kafka: KafkaSettings) -> list[TopicSpec]:
    """Every topic the flywheel owns. docs/data-contract.md describes the same list for other teams."""
    return [
        TopicSpec(
            kafka.traces_topic,
            kafka.traces_partitions,
            {
                "cleanup.policy": "delete",
                "retention.ms": str(kafka.traces_retention_ms),
                "segment.ms": str(kafka.segment_ms),
                "compression.type": "producer",  # keep the producer's zstd batches as they are
                "max.message.bytes": str(4 * 1024 * 1024),
                # the broker's clock stamps every message: the lake's trusted time (ingest_time), never
                # the serving node's (a CreateTime topic makes the ingest fall back to its own clock)
                "message.timestamp.type": "LogAppendTime",
            },
            "one TraceEvent per finished request (Avro), key = request id",
        ),
        TopicSpec(
            kafka.dlq_topic,
            1,
            {
                "cleanup.policy": "delete",
                "retention.ms": str(kafka.dlq_retention_ms),
                "segment.ms": str(kafka.segment_ms),
                "compression.type": "zstd",
                "max.message.bytes": str(8 * 1024 * 1024),
            },
            "messages the ingest could not decode or validate, with the reason in headers",
        ),
        TopicSpec(
            kafka.promotions_topic,
            1,
            {
                "cleanup.policy": "compact",  # the latest promotion per target model is the state
                "min.compaction.lag.ms": "0",
                "segment.ms": str(kafka.segment_ms),
                "compression.type": "zstd",
            },
            "DrafterPromotion events, key = target model id",
        ),
    ]


def admin_client(kafka: KafkaSettings) -> AdminClient:
    return AdminClient(kafka.client_config())


def ensure_topics(admin: AdminClient, specs: list[TopicSpec], timeout_s: float = 30.0) -> list[str]:
    """Create missing topics; existing ones are left untouched. Returns the names created, once the broker's
    metadata lists them (a client started right after must find them)."""
    futures = admin.create_topics(
        [NewTopic(s.name, num_partitions=s.partitions, replication_factor=1, config=s.config) for s in specs],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    created = []
    for name, fut in futures.items():
        try:
            fut.result()
            created.append(name)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    deadline = time.monotonic() + timeout_s
    while created:
        listed = admin.list_topics(timeout=timeout_s).topics
        if all(name in listed and not listed[name].error for name in created):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"created topics {created} are not in the broker's metadata after {timeout_s}s"
            )
        time.sleep(0.1)
    return created


def delete_topics(admin: AdminClient, names: list[str], timeout_s: float = 30.0) -> None:
    for fut in admin.delete_topics(names, operation_timeout=timeout_s).values():
        try:
            fut.result()
        except KafkaException as e:
            if e.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
