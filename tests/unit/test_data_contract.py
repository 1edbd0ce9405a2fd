"""docs/data-contract.md agrees with the code: topics, configs, table, columns, properties, headers, schemas.

The document is what other teams build on; every fact in it that the code also states is checked here,
and its Python decoding snippet is executed against messages our codec wrote, through the suite's registry.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from trace_events import UNREGISTERED_ID, encoded, trace

from consumers.dead_letters import DeadLetter, dead_letter_headers
from consumers.table import TABLE_PROPERTIES
from consumers.trace_rules import RULES
from core.settings import KafkaSettings, LakeSettings
from infra.topics import project_topics
from schemas import codec
from schemas.arrow import PARTITION_COLUMNS, traces_table_schema
from schemas.registry import WINDOW_ANNOUNCEMENT, current, events, versions
from schemas.schema_ids import subject, topic_events

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "data-contract.md"
DECODE_REASONS = ["not-confluent-avro", "unknown-schema", "wrong-event-type", "malformed-avro"]


@pytest.fixture
def doc() -> str:
    return DOC.read_text()


@pytest.fixture
def defaults(monkeypatch) -> tuple[KafkaSettings, LakeSettings]:
    """The settings' defaults (the document states defaults), whatever this shell exported."""
    for name in list(os.environ):
        if name.startswith(("FLYWHEEL_KAFKA_", "FLYWHEEL_LAKE_")):
            monkeypatch.delenv(name)
    return KafkaSettings(), LakeSettings()


def section(doc: str, heading: str) -> str:
    """Text from ``heading`` (a whole heading line) to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = doc.index(f"\n{heading}\n")
    ends = [m.start() for m in re.finditer(rf"\n#{{1,{len(level)}}} ", doc) if m.start() > start]
    return doc[start : min(ends, default=len(doc))]


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows keyed by their first cell (backticks stripped)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_every_topic_with_its_partitions_and_configs(doc, defaults):
    kafka, _ = defaults
    specs = project_topics(kafka)
    topics = section(doc, "## Topics")
    assert set(re.findall(r"^### `([^`]+)`$", topics, re.M)) == {s.name for s in specs}
    assert {kafka.traces_topic, kafka.dlq_topic, kafka.promotions_topic, kafka.windows_topic} == {
        s.name for s in specs
    }
    for spec in specs:
        rows = table_rows(section(topics, f"### `{spec.name}`"))
        assert rows["partitions"] == [str(spec.partitions)], spec.name
        for key, value in spec.config.items():
            assert key in rows, f"{spec.name}: {key} missing"
            assert rows[key][0].startswith(f"`{value}`"), (
                f"{spec.name}: {key} is {value}, doc says {rows[key]}"
            )
        documented = {k for k in rows if "." in k and k[0].islower() and not k.startswith("flywheel.")}
        assert documented == set(spec.config), f"{spec.name}: configs the code does not set"


def test_topic_keys_and_schemas(doc, defaults):
    kafka, _ = defaults
    fingerprints = {
        f"schemas/avro/{v.event}/v{v.version}.avsc": v.fingerprint.hex()
        for e in events()
        for v in versions(e)
    }
    rows = table_rows(section(doc, "## Encoding of every message: Confluent wire format"))
    subjects = {event: subject(topic) for topic, event in topic_events(kafka).items()}
    for path, fp in fingerprints.items():
        assert rows[path][1] == f"`{fp}`", path
        assert rows[path][2] == f"`{subjects[path.split('/')[2]]}`", path
    traces = table_rows(section(doc, f"### `{kafka.traces_topic}`"))
    assert "request id" in traces["key"][0]
    assert traces["value"][0].startswith("TraceEvent, `schemas/avro/trace_event/v1.avsc`")
    promotions = table_rows(section(doc, f"### `{kafka.promotions_topic}`"))
    assert "target_model_id" in promotions["key"][0]
    windows_section = section(doc, f"### `{kafka.windows_topic}`")
    assert "| key | the table URI (UTF-8) |" in windows_section  # (the `key` field's row shadows it below)
    windows = table_rows(windows_section)
    assert windows["value"][0].startswith("WindowAnnouncement, `schemas/avro/window_announcement/v1.avsc`")
    fields = current(WINDOW_ANNOUNCEMENT).raw["fields"]
    assert {f["name"] for f in fields} <= set(windows)  # every field is documented


def test_the_table_its_columns_partitions_properties_and_retention(doc, defaults):
    _, lake = defaults
    table = section(doc, f"## Delta table `{lake.traces_table}`")
    assert f"<FLYWHEEL_LAKE_ROOT>/{lake.traces_table}" in table
    rows = table_rows(table)
    schema = traces_table_schema()
    columns = {name: cells for name, cells in rows.items() if name in schema.names}
    assert list(columns) == schema.names  # every column, in table order
    for f in schema:
        assert columns[f.name][1] == ("yes" if f.nullable else "no"), f.name
        assert columns[f.name][3].rstrip(" .") in f.metadata[b"doc"].decode().replace("|", "\\|"), f.name
    assert rows["partitioned by"][0].startswith(", ".join(f"`{c}`" for c in PARTITION_COLUMNS) + " ")
    for key, value in TABLE_PROPERTIES.items():
        assert rows[key][0] == f"`{value}`", key
    assert rows["retention"][0].startswith(f"{lake.retention_days} days")
    assert f"`{lake.app_id}-<partition>`" in table


def test_dead_letter_headers_and_reasons(doc, defaults):
    kafka, _ = defaults
    dlq = section(doc, f"### `{kafka.dlq_topic}`")
    rows = table_rows(dlq)
    letter = DeadLetter(b"", None, "r", "d", "t", 0, 0, 0)
    assert [h for h, _ in dead_letter_headers(letter)] == [k for k in rows if k.startswith("flywheel.")]
    for reason in DECODE_REASONS + [r.reason for r in RULES]:
        assert f"`{reason}`" in dlq, reason


@pytest.mark.integration
def test_the_python_decoding_snippet_reads_our_messages(doc, monkeypatch, schema_ids, kafka_settings):
    python = section(doc, "### Python: confluent-kafka's schema-registry deserializer")
    snippet = re.search(r"```python\n(.*?)```", python, re.S).group(1)
    documented = KafkaSettings.model_fields["schema_registry_url"].default
    assert f'"{documented}"' in snippet
    snippet = snippet.replace(documented, kafka_settings.schema_registry_url)  # the suite's registry
    monkeypatch.chdir(REPO)  # the snippet reads schemas/avro relative to the working directory
    namespace: dict = {}
    exec(compile(snippet, str(DOC), "exec"), namespace)

    record = trace(3)
    decoded = namespace["decode_trace"](encoded([record], schema_ids)[0])
    as_time = lambda us: None if us is None else datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)  # noqa: E731
    for name in ("arrival_time", "first_token_time", "finish_time"):
        assert decoded.pop(name) == as_time(record.pop(name))
    assert decoded == record  # floats of the test record are exact in float32
    payload = encoded([trace(4)], schema_ids)[0]
    for bad, error in [
        (codec.header(UNREGISTERED_ID) + payload[codec.HEADER_LEN :], "not found"),
        (b"random bytes", "magic byte"),
        (payload[: len(payload) // 2], None),
    ]:
        with pytest.raises(Exception, match=error):
            namespace["decode_trace"](bad)
