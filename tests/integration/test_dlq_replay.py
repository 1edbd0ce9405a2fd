"""Dead letters come back: a producer rolls out TraceEvent v2 before the consumer knows it, the v1 ingest
sends its events to the DLQ (`unknown-schema`), the consumer is upgraded, `flywheel dlq replay` redrives
them into the table exactly once, and letters that still fail stay in the DLQ.

"Upgraded" is the same code with a schema directory that holds v2 (``schemas.registry.AVRO_DIR``), the way a
release that adds ``v2.avsc`` would ship; v2 adds a nullable field, so the table gains a column on open.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from confluent_kafka import Producer
from deltalake import DeltaTable
from trace_events import encoded, ingest_env, poison_messages, produce, read_dlq, trace

from consumers.dead_letter_replay import inspect, replay
from consumers.delta_sink import IngestOptions, TraceIngest
from consumers.flush_policy import FlushPolicy
from core.settings import LakeSettings
from schemas import codec, registry
from schemas.registry import TRACE_EVENT, current
from schemas.schema_ids import SchemaIds, register_all, subject

pytestmark = pytest.mark.integration


@pytest.fixture
def v2_schemas(tmp_path) -> Path:
    """A copy of the released schemas plus a TraceEvent v2 that adds a nullable field."""
    root = tmp_path / "avro"
    shutil.copytree(registry.AVRO_DIR, root)
    v1 = json.loads((root / TRACE_EVENT / "v1.avsc").read_text())
    v1["fields"].append(
        {"name": "priority", "type": ["null", "string"], "default": None, "doc": "request priority class"}
    )
    (root / TRACE_EVENT / "v2.avsc").write_text(json.dumps(v1, indent=2))
    return root


@contextmanager
def schemas_from(avro_dir: Path):
    """Run as a consumer (or producer) whose schema directory is ``avro_dir``."""
    saved = registry.AVRO_DIR
    registry.AVRO_DIR = avro_dir
    registry.versions.cache_clear()
    registry.by_fingerprint.cache_clear()
    try:
        yield
    finally:
        registry.AVRO_DIR = saved
        registry.versions.cache_clear()
        registry.by_fingerprint.cache_clear()


def _ingest(kafka, lake, topic, group) -> None:
    opts = IngestOptions(
        group=group, until_idle_s=2.0, consume_batch=50, policy=FlushPolicy(max_events=100, max_age_s=0.2)
    )
    TraceIngest(kafka, lake, opts, topic=topic).run()


def _event_ids(lake: LakeSettings) -> list[str]:
    return DeltaTable(lake.traces_uri).to_pyarrow_table(columns=["event_id"])["event_id"].to_pylist()


def _v2_producer(kafka) -> int:
    """What the upgraded producer's rollout does: `topics create` registers v2 (BACKWARD: the registry
    accepts it); returns the id v2 messages carry."""
    ids = SchemaIds.connect(kafka)
    register_all(kafka, ids)
    return ids.id_of(current(TRACE_EVENT), subject(kafka.traces_topic))


def test_a_schema_learnt_after_the_rollout_brings_dead_letters_back_exactly_once(
    kafka_settings, schema_ids, topic_factory, tmp_path, v2_schemas
):
    topic, dlq = topic_factory(partitions=2), topic_factory(prefix="dlq")
    kafka = kafka_settings.model_copy(update={"traces_topic": topic, "dlq_topic": dlq})
    lake = LakeSettings(root=str(tmp_path / "lake"))

    old = [trace(i) for i in range(60)]
    with schemas_from(v2_schemas):  # the upgraded producer
        v2_id = _v2_producer(kafka)
        new = [trace(1000 + i, schema_version=2, priority="high") for i in range(40)]
        new_values = [codec.encode(TRACE_EVENT, r, v2_id) for r in new]
    poison = [
        value
        for _, reason, value in poison_messages(encoded(old[:1], schema_ids)[0], schema_ids)
        if reason == "malformed-avro"
    ]
    produce(kafka, topic, encoded(old, schema_ids) + new_values + poison)

    _ingest(kafka, lake, topic, "v1-consumer")  # the consumer that knows only v1
    assert sorted(_event_ids(lake)) == sorted(r["event_id"] for r in old)
    letters = read_dlq(kafka, dlq)
    assert len(letters) == len(new) + len(poison)
    # a crash between the DLQ flush and the Delta commit re-sends a batch's letters: one arrives twice
    twice = next(m for m in letters if dict(m.headers())["flywheel.dlq.reason"] == b"unknown-schema")
    resend = Producer(kafka.client_config())
    resend.produce(dlq, value=twice.value(), key=twice.key(), headers=twice.headers())
    assert resend.flush(30) == 0

    summary = inspect(kafka)  # the old consumer cannot read them either
    assert summary.by_reason == {"unknown-schema": len(new) + 1, "malformed-avro": len(poison)}

    with schemas_from(v2_schemas):  # the consumer is upgraded
        report = replay(kafka, lake, {"unknown-schema"})
        assert (report.selected, report.decoded, report.duplicates) == (len(new) + 1, len(new) + 1, 1)
        assert report.inserted == len(new) and report.already_in_table == 0 and not report.still_invalid

        table = DeltaTable(lake.traces_uri).to_pyarrow_table(columns=["event_id", "priority"])
        ids = table["event_id"].to_pylist()
        assert len(ids) == len(set(ids)) == len(old) + len(new)
        assert set(ids) == {r["event_id"] for r in old + new}
        priority = dict(zip(ids, table["priority"].to_pylist(), strict=True))
        assert {priority[r["event_id"]] for r in new} == {"high"}
        assert {priority[r["event_id"]] for r in old} == {None}  # rows from before the column read as null

        again = replay(kafka, lake)  # every reason, a second time: nothing new, the poison stays
        assert again.inserted == 0 and again.already_in_table == len(new)
        assert again.still_invalid == {"malformed-avro": len(poison)}
        assert len(read_dlq(kafka, dlq)) == len(new) + 1 + len(poison), "the DLQ is a log: nothing removed"

        later = [trace(2000 + i, schema_version=2, priority="low") for i in range(10)]
        produce(kafka, topic, [codec.encode(TRACE_EVENT, r, v2_id) for r in later])
        _ingest(kafka, lake, topic, "v1-consumer")  # the upgraded ingest resumes on the evolved table
    ids = _event_ids(lake)
    assert len(ids) == len(set(ids)) == len(old) + len(new) + len(later)


def test_dlq_cli_reports_reasons_and_replays_nothing_it_cannot_decode(
    kafka_settings, schema_ids, topic_factory, tmp_path
):
    topic, dlq = topic_factory(partitions=1), topic_factory(prefix="dlq")
    kafka = kafka_settings.model_copy(update={"traces_topic": topic, "dlq_topic": dlq})
    good = encoded([trace(1)], schema_ids)[0]
    poison = poison_messages(good, schema_ids)
    produce(kafka, topic, [value for _, _, value in poison])
    _ingest(kafka, LakeSettings(root=str(tmp_path / "lake")), topic, "cli")
    env = ingest_env(kafka, topic, dlq, str(tmp_path / "lake"))

    def cli(*args: str) -> dict:
        run = subprocess.run(
            [sys.executable, "-m", "flywheel.cli", "dlq", *args, "--json"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout)

    summary = cli("inspect")
    expected: dict[str, int] = {}
    for _, reason, _ in poison:
        expected[reason] = expected.get(reason, 0) + 1
    assert summary["letters"] == len(poison) and summary["by_reason"] == expected
    assert all(len(s) >= 1 and s[0]["source"].startswith(f"{topic}/0@") for s in summary["samples"].values())

    report = cli("replay")
    assert report["inserted"] == 0 and report["still_invalid"] == expected
