"""The ingest's /metrics as Prometheus scrapes it, on the real broker and a real Delta table: rows and dead
letters equal what was produced, the lag per partition is seen above 0 and reaches 0, the table version is
the table's. A revoked partition's lag is no longer reported (its new owner reports it)."""

from __future__ import annotations

import threading

import httpx
import pytest
from deltalake import DeltaTable
from prometheus_client.parser import text_string_to_metric_families
from trace_events import encoded, poison_messages, produce, trace

from consumers.delta_sink import IngestOptions, TraceIngest
from consumers.ingest_metrics import IngestMetrics, serve
from core.settings import LakeSettings

pytestmark = pytest.mark.integration
PARTITIONS = 3


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, parsed from the text exposition format."""
    text = httpx.get(url, timeout=5).raise_for_status().text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def lags(samples: dict[tuple[str, tuple], float]) -> dict[str, float]:
    return {
        dict(labels)["partition"]: v for (name, labels), v in samples.items() if name == "flywheel_ingest_lag"
    }


def test_metrics_endpoint_counts_rows_dead_letters_lag_and_table_version(
    kafka_settings, schema_ids, topic_factory, tmp_path
):
    topic, dlq = topic_factory(partitions=PARTITIONS), topic_factory(prefix="dlq")
    good = encoded([trace(i) for i in range(300)], schema_ids)
    poison = [value for _, _, value in poison_messages(good[0], schema_ids)]
    produce(kafka_settings, topic, good + poison)
    kafka = kafka_settings.model_copy(update={"dlq_topic": dlq})
    lake = LakeSettings(root=str(tmp_path / "lake"))
    metrics = IngestMetrics(topic, "metrics-test", lake.traces_uri)
    port, stop = serve(metrics, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}/metrics"
    expected = len(good) + len(poison)
    seen: list[dict[str, float]] = []
    caught_up: dict[tuple[str, tuple], float] = {}
    done = threading.Event()

    def watch() -> None:  # Prometheus, scraping while the ingest runs
        while not done.wait(0.25):
            seen.append(lags(scrape(url)))

    def progress(stats) -> None:  # the moment everything is committed, before the partitions are revoked
        if stats.processed == expected and not caught_up:
            caught_up.update(scrape(url))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        opts = IngestOptions(group="metrics-test", until_idle_s=2.0, stats_interval_s=0.5)
        stats = TraceIngest(kafka, lake, opts, topic=topic, metrics=metrics).run(on_progress=progress)
        final = scrape(url)
    finally:
        done.set()
        watcher.join(5)
        stop()

    assert (stats.rows, stats.dead_letters) == (len(good), len(poison))
    assert final["flywheel_ingest_rows_total", ()] == len(good)
    assert final["flywheel_ingest_dead_letters_total", ()] == len(poison)
    assert final["flywheel_ingest_consumed_total", ()] == expected
    assert final["flywheel_ingest_commits_total", ()] == stats.commits
    assert final["flywheel_ingest_commit_seconds_count", ()] == stats.commits
    version = DeltaTable(lake.traces_uri).version()
    assert final["flywheel_ingest_table_version", ()] == version > 0
    assert lags(caught_up) == {str(p): 0 for p in range(PARTITIONS)}
    assert lags(final) == {}  # closing revoked the partitions: this ingest no longer reports them
    assert any(sum(observed.values()) > 0 for observed in seen), "the lag was never seen above 0"
    info = ("flywheel_ingest_info", (("group", "metrics-test"), ("table", lake.traces_uri), ("topic", topic)))
    assert final[info] == 1
