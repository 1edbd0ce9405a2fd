"""Dead letters can come back: look into the DLQ, and redrive into ``traces`` what decodes now, exactly once.

A message fails for a reason that may later go away: a producer rolled out a new schema version before the
consumers learnt it (``unknown-schema``), or a rule was fixed. ``inspect`` reads a snapshot of the DLQ (up to
its high watermarks when it starts) and counts its letters by reason with a few samples. ``replay`` decodes
the letters again with the code that runs now (optionally only those of some reasons) and writes every one
that passes into the table, as the row the ingest would have written: ``kafka_partition``/``kafka_offset``
are the letter's *source* coordinates and ``ingest_time`` the time the DLQ received it (when the pipeline
first observed the event, give or take a flush).

Exactly once: the source coordinates identify a trace message, and the rows go in with a Delta MERGE that
inserts only rows whose ``(kafka_partition, kafka_offset)`` is not in the table yet, in one commit; a commit
that races the live ingest is retried on the new version. So a letter the DLQ holds twice (a crash between
the DLQ flush and the Delta commit re-sends a batch's letters), a replay run twice or two replays at once
write each event once. Letters that still fail are left where they are (the DLQ is a log; nothing is
removed or re-sent), counted by their reason now, and can be replayed again after the next fix.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from confluent_kafka import Consumer, TopicPartition
from deltalake import CommitProperties
from deltalake.exceptions import CommitFailedError

from consumers.dead_letters import parse_headers
from consumers.lake_files import delta_writer_properties
from consumers.table import open_or_create
from consumers.trace_batch import MessageBatch, TraceBatchDecoder
from core.kafka_log import librdkafka_log
from core.settings import KafkaSettings, LakeSettings
from infra.acls import DLQ_READER_GROUP_PREFIX
from schemas.schema_ids import SchemaIds

log = logging.getLogger("flywheel.dlq")

MERGE_PREDICATE = "t.kafka_partition = s.kafka_partition AND t.kafka_offset = s.kafka_offset"


@dataclass(frozen=True)
class Letter:
    """One DLQ message: the original bytes and what the ingest said about them."""

    value: bytes
    headers: dict[str, str]
    dlq_partition: int
    dlq_offset: int
    received_ms: int  # the DLQ message's timestamp

    @property
    def reason(self) -> str:
        return self.headers.get("dlq.reason", "unknown")

    @property
    def source(self) -> tuple[str, int, int]:
        h = self.headers
        return h.get("source.topic", ""), int(h.get("source.partition", -1)), int(h.get("source.offset", -1))


def read_letters(kafka: KafkaSettings, batch: int = 5000, timeout_s: float = 30.0) -> Iterator[list[Letter]]:
    """The DLQ up to its high watermarks as of now, in batches. No consumer group offsets are used or
    committed: every run sees every letter the topic still retains."""
    consumer = Consumer(
        kafka.client_config()
        | {
            "group.id": f"{DLQ_READER_GROUP_PREFIX}{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "logger": librdkafka_log(),
        }
    )
    try:
        topic = consumer.list_topics(kafka.dlq_topic, timeout=timeout_s).topics.get(kafka.dlq_topic)
        if topic is None or topic.error is not None:
            raise RuntimeError(f"DLQ topic {kafka.dlq_topic} not found: run `flywheel topics create`")
        ends: dict[int, int] = {}
        assign = []
        for p in topic.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(kafka.dlq_topic, p), timeout=timeout_s)
            if high > low:
                ends[p] = high
                assign.append(TopicPartition(kafka.dlq_topic, p, low))
        if not assign:
            return
        consumer.assign(assign)
        done: set[int] = set()
        while len(done) < len(ends):
            messages = consumer.consume(batch, timeout=1.0)
            out = []
            for m in messages:
                if m.error() is not None:
                    raise RuntimeError(f"reading {kafka.dlq_topic}: {m.error()}")
                if m.offset() >= ends[m.partition()]:
                    done.add(m.partition())
                    continue
                out.append(
                    Letter(
                        m.value() or b"",
                        parse_headers(m.headers()),
                        m.partition(),
                        m.offset(),
                        m.timestamp()[1],
                    )
                )
                if m.offset() + 1 >= ends[m.partition()]:
                    done.add(m.partition())
            if out:
                yield out
    finally:
        consumer.close()


@dataclass
class DlqSummary:
    letters: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_source_topic: Counter[str] = field(default_factory=Counter)
    first_received_ms: int | None = None
    last_received_ms: int | None = None
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "letters": self.letters,
            "by_reason": dict(self.by_reason.most_common()),
            "by_source_topic": dict(self.by_source_topic),
            "first_received_ms": self.first_received_ms,
            "last_received_ms": self.last_received_ms,
            "samples": self.samples,
        }


def inspect(
    kafka: KafkaSettings, samples: int = 3, on_batch: Callable[[int], None] | None = None
) -> DlqSummary:
    """Counts by reason and source topic, the time span, and up to ``samples`` letters per reason."""
    summary = DlqSummary()
    for letters in read_letters(kafka):
        for letter in letters:
            summary.letters += 1
            summary.by_reason[letter.reason] += 1
            summary.by_source_topic[letter.source[0]] += 1
            t = letter.received_ms
            summary.first_received_ms = (
                t if summary.first_received_ms is None else min(summary.first_received_ms, t)
            )
            summary.last_received_ms = (
                t if summary.last_received_ms is None else max(summary.last_received_ms, t)
            )
            kept = summary.samples.setdefault(letter.reason, [])
            if len(kept) < samples:
                topic, partition, offset = letter.source
                kept.append(
                    {
                        "detail": letter.headers.get("dlq.detail", ""),
                        "source": f"{topic}/{partition}@{offset}",
                        "dlq_offset": f"{letter.dlq_partition}@{letter.dlq_offset}",
                        "value_bytes": len(letter.value),
                        "value_head": letter.value[:16].hex(),
                    }
                )
        if on_batch:
            on_batch(summary.letters)
    return summary


@dataclass
class ReplayReport:
    letters: int = 0  # read from the DLQ
    selected: int = 0  # of the reasons asked for, from the traces topic
    decoded: int = 0  # pass decoding and the rules now
    duplicates: int = 0  # the same source message more than once in the DLQ
    inserted: int = 0  # new rows in the table
    already_in_table: int = 0  # replayed before
    still_invalid: Counter[str] = field(default_factory=Counter)  # reason now -> letters left in the DLQ
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "letters": self.letters,
            "selected": self.selected,
            "decoded": self.decoded,
            "duplicates": self.duplicates,
            "inserted": self.inserted,
            "already_in_table": self.already_in_table,
            "still_invalid": dict(self.still_invalid.most_common()),
            "dry_run": self.dry_run,
        }


def replay(
    kafka: KafkaSettings,
    lake: LakeSettings,
    reasons: set[str] | None = None,
    *,
    dry_run: bool = False,
    attempts: int = 5,
    on_batch: Callable[[ReplayReport], None] | None = None,
) -> ReplayReport:
    """Redrive the letters of ``reasons`` (all if None) that decode now into the lake's ``traces`` table."""
    report = ReplayReport(dry_run=dry_run)
    decoder = TraceBatchDecoder(SchemaIds.connect(kafka))
    batches: list[pa.RecordBatch] = []
    for letters in read_letters(kafka):
        report.letters += len(letters)
        chosen = [
            x
            for x in letters
            if (reasons is None or x.reason in reasons)
            and x.source[0] == kafka.traces_topic
            and x.source[1] >= 0
        ]
        report.selected += len(chosen)
        if chosen:
            batch = MessageBatch.from_values(
                [x.value for x in chosen],
                partitions=[x.source[1] for x in chosen],
                offsets=[x.source[2] for x in chosen],
                observed=[max(x.received_ms, 0) * 1000 for x in chosen],
            )
            decoded = decoder.decode(batch)
            report.still_invalid.update(r.reason for r in decoded.rejected)
            if decoded.rows.num_rows:
                batches.append(decoded.rows)
        if on_batch:
            on_batch(report)
    rows = _first_per_source(batches, decoder.schema)
    report.decoded = sum(b.num_rows for b in batches)
    report.duplicates = report.decoded - rows.num_rows
    if dry_run or rows.num_rows == 0:
        return report
    report.inserted = _merge(lake, rows, attempts)
    report.already_in_table = rows.num_rows - report.inserted
    log.info("dlq replay: %s", report.as_dict())
    return report


