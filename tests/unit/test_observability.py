"""The dashboard and alert rules in deploy/ against what the code exports, and the series themselves.

Every PromQL expression of the Grafana dashboard and of the Prometheus rules is parsed (``tests/promql.py``:
no PromQL parser is a dependency) and may select only metric names that exist: the ingest's registry, the
plugin's series in prometheus_client's default registry (collected from the code, not listed here) and
vLLM's own ``vllm:*`` names (read from its metrics sources, without importing vLLM).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import re
import threading
from pathlib import Path

import jsonschema
import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from promql import PromQLError, metric_names, parse

from consumers.delta_commit import CommitJob, CommitResult
from consumers.ingest_metrics import IngestMetrics
from core.kafka_log import LibrdkafkaLog
from producers import metrics as plugin_metrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "flywheel.json"
RULES = REPO / "deploy" / "prometheus" / "flywheel-rules.yml"
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}
# The classic Grafana dashboard model (the JSON that "Import dashboard" takes), as far as this file uses it.
_GRID = {
    "type": "object",
    "required": ["x", "y", "w", "h"],
    "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 23},
        "y": {"type": "integer", "minimum": 0},
        "w": {"type": "integer", "minimum": 1, "maximum": 24},
        "h": {"type": "integer", "minimum": 1},
    },
}
_DATASOURCE = {
    "type": "object",
    "required": ["type", "uid"],
    "properties": {"type": {"const": "prometheus"}, "uid": {"const": "${datasource}"}},
}
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "time", "templating", "panels"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "time": {"type": "object", "required": ["from", "to"]},
        "refresh": {"type": "string"},
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {
                "list": {"type": "array", "items": {"type": "object", "required": ["name", "type"]}}
            },
        },
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos"],
                "properties": {
                    "id": {"type": "integer"},
                    "type": {"enum": ["row", "timeseries", "stat", "table", "gauge", "bargauge"]},
                    "title": {"type": "string", "minLength": 1},
                    "gridPos": _GRID,
                    "datasource": _DATASOURCE,
                },
                "if": {"properties": {"type": {"not": {"const": "row"}}}},
                "then": {
                    "required": ["datasource", "targets"],
                    "properties": {
                        "targets": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["refId", "expr"],
                                "properties": {
                                    "refId": {"type": "string", "pattern": "^[A-Z]$"},
                                    "expr": {"type": "string", "minLength": 1},
                                    "datasource": _DATASOURCE,
                                },
                            },
                        }
                    },
                },
            },
        },
    },
}
DURATION = re.compile(r"^(\d+(ms|[smhdwy]))+$")


def sample_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry can expose (a labelled series without children exposes none yet)."""
    names = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",))}
    return names


def vllm_names() -> set[str]:
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    sources = [root / "v1" / "metrics" / "loggers.py", root / "v1" / "spec_decode" / "metrics.py"]
    found = {m for path in sources for m in re.findall(r"\"(vllm:[a-z0-9_]+)\"", path.read_text())}
    return {name + suffix for name in found for suffix in ("", "_total", "_bucket", "_count", "_sum")}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    plugin_metrics.registered()
    ingest = IngestMetrics("spec.traces.v1", "flywheel-ingest", "/lake/traces")
    return sample_names(ingest.registry) | sample_names(REGISTRY) | vllm_names()


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


# --- the dashboard -----------------------------------------------------------------------------------


def test_the_dashboard_is_a_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    jsonschema.validate(dashboard, DASHBOARD_SCHEMA)
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource"}
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids repeat"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"{p['title']} is wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[x, y]}"
                cells[x, y] = p["title"]
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(set(refs)) == len(refs), f"{p['title']}: refIds repeat"


def test_every_dashboard_query_parses_and_selects_exported_metrics(exported):
    queries = dashboard_queries()
    assert len(queries) >= 10
    for title, expr in queries:
        names = metric_names(expr)
        assert names, f"{title}: {expr} selects no metric"
        assert names <= exported, f"{title}: {sorted(names - exported)} are not exported by anything"


def test_the_dashboard_shows_what_operators_ask_for():
    selected = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    assert selected >= {
        "flywheel_ingest_lag",
        "flywheel_ingest_rows_total",
        "flywheel_ingest_dead_letters_total",
        "flywheel_ingest_commit_seconds_bucket",
        "flywheel_ingest_table_version",
        "flywheel_trace_events_total",
        "flywheel_trace_spill_bytes",
        "flywheel_served_drafter",
        "vllm:spec_decode_num_accepted_tokens_total",
        "vllm:spec_decode_num_drafts_total",
    }


# --- the alert rules ---------------------------------------------------------------------------------


