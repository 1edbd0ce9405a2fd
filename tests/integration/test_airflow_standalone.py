"""Airflow 3 standalone as `flywheel stack up` runs it, driven over its REST API the way the demo drives it.

Every DAG in dags/ parses in the real DAG processor without import errors, and a manually triggered
``trace_maintenance`` run is scheduled, executed by the standalone's executor on a real Delta table, and
reports through XCom what it removed. The instance is this module's own: a fresh state dir, on the Airflow
port of the suite's stack (18080, tests/user_state.py), so a running demo stack is never touched; it is
stopped at the end. Other modules run DAGs with ``dag.test()``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from deltalake import DeltaTable
from trace_events import trace

from bench.offline_traces import lake_rows, write_traces
from core import process
from core.settings import LakeSettings
from infra.airflow_client import AirflowClient
from infra.stack.airflow_server import AirflowStandalone

pytestmark = pytest.mark.integration
DAG_IDS = {"drafter_flywheel", "trace_watch", "trace_maintenance"}


@pytest.fixture(scope="module")
def airflow(stack_settings, tmp_path_factory):
    stack = stack_settings.model_copy(update={"state_dir": tmp_path_factory.mktemp("airflow-stack")})
    spec = AirflowStandalone(stack)
    process.start(spec, timeout_s=600)
    try:
        yield stack, AirflowClient(f"http://{spec.address}")
    finally:
        process.stop(spec)


def test_every_dag_parses_without_import_errors(airflow):
    _, client = airflow
    for dag_id in DAG_IDS:
        client.wait_dag_parsed(dag_id, timeout_s=240)
    errors = client.get("/api/v2/importErrors")
    assert errors["total_entries"] == 0, errors["import_errors"]
    pools = client.get("/api/v2/pools/training")
    assert pools["slots"] == 1  # drafter fine-tunes are serialised


def test_triggered_maintenance_run_applies_retention(airflow):
    stack, client = airflow
    lake = LakeSettings(root=str(stack.root / "lake"))  # what the standalone's tasks resolve
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=30), now - timedelta(minutes=5)
    records = [trace(i, finish_time_s=old.timestamp() + i) for i in range(20)]
    records += [trace(100 + i, finish_time_s=recent.timestamp() + i) for i in range(30)]
    write_traces(lake.traces_uri, lake_rows(records))

    client.wait_dag_parsed("trace_maintenance", timeout_s=240)
    client.set_paused("trace_maintenance", False)
    run_id = client.trigger("trace_maintenance", {}, f"test-{int(time.time())}")
    assert run_id in client.active_runs("trace_maintenance")  # what the demo checks before each cycle
    deadline = time.monotonic() + 300
    while (state := client.run_state("trace_maintenance", run_id)) not in ("success", "failed"):
        assert time.monotonic() < deadline, (state, client.task_states("trace_maintenance", run_id))
        time.sleep(2)
    assert state == "success", client.task_states("trace_maintenance", run_id)
    assert run_id not in client.active_runs("trace_maintenance")

    # unpausing also lets the scheduler start today's scheduled run: whichever ran first deleted the day
    runs = client.get("/api/v2/dags/trace_maintenance/dagRuns")["dag_runs"]
    reports = [client.xcom("trace_maintenance", r["dag_run_id"], "retention") for r in runs]
    assert sum(r["deleted_files"] for r in reports if r) >= 1, reports
    report = client.xcom("trace_maintenance", run_id, "retention")
    assert report["cutoff_date"] in {str((now - timedelta(days=d)).date()) for d in (6, 7)}  # near midnight
    dt = DeltaTable(lake.traces_uri)
    assert dt.to_pyarrow_table(columns=["event_id"]).num_rows == 30  # only the expired day went