def _first_per_source(batches: list[pa.RecordBatch], schema: pa.Schema) -> pa.Table:
    """One row per source (partition, offset): the DLQ may hold a letter twice."""
    if not batches:
        return schema.empty_table()
    rows = pa.Table.from_batches(batches, schema=schema)
    keys = np.asarray(rows["kafka_partition"]).astype(np.int64) << 40 | np.asarray(rows["kafka_offset"])
    _, first = np.unique(keys, return_index=True)
    return rows.take(pa.array(np.sort(first)))


def _merge(lake: LakeSettings, rows: pa.Table, attempts: int) -> int:
    """Insert the rows whose source coordinates the table does not hold, in one commit; retried when a
    concurrent commit (the live ingest) wins the race. Returns the rows inserted."""
    for attempt in range(1, attempts + 1):
        dt = open_or_create(lake)  # also adds the columns a newer schema brought
        try:
            metrics = (
                dt.merge(
                    rows,
                    MERGE_PREDICATE,
                    source_alias="s",
                    target_alias="t",
                    writer_properties=delta_writer_properties(),
                    commit_properties=CommitProperties(
                        custom_metadata={"flywheel.operation": "dlq-replay", "flywheel.rows": rows.num_rows}
                    ),
                )
                .when_not_matched_insert_all()
                .execute()
            )
            return int(metrics.get("num_target_rows_inserted", 0))
        except CommitFailedError as e:
            if attempt == attempts:
                raise
            log.info("dlq replay lost a commit race (%s); retrying on the new version", e)
    raise AssertionError("unreachable")
