"""A real three-node KRaft cluster (`flywheel stack up --kafka-brokers 3`, the same jars): acks=all with
min.insync.replicas 2 keeps serving and ingest exactly-once through a SIGKILLed broker.

The cluster runs on its own ports (29092-29097) in a tmp state dir, started and stopped by this module.
The serving path's TraceEmitter (idempotent producer: acks=all) streams events while `flywheel ingest`
writes them to Delta; mid-traffic and mid-ingest the leader of partition 0 of the traces topic is killed
with SIGKILL, traffic goes on on two nodes, then the node is restarted and rejoins every ISR. At the end
the table holds every submitted event once, and the emitter dropped and failed nothing.

One broker's death is not "Kafka down" for the emitter (only all brokers down is): librdkafka moves the
partitions to their new leaders and nothing goes to the spill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import ConfigResource
from lakes import commits
from test_ingest_exactly_once import assert_exactly_once
from trace_events import ingest_env, register_topics, trace

from core import process
from core.settings import KafkaSettings, LakeSettings, StackSettings
from infra import stack
from infra.topics import admin_client, cluster_topics, sync_topics
from producers.emitter import TraceEmitter
from producers.trace_record import TraceEncoder

pytestmark = pytest.mark.integration

MAX_EVENTS = 20_000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[StackSettings]:
    settings = StackSettings(
        state_dir=tmp_path_factory.mktemp("cluster-state"),
        kafka_port=29092,
        kafka_controller_port=29093,
        kafka_brokers=3,
        kafka_heap="512m",
        start_timeout_s=120,
        cache_dir=os.environ.get("FLYWHEEL_STACK_CACHE_DIR") or StackSettings().cache_dir,
    )
    try:
        stack.up(settings, only=["kafka"])  # a failure to start fails the module
        yield settings
    finally:
        stack.down(settings, only=["kafka"])


@pytest.fixture(scope="module")
def kafka(cluster: StackSettings) -> KafkaSettings:
    suffix = uuid.uuid4().hex[:8]
    settings = KafkaSettings(
        bootstrap_servers=stack.bootstrap_servers(cluster),
        traces_topic=f"cluster.traces.{suffix}",
        dlq_topic=f"cluster.dlq.{suffix}",
        promotions_topic=f"cluster.promotions.{suffix}",
    )
    admin = admin_client(settings)
    sync_topics(admin, cluster_topics(settings, admin))
    return settings


def _metadata_listing(admin, names: tuple[str, ...], timeout_s: float = 60):
    """Cluster metadata listing ``names``. Each broker keeps its own copy of the KRaft metadata log and a
    metadata request goes to any of them: one that has not replayed the creations yet answers without
    the new topics for a moment, so ask until an answer has them all."""
    deadline = time.monotonic() + timeout_s
    while True:
        meta = admin.list_topics(timeout=30)
        if all(n in meta.topics and not meta.topics[n].error for n in names) or time.monotonic() > deadline:
            return meta
        time.sleep(0.2)


def test_three_brokers_and_topics_replicated_three_ways_min_insync_two(cluster, kafka):
    admin = admin_client(kafka)
    names = (kafka.traces_topic, kafka.dlq_topic, kafka.promotions_topic)
    meta = _metadata_listing(admin, names)
    assert sorted(meta.brokers) == [1, 2, 3]
    for name in names:
        assert name in meta.topics, (name, sorted(meta.topics))
        partitions = meta.topics[name].partitions.values()
        assert {len(p.replicas) for p in partitions} == {3}, name
        assert {len(p.isrs) for p in partitions} == {3}, name
        resource = ConfigResource(ConfigResource.Type.TOPIC, name)
        config = admin.describe_configs([resource])[resource].result(30)
        assert config["min.insync.replicas"].value == "2", name
    again = sync_topics(admin, cluster_topics(kafka, admin))  # idempotent, no replication warnings
    assert all(s.state == "as documented" and not s.warnings for s in again)


def _leaders(admin, kafka: KafkaSettings, timeout_s: float = 60) -> dict[int, int]:
    """Partition -> leader; a metadata request that went to the broker just killed times out: ask again."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            meta = admin.list_topics(kafka.traces_topic, timeout=10)
            return {p: m.leader for p, m in meta.topics[kafka.traces_topic].partitions.items()}
        except KafkaException:
            if time.monotonic() > deadline:
                raise