def test_every_rule_is_complete():
    document = yaml.safe_load(RULES.read_text())
    assert set(document) == {"groups"}
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(set(names)) == len(names), "alert names repeat"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule[
            "alert"
        ]
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
        assert DURATION.match(rule["for"]), f"{rule['alert']}: for {rule['for']!r}"
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_every_rule_expression_parses_and_selects_exported_metrics(exported):
    for rule in alert_rules():
        parsed = parse(rule["expr"])
        assert parsed.kind == "vector", f"{rule['alert']}: an alert needs an instant vector"
        assert parsed.metrics <= exported, (
            f"{rule['alert']}: {sorted(parsed.metrics - exported)} not exported"
        )


def test_the_alerts_cover_lag_dead_letters_drops_and_tau():
    by_name = {r["alert"]: metric_names(r["expr"]) for r in alert_rules()}
    assert "flywheel_ingest_lag" in by_name["FlywheelIngestLagHigh"]
    assert "flywheel_ingest_dead_letters_total" in by_name["FlywheelDeadLetters"]
    assert "flywheel_trace_events_total" in by_name["FlywheelCaptureDrops"]
    assert by_name["FlywheelTauDrop"] >= {
        "vllm:spec_decode_num_accepted_tokens_total",
        "vllm:spec_decode_num_drafts_total",
        "flywheel_drafter_swaps_total",  # only under a champion that served the whole baseline day
    }


@pytest.mark.parametrize(
    "expr",
    [
        "rate(flywheel_ingest_rows_total)",  # an instant vector where a range is needed
        "sum(flywheel_ingest_lag[5m])",
        "sum(flywheel_ingest_lag",
        "flywheel_ingest_lag{topic=spec}",
        "rates(flywheel_ingest_rows_total[5m])",
        "flywheel_ingest_lag > > 1",
    ],
)
def test_the_check_refuses_invalid_promql(expr):
    with pytest.raises(PromQLError):
        parse(expr)


def test_the_check_sees_a_metric_nobody_exports(exported):
    assert not metric_names("sum(rate(flywheel_ingest_rowz_total[5m]))") <= exported


# --- the ingest's series -----------------------------------------------------------------------------


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels or None)


def _stats(topic: str, **partitions: tuple[int, int]) -> str:
    """A librdkafka statistics report: partition -> (lo_offset, ls_offset)."""
    parts = {
        p.removeprefix("p"): {"lo_offset": lo, "ls_offset": ls, "hi_offset": ls}
        for p, (lo, ls) in partitions.items()
    }
    parts["-1"] = {"lo_offset": -1, "ls_offset": -1, "hi_offset": -1}
    return json.dumps({"topics": {topic: {"partitions": parts}}})


def test_ingest_lag_follows_statistics_batches_and_commits():
    m = IngestMetrics("t", "g", "/lake/traces")
    r = m.registry
    m.assigned(0, None)  # nothing in the table yet
    m.assigned(1, 9)  # the table holds offsets up to 9
    assert _value(r, "flywheel_ingest_lag", topic="t", partition="0") is None  # end unknown yet
    m.on_stats(_stats("t", p0=(0, 100), p1=(0, 10), p7=(0, 5)))
    assert _value(r, "flywheel_ingest_lag", topic="t", partition="0") == 100
    assert _value(r, "flywheel_ingest_lag", topic="t", partition="1") == 0
    assert _value(r, "flywheel_ingest_lag", topic="t", partition="7") is None  # not ours

    m.took(30, {0: 119, 1: 14})  # newer than the last report: the end moves with the batch
    assert _value(r, "flywheel_ingest_lag", topic="t", partition="0") == 120
    assert _value(r, "flywheel_ingest_consumed_total") == 30
    job = CommitJob([], [], txns={0: 119, 1: 14}, expected={0: None, 1: 9})
    m.committed(CommitResult(job, None, 4, 0.3), now_s=1_800_000_000.0)
    assert _value(r, "flywheel_ingest_lag", topic="t", partition="0") == 0
    assert _value(r, "flywheel_ingest_lag", topic="t", partition="1") == 0
    assert _value(r, "flywheel_ingest_table_version") == 4
    assert _value(r, "flywheel_ingest_commits_total") == 1
    assert _value(r, "flywheel_ingest_commit_seconds_count") == 1
    assert _value(r, "flywheel_ingest_last_commit_timestamp_seconds") == 1_800_000_000.0

    m.failed(CommitResult(job, RuntimeError("disk"), None, 0.1), conflict=False)
    m.failed(CommitResult(job, RuntimeError("race"), None, 0.1), conflict=True)
    assert (
        _value(r, "flywheel_ingest_commit_failures_total"),
        _value(r, "flywheel_ingest_conflicts_total"),
    ) == (1, 1)

    m.on_stats(
        _stats("t", p0=(500, 600))
    )  # retention deleted what the table never got: lag from the low mark
    assert _value(r, "flywheel_ingest_lag", topic="t", partition="0") == 100
    m.revoked(0)
    assert _value(r, "flywheel_ingest_lag", topic="t", partition="0") is None
    assert _value(r, "flywheel_ingest_info", topic="t", group="g", table="/lake/traces") == 1


