"""The ingest loop: Kafka ``spec.traces.v1`` -> Delta table ``traces``, exactly once (kafka-delta-ingest style).

One state object, one loop, small predicates. Invariants:

- Offsets live in the Delta log (``consumers.delta_log``); Kafka auto-commit is off and Kafka commits
  (asynchronous, after a Delta commit) exist only so lag dashboards work.
- On assignment each partition seeks to its txn version + 1 (or the beginning). ``logged[p]`` is the txn
  version the log will hold once the in-flight commit lands; a job expects exactly that, and the writer
  checks it against a fresh snapshot before committing.
- A message is buffered only if its offset is above everything buffered or logged for its partition, so a
  replay after a seek never doubles a row.
- Any failed commit (offsets moved, concurrent txn, I/O) drops everything buffered and re-seeks every
  assigned partition from the table: the typed errors are control flow, not crashes.
- Revoke flushes what is buffered, then forgets the partitions; lost partitions are dropped (another
  consumer may already own them). SIGTERM/SIGINT stop the loop, which flushes before closing.
- With an announcer (``consumers.window_announcements``), each successful commit is counted and every
  window's worth of committed rows is announced on the windows topic, which then must exist too.
- Start-up asks the broker first: an unreachable one is one ``KafkaUnreachableError`` after
  ``connect_timeout_s``, before the table is opened or created; librdkafka's own log lines go through our
  logging (``core.kafka_log``), not to stderr.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError

from consumers.dead_letters import DeadLetter, DeadLetterProducer, from_message
from consumers.delta_commit import CommitJob, CommitResult, CommitWorker, DeltaCommitter
from consumers.delta_log import OffsetMismatchError, last_offsets, seek_offset, txn_app_id
from consumers.flush_policy import FlushPolicy, FlushReason, should_flush
from consumers.hour_compaction import HourCompactor
from consumers.ingest_metrics import IngestMetrics
from consumers.table import open_or_create, refresh, table_filesystem
from consumers.trace_batch import MessageBatch, TraceBatchDecoder
from consumers.window_announcements import WindowAnnouncer
from core.kafka_log import librdkafka_log
from core.settings import KafkaSettings, LakeSettings
from schemas.schema_ids import SchemaIds

log = logging.getLogger("flywheel.ingest")
CONFLICTS = (OffsetMismatchError, CommitFailedError)


class IngestError(RuntimeError):
    """The ingest cannot go on (commits keep failing, a topic is missing): stop rather than spin."""


class KafkaUnreachableError(IngestError):
    """No broker answered at start-up."""


@dataclass(frozen=True)
class IngestOptions:
    group: str = "flywheel-ingest"
    policy: FlushPolicy = field(default_factory=FlushPolicy)
    consume_batch: int = 10_000  # messages per consume() call, decoded as one batch
    max_events: int | None = None  # stop once this many messages are committed (rows + dead letters)
    until_idle_s: float | None = None  # stop after this long without a message and nothing buffered
    instance_id: str | None = None  # static group membership: a restarted member takes its place at once
    session_timeout_ms: int = 45_000
    queued_max_kbytes: int = 32 * 1024  # librdkafka prefetch bound (whatever the backlog)
    fetch_max_bytes: int = 16 * 1024 * 1024
    max_failures: int = 5  # consecutive non-conflict commit failures before giving up
    table_properties: dict[str, str] | None = None  # overrides at table creation (tests)
    compact_closed_hours: bool = True  # compact each hour once closed (consumers.hour_compaction)
    connect_timeout_s: float = 15.0  # start-up: how long the broker has to answer
    stats_interval_s: float | None = None  # librdkafka statistics (the lag per partition); None: off
    # the ingest's clock (s since the epoch): ingest_time of messages without a broker LogAppendTime
    clock: Callable[[], float] = time.time


@dataclass
class IngestStats:
    consumed: int = 0  # messages taken into buffers (replays after a reset count again)
    rows: int = 0  # committed rows
    dead_letters: int = 0  # committed dead letters
    commits: int = 0
    conflicts: int = 0
    resets: int = 0
    windows_announced: int = 0
    first_message_at: float | None = None
    last_commit_at: float | None = None
    cpu_at_first_message: float = 0.0  # process CPU seconds, all threads
    cpu_at_last_commit: float = 0.0

    @property
    def processed(self) -> int:
        return self.rows + self.dead_letters

    def as_dict(self) -> dict:
        span = (self.last_commit_at or 0) - (self.first_message_at or 0)
        rate = self.processed / span if self.first_message_at and span > 0 else None
        return {
            "consumed": self.consumed,
            "rows": self.rows,
            "dead_letters": self.dead_letters,
            "commits": self.commits,
            "conflicts": self.conflicts,
            "resets": self.resets,
            "windows_announced": self.windows_announced,
            "seconds_first_message_to_last_commit": span if rate else None,
            "events_per_s": rate,
            "cpu_us_per_event": (self.cpu_at_last_commit - self.cpu_at_first_message) / self.processed * 1e6
            if rate
            else None,
        }


@dataclass
class _Buffer:
    rows: list[pa.RecordBatch] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    last: dict[int, int] = field(default_factory=dict)  # partition -> highest buffered offset
    events: int = 0
    nbytes: int = 0
    since: float = 0.0

    def add(
        self, rows: pa.RecordBatch, letters: list[DeadLetter], last: dict[int, int], events: int, nbytes: int
    ) -> None:
        if not self.events:
            self.since = time.monotonic()
        if rows.num_rows:
            self.rows.append(rows)
        self.letters.extend(letters)
        self.last.update(last)
        self.events += events
        self.nbytes += nbytes

    def age_s(self) -> float:
        return time.monotonic() - self.since if self.events else 0.0


def consumer_config(kafka: KafkaSettings, opts: IngestOptions) -> dict:
    conf = kafka.client_config() | {
        "group.id": opts.group,
        "enable.auto.commit": False,  # Delta holds the offsets; see module docstring
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "isolation.level": "read_committed",
        "session.timeout.ms": opts.session_timeout_ms,
        "queued.max.messages.kbytes": opts.queued_max_kbytes,
        "fetch.max.bytes": opts.fetch_max_bytes,
        "enable.partition.eof": False,
    }
    if opts.instance_id:
        conf["group.instance.id"] = opts.instance_id
    if opts.stats_interval_s:
        conf["statistics.interval.ms"] = max(1, int(opts.stats_interval_s * 1000))
    return conf


class TraceIngest:
    """``run()`` consumes until stopped (signal or bounded-run condition) and returns the stats.

    ``metrics`` (``consumers.ingest_metrics``) are updated whether or not anything serves them."""

    def __init__(
        self,
        kafka: KafkaSettings,
        lake: LakeSettings,
        opts: IngestOptions,
        topic: str | None = None,
        metrics: IngestMetrics | None = None,
        announcer: WindowAnnouncer | None = None,
    ):
        self.kafka, self.lake, self.opts = kafka, lake, opts
        self.announcer = announcer
        self.topic = topic or kafka.traces_topic
        self.app_id = lake.app_id
        self.metrics = metrics or IngestMetrics(self.topic, opts.group, lake.traces_uri)
        self.decoder = TraceBatchDecoder(SchemaIds.connect(kafka))
        # Loading the compiled kernels takes a second or two: overlap it with joining the group.
        self._warm_up = threading.Thread(
            target=self.decoder.warm_up, name="flywheel-kernel-warm-up", daemon=True
        )
        self._warm_up.start()
        self._kafka_error: KafkaError | None = None
        self._broker_down = False
        self._started = False
        conf = consumer_config(kafka, opts) | {"logger": librdkafka_log(), "error_cb": self._on_client_error}
        if opts.stats_interval_s:
            conf["stats_cb"] = self.metrics.on_stats
        self.consumer = Consumer(conf)
        try:
            self._require_topics(self.topic, kafka.dlq_topic, *([kafka.windows_topic] if announcer else []))
            self.table: DeltaTable = open_or_create(lake, opts.table_properties)
        except BaseException:
            self.consumer.close()
            raise
        self.metrics.table_version.set(self.table.version())
        writer_table = DeltaTable(lake.traces_uri, storage_options=lake.delta_options())
        self.dlq = DeadLetterProducer(kafka, kafka.dlq_topic)
        self.worker = CommitWorker(
            DeltaCommitter(writer_table, table_filesystem(lake), self.dlq, self.app_id)
        )
        self._started = True
        self.stats = IngestStats()
        self.buffer = _Buffer()
        self.assigned: set[int] = set()
        self.logged: dict[int, int | None] = {}
        self._needs_reset = False
        self._failures = 0
        self._stop = False
        self._closing = False
        self._last_activity = time.monotonic()
        self._in_flight = 0  # messages in the commit the writer is working on
        self.compactor = HourCompactor(lake, opts.clock) if opts.compact_closed_hours else None

    # --- loop ---------------------------------------------------------------------------------------

    def run(self, on_progress: Callable[[IngestStats], None] | None = None) -> IngestStats:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.consumer.subscribe(
            [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        try:
            while not self._stop and not self._bounded_run_done():
                self._step()
                if on_progress:
                    on_progress(self.stats)
            self._take_results(self.worker.wait_idle())
            if not self._needs_reset:
                self._flush(FlushReason.SHUTDOWN)
                self._take_results(self.worker.wait_idle())
        finally:
            self._closing = True
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.consumer.close()
            self.worker.close()
            self.dlq.close()
            if self.announcer is not None:
                self.announcer.close()
                self.stats.windows_announced = self.announcer.announced
            if self.compactor is not None:
                self.compactor.close()
        return self.stats

    def _require_topics(self, *names: str) -> None:
        """Fail at start, not at the first poison message, when the broker is unreachable or a topic is
        missing."""
        try:
            known = self.consumer.list_topics(timeout=self.opts.connect_timeout_s).topics
        except KafkaException as e:
            self.consumer.poll(0)  # serves the error callback: why the broker did not answer
            why = self._kafka_error.str() if self._kafka_error is not None else e.args[0].str()
            raise KafkaUnreachableError(
                f"Kafka at {self.kafka.bootstrap_servers} is unreachable ({why}; no answer within "
                f"{self.opts.connect_timeout_s:g} s): is the broker up? Run `flywheel stack status` "
                "(local stack) or check FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS"
            ) from None
        missing = [n for n in names if n not in known]
        if missing:
            raise IngestError(f"missing Kafka topics {missing}: run `flywheel topics create`")

    def _on_client_error(self, err: KafkaError) -> None:
        """librdkafka's error callback (served inside ``consume()``): remembered for the start-up check; once
        running, an outage of every broker is one warning (librdkafka reconnects by itself)."""
        if err.code() != KafkaError._ALL_BROKERS_DOWN:
            self._kafka_error = err  # the cause: a refused connection, a failed handshake, ...
            return
        if self._started and not self._broker_down:
            log.warning("Kafka at %s unreachable (%s); retrying", self.kafka.bootstrap_servers, err.str())
            self._broker_down = True

    def stop(self) -> None:
        self._stop = True

    def _on_signal(self, signum, _frame) -> None:
        log.info("signal %s: flushing and stopping", signum)
        self._stop = True

    def _step(self) -> None:
        messages = self.consumer.consume(self.opts.consume_batch, timeout=0.2)
        self._take_results(self.worker.poll())
        if self._needs_reset:
            self._reset()
            return
        if messages:
            self._ingest(messages)
        reason = should_flush(
            self.opts.policy, self.buffer.events, self.buffer.nbytes, self.buffer.age_s(), self._ending()
        )
        if reason:
            self._flush(reason)

    def _outstanding(self) -> int:
        """Messages committed, in flight or buffered."""
        return self.stats.processed + self._in_flight + self.buffer.events

    def _quiet(self) -> bool:
        """A bounded run saw no message for until_idle_s while owning partitions. Without partitions (group
        join, a rebalance in progress) it waits longer: another member may be about to hand some over."""
        if self.opts.until_idle_s is None:
            return False
        idle = time.monotonic() - self._last_activity
        return idle >= (self.opts.until_idle_s if self.assigned else max(self.opts.until_idle_s, 120.0))

    def _ending(self) -> bool:
        """A bounded run has all it will get: flush now instead of waiting for the flush policy."""
        reached = self.opts.max_events is not None and self._outstanding() >= self.opts.max_events
        return reached or self._quiet()

    def _bounded_run_done(self) -> bool:
        if self.opts.max_events is not None and self.stats.processed >= self.opts.max_events:
            return True
        return self._quiet() and not self.buffer.events and not self.worker.pending

    # --- messages -> buffer ---------------------------------------------------------------------------

    def _ingest(self, messages: list) -> None:
        good = [m for m in messages if m.error() is None]
        if len(good) < len(messages):
            for m in messages:
                if m.error() is not None:
                    self._on_kafka_error(m.error())
        if not good:
            return
        if self._broker_down:
            log.warning("Kafka at %s reachable again", self.kafka.bootstrap_servers)
            self._broker_down = False
        if self._warm_up.is_alive():  # start-up, like imports: not part of the ingest rate
            self._warm_up.join()
        self._last_activity = time.monotonic()
        if self.stats.first_message_at is None:
            self.stats.first_message_at = self._last_activity
            self.stats.cpu_at_first_message = time.process_time()
        clock_us = int(self.opts.clock() * 1_000_000)
        batch = MessageBatch.from_messages(good, clock_us)
        fresh = self._fresh(batch.partitions, batch.offsets)
        if not fresh.all():
            batch = MessageBatch.from_messages(
                [m for m, keep in zip(good, fresh, strict=True) if keep], clock_us
            )
            if not len(batch):
                return
        decoded = self.decoder.decode(batch)
        letters = [from_message(batch.messages[r.index], r.reason, r.detail) for r in decoded.rejected]
        last = last_offsets(batch.partitions, batch.offsets)
        self.buffer.add(decoded.rows, letters, last, len(batch), batch.nbytes)
        self.stats.consumed += len(batch)
        self.metrics.took(len(batch), last)
        self._last_activity = time.monotonic()

    def _fresh(self, partitions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Messages of assigned partitions above everything buffered or logged for their partition."""
        keep = np.ones(len(partitions), dtype=bool)
        for p in np.unique(partitions):
            p = int(p)
            here = partitions == p
            if p not in self.assigned:
                keep[here] = False
                continue
            logged = self.logged.get(p)
            floor = max(self.buffer.last.get(p, -1), -1 if logged is None else logged)
            keep[here & (offsets <= floor)] = False
        return keep

    def _on_kafka_error(self, err) -> None:
        if err.fatal():
            raise KafkaException(err)
        log.warning("kafka: %s", err)

    # --- buffer -> Delta ------------------------------------------------------------------------------

    def _flush(self, reason: FlushReason) -> None:
        """Hand the buffer to the writer once the previous commit is done (and succeeded)."""
        if not self.buffer.events:
            return
        self._take_results(self.worker.wait_idle())
        if self._needs_reset:
            return  # the buffer was built on offsets that did not land; _reset drops it
        b = self.buffer
        job = CommitJob(b.rows, b.letters, dict(b.last), {p: self.logged.get(p) for p in b.last}, b.nbytes)
        log.debug("flush (%s): %d messages, %d bytes", reason.value, b.events, b.nbytes)
        self.worker.submit(job)
        self._in_flight = b.events
        self.logged.update(job.txns)
        self.buffer = _Buffer()

    def _take_results(self, results: list[CommitResult]) -> None:
        for r in results:
            self._in_flight = 0
            if r.error is None:
                self._failures = 0
                self.stats.rows += r.job.num_rows
                self.stats.dead_letters += len(r.job.dead_letters)
                self.stats.commits += 1
                self.stats.last_commit_at = time.monotonic()
                self.stats.cpu_at_last_commit = time.process_time()
                self.metrics.committed(r, time.time())
                self._commit_kafka_offsets(r.job.txns)
                if self.compactor is not None:
                    self.compactor.after_commit()
                if self.announcer is not None:
                    self.announcer.after_commit(r.job.num_rows, r.version)
                continue
            self._needs_reset = True
            self.metrics.failed(r, isinstance(r.error, CONFLICTS))
            if isinstance(r.error, CONFLICTS):
                self.stats.conflicts += 1
                log.info("commit conflict, re-seeking from the table: %s", r.error)
                continue
            self._failures += 1
            log.warning("commit failed (%d in a row): %r", self._failures, r.error)
            if self._failures > self.opts.max_failures:
                raise IngestError(f"{self._failures} commits failed in a row") from r.error

    def _commit_kafka_offsets(self, txns: dict[int, int]) -> None:
        """Only for lag display: Delta is the source of truth, so failures here are harmless."""
        offsets = [TopicPartition(self.topic, p, v + 1) for p, v in txns.items() if p in self.assigned]
        if offsets and not self._closing:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=True)
            except KafkaException as e:
                log.debug("lag commit skipped: %s", e)

    def _reset(self) -> None:
        """Drop everything buffered and seek every assigned partition to its txn version + 1."""
        self._take_results(self.worker.wait_idle())
        self.buffer = _Buffer()
        self._needs_reset = False
        self.stats.resets += 1
        self.metrics.resets.inc()
        if self._failures:
            time.sleep(min(0.5 * 2**self._failures, 10.0))
        refresh(self.table)
        for p in sorted(self.assigned):
            version = self.table.transaction_version(txn_app_id(self.app_id, p))
            self.logged[p] = version
            self.metrics.assigned(p, version)
            offset = seek_offset(version)
            if offset == OFFSET_BEGINNING:  # seek() wants a real offset: the partition's first one
                offset, _ = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)
            tp = TopicPartition(self.topic, p, offset)
            try:
                self.consumer.seek(tp)
            except KafkaException as e:  # partition not fetching yet: re-assign it at the offset instead
                log.info("seek p%d failed (%s); re-assigning", p, e)
                self.consumer.incremental_unassign([tp])
                self.consumer.incremental_assign([tp])

    # --- rebalance callbacks (run inside consume()) ---------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        refresh(self.table)
        for tp in partitions:
            version = self.table.transaction_version(txn_app_id(self.app_id, tp.partition))
            tp.offset = seek_offset(version)
            self.logged[tp.partition] = version
            self.assigned.add(tp.partition)
            self.metrics.assigned(tp.partition, version)
        log.info("assigned %s", {tp.partition: tp.offset for tp in partitions})
        consumer.incremental_assign(partitions)
        self._last_activity = time.monotonic()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not self._closing:
            self._take_results(self.worker.wait_idle())
            if not self._needs_reset:
                self._flush(FlushReason.SHUTDOWN)
                self._take_results(self.worker.wait_idle())
        self._forget(partitions)
        consumer.incremental_unassign(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not self._closing:
            self._take_results(self.worker.wait_idle())
            self._needs_reset = True  # another consumer may own them now: drop, never flush
        self._forget(partitions)
        consumer.incremental_unassign(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.assigned.discard(tp.partition)
            self.logged.pop(tp.partition, None)
            self.buffer.last.pop(tp.partition, None)
            self.metrics.revoked(tp.partition)
        log.info("revoked %s", sorted(tp.partition for tp in partitions))