def test_sigkill_a_broker_mid_traffic_and_mid_ingest_loses_and_duplicates_nothing(
    cluster, kafka, local_stack, tmp_path, tmp_path_factory
):
    admin = admin_client(kafka)  # one client for every look at leaders and ISRs
    pycache = str(tmp_path_factory.mktemp("pycache"))
    lake = LakeSettings(root=str(tmp_path / "lake"))
    env = ingest_env(kafka, kafka.traces_topic, kafka.dlq_topic, lake, pycache)
    stats_path = tmp_path / "ingest.json"
    ingest = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flywheel.cli",
            "ingest",
            "--group",
            "cluster-ingest",
            "--no-progress",
            "--consume-batch",
            "50",
            "--flush-events",
            "100",
            "--flush-latency-s",
            "0.2",
            "--session-timeout-ms",
            "6000",
            "--until-idle-s",
            "10",
            "--stats-json",
            str(stats_path),
        ],
        env=env,
        stderr=(tmp_path / "ingest.log").open("w"),
    )
    # the suite's registry serves the cluster's topics too: their subjects registered as topics create does
    encoder = TraceEncoder(register_topics(kafka), kafka.traces_topic)
    emitter = TraceEmitter(
        kafka, kafka.traces_topic, encoder, tmp_path / "spill", probe_interval_s=0.5, frame=encoder.frame
    )
    records: list[dict] = []
    stop_traffic = threading.Event()

    def serve() -> None:  # 25 requests finish every 0.1 s until told to stop
        while not stop_traffic.is_set() and len(records) < MAX_EVENTS:
            for _ in range(25):
                records.append(trace(len(records)))
                emitter.submit(records[-1])
            time.sleep(0.1)

    started = time.monotonic()
    server = threading.Thread(target=serve)
    server.start()
    try:
        deadline = time.monotonic() + 90
        while commits(lake) < 3:  # the ingest is committing: mid-ingest
            assert time.monotonic() < deadline, (tmp_path / "ingest.log").read_text()[-3000:]
            assert ingest.poll() is None, (tmp_path / "ingest.log").read_text()[-3000:]
            time.sleep(0.05)
        leaders_before = _leaders(admin, kafka)
        victim = stack.service("kafka" if leaders_before[0] == 1 else f"kafka-{leaders_before[0]}", cluster)
        pid = process.read_pid(victim)
        os.kill(pid, signal.SIGKILL)  # the JVM of the node leading partition 0, mid-traffic
        killed_at, submitted_at_kill = time.monotonic() - started, len(records)
        deadline = time.monotonic() + 30
        while (leaders := _leaders(admin, kafka)) and leaders_before[0] in leaders.values():
            assert time.monotonic() < deadline, f"no new leaders after the kill: {leaders}"
            time.sleep(0.2)
        time.sleep(4)  # traffic and ingest go on on two nodes
        stop_traffic.set()
        server.join(timeout=60)
        assert not server.is_alive()
        # the killed node comes back and catches up
        process.start(victim, cluster.start_timeout_s)
        counts = emitter.close(timeout_s=60)
        ingest.wait(timeout=120)
    finally:
        if ingest.poll() is None:
            ingest.kill()
            ingest.wait()
    assert ingest.returncode == 0, (tmp_path / "ingest.log").read_text()[-3000:]
    for bad in ("dropped", "failed", "spill_dropped", "spilled"):
        assert counts[bad] == 0, counts
    assert counts["sent"] == len(records), counts
    assert_exactly_once(lake, {r["event_id"] for r in records})
    deadline = time.monotonic() + 60
    while True:  # the restarted node is back in every ISR
        meta = admin.list_topics(kafka.traces_topic, timeout=10)
        isrs = {len(p.isrs) for p in meta.topics[kafka.traces_topic].partitions.values()}
        if isrs == {3}:
            break
        assert time.monotonic() < deadline, f"ISR sizes {isrs} a minute after the restart"
        time.sleep(0.5)
    print(
        json.dumps(
            {
                "killed_node": leaders_before[0],
                "killed_at_s": round(killed_at, 1),
                "submitted_at_kill": submitted_at_kill,
                "submitted": len(records),
                "leaders_before": leaders_before,
                "leaders_after_kill": leaders,
                "emitter": counts,
                "ingest": json.loads(stats_path.read_text()),
                "total_s": round(time.monotonic() - started, 1),
            }
        )
    )
