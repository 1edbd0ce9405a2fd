"""Window announcements: the ingest says when a window's worth of new traces is in the table.

After each Delta commit the ingest hands the rows it committed to a background thread; once they reach
``min_window_rows`` since its last announcement, that thread reads the window at the version that completed
it (``consumers.windows``: the window's hours, two columns) and publishes one WindowAnnouncement (table,
version, window key, rows) to ``FLYWHEEL_KAFKA_WINDOWS_TOPIC``. Airflow's triggerer watches that topic (the Kafka provider's message-queue
trigger behind an ``AssetWatcher``, dags/flywheel_assets.py) and calls :func:`asset_event` on each message:
its return value becomes the payload of a ``trace_windows`` asset event, which schedules drafter_flywheel.

The count is per ingest process and starts at zero: a restarted ingest announces after a full window of new
rows, and each member of a consumer group announces for the rows it committed. A window that is too thin
(fewer than ``min_window_rows`` traces in its ``window_minutes``) is not announced; the count stands and the
next commit tries again. An announcement the broker did not acknowledge is logged and retried at the next
commit; the lake, not the topic, is the record (drafter_flywheel's timetable picks up a lost one).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from datetime import timedelta
from typing import Any

from confluent_kafka import Producer

from consumers.windows import EPOCH, TraceWindow, pick_window
from core.kafka_log import librdkafka_log
from core.settings import CycleSettings, KafkaSettings, LakeSettings
from schemas import codec
from schemas.registry import WINDOW_ANNOUNCEMENT, current
from schemas.schema_ids import RegistryUnavailable, SchemaIds, subject

log = logging.getLogger("flywheel.ingest.windows")
MICRO = timedelta(microseconds=1)


def announcement(window: TraceWindow, new_rows: int, now_s: float) -> dict[str, Any]:
    """The WindowAnnouncement record of ``window`` (times as µs since the epoch, as the schema stores them)."""
    return {
        "schema_version": 1,
        "table": window.table,
        "version": window.version,
        "key": window.key,
        "rows": window.rows,
        "new_rows": new_rows,
        "window_start": (window.start - EPOCH) // MICRO,
        "window_end": (window.end - EPOCH) // MICRO,
        "announced_at": int(now_s * 1_000_000),
    }


def publish(
    producer: Producer, topic: str, record: dict[str, Any], ids: SchemaIds, timeout_s: float
) -> str | None:
    """Produce one announcement, keyed on its table, and wait for the broker: None, or why it failed.
    The schema id comes from the registry (``ids``; RegistryUnavailable/LookupError propagate)."""
    errors: list[str] = []
    schema_id = ids.id_of(current(WINDOW_ANNOUNCEMENT), subject(topic))
    producer.produce(
        topic,
        key=record["table"].encode(),
        value=codec.encode(WINDOW_ANNOUNCEMENT, record, schema_id, check=True),
        on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
    )
    if producer.flush(timeout_s):
        return "not acknowledged within the timeout"
    return errors[0] if errors else None


class WindowAnnouncer:
    """Counts committed rows and announces a window each time ``min_window_rows`` of them landed.

    The ingest's loop only queues (rows, version) per commit; one background thread applies the rule in
    commit order, reads the window and publishes, so a window read or a slow broker never stalls
    consumption. ``close()`` drains the queue.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        lake: LakeSettings,
        cycle: CycleSettings,
        clock=time.time,
        timeout_s: float = 10.0,
    ):
        self.kafka, self.lake, self.cycle, self.clock, self.timeout_s = kafka, lake, cycle, clock, timeout_s
        self.pending_rows = 0  # committed since the last announcement
        self.announced = 0
        self._producer: Producer | None = None  # made at the first window: no client for a run without one
        self._ids: SchemaIds | None = None
        self._commits: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="flywheel-window-announcer", daemon=True)
        self._thread.start()

    def after_commit(self, rows: int, version: int) -> None:
        """Called after each successful Delta commit of ``rows`` at table ``version`` (never blocks)."""
        self._commits.put((rows, version))

    def close(self) -> None:
        """Announce what the commits so far call for, then stop."""
        self._commits.put(None)
        self._thread.join()
        if self._producer is not None:
            self._producer.flush(self.timeout_s)

    def _run(self) -> None:
        while (commit := self._commits.get()) is not None:
            try:
                self._commit(*commit)
            except Exception:  # the lake is the record: a failed announcement must not stop the ingest
                log.exception("window announcement after table version %d failed", commit[1])

    def _commit(self, rows: int, version: int) -> None:
        self.pending_rows += rows
        if self.pending_rows < self.cycle.min_window_rows:
            return
        window = pick_window(self.lake, self.cycle.window_minutes, self.cycle.min_window_rows, version)
        if window is None:
            return
        if self._producer is None:
            conf = {"enable.idempotence": True, "linger.ms": 0, "logger": librdkafka_log()}
            self._producer = Producer(self.kafka.client_config() | conf)
            self._ids = SchemaIds.connect(self.kafka)
        record = announcement(window, self.pending_rows, self.clock())
        failed = publish(self._producer, self.kafka.windows_topic, record, self._ids, self.timeout_s)
        if failed:
            log.warning("window %s not announced on %s: %s", window.key, self.kafka.windows_topic, failed)
            return
        log.info("announced window %s (%d rows, %d new)", window.key, window.rows, self.pending_rows)
        self.pending_rows = 0
        self.announced += 1


@functools.cache
def _triggerer_ids() -> SchemaIds:
    """The triggerer process's registry client (its ids are cached for good), from its environment."""
    return SchemaIds.connect(KafkaSettings())


def asset_event(message) -> dict[str, Any] | None:
    """The triggerer's ``apply_function``: a Kafka message -> the asset event's payload (JSON), or None to
    skip a message that is not a WindowAnnouncement of ours (logged; the trigger goes on polling)."""
    try:
        _, record = codec.decode(
            message.value() or b"", _triggerer_ids().version_of, expect=WINDOW_ANNOUNCEMENT
        )
    except (codec.DecodeError, RegistryUnavailable) as e:
        log.warning("skipped a message on %s@%d: %s", message.topic(), message.offset(), e)
        return None
    return {
        "table": record["table"],
        "version": record["version"],
        "key": record["key"],
        "rows": record["rows"],
        "new_rows": record["new_rows"],
        **{
            k: (EPOCH + record[k] * MICRO).isoformat() for k in ("window_start", "window_end", "announced_at")
        },
    }
