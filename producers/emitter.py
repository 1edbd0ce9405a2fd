"""Non-blocking Kafka emitter with a disk spill: capture is best-effort in time, lossless in content.

``submit()`` is the only call on the serving hot path: it puts the record on a bounded in-memory queue and
returns (a full queue drops the record and counts it; it never waits). One background thread encodes,
produces (idempotent, zstd, linger) and watches the broker; it shares the serving process's GIL, so it
sleeps on the queue (long when nothing is in flight) instead of polling:

- broker up, nothing spilled: produce straight to Kafka;
- broker down (librdkafka reports all brokers down), or its queue full: append to the spill file;
- broker back (a metadata probe answers): replay spill files in order, then produce directly again.

The schema registry is a dependency like the broker: an encoder that cannot frame a value (its schema id
unknown and the registry not answering) raises :class:`Pending` with the value in a spillable form, and the
emitter spills it and counts the registry as down; replay passes every spilled value through ``frame``
(which turns pending values into messages), and a ``frame`` that raises Pending again pauses the replay
until the next probe. The request path never talks to the registry.

Messages already handed to librdkafka never time out (``message.timeout.ms=0``): the idempotent producer
delivers them exactly once when the broker returns. On close, whatever librdkafka still holds is purged
into the spill, to be replayed by the next process.

Faults cost events, never capture: the spill is capped (``spill_max_bytes``); an event the spill cannot take
(cap reached, disk full, any ``OSError``) is counted as ``spill_dropped``, every ``OSError`` as ``io_errors``,
logged once per burst (and once when the disk takes writes again); and the loop runs under a supervisor that
logs and restarts it (``restarts``) if anything else escapes, so the thread lives as long as the process.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Producer

from core.kafka_log import librdkafka_log
from core.settings import KafkaSettings
from producers.spill import AckedPrefix, SpillDir, read_records

log = logging.getLogger("flywheel.emitter")

Encoder = Callable[[Any], tuple[bytes, bytes]]  # record -> (key, value)
Framer = Callable[[bytes], bytes]  # spilled value -> the value to produce


class Pending(Exception):
    """Raised by an encoder or framer that cannot make the message yet (the schema registry is away):
    ``value`` is what to spill meanwhile (an encoder's; a framer's spilled value stays where it is)."""

    def __init__(self, reason: str, key: bytes = b"", value: bytes = b""):
        super().__init__(reason)
        self.key = key
        self.value = value


# Only every broker down means Kafka is down: on a cluster a transport error from one broker (it died, its
# partitions' leadership moves) is librdkafka's to handle, and the messages it holds wait for the new leader
_DOWN_CODES = {KafkaError._ALL_BROKERS_DOWN}
OUTCOMES = ("sent", "spilled", "replayed", "dropped", "spill_dropped", "failed")  # what became of events
FAULTS = ("io_errors", "restarts")  # what went wrong on the emitter thread (counted, never raised)
_WAKE = object()  # put on the queue by close(): the thread stops waiting at once
_URGENT_WAIT_S = 0.05  # queue wait while a spill replays or the broker is down (probes, replay progress)
_BUSY_WAIT_S = 0.25  # while librdkafka holds messages: their delivery reports wait in its queue meanwhile
_IDLE_WAIT_S = 1.0  # queue wait with nothing in flight


class TraceEmitter:
    """One per serving process. Thread-safe ``submit``; everything else runs on the emitter thread."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        encoder: Encoder,
        spill_dir: Path,
        max_queue: int = 10_000,
        probe_interval_s: float = 1.0,
        on_count: Callable[[str, int], None] | None = None,
        spill_max_bytes: int | None = None,
        frame: Framer | None = None,
    ):
        self.kafka = kafka
        self.topic = topic
        self.encoder = encoder
        self.frame = frame
        self.spill = SpillDir(spill_dir, max_bytes=spill_max_bytes)
        self.max_queue = max_queue
        self.probe_interval_s = probe_interval_s
        self.counts: Counter[str] = Counter()
        self._on_count = on_count
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._down = False
        self._next_probe = 0.0
        self._producer: Producer | None = None
        self._replay: _Replay | None = None
        self._io_failing = 0  # OSErrors in the current burst (0: the disk takes writes)
        self.queue_peak = 0  # deepest queue the thread has found (a gauge at /metrics)
        self._thread = threading.Thread(target=self._run, name="flywheel-trace-emitter", daemon=True)
        self._started = False
        self._lock = threading.Lock()

    # --- hot path -------------------------------------------------------------------------------------

    def submit(self, record: Any) -> None:
        """Hand a record to the emitter. Never blocks, never raises."""
        if not self._started:
            self._start()
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._count("dropped")

    # --- lifecycle ------------------------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if not self._started:
                self._started = True
                self._thread.start()

    def close(self, timeout_s: float = 10.0) -> dict[str, int]:
        """Drain the queue, flush what Kafka accepts within ``timeout_s``, spill the rest. Returns counts."""
        if self._started:
            self._stop.set()
            try:
                self._queue.put_nowait(_WAKE)
            except queue.Full:  # the thread is busy draining anyway
                pass
            self._thread.join(timeout_s + 5)
        self._log_counts("closed")
        return {k: self.counts[k] for k in OUTCOMES + FAULTS}

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def spill_bytes(self) -> int:
        """Bytes waiting in the spill files, as the emitter thread last counted them (any thread may ask)."""
        return self.spill.known_bytes()

    def stats(self) -> dict[str, int]:
        return {
            **{k: self.counts[k] for k in OUTCOMES + FAULTS},
            "queued": self._queue.qsize(),
            "queue_peak": self.queue_peak,
            "down": int(self._down),
        }

    # --- emitter thread -------------------------------------------------------------------------------

    def _producer_config(self) -> dict[str, Any]:
        return self.kafka.client_config() | {
            "enable.idempotence": True,
            "compression.type": "zstd",
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "message.timeout.ms": 0,  # never give up on a message librdkafka holds: no timeout duplicates
            "queue.buffering.max.messages": self.max_queue,
            "queue.buffering.max.kbytes": 65_536,
            "error_cb": self._on_error,
            "logger": librdkafka_log(),
        }

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        """The supervisor: the loop is restarted (with a backoff) whatever escapes it; state survives."""
        self._producer = Producer(self._producer_config())
        failures = 0
        while True:
            try:
                self._loop()
                break
            except Exception:
                self._count("restarts")
                log.exception("trace emitter loop failed; restarting it (events keep queueing meanwhile)")
                time.sleep(min(5.0, 0.05 * 2**failures))
                failures += 1
        try:
            self._shutdown()
        except Exception:
            log.exception("trace emitter shutdown failed; what librdkafka held may be lost")

    def _loop(self) -> None:
        last_log = time.monotonic()
        while not (self._stop.is_set() and self._queue.empty()):
            self._drain_queue()
            self._producer.poll(0)
            if self._down and time.monotonic() >= self._next_probe:
                self._probe()
            if not self._down:
                self._advance_replay()
            if time.monotonic() - last_log > 60:
                self._log_counts("running")
                last_log = time.monotonic()

    def _drain_queue(self, budget: int = 2000) -> None:
        """Handle what is queued, waiting for the first record: briefly while something needs watching
        (deliveries to serve, a replay, a probe), long when idle."""
        if self._down or self._replay is not None or self.spill.pending():
            wait = _URGENT_WAIT_S
        else:
            wait = _BUSY_WAIT_S if len(self._producer) > 0 else _IDLE_WAIT_S
        try:
            record = self._queue.get(timeout=wait)
            # serve callbacks queued while asleep first: a broker found down meanwhile decides where this goes
            self._producer.poll(0)
            self._handle(record)
            self.queue_peak = max(self.queue_peak, self._queue.qsize() + 1)
            for _ in range(budget - 1):
                self._handle(self._queue.get_nowait())
        except queue.Empty:
            pass

    def _handle(self, record: Any) -> None:
        if record is _WAKE:
            return
        try:
            key, value = self.encoder(record)
        except Pending as e:  # no schema id yet: like a broker outage, the spill holds it
            self._unframed(e)
            self._spill(e.key, e.value)
            return
        except Exception:  # a record we cannot encode is a bug upstream: count it, keep serving
            log.exception("cannot encode trace record; dropped")
            self._count("failed")
            return
        if self._down or self.spill.pending():
            self._spill(key, value)
            return
        try:
            self._producer.produce(self.topic, value=value, key=key, on_delivery=self._on_delivery)
        except BufferError:
            self._spill(key, value)

    def _spill(self, key: bytes, value: bytes) -> None:
        try:
            self.spill.append(key, value)
        except OSError as e:
            self._count("spill_dropped")
            self._io_error(f"cannot spill to {self.spill.directory}; dropping trace events", e)
            return
        self._count("spilled")
        self._io_ok()

    def _io_error(self, what: str, error: OSError) -> None:
        """Count every OSError; log the first of a burst (the rest are in the counters)."""
        self._count("io_errors")
        if not self._io_failing:
            log.error(
                "%s: %s (further I/O errors are counted, not logged, until a write succeeds)", what, error
            )
        self._io_failing += 1

    def _io_ok(self) -> None:
        if self._io_failing:
            log.warning(
                "spill writable again after %d I/O error(s); %d event(s) dropped so far",
                self._io_failing,
                self.counts["spill_dropped"],
            )
            self._io_failing = 0

    def _on_error(self, err: KafkaError) -> None:
        if err.code() in _DOWN_CODES and not self._down:
            log.warning(
                "Kafka unreachable (%s): spilling trace events to %s", err.str(), self.spill.directory
            )
            self._down = True
            self._next_probe = time.monotonic() + self.probe_interval_s

    def _on_delivery(self, err: KafkaError | None, msg) -> None:
        if err is None:
            self._down = False  # a delivery proves the broker is back, whatever stale errors said
            self._count("sent")
        elif err.code() in (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT):
            self._spill(msg.key() or b"", msg.value())
        else:
            log.error("trace event rejected by Kafka (%s); dropped", err.str())
            self._count("failed")

    def _unframed(self, error: Pending) -> None:
        """The registry is away: wait for the next probe as if the broker were down (spill, then replay)."""
        if not self._down:
            log.warning("%s: spilling trace events to %s", error, self.spill.directory)
            self._down = True
            self._next_probe = time.monotonic() + self.probe_interval_s

    def _probe(self) -> None:
        """While down: does the broker answer a metadata request again?"""
        self._next_probe = time.monotonic() + self.probe_interval_s
        try:
            self._producer.list_topics(self.topic, timeout=0.5)
        except Exception:
            return
        log.warning("Kafka reachable again; replaying %d spill file(s)", len(self.spill.files()))
        self._down = False

    def _advance_replay(self) -> None:
        """Replay spill files oldest first, one at a time, a bounded amount per loop turn."""
        if self._replay is None:
            if not self.spill.pending():
                return
            self.spill.seal()  # newer events go to a new file behind the ones being replayed
            self._replay = _Replay(self.spill.files()[0], self.topic, self._count, self._io_error)
        try:
            self._replay.hand_off(self._producer, self.frame)
        except Pending as e:  # the rest of the file waits for the registry
            self._unframed(e)
            return
        if self._replay.settle():
            replay, self._replay = self._replay, None
            replay.close()
            try:
                self.spill.remove(replay.path)
            except OSError as e:
                self._io_error(f"cannot remove replayed spill file {replay.path}", e)

    def _shutdown(self) -> None:
        remaining = self._producer.flush(5.0 if not self._down else 0.5)
        if remaining:
            self._producer.purge(in_queue=True, in_flight=True)  # delivery callbacks spill them
            self._producer.poll(0.5)
        self.spill.seal()

    def _count(self, outcome: str, n: int = 1) -> None:  # outcomes and faults
        self.counts[outcome] += n
        if self._on_count is not None:
            self._on_count(outcome, n)

    def _log_counts(self, when: str) -> None:
        log.info("trace emitter %s: %s", when, ", ".join(f"{k}={self.counts[k]}" for k in OUTCOMES + FAULTS))


