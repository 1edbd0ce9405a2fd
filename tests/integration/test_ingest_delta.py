"""Dead letters, the live table's schema, its migration and the commit guard, on the real broker and real
Delta."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pyarrow as pa
import pytest
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from trace_events import OFFLINE_IDS, encoded, poison_messages, produce, read_all, read_dlq, trace

from consumers.dead_letters import DeadLetterProducer, parse_headers
from consumers.delta_commit import CommitJob, DeltaCommitter
from consumers.delta_log import OffsetMismatchError, txn_app_id
from consumers.delta_sink import IngestOptions, TraceIngest
from consumers.flush_policy import FlushPolicy
from consumers.retention import partitions_of
from consumers.table import (
    TABLE_PROPERTIES,
    SchemaMismatchError,
    is_legacy,
    legacy_schema,
    open_or_create,
    table_filesystem,
    table_schema,
)
from consumers.trace_batch import MessageBatch, TraceBatchDecoder
from consumers.window_announcements import WindowAnnouncer, asset_event
from consumers.windows import pick_window
from core.settings import CycleSettings, KafkaSettings, LakeSettings
from schemas.arrow import PARTITION_COLUMNS, traces_table_schema
from schemas.schema_ids import register_all

pytestmark = pytest.mark.integration


def test_poison_goes_to_the_dlq_and_every_good_event_to_the_table(
    kafka_settings, schema_ids, topic_factory, tmp_path
):
    topic, dlq = topic_factory(partitions=2), topic_factory(prefix="dlq")
    good_records = [trace(i) for i in range(400)]
    good = encoded(good_records, schema_ids)
    poison = poison_messages(good[0], schema_ids)
    values = list(good)
    for n, (_, _, v) in enumerate(poison):
        values.insert(25 * n + 7, v)
    produce(kafka_settings, topic, values, keys=[f"key-{i}".encode() for i in range(len(values))])
    kafka = kafka_settings.model_copy(update={"dlq_topic": dlq})
    lake = LakeSettings(root=str(tmp_path / "lake"))

    stats = TraceIngest(kafka, lake, IngestOptions(group="dlq-test", until_idle_s=2.0), topic=topic).run()

    assert (stats.rows, stats.dead_letters) == (len(good), len(poison))
    table = DeltaTable(lake.traces_uri).to_pyarrow_table()
    assert sorted(table["event_id"].to_pylist()) == sorted(r["event_id"] for r in good_records)
    letters = read_dlq(kafka, dlq)
    sources = {(m.partition(), m.offset()): m for m in read_all(kafka, topic, partitions=2)}
    by_value = {v: reason for _, reason, v in poison}
    assert sorted(parse_headers(m.headers())["dlq.reason"] for m in letters) == sorted(by_value.values())
    for m in letters:
        h = parse_headers(m.headers())
        assert h["source.topic"] == topic and h["dlq.detail"]
        original = sources[int(h["source.partition"]), int(h["source.offset"])]
        assert m.value() == original.value() and m.key() == original.key()  # unchanged bytes, same key
        assert int(h["source.timestamp"]) == original.timestamp()[1]
        assert by_value[m.value()] == h["dlq.reason"]

    # the live table's schema is the one derived from schemas/ (names, types, nullability and docs)
    dt = DeltaTable(lake.traces_uri)
    assert table_schema(dt).equals(traces_table_schema(), check_metadata=True)
    assert table.schema.equals(traces_table_schema())
    assert {k: v for k, v in dt.metadata().configuration.items()} == TABLE_PROPERTIES
    assert "delta.setTransactionRetentionDuration" not in dt.metadata().configuration


def test_a_table_with_another_schema_is_refused(tmp_path):
    lake = LakeSettings(root=str(tmp_path / "lake"))
    write_deltalake(lake.traces_uri, pa.table({"event_id": ["x"]}))
    with pytest.raises(SchemaMismatchError, match="columns differ"):
        open_or_create(lake)


def test_commits_refuse_replays_and_stale_offsets(tmp_path):
    """delta-rs would happily commit the same txn twice (duplicate rows): the committer must not."""
    lake = LakeSettings(root=str(tmp_path / "lake"), app_id="app")
    open_or_create(lake)
    committer = DeltaCommitter(
        DeltaTable(lake.traces_uri),
        table_filesystem(lake),
        DeadLetterProducer(KafkaSettings(), "unused"),
        "app",
    )
    decoder = TraceBatchDecoder(OFFLINE_IDS)
    rows = decoder.decode(MessageBatch.from_values(encoded([trace(i) for i in range(10)]))).rows

    first = CommitJob([rows], [], txns={0: 9}, expected={0: None})
    committer.commit(first)
    with pytest.raises(OffsetMismatchError):
        committer.commit(first)  # a replay of the same offsets
    with pytest.raises(OffsetMismatchError):
        committer.commit(CommitJob([rows], [], txns={0: 19}, expected={0: 5}))  # stale expectation
    committer.commit(CommitJob([rows], [], txns={0: 19}, expected={0: 9}))
    committer.commit(CommitJob([], [], txns={1: 4}, expected={1: None}))  # a batch of only dead letters

    dt = DeltaTable(lake.traces_uri)
    assert dt.to_pyarrow_table().num_rows == 20
    assert [dt.transaction_version(txn_app_id("app", p)) for p in (0, 1, 2)] == [19, 4, None]


def test_a_table_from_before_ingest_time_is_migrated_once_and_keeps_its_offsets(tmp_path):
    """A table the previous version wrote (no ingest_time, partitions from the node's finish_time) is
    rewritten once when the ingest opens it: every row kept, ingest_time = finish_time clipped to when its
    file was written, partitions by ingest_time, the Kafka offsets in the log intact."""
    lake = LakeSettings(root=str(tmp_path / "lake"), app_id="app")
    now = time.time()
    records = [trace(i, finish_time_s=now - 3600 + i) for i in range(20)]  # healthy nodes
    records += [trace(20 + i, finish_time_s=4_084_000_000.0 + i) for i in range(3)]  # a clock in 2099
    records += [trace(30 + i, finish_time_s=990_000_000.0 + i) for i in range(3)]  # a clock in 2001
    legacy_rows = []
    for offset, r in enumerate(records):
        finish = datetime.fromtimestamp(r["finish_time"] / 1e6, UTC)
        legacy_rows.append(
            r
            | {
                "kafka_partition": 0,
                "kafka_offset": offset,
                "date": f"{finish:%Y-%m-%d}",
                "hour": finish.hour,
            }
        )
    old_properties = TABLE_PROPERTIES | {
        "delta.dataSkippingStatsColumns": "arrival_time,finish_time,kafka_partition,kafka_offset"
    }
    written_from = int(time.time() * 1e6)
    write_deltalake(
        lake.traces_uri,
        pa.Table.from_pylist(legacy_rows, schema=legacy_schema()),
        partition_by=PARTITION_COLUMNS,
        configuration=old_properties,
        commit_properties=CommitProperties(
            app_transactions=[Transaction(txn_app_id("app", 0), len(records) - 1)]
        ),
    )
    written_until = int(time.time() * 1e6)
    legacy = DeltaTable(lake.traces_uri)
    assert is_legacy(legacy) and any(p.date.startswith("2099-") for p in partitions_of(legacy))

    dt = open_or_create(lake)  # what `flywheel ingest` does on start
    assert table_schema(dt).equals(traces_table_schema())
    assert dt.version() > legacy.version()
    assert (
        dt.metadata().configuration["delta.dataSkippingStatsColumns"]
        == TABLE_PROPERTIES["delta.dataSkippingStatsColumns"]
    )
    assert any((c.get("flywheel.migration") or "") == "ingest_time" for c in dt.history())
    table = dt.to_pyarrow_table()
    assert sorted(table["event_id"].to_pylist()) == sorted(r["event_id"] for r in records)
    ingest = dict(
        zip(table["event_id"].to_pylist(), table["ingest_time"].cast(pa.int64()).to_pylist(), strict=True)
    )
    three_days = 3 * 86_400_000_000
    for r in records:
        got = ingest[r["event_id"]]
        if r["finish_time"] > written_until:  # ahead of the time its file was written: that time
            assert written_from - 1000 <= got <= written_until + 1000, r["event_id"]
        elif r["finish_time"] < written_from - three_days:  # long before: the earliest the topic allows
            assert written_from - three_days - 1000 <= got <= written_until - three_days + 1000, r["event_id"]
        else:
            assert got == r["finish_time"], r["event_id"]
    for row in table.to_pylist():
        assert (row["date"], row["hour"]) == (f"{row['ingest_time']:%Y-%m-%d}", row["ingest_time"].hour)
    assert not [p for p in partitions_of(dt) if p.date < "2026-01-01" or p.date > "2030-01-01"]

    # the offsets survived the rewrite: the ingest continues from them, and a second open changes nothing
    assert dt.transaction_version(txn_app_id("app", 0)) == len(records) - 1
    assert open_or_create(lake).version() == dt.version()
    committer = DeltaCommitter(
        DeltaTable(lake.traces_uri),
        table_filesystem(lake),
        DeadLetterProducer(KafkaSettings(), "unused"),
        "app",
    )
    more = TraceBatchDecoder(OFFLINE_IDS).decode(
        MessageBatch.from_values(encoded([trace(100)]), offsets=[len(records)])
    )
    committer.commit(CommitJob([more.rows], [], txns={0: len(records)}, expected={0: len(records) - 1}))
    assert DeltaTable(lake.traces_uri).to_pyarrow_table(columns=["event_id"]).num_rows == len(records) + 1


def test_each_window_of_committed_rows_is_announced_once(kafka_settings, schema_ids, topic_factory, tmp_path):
    """The ingest announces a window each time min_window_rows rows committed since its last announcement,
    at the version that completed it; the triggerer's apply_function reads the message back."""
    topic, dlq, windows_topic = topic_factory(), topic_factory(prefix="dlq"), topic_factory(prefix="windows")
    produce(kafka_settings, topic, encoded([trace(i) for i in range(250)], schema_ids))
    kafka = kafka_settings.model_copy(update={"dlq_topic": dlq, "windows_topic": windows_topic})
    register_all(kafka, schema_ids)  # as `flywheel topics create` does: the windows topic's subject too
    lake = LakeSettings(root=str(tmp_path / "lake"))
    cycle = CycleSettings(min_window_rows=100, window_minutes=60)
    policy = FlushPolicy(max_events=40)  # several commits of up to 40 rows
    opts = IngestOptions(group="windows-test", policy=policy, until_idle_s=2.0, consume_batch=40)

    stats = TraceIngest(kafka, lake, opts, topic=topic, announcer=WindowAnnouncer(kafka, lake, cycle)).run()

    # replay the rule over the table's own history: rows committed by each version
    dt = DeltaTable(lake.traces_uri)
    counts = [
        DeltaTable(lake.traces_uri, version=v).to_pyarrow_dataset().count_rows()
        for v in range(dt.version() + 1)
    ]
    expected, pending = [], 0
    for version in range(1, len(counts)):
        pending += counts[version] - counts[version - 1]
        if pending >= cycle.min_window_rows:
            expected.append((version, pending))
            pending = 0
    assert len(counts) > 4 and len(expected) == 2 and stats.windows_announced == 2, counts
    events = [asset_event(m) for m in read_all(kafka, windows_topic)]
    assert [(e["version"], e["new_rows"]) for e in events] == expected
    for e in events:
        window = pick_window(lake, cycle.window_minutes, cycle.min_window_rows, e["version"])
        assert (e["key"], e["rows"], e["table"]) == (window.key, window.rows, lake.traces_uri)
        assert e["window_end"] == window.end.isoformat()
    assert asset_event(read_all(kafka, topic)[0]) is None  # a TraceEvent is no announcement: skipped
