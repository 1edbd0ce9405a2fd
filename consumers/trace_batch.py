"""Decode a batch of Kafka messages into rows of the Delta table ``traces``, setting poison messages aside.

One call per ``consume()`` batch: message values are concatenated into one buffer, the compiled kernels
read each header's schema registry id (Confluent wire format, ``schemas.codec``), every distinct id is
mapped to one of our schema versions (``schemas.schema_ids``: asked of the registry once, then cached), and
the kernels decode every message of each writer schema in one pass (an id that is not one of our released
versions is a poison message: ``unknown-schema``). Arrow columns are built from the decoded buffers
without per-row Python, and the semantic rules run vectorised. Every message ends up in
exactly one place: a row of ``DecodedBatch.rows`` or an entry of ``DecodedBatch.rejected`` (reason +
detail), so a poison message is isolated exactly and never takes good neighbours down with it.

Every row gets the lake's trusted time, ``ingest_time`` (docs/data-contract.md): the message's broker
timestamp when the topic stamps LogAppendTime (the broker's clock), otherwise the ingest's clock when the
batch was consumed. Never the producer's CreateTime: that is the serving node's clock, the one that can
be wrong. ``date``/``hour`` derive from it, so a node stamping 2099 or 1999 lands in the current hour.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME

from consumers import avro_kernels as k
from consumers.avro_program import ArrowProjection, DecodeScratch, FieldProgram, decode_rows, status_detail
from consumers.trace_rules import RULES, broken_rule
from schemas.arrow import arrow_schema, traces_table_schema
from schemas.codec import MALFORMED, NOT_CONFLUENT, UNKNOWN_SCHEMA, WRONG_EVENT
from schemas.registry import TRACE_EVENT, SchemaVersion, current, versions
from schemas.schema_ids import SchemaIds

US_PER_HOUR = 3_600_000_000


def now_us() -> int:
    """The ingest's clock (microseconds since the epoch, UTC)."""
    return time.time_ns() // 1000


def observed_us(messages: list[Any], clock_us: int) -> np.ndarray:
    """Per message, when the pipeline observed it: the broker's LogAppendTime if the message carries one
    (ms -> us), else ``clock_us`` (CreateTime is the producer's clock, so it is never trusted)."""
    stamps = [m.timestamp() for m in messages]
    kinds = np.fromiter((kind for kind, _ in stamps), dtype=np.int64, count=len(stamps))
    ms = np.fromiter((t for _, t in stamps), dtype=np.int64, count=len(stamps))
    return np.where((kinds == TIMESTAMP_LOG_APPEND_TIME) & (ms >= 0), ms * 1000, np.int64(clock_us))


@dataclass
class MessageBatch:
    """Values of a batch of messages laid out for the kernels: message i is ``buf[starts[i]:ends[i]]``."""

    buf: np.ndarray  # uint8
    starts: np.ndarray  # int64
    ends: np.ndarray  # int64
    partitions: np.ndarray  # int32
    offsets: np.ndarray  # int64
    observed: np.ndarray  # int64 us since the epoch: the trusted time of each message (ingest_time)
    messages: list[Any] = field(default_factory=list)  # the confluent_kafka.Message objects, if any

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def nbytes(self) -> int:
        return int(self.buf.nbytes)

    @classmethod
    def from_values(
        cls,
        values: list[bytes | None],
        partitions: Any = None,
        offsets: Any = None,
        messages: Any = None,
        observed: Any = None,
    ) -> MessageBatch:
        """``observed``: per-message trusted time in us (default: the ingest's clock now, for every one)."""
        values = [v or b"" for v in values]  # a tombstone (None) is just an empty, undecodable value
        n = len(values)
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=n)
        ends = np.cumsum(lengths)
        return cls(
            buf=np.frombuffer(b"".join(values), dtype=np.uint8),
            starts=ends - lengths,
            ends=ends,
            partitions=np.zeros(n, np.int32) if partitions is None else np.asarray(partitions, np.int32),
            offsets=np.arange(n, dtype=np.int64) if offsets is None else np.asarray(offsets, np.int64),
            observed=np.full(n, now_us(), np.int64) if observed is None else np.asarray(observed, np.int64),
            messages=list(messages or []),
        )

    @classmethod
    def from_messages(cls, messages: list[Any], clock_us: int | None = None) -> MessageBatch:
        """From confluent_kafka messages (error messages must have been removed by the caller);
        ``clock_us``: the ingest's clock for messages without a broker timestamp (default: now)."""
        n = len(messages)
        return cls.from_values(
            [m.value() for m in messages],
            np.fromiter((m.partition() for m in messages), dtype=np.int32, count=n),
            np.fromiter((m.offset() for m in messages), dtype=np.int64, count=n),
            messages,
            observed_us(messages, now_us() if clock_us is None else clock_us),
        )


class Rejection(NamedTuple):
    index: int  # position of the message in its MessageBatch
    reason: str  # short stable code
    detail: str


@dataclass
class DecodedBatch:
    rows: pa.RecordBatch  # traces_table_schema(); kafka_partition/kafka_offset say where each row came from
    rejected: list[Rejection]


def _header_detail(batch: MessageBatch, i: int) -> str:
    head = batch.buf[batch.starts[i] : min(batch.ends[i], batch.starts[i] + k.HEADER_LEN)].tobytes()
    return f"{batch.ends[i] - batch.starts[i]} bytes, header {head.hex()}"