class _Replay:
    """Replay of one spill file, streamed: advanced a little on every loop turn, never blocking the emitter
    thread and never holding more of the file than librdkafka has in flight.

    Records are handed to librdkafka once each (it never times them out, so none is sent twice while
    this process lives); the acknowledged prefix is persisted next to the file, so a crash re-sends only
    records Kafka had not acknowledged. The caller deletes the file when every record is acknowledged.
    """

    def __init__(
        self,
        path: Path,
        topic: str,
        count: Callable[[str, int], None],
        io_error: Callable[[str, OSError], None],
    ):
        self.path = path
        self.topic = topic
        self.marker = AckedPrefix(path)
        self.start = self.marker.read()
        self._records = read_records(path)
        for _ in range(self.start):  # acknowledged before a crash: not sent again
            next(self._records, None)
        self._next: tuple[bytes, bytes] | None = None
        self.exhausted = False
        self.handed = 0  # records handed to librdkafka (counted from ``start``)
        self.prefix = 0  # leading records acknowledged
        self._acked: set[int] = set()  # acknowledged beyond the prefix (deliveries may come out of order)
        self._count = count
        self._io_error = io_error

    def _callback(self, i: int) -> Callable:
        def on_delivery(err, _msg) -> None:
            if err is None:
                self._acked.add(i)
                self._count("replayed", 1)

        return on_delivery

    def hand_off(self, producer: Producer, frame: Framer | None = None, budget: int = 5000) -> None:
        """Hand records to librdkafka; ``frame`` raising Pending stops here, this record first next time."""
        for _ in range(budget):
            if self._next is None:
                self._next = next(self._records, None)
                if self._next is None:
                    self.exhausted = True
                    return
            key, value = self._next
            if frame is not None:
                value = frame(value)
            try:
                producer.produce(
                    self.topic, value=value, key=key or None, on_delivery=self._callback(self.handed)
                )
            except BufferError:
                return
            self._next = None
            self.handed += 1

    def settle(self) -> bool:
        """Advance and persist the acknowledged prefix; True once the whole file is acknowledged."""
        before = self.prefix
        while self.prefix in self._acked:
            self._acked.remove(self.prefix)
            self.prefix += 1
        if self.prefix != before:
            try:
                self.marker.write(self.start + self.prefix)
            except OSError as e:  # only a crash now would re-send the unmarked acknowledged records
                self._io_error(f"cannot persist the replay position of {self.path}", e)
        return self.exhausted and self.prefix == self.handed

    def close(self) -> None:
        self._records.close()
        self.marker.close()
