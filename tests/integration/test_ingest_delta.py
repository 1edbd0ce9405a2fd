"""Dead letters, the live table's schema and the commit guard, on the real broker and real Delta."""

from __future__ import annotations

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from trace_events import encoded, poison_messages, produce, read_all, read_dlq, trace

from consumers.dead_letters import DeadLetterProducer, parse_headers
from consumers.delta_commit import CommitJob, DeltaCommitter
from consumers.delta_log import OffsetMismatchError, txn_app_id
from consumers.delta_sink import IngestOptions, TraceIngest
from consumers.table import (
    TABLE_PROPERTIES,
    SchemaMismatchError,
    open_or_create,
    table_filesystem,
    table_schema,
)
from consumers.trace_batch import MessageBatch, TraceBatchDecoder
from core.settings import KafkaSettings, LakeSettings
from schemas.arrow import traces_table_schema

pytestmark = pytest.mark.integration


def test_poison_goes_to_the_dlq_and_every_good_event_to_the_table(kafka_settings, topic_factory, tmp_path):
    topic, dlq = topic_factory(partitions=2), topic_factory(prefix="dlq")
    good_records = [trace(i) for i in range(400)]
    good = encoded(good_records)
    poison = poison_messages(good[0])
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
    decoder = TraceBatchDecoder()
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
