"""The project's Kafka topics, declared once with the configs we document, created or brought back to them.

Replication follows the cluster: ``replication_factor`` defaults to min(3, brokers) and
``min.insync.replicas`` to one less (at least 1), so the same command is right for the single local broker
and for a production cluster, and both can be pinned in settings. ``sync_topics`` (what `flywheel topics
create` runs) creates missing topics and, for existing ones, sets every documented config that differs and
adds partitions up to the declared count (never fewer: that would remap keys); a replication factor that
differs is reported, not changed (that takes a partition reassignment).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)

from core.settings import KafkaSettings


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    purpose: str = ""
    replication_factor: int = 1


def replication(kafka: KafkaSettings, brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for a cluster of ``brokers``, settings first."""
    factor = kafka.replication_factor or max(1, min(3, brokers))
    if factor > brokers:
        raise ValueError(
            f"replication factor {factor} needs at least {factor} brokers; the cluster has {brokers}"
        )
    insync = kafka.min_insync_replicas or max(1, factor - 1)
    if insync > factor:
        raise ValueError(f"min.insync.replicas {insync} exceeds the replication factor {factor}")
    return factor, insync


def cluster_topics(kafka: KafkaSettings, admin: AdminClient, timeout_s: float = 30.0) -> list[TopicSpec]:
    """``project_topics`` with the replication the cluster behind ``admin`` supports."""
    brokers = len(admin.list_topics(timeout=timeout_s).brokers)
    factor, insync = replication(kafka, brokers)
    return [
        TopicSpec(s.name, s.partitions, s.config | {"min.insync.replicas": str(insync)}, s.purpose, factor)
        for s in project_topics(kafka)
    ]


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
        TopicSpec(
            kafka.windows_topic,
            1,  # a handful of messages an hour, read by one triggerer: order is all that matters
            {
                "cleanup.policy": "delete",
                "retention.ms": str(kafka.windows_retention_ms),
                "segment.ms": str(kafka.segment_ms),
                "compression.type": "zstd",
            },
            "WindowAnnouncement events (a window's worth of traces committed), key = table URI",
        ),
    ]


def admin_client(kafka: KafkaSettings) -> AdminClient:
    return AdminClient(kafka.client_config())


def ensure_topics(admin: AdminClient, specs: list[TopicSpec], timeout_s: float = 30.0) -> list[str]:
    """Create missing topics; existing ones are left untouched. Returns the names created, once the broker's
    metadata lists them (a client started right after must find them)."""
    futures = admin.create_topics(
        [
            NewTopic(
                s.name, num_partitions=s.partitions, replication_factor=s.replication_factor, config=s.config
            )
            for s in specs
        ],
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


@dataclass
class TopicSync:
    """What ``sync_topics`` found and did for one topic."""

    name: str
    created: bool = False
    altered: dict[str, tuple[str | None, str]] = field(default_factory=dict)  # config -> (was, now)
    partitions: tuple[int, int] | None = None  # (was, now) when partitions were added
    warnings: list[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.created:
            return "created"
        changes = [f"{k}: {was} -> {now}" for k, (was, now) in self.altered.items()]
        if self.partitions:
            changes.append(f"partitions: {self.partitions[0]} -> {self.partitions[1]}")
        return "updated: " + "; ".join(changes) if changes else "as documented"


def sync_topics(admin: AdminClient, specs: list[TopicSpec], timeout_s: float = 30.0) -> list[TopicSync]:
    """Create missing topics; bring existing ones to their documented configs and partition counts."""
    created = set(ensure_topics(admin, specs, timeout_s))
    meta = admin.list_topics(timeout=timeout_s).topics
    out = []
    for spec in specs:
        sync = TopicSync(spec.name, created=spec.name in created)
        out.append(sync)
        if sync.created:
            continue
        partitions = meta[spec.name].partitions
        replicas = {len(p.replicas) for p in partitions.values()}
        if replicas != {spec.replication_factor}:
            sync.warnings.append(
                f"replication factor {sorted(replicas)} != {spec.replication_factor}: reassign partitions to change it"
            )
        if len(partitions) < spec.partitions:
            admin.create_partitions([NewPartitions(spec.name, spec.partitions)])[spec.name].result(timeout_s)
            sync.partitions = (len(partitions), spec.partitions)
        elif len(partitions) > spec.partitions:
            sync.warnings.append(
                f"{len(partitions)} partitions, more than the {spec.partitions} declared: left"
            )
        resource = ConfigResource(ConfigResource.Type.TOPIC, spec.name)
        current = admin.describe_configs([resource])[resource].result(timeout_s)
        differ = {k: v for k, v in spec.config.items() if k not in current or current[k].value != v}
        if differ:
            resource = ConfigResource(
                ConfigResource.Type.TOPIC,
                spec.name,
                incremental_configs=[
                    ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in differ.items()
                ],
            )
            admin.incremental_alter_configs([resource])[resource].result(timeout_s)
            sync.altered = {k: (current[k].value if k in current else None, v) for k, v in differ.items()}
    return out
