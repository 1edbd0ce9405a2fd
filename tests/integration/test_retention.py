"""Retention on a real Delta table fed by the real ingest: only expired days go, and storage stays bounded."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
from deltalake import DeltaTable
from trace_events import encoded, produce, trace

from consumers.delta_sink import IngestOptions, TraceIngest
from consumers.flush_policy import FlushPolicy
from consumers.retention import apply_retention, partitions_of, plan_retention
from core.settings import LakeSettings

pytestmark = pytest.mark.integration


DAY0 = datetime(2026, 11, 1, tzinfo=UTC)
# Shortened so that a test can watch files and log entries expire (see consumers/table.py for the real ones).
FAST_EXPIRY = {
    "delta.logRetentionDuration": "interval 1 seconds",
    "delta.deletedFileRetentionDuration": "interval 1 seconds",  # tombstones leave checkpoints quickly
    "delta.checkpointInterval": "5",
}


def day_events(day: int, n: int, hours: int = 3) -> list[dict]:
    """``n`` events finishing on DAY0 + day, spread over its first ``hours`` hours."""
    start = (DAY0 + timedelta(days=day)).timestamp()
    return [trace(day * 100_000 + i, finish_time_s=start + (i % hours) * 3600 + i) for i in range(n)]


def ingest_all(kafka, lake, topic, group="retention") -> None:
    opts = IngestOptions(
        group=group,
        until_idle_s=1.5,
        policy=FlushPolicy(max_events=40, max_age_s=0.2),  # several files per hour, as a live stream makes
        table_properties=FAST_EXPIRY,
    )
    TraceIngest(kafka, lake, opts, topic=topic).run()


def disk_usage(root: str) -> tuple[int, int, int]:
    """(Parquet bytes, _delta_log bytes, _delta_log files) under the table root."""
    data = log = log_files = 0
    for folder, _, files in os.walk(root):
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
        if "_delta_log" in folder:
            log, log_files = log + size, log_files + len(files)
        else:
            data += size
    return data, log, log_files


def test_retention_deletes_only_expired_partitions(kafka_settings, topic_factory, tmp_path):
    topic, dlq = topic_factory(partitions=2), topic_factory(prefix="dlq")
    kafka = kafka_settings.model_copy(update={"dlq_topic": dlq})
    lake = LakeSettings(root=str(tmp_path / "lake"))
    records = [r for day in range(5) for r in day_events(day, 60)]
    produce(kafka, topic, encoded(records))
    ingest_all(kafka, lake, topic)
    dt = DeltaTable(lake.traces_uri)
    before = partitions_of(dt)
    assert {p.date for p in before} == {f"2026-11-0{d}" for d in range(1, 6)}

    now = DAY0 + timedelta(days=4, hours=12)  # retention 2 days -> cutoff 2026-11-03
    dry = apply_retention(dt, plan_retention(before, now, 2), dry_run=True)
    assert dry.dry_run and partitions_of(DeltaTable(lake.traces_uri)) == before  # a dry run changes nothing

    report = apply_retention(dt, plan_retention(before, now, 2), vacuum_retention_hours=0)
    dt = DeltaTable(lake.traces_uri)
    after = partitions_of(dt)
    assert {p.date for p in after} == {"2026-11-03", "2026-11-04", "2026-11-05"}
    kept = [r for r in records if r["finish_time"] >= (DAY0 + timedelta(days=2)).timestamp() * 1e6]
    assert sorted(dt.to_pyarrow_table(columns=["event_id"])["event_id"].to_pylist()) == sorted(
        r["event_id"] for r in kept
    )
    assert report.deleted_files == sum(p.files for p in before if p.date < "2026-11-03")
    # closed hours are compacted to one file each; the current day's open hours are left alone
    closed = [p for p in after if p.start + timedelta(hours=1, minutes=5) <= now]
    assert closed and all(p.files == 1 for p in closed)
    assert set(report.compacted) == {f"{p.date}/{p.hour:02d}" for p in before if p in report.plan.compact}
    on_disk = {
        os.path.join(d, f)
        for d, _, fs in os.walk(lake.traces_uri)
        for f in fs
        if f.endswith(".parquet") and "_delta_log" not in d
    }
    assert on_disk == {u.removeprefix("file://") for u in dt.file_uris()}, "vacuum left files the table lost"


def test_storage_stays_bounded_under_continuous_ingest(kafka_settings, topic_factory, tmp_path):
    """Six simulated days of steady traffic with retention after each: bytes on disk plateau."""
    topic, dlq = topic_factory(partitions=2), topic_factory(prefix="dlq")
    kafka = kafka_settings.model_copy(update={"dlq_topic": dlq})
    lake = LakeSettings(root=str(tmp_path / "lake"))
    sizes = []
    for day in range(6):
        produce(kafka, topic, encoded(day_events(day, 150)))
        ingest_all(kafka, lake, topic)
        dt = DeltaTable(lake.traces_uri)
        now = DAY0 + timedelta(days=day + 1)  # the day is over
        apply_retention(
            dt, plan_retention(partitions_of(dt), now, retention_days=2), vacuum_retention_hours=0
        )
        sizes.append(disk_usage(lake.traces_uri))
        assert {p.date for p in partitions_of(DeltaTable(lake.traces_uri))} == {
            f"{DAY0 + timedelta(days=d):%Y-%m-%d}" for d in range(max(0, day - 1), day + 1)
        }
    print("per day: (parquet bytes, log bytes, log files):", sizes)
    data, log, log_files = zip(*sizes, strict=True)
    # from day 1 on the table holds two full days: data stops growing (compressed sizes vary a little)
    assert max(data[1:]) <= 1.1 * min(data[1:])
    # the log is trimmed at each retention run: a few checkpoints and recent entries, however many days pass
    assert max(log_files) <= 15 and max(log[2:]) <= 2 * max(log[:3])
    assert data[-1] + log[-1] <= 1.5 * (data[2] + log[2])
    # and the consumer resumed from the offsets kept in checkpoints: every day ingested exactly once
    assert DeltaTable(lake.traces_uri).to_pyarrow_table(columns=["event_id"]).num_rows == 2 * 150
