"""`flywheel topics create` on the real broker: creates what is missing and brings a drifted topic back to
its documented configs and partition count, then has nothing left to do."""

from __future__ import annotations

import uuid

import pytest

from infra.topics import admin_client, cluster_topics, delete_topics, ensure_topics, sync_topics

pytestmark = pytest.mark.integration


def test_sync_creates_and_repairs_topics(kafka_settings):
    suffix = uuid.uuid4().hex[:8]
    kafka = kafka_settings.model_copy(
        update={
            "traces_topic": f"sync-traces-{suffix}",
            "dlq_topic": f"sync-dlq-{suffix}",
            "promotions_topic": f"sync-promotions-{suffix}",
            "windows_topic": f"sync-windows-{suffix}",
            "traces_partitions": 4,
        }
    )
    admin = admin_client(kafka)
    specs = cluster_topics(kafka, admin)
    traces = specs[0]
    assert traces.replication_factor == 1 and traces.config["min.insync.replicas"] == "1"  # one local broker
    # a traces topic someone created by hand: 2 partitions, one day of retention, CreateTime
    drifted = traces.__class__(traces.name, 2, {"retention.ms": "86400000"}, replication_factor=1)
    ensure_topics(admin, [drifted])
    try:
        first = {r.name: r for r in sync_topics(admin, specs)}
        assert all(first[t].created for t in (kafka.dlq_topic, kafka.promotions_topic, kafka.windows_topic))
        fixed = first[kafka.traces_topic]
        assert not fixed.created and fixed.partitions == (2, 4)
        assert fixed.altered["retention.ms"] == ("86400000", traces.config["retention.ms"])
        assert fixed.altered["message.timestamp.type"] == ("CreateTime", "LogAppendTime")
        assert not fixed.warnings

        again = sync_topics(admin, specs)
        assert [r.state for r in again] == ["as documented"] * 4
    finally:
        delete_topics(
            admin, [kafka.traces_topic, kafka.dlq_topic, kafka.promotions_topic, kafka.windows_topic]
        )
