"""The trace emitter against the real broker: never blocks, spills while Kafka is down, replays in order."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from core import process
from infra import stack
from producers.emitter import TraceEmitter
from producers.spill import SpillDir, read_records

pytestmark = pytest.mark.integration


def _encode(record: dict) -> tuple[bytes, bytes]:
    return record["key"].encode(), record["value"].encode()


def _drain(kafka_settings, topic: str, expected: int, timeout_s: float = 60.0) -> list[str]:
    consumer = Consumer(
        kafka_settings.client_config()
        | {
            "group.id": f"g-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    got: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and len(got) < expected:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                got.append(msg.value().decode())
        # a little longer, to catch duplicates arriving after the expected count
        end = time.monotonic() + 2
        while time.monotonic() < end:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                got.append(msg.value().decode())
    finally:
        consumer.close()
    return got


def _submits_without_waiting(emitter: TraceEmitter, records: list[dict], bound_s: float = 60.0) -> None:
    """Submit ``records`` from a thread of their own. A submit that waited for Kafka, the disk or the
    emitter's thread would never return in the tests below (the broker stays down, the encoder stays
    blocked), so the bound is a liveness check, not a speed measurement (that is ``bench capture``)."""
    thread = threading.Thread(target=lambda: [emitter.submit(r) for r in records], daemon=True)
    thread.start()
    thread.join(bound_s)
    assert not thread.is_alive(), "submit waited for something: it must only enqueue or drop"


def _stop_and_wait_until_noticed(emitter: TraceEmitter, broker) -> None:
    """Stop the broker and wait until the emitter knows (librdkafka reported every broker down): what is
    submitted then goes to the spill. Before that moment a record is handed to librdkafka, which holds it
    in memory until the broker returns (never lost, never spilled), so a test of the spill that submitted
    at once would depend on which came first."""
    process.stop(broker)
    _wait(lambda: emitter.stats()["down"] == 1)


def _wait(pred, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_events_reach_kafka(kafka_settings, topic_factory, tmp_path):
    topic = topic_factory(partitions=3)
    emitter = TraceEmitter(kafka_settings, topic, _encode, tmp_path / "spill")
    values = [f"v{i}" for i in range(500)]
    for v in values:
        emitter.submit({"key": v, "value": v})
    _wait(lambda: emitter.counts["sent"] == len(values))
    counts = emitter.close()
    assert counts["spilled"] == counts["dropped"] == 0
    assert sorted(_drain(kafka_settings, topic, len(values))) == sorted(values)


def test_broker_outage_spills_then_replays_exactly_once_in_order(
    local_stack, kafka_settings, topic_factory, tmp_path
):
    topic = topic_factory(partitions=1)  # one partition: the topic's order is the emitter's order
    emitter = TraceEmitter(kafka_settings, topic, _encode, tmp_path / "spill", probe_interval_s=0.5)
    broker = stack.service("kafka", local_stack)
    before = [f"before-{i}" for i in range(100)]
    during = [f"during-{i}" for i in range(300)]
    after = [f"after-{i}" for i in range(100)]
    for v in before:
        emitter.submit({"key": "k", "value": v})
    _wait(lambda: emitter.counts["sent"] == len(before))

    try:
        _stop_and_wait_until_noticed(emitter, broker)
        _submits_without_waiting(emitter, [{"key": "k", "value": v} for v in during])
        _wait(lambda: emitter.counts["spilled"] == len(during) and emitter.stats()["queued"] == 0)
        assert SpillDir(tmp_path / "spill").pending()
    finally:
        process.start(broker, local_stack.start_timeout_s)

    _wait(lambda: not SpillDir(tmp_path / "spill").pending(), timeout_s=60)
    for v in after:
        emitter.submit({"key": "k", "value": v})
    counts = emitter.close()
    got = _drain(kafka_settings, topic, len(before) + len(during) + len(after))
    assert got == before + during + after
    assert counts["dropped"] == counts["failed"] == 0
    assert counts["sent"] + counts["replayed"] == len(got)


def test_spill_left_by_a_crashed_process_is_replayed(kafka_settings, topic_factory, tmp_path):
    topic = topic_factory(partitions=1)
    spill = SpillDir(tmp_path / "spill")
    for i in range(50):
        spill.append(b"k", f"old-{i}".encode())
    spill.seal()
    # a torn tail from the crash must not poison the file
    with spill.files()[0].open("ab") as f:
        f.write(b"\x00\x00\x01")
    assert len(list(read_records(spill.files()[0]))) == 50

    emitter = TraceEmitter(kafka_settings, topic, _encode, tmp_path / "spill", probe_interval_s=0.2)
    emitter.submit({"key": "k", "value": "new-0"})
    # a fresh listing: ``spill`` keeps its own in-memory list of what it wrote
    _wait(
        lambda: (
            not SpillDir(spill.directory).pending()
            and emitter.counts["sent"] + emitter.counts["replayed"] == 51
        )
    )
    emitter.close()
    assert _drain(kafka_settings, topic, 51) == [f"old-{i}" for i in range(50)] + ["new-0"]


def test_full_queue_drops_and_counts_instead_of_blocking(kafka_settings, topic_factory, tmp_path):
    topic = topic_factory()

    release = threading.Event()

    def blocked_encode(record):  # the emitter's thread stays here until every submit returned
        release.wait()
        return _encode(record)

    emitter = TraceEmitter(kafka_settings, topic, blocked_encode, tmp_path / "spill", max_queue=5)
    try:
        _submits_without_waiting(emitter, [{"key": "k", "value": str(i)} for i in range(200)])
        # the thread holds at most one record and the queue five: the rest were dropped and counted
        assert emitter.counts["dropped"] >= 200 - 6
    finally:
        release.set()
    emitter.close()


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A real 64 KiB filesystem (tmpfs), mounted for the test: the spill meets ENOSPC, not a mock of it."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.fail("mounting a size-capped tmpfs needs root (CI runs the suite as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_full_disk_during_an_outage_costs_events_not_capture(
    local_stack, kafka_settings, topic_factory, small_disk
):
    topic = topic_factory(partitions=1)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 32 * 1024)  # half the disk: the spill gets the other half
    spill_dir = small_disk / "spill"
    emitter = TraceEmitter(kafka_settings, topic, _encode, spill_dir, probe_interval_s=0.5)
    broker = stack.service("kafka", local_stack)
    during = [f"during-{i:03d}-" + "x" * 500 for i in range(200)]  # ~100 KiB: most cannot be spilled
    freed = [f"freed-{i:03d}-" + "y" * 500 for i in range(20)]
    emitter.submit({"key": "k", "value": "connected"})  # the emitter's producer is up before the outage
    _wait(lambda: emitter.counts["sent"] == 1)
    try:
        _stop_and_wait_until_noticed(emitter, broker)
        _submits_without_waiting(emitter, [{"key": "k", "value": v} for v in during])
        _wait(lambda: emitter.counts["spill_dropped"] > 0 and emitter.stats()["queued"] == 0)
        dropped = emitter.counts["spill_dropped"]
        assert emitter.alive(), "the emitter thread must survive a full disk"
        assert emitter.counts["io_errors"] >= dropped and emitter.counts["restarts"] == 0
        assert emitter.counts["spilled"] > 0 and dropped < len(during)

        filler.unlink()  # the disk frees while the broker is still down: spilling resumes
        for v in freed:
            emitter.submit({"key": "k", "value": v})
        _wait(lambda: emitter.stats()["queued"] == 0 and emitter.counts["spilled"] >= len(freed))
        assert emitter.counts["spill_dropped"] == dropped
    finally:
        process.start(broker, local_stack.start_timeout_s)

    _wait(lambda: not SpillDir(spill_dir).pending(), timeout_s=60)
    counts = emitter.close()
    got = _drain(kafka_settings, topic, 1 + len(during) - dropped + len(freed))
    # same-sized records: once the disk refused one it refused every later one until it freed, so what
    # was kept is the head of `during`, spilled and replayed in order
    assert got == ["connected"] + during[: len(during) - dropped] + freed
    print(json.dumps({"full_disk": counts, "delivered": len(got)}))
    assert counts["failed"] == counts["dropped"] == 0
    assert counts["sent"] + counts["replayed"] == len(got)


def test_the_emitter_loop_is_restarted_whatever_escapes_it(kafka_settings, topic_factory, tmp_path):
    topic = topic_factory(partitions=1)
    emitter = TraceEmitter(kafka_settings, topic, _encode, tmp_path / "spill")
    real_advance = emitter._advance_replay
    failures = iter([RuntimeError("injected"), RuntimeError("injected again")])

    def advance_that_fails_twice() -> None:
        error = next(failures, None)
        if error is not None:
            raise error
        real_advance()

    emitter._advance_replay = advance_that_fails_twice
    values = [f"v{i}" for i in range(100)]
    for v in values:
        emitter.submit({"key": "k", "value": v})
    _wait(lambda: emitter.counts["sent"] == len(values))
    assert emitter.alive() and emitter.counts["restarts"] == 2
    counts = emitter.close()
    assert counts["dropped"] == counts["failed"] == 0
    assert _drain(kafka_settings, topic, len(values)) == values


def test_a_large_spill_is_replayed_streaming_through_a_small_producer_queue(
    kafka_settings, topic_factory, tmp_path
):
    """librdkafka's queue holds 50 messages here: replay must stop at BufferError and resume with the
    record it could not hand over, not skip it and not load the whole file."""
    topic = topic_factory(partitions=1)
    spill = SpillDir(tmp_path / "spill")
    values = [f"old-{i:05d}" for i in range(5000)]
    for v in values:
        spill.append(b"k", v.encode())
    spill.seal()
    emitter = TraceEmitter(kafka_settings, topic, _encode, tmp_path / "spill", max_queue=50)
    emitter.submit({"key": "k", "value": "new"})
    _wait(lambda: emitter.counts["sent"] + emitter.counts["replayed"] == len(values) + 1, timeout_s=60)
    counts = emitter.close()
    assert counts["spill_dropped"] == counts["failed"] == 0
    assert _drain(kafka_settings, topic, len(values) + 1) == values + ["new"]
    assert not SpillDir(tmp_path / "spill").pending()
