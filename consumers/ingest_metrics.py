"""The ingest's Prometheus series (``flywheel_ingest_*``), served at /metrics by `flywheel ingest --metrics-port N`.

A registry of its own, not prometheus_client's global one: the process serves exactly these series, and two
ingests in one process (tests, benchmarks) do not collide. Everything is updated on the consume loop's
thread where it already does something once per consumed batch, per commit or per librdkafka statistics
report (``statistics.interval.ms``), never per message. Rates (events/s, rows/s, dead letters/s) are left to
Prometheus (``rate()`` of the counters).

Lag per partition = the partition's end offset minus the offset after the one the Delta log holds for it:
the messages not yet in the table, buffered ones included. The end offset is the last stable offset from
librdkafka's statistics (the ingest reads committed messages only), raised by every consumed batch, so a
commit that catches up shows lag 0 at once, without waiting for the next report.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from consumers.delta_commit import CommitResult

COMMIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class IngestMetrics:
    def __init__(self, topic: str, group: str, table_uri: str):
        self.topic = topic
        self.registry = CollectorRegistry()
        r = self.registry
        info = Gauge(
            "flywheel_ingest_info",
            "What this ingest reads and writes (always 1)",
            ["topic", "group", "table"],
            registry=r,
        )
        info.labels(topic, group, table_uri).set(1)
        self.consumed = Counter(
            "flywheel_ingest_consumed",
            "Messages taken into the buffer (replays after a reset count again)",
            registry=r,
        )
        self.rows = Counter("flywheel_ingest_rows", "Rows committed to the Delta table", registry=r)
        self.dead_letters = Counter(
            "flywheel_ingest_dead_letters",
            "Messages committed as dead letters (sent to the DLQ topic)",
            registry=r,
        )
        self.commits = Counter("flywheel_ingest_commits", "Delta commits that landed", registry=r)
        self.conflicts = Counter(
            "flywheel_ingest_conflicts",
            "Commits lost to another writer or to moved offsets (the ingest re-seeks from the table)",
            registry=r,
        )
        self.failures = Counter(
            "flywheel_ingest_commit_failures",
            "Commits that failed otherwise (I/O, dead letters unacknowledged); retried with a backoff",
            registry=r,
        )
        self.resets = Counter(
            "flywheel_ingest_resets", "Times the buffer was dropped and partitions re-seeked", registry=r
        )
        self.commit_seconds = Histogram(
            "flywheel_ingest_commit_seconds",
            "One commit on the writer thread: offset check, dead letters, Parquet files, Delta commit",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.table_version = Gauge(
            "flywheel_ingest_table_version",
            "Version of the Delta table after the ingest's last commit",
            registry=r,
        )
        self.last_commit = Gauge(
            "flywheel_ingest_last_commit_timestamp_seconds",
            "When the ingest's last commit landed (Unix time)",
            registry=r,
        )
        self.lag = Gauge(
            "flywheel_ingest_lag",
            "Messages of a partition not yet committed to the table (end offset - next offset of the table)",
            ["topic", "partition"],
            registry=r,
        )
        self._next: dict[int, int | None] = {}  # assigned partition -> offset after the table's txn
        self._end: dict[int, int] = {}
        self._low: dict[int, int] = {}

    # --- from the consume loop ------------------------------------------------------------------------

    def assigned(self, partition: int, txn: int | None) -> None:
        self._next[partition] = None if txn is None else txn + 1
        self._update(partition)

    def revoked(self, partition: int) -> None:
        for known in (self._next, self._end, self._low):
            known.pop(partition, None)
        try:
            self.lag.remove(self.topic, str(partition))
        except KeyError:
            pass

    def took(self, messages: int, last: Mapping[int, int]) -> None:
        """A consumed batch: ``last`` is the highest offset per partition."""
        self.consumed.inc(messages)
        for p, offset in last.items():
            if offset + 1 > self._end.get(p, -1):
                self._end[p] = offset + 1
                self._update(p)

    def committed(self, result: CommitResult, now_s: float) -> None:
        job = result.job
        self.rows.inc(job.num_rows)
        self.dead_letters.inc(len(job.dead_letters))
        self.commits.inc()
        self.commit_seconds.observe(result.seconds)
        if result.version is not None:
            self.table_version.set(result.version)
        self.last_commit.set(now_s)
        for p, txn in job.txns.items():
            if p in self._next:
                self._next[p] = txn + 1
                self._update(p)

    def failed(self, result: CommitResult, conflict: bool) -> None:
        self.commit_seconds.observe(result.seconds)
        (self.conflicts if conflict else self.failures).inc()

    def on_stats(self, report: str) -> None:
        """librdkafka's ``stats_cb`` (served inside ``consume()``): end and low offsets of our partitions."""
        partitions = json.loads(report).get("topics", {}).get(self.topic, {}).get("partitions", {})
        for p in list(self._next):
            stats = partitions.get(str(p))
            if not stats:
                continue
            end = stats.get("ls_offset", -1)
            end = end if end >= 0 else stats.get("hi_offset", -1)
            if end >= 0 and end > self._end.get(p, -1):
                self._end[p] = end
            if stats.get("lo_offset", -1) >= 0:
                self._low[p] = stats["lo_offset"]
            self._update(p)

    def _update(self, p: int) -> None:
        nxt, end, low = self._next.get(p), self._end.get(p), self._low.get(p)
        start = max((o for o in (nxt, low) if o is not None), default=None)
        if start is not None and end is not None:
            self.lag.labels(self.topic, str(p)).set(max(0, end - start))


def serve(metrics: IngestMetrics, host: str, port: int) -> tuple[int, Callable[[], None]]:
    """Serve ``metrics`` at http://host:port/metrics on a daemon thread; returns the bound port (port 0: any
    free one) and the function that stops the server. Raises OSError when the port is taken."""
    server, _ = start_http_server(port, host, registry=metrics.registry)
    return server.server_port, server.shutdown
