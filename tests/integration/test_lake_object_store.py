"""The lake on a real S3 server (the suite's SeaweedFS): what reads the lake after the ingest, a training
window and the evaluation's replay of held-out traffic, opens it with the same settings the ingest wrote
with (``FLYWHEEL_LAKE_ROOT=s3://...``, endpoint, keys), and two writers' racing commits stay atomic.

The exactly-once and retention suites run on this server too (their ``lake`` fixture); this module covers
the readers and the storage settings themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from deltalake import DeltaTable, write_deltalake
from lakes import lake_env, objects
from trace_events import IDENTITY, encoded, produce, trace

from consumers.delta_sink import IngestOptions, TraceIngest
from consumers.flush_policy import FlushPolicy
from consumers.windows import pick_window
from core.settings import LakeSettings, Settings
from flywheel.cycle import heldout_traffic
from trainer.trace_window import Window, WindowReader

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("lake", ["s3"], indirect=True)]

EVENTS = 240


@pytest.fixture
def lake_with_traces(kafka_settings, schema_ids, topic_factory, lake: LakeSettings) -> LakeSettings:
    lake = lake.model_copy(update={"heldout_fraction": 0.25})
    topic, dlq = topic_factory(partitions=2), topic_factory(prefix="dlq")
    kafka = kafka_settings.model_copy(update={"dlq_topic": dlq})
    produce(kafka, topic, encoded([trace(i) for i in range(EVENTS)], schema_ids))
    opts = IngestOptions(group="s3-lake", until_idle_s=1.5, policy=FlushPolicy(max_events=100, max_age_s=0.2))
    TraceIngest(kafka, lake, opts, topic=topic).run()
    return lake


def test_a_training_window_and_the_evaluation_replay_read_the_lake(lake_with_traces):
    lake = lake_with_traces
    assert lake.traces_uri.startswith("s3://")
    assert any(p.endswith(".parquet") for p in objects(lake)), "the ingest wrote no object to the bucket"

    window = pick_window(lake, minutes=60 * 24 * 366, min_rows=1)  # the window step of the cycle
    assert window is not None and window.rows == EVENTS and window.table == lake.traces_uri

    def reader(heldout: str) -> WindowReader:  # as the training recipe opens its window
        return WindowReader(
            Window(
                window.table,
                window.start,
                window.end,
                window.version,
                storage_options=lake.delta_options(),
                heldout_fraction=lake.heldout_fraction,
                heldout=heldout,
                target_model_id=IDENTITY.target_model_id,
            )
        )

    train = {r for b in reader("exclude").batches(["request_id"]) for r in b.column(0).to_pylist()}
    held = {r for b in reader("only").batches(["request_id"]) for r in b.column(0).to_pylist()}
    assert train and held and not train & held and len(train | held) == EVENTS

    traffic = heldout_traffic(Settings(lake=lake), window)  # the evaluation's replay of held-out traffic
    assert traffic.source == "lake" and traffic.prompts
    assert sum(traffic.strata.values()) == len(held)


def test_two_writers_of_one_version_on_s3_both_commits_survive(lake: LakeSettings):
    """Both writers hold version 0 and append: the second one's put of version 1 must fail (If-None-Match on
    the commit file), so it re-checks and commits version 2. A store that ignored the condition would let it
    overwrite version 1, and the first writer's row would be gone."""
    import pyarrow as pa

    options = lake.delta_options()
    write_deltalake(lake.traces_uri, pa.table({"x": [0]}), storage_options=options)
    a, b = (DeltaTable(lake.traces_uri, storage_options=options) for _ in range(2))
    write_deltalake(a, pa.table({"x": [1]}), mode="append")
    write_deltalake(b, pa.table({"x": [2]}), mode="append")  # b still believes version 0 is the newest
    final = DeltaTable(lake.traces_uri, storage_options=options)
    assert final.version() == 2
    assert sorted(final.to_pyarrow_table()["x"].to_pylist()) == [0, 1, 2]


SPARK_COUNT = """
import json, sys
from core.settings import get_settings
from consumers.spark_session import delta_spark_session
settings = get_settings()
spark = delta_spark_session("s3-lake", settings.spark, lake=settings.lake)
df = spark.read.format("delta").load(settings.lake.traces_uri)
print(json.dumps({"rows": df.count(), "ids": df.select("request_id").distinct().count()}))
"""


def test_spark_reads_the_s3_lake_with_the_same_settings(lake_with_traces, tmp_path):
    """The analysts' Spark session (hadoop-aws from Maven through Ivy, S3A from ``lake_conf``) reads the
    table the ingest wrote, given nothing but the ``FLYWHEEL_LAKE_*`` environment. In a subprocess: the
    JVM's packages are fixed at its start, and this one needs hadoop-aws."""
    env = os.environ | lake_env(lake_with_traces) | {"FLYWHEEL_SPARK_JVM_LOG": str(tmp_path / "spark.log")}
    run = subprocess.run(
        [sys.executable, "-c", SPARK_COUNT], env=env, capture_output=True, text=True, timeout=540
    )
    assert run.returncode == 0, run.stderr[-3000:] + (tmp_path / "spark.log").read_text()[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"rows": EVENTS, "ids": EVENTS}