def test_ingest_registries_are_independent():
    a, b = IngestMetrics("t", "g", "u"), IngestMetrics("t", "g", "u")
    a.took(5, {0: 4})
    assert (
        _value(a.registry, "flywheel_ingest_consumed_total"),
        _value(b.registry, "flywheel_ingest_consumed_total"),
    ) == (5, 0)
    assert not any(name.startswith("flywheel_ingest") for name in sample_names(REGISTRY))


# --- the plugin's series -----------------------------------------------------------------------------


@pytest.fixture
def plugin(monkeypatch):
    plugin_metrics.registered()
    monkeypatch.setattr(plugin_metrics, "_EMITTER", [])
    yield plugin_metrics
    plugin_metrics._counters()[4].clear()


def test_drops_are_visible_before_the_first_one(plugin):
    exposition = generate_latest().decode()
    for outcome in ("dropped", "spill_dropped", "failed"):
        assert re.search(rf'^flywheel_trace_events_total\{{outcome="{outcome}"\}} \d', exposition, re.M), (
            outcome
        )
    assert re.search(r'^flywheel_trace_emitter_faults_total\{kind="io_errors"\} \d', exposition, re.M)


def test_the_series_created_at_zero_are_the_emitters_own():
    from producers.emitter import FAULTS, OUTCOMES

    assert set(plugin_metrics.LOSSES) <= set(OUTCOMES)
    assert set(FAULTS) == set(plugin_metrics.EMITTER_FAULTS)


def test_spill_bytes_and_queue_are_read_from_the_emitter_at_scrape_time(plugin, tmp_path):
    from core.settings import KafkaSettings
    from producers.emitter import TraceEmitter

    assert REGISTRY.get_sample_value("flywheel_trace_spill_bytes") == 0  # no emitter yet
    emitter = TraceEmitter(KafkaSettings(), "unused", lambda r: (b"k", r), tmp_path / "spill")
    plugin.watch_emitter(emitter)
    emitter.spill.append(b"key", b"x" * 1000)  # what the emitter thread does while Kafka is down
    assert REGISTRY.get_sample_value("flywheel_trace_spill_bytes") == emitter.spill.size_bytes() > 1000
    assert REGISTRY.get_sample_value("flywheel_trace_queue") == 0
    emitter.spill.seal()


def test_the_served_drafter_is_one_series_that_follows_hot_swaps(plugin, tmp_path):
    from core.settings import KafkaSettings, MlflowSettings, ServingSettings
    from producers import promotion_listener
    from producers.promotion_listener import PromotionListener
    from producers.trace_record import ServingIdentity
    from producers.vllm_capture import CaptureRuntime

    (tmp_path / "d7").mkdir()
    runtime = CaptureRuntime(ServingSettings(drafter_paths=[tmp_path]), KafkaSettings(), MlflowSettings())
    runtime.identity = ServingIdentity("node", "target", "rev", "eagle3", 3, "drafter-a")
    plugin.set_served_drafter("drafter-a", "initial")  # what attach_engine does on start

    class Engine:
        version = "initial"

        async def get_weight_version(self) -> str:
            return self.version

    async def swapped(_swap, _path, version, _sha256) -> None:
        runtime.engine.version = version

    runtime.engine = Engine()
    runtime.loop = asyncio.new_event_loop()
    thread = threading.Thread(target=runtime.loop.run_forever, daemon=True)
    thread.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(promotion_listener, "swap_drafter_async", swapped)
            promotion = {
                "event_id": "e1",
                "action": "promote",
                "drafter_id": "drafter-a",
                "drafter_version": "7",
                "drafter_uri": str(tmp_path / "d7"),
                "weights_sha256": "0" * 64,
            }
            assert PromotionListener(runtime).apply(promotion)
    finally:
        runtime.loop.call_soon_threadsafe(runtime.loop.stop)
        thread.join(5)
    served = [
        line
        for line in generate_latest().decode().splitlines()
        if line.startswith("flywheel_served_drafter{")
    ]
    assert served == ['flywheel_served_drafter{drafter_id="drafter-a",version="7"} 1.0']


# --- librdkafka's log lines --------------------------------------------------------------------------


def test_librdkafka_lines_are_logged_once_per_kind_then_at_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="flywheel.test-librdkafka")
    log = LibrdkafkaLog(logging.getLogger("flywheel.test-librdkafka"))
    refused = "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused (after {}ms)"
    for ms in range(20):
        log.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", refused.format(ms))
    log.log(logging.WARNING, "%s [%s] %s", "REQTMOUT", "rdkafka#consumer-1", "Timed out 1 requests")
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.INFO] + [logging.DEBUG] * 19 + [logging.INFO]
    assert "Connection refused" in caplog.records[0].getMessage()