def lake_columns(observed: np.ndarray, partitions: np.ndarray, offsets: np.ndarray) -> list[pa.Array]:
    """kafka_partition, kafka_offset, ingest_time (``observed``, us) and the partition it decides: date
    (UTC YYYY-MM-DD) and hour (0-23)."""
    hours = observed // US_PER_HOUR
    days, day_of_row = np.unique(hours // 24, return_inverse=True)
    names = pa.array(np.datetime_as_string(days.astype("datetime64[D]")).tolist(), pa.string())
    return [
        pa.array(partitions, pa.int32()),
        pa.array(offsets, pa.int64()),
        pa.array(observed, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        names.take(pa.array(day_of_row.astype(np.int32))),
        pa.array((hours % 24).astype(np.int32), pa.int32()),
    ]


class TraceBatchDecoder:
    """Stateless apart from caches; one per consumer. ``decode`` is the only entry point. ``ids`` maps the
    registry's schema ids to our versions (a registry that does not answer raises RegistryUnavailable out
    of ``decode``: the batch is not committed, and the ingest resumes from its offsets)."""

    def __init__(self, ids: SchemaIds) -> None:
        self.ids = ids
        self.schema = traces_table_schema()
        self.event_schema = arrow_schema(TRACE_EVENT)
        self.programs = {v.fingerprint: FieldProgram.for_schema(v) for v in versions(TRACE_EVENT)}
        self.projection = ArrowProjection(current(TRACE_EVENT), self.event_schema)
        self.scratch = DecodeScratch()  # hence one decoder per thread

    def warm_up(self) -> None:
        """Load (or compile, first time on a machine) the kernels before the first real batch."""
        batch = MessageBatch.from_values([b"", b"\x00\x00\x00\x00\x00\x02"])
        k.schema_ids(batch.buf, batch.starts, batch.ends)
        self._decode_writer(current(TRACE_EVENT), batch, np.arange(len(batch)), [])

    def decode(self, batch: MessageBatch) -> DecodedBatch:
        """Table rows for the good messages, a Rejection for every other one."""
        events_batch, index, rejected = self.decode_events(batch)
        return self._validated(batch, events_batch, index, rejected)

    def decode_events(self, batch: MessageBatch) -> tuple[pa.RecordBatch, np.ndarray, list[Rejection]]:
        """Avro level only: (TraceEvent columns of the messages that decode, their batch positions,
        rejections of the others). No semantic rules, no lake columns."""
        sids = k.schema_ids(batch.buf, batch.starts, batch.ends)
        rejected = [
            Rejection(int(i), NOT_CONFLUENT, _header_detail(batch, i)) for i in np.flatnonzero(sids < 0)
        ]
        parts, kept = [], []
        for sid in np.unique(sids[sids >= 0]):
            writer = self.ids.version_of(int(sid))
            rows = np.flatnonzero(sids == sid)
            if writer is None:
                detail = f"schema id {sid} is not a registered version of our schemas"
                rejected.extend(Rejection(int(i), UNKNOWN_SCHEMA, detail) for i in rows)
            elif writer.event != TRACE_EVENT:
                detail = f"expected {TRACE_EVENT}, got {writer.event} v{writer.version} (schema id {sid})"
                rejected.extend(Rejection(int(i), WRONG_EVENT, detail) for i in rows)
            else:
                parts.append(self._decode_writer(writer, batch, rows, rejected))
                kept.append(rows[parts[-1][1]])
        events_batch, index = self._concat([p for p, _ in parts], kept)
        return events_batch, index, rejected

    def _decode_writer(
        self, writer: SchemaVersion, batch: MessageBatch, rows: np.ndarray, rejected: list[Rejection]
    ) -> tuple[pa.RecordBatch, np.ndarray]:
        """The messages ``rows`` of ``batch``, all written with ``writer``: (columns of those that decode,
        their positions within ``rows``); the others are appended to ``rejected``."""
        program = self.programs[writer.fingerprint]
        decoded = decode_rows(program, batch.buf, batch.starts, batch.ends, rows, self.scratch)
        for j in np.flatnonzero(decoded.status != k.OK):
            f = decoded.failed_field[j]
            name = decoded.program.fields[f].name if f >= 0 else None
            rejected.append(Rejection(int(rows[j]), MALFORMED, status_detail(int(decoded.status[j]), name)))
        keep = np.flatnonzero(decoded.status == k.OK)
        columns = self.projection.columns(decoded, keep)
        return pa.RecordBatch.from_arrays(columns, schema=self.event_schema), keep

    def _concat(
        self, parts: list[pa.RecordBatch], kept: list[np.ndarray]
    ) -> tuple[pa.RecordBatch, np.ndarray]:
        if not parts:
            return pa.RecordBatch.from_pylist([], schema=self.event_schema), np.empty(0, np.int64)
        if len(parts) == 1:
            return parts[0], kept[0]
        return pa.concat_batches(parts), np.concatenate(kept)

    def _validated(
        self, batch: MessageBatch, events_batch: pa.RecordBatch, index: np.ndarray, rejected: list[Rejection]
    ) -> DecodedBatch:
        broken = broken_rule(events_batch) if events_batch.num_rows else np.empty(0, np.int16)
        for j in np.flatnonzero(broken >= 0):
            rule = RULES[broken[j]]
            rejected.append(Rejection(int(index[j]), rule.reason, rule.detail))
        if len(rejected) > len(batch) - len(index):  # some decoded rows broke a rule
            good = broken < 0
            events_batch, index = events_batch.filter(pa.array(good)), index[good]
        lake = lake_columns(batch.observed[index], batch.partitions[index], batch.offsets[index])
        rows = pa.RecordBatch.from_arrays([*events_batch.columns, *lake], schema=self.schema)
        return DecodedBatch(rows, sorted(rejected))
