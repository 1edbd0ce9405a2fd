"""Airflow 3 standalone as `flywheel stack up` runs it, driven over its REST API the way the demo drives it.

Every DAG in dags/ parses in the real DAG processor without import errors; on this fresh stack each DAG is
in the state its setting says without anyone touching it (``trace_maintenance`` and ``drafter_flywheel``
active by default, ``trace_watch`` switched off here to show the settings work), `flywheel stack status`
shows those states, and `stack up` on a running stack restores them. The scheduler's own
``trace_maintenance`` run applies retention to a real Delta table, and so does a manually triggered run,
both reporting through XCom what they removed. A window announced on Kafka (the suite's broker, a topic of
this module's own) makes the triggerer's AssetWatcher create an asset-triggered drafter_flywheel run
carrying the announcement; the run skips at its window task (FLYWHEEL_CYCLE_MIN_WINDOW_ROWS is set above
the lake's rows here), so it costs one short task, not a training. It runs with auth on
(``FLYWHEEL_STACK_AUTH=true``), as a deployment would: the API refuses a caller without a token, a viewer
reads but triggers nothing, and the stack's own client logs in as admin. The instance is this module's own:
a fresh state dir, on a port of its own (tests/user_state.py ``OWN_PORTS``), so neither a running demo stack
nor the suite's is touched; it is stopped at the end. Other modules run DAGs with ``dag.test()``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from confluent_kafka import Producer
from deltalake import DeltaTable
from trace_events import trace
from typer.testing import CliRunner
from user_state import OWN_PORTS

from bench.offline_traces import lake_rows, write_traces
from consumers.window_announcements import announcement, publish
from consumers.windows import pick_window
from core import process
from core.settings import LakeSettings
from infra.airflow_client import AirflowClient, AuthError
from infra.cli import stack_app
from infra.stack import credentials
from infra.stack.airflow_server import AirflowStandalone
from infra.topics import admin_client, delete_topics, ensure_topics, project_topics
from schemas.schema_ids import SchemaIds, register_all

pytestmark = pytest.mark.integration
DAG_IDS = {"drafter_flywheel", "trace_watch", "trace_maintenance"}
WANT_PAUSED = {"trace_maintenance": False, "trace_watch": True, "drafter_flywheel": False}
STARTED = datetime.now(UTC)
EXPIRED, KEPT = 20, 30


@pytest.fixture(scope="module")
def airflow(stack_settings, kafka_settings, tmp_path_factory):
    stack = stack_settings.model_copy(
        update={
            "state_dir": tmp_path_factory.mktemp("airflow-stack"),
            "airflow_port": OWN_PORTS["airflow"],
            "auth": True,
            "trace_watch_active": False,
        }
    )
    # the triggerer watches a windows topic of this module's own on the suite's broker
    kafka = kafka_settings.model_copy(update={"windows_topic": f"windows-{uuid.uuid4().hex[:10]}"})
    admin = admin_client(kafka)
    (spec,) = [s for s in project_topics(kafka_settings) if s.name == kafka_settings.windows_topic]
    ensure_topics(admin, [replace(spec, name=kafka.windows_topic)])
    register_all(kafka, SchemaIds.connect(kafka))  # as `flywheel topics create` does: its subject too
    # traces before Airflow starts, as on a stack that has been serving: a month-old day and a recent one
    lake = LakeSettings(root=str(stack.root / "lake"))  # what the standalone's tasks resolve
    old, recent = STARTED - timedelta(days=30), STARTED - timedelta(minutes=5)
    records = [trace(i, finish_time_s=old.timestamp() + i) for i in range(EXPIRED)]
    records += [trace(100 + i, finish_time_s=recent.timestamp() + i) for i in range(KEPT)]
    write_traces(lake.traces_uri, lake_rows(records))  # offline rows: ingest_time = finish_time
    spec = AirflowStandalone(stack, kafka)
    try:
        with pytest.MonkeyPatch.context() as env:  # a drafter_flywheel run skips at its window task
            env.setenv("FLYWHEEL_CYCLE_MIN_WINDOW_ROWS", str(10 * (EXPIRED + KEPT)))
            process.start(spec, timeout_s=600)
        yield stack, spec, spec.client()  # logged in as admin
    finally:
        process.stop(spec)
        delete_topics(admin, [kafka.windows_topic])


def test_every_dag_parses_without_import_errors(airflow):
    _, _, client = airflow
    for dag_id in DAG_IDS:
        client.wait_dag_parsed(dag_id, timeout_s=240)
    errors = client.get("/api/v2/importErrors")
    assert errors["total_entries"] == 0, errors["import_errors"]
    pools = client.get("/api/v2/pools/training")
    assert pools["slots"] == 1  # drafter fine-tunes are serialised


def test_a_fresh_stack_leaves_each_dag_as_its_setting_says(airflow):
    stack, spec, client = airflow
    for dag_id in DAG_IDS:
        client.wait_dag_parsed(dag_id, timeout_s=240)
    assert {d: client.is_paused(d) for d in DAG_IDS} == WANT_PAUSED  # nobody (un)paused anything
    assert {s.dag_id: s.state for s in spec.dag_states()} == {
        d: "paused" if p else "active" for d, p in WANT_PAUSED.items()
    }

    # `flywheel stack status` shows them (Kafka and MLflow of this state dir are down: exit code 1)
    env = {
        "FLYWHEEL_STACK_STATE_DIR": str(stack.root),
        "FLYWHEEL_STACK_AIRFLOW_PORT": str(stack.airflow_port),
        "FLYWHEEL_STACK_AUTH": "true",
        "FLYWHEEL_STACK_TRACE_WATCH_ACTIVE": "false",
        "COLUMNS": "160",
    }
    shown = CliRunner().invoke(stack_app, ["status"], env=env)
    assert shown.exit_code == 1, shown.output
    lines = {line.split()[1]: line for line in shown.output.splitlines() if line.split()[1:2] and "_" in line}
    assert "active" in lines["trace_maintenance"] and "paused" not in lines["trace_maintenance"], shown.output
    assert lines["trace_watch"].count("paused") == 2, shown.output  # state and setting
    assert "auth: on" in shown.output, shown.output

    # someone pauses maintenance by hand: the next `flywheel stack up` (Airflow already running) undoes it
    client.set_paused("trace_maintenance", True)
    process.start(spec, timeout_s=60)
    assert client.is_paused("trace_maintenance") is False


def test_the_api_wants_a_user_and_the_role_decides(airflow):
    stack, spec, admin = airflow
    admin.wait_dag_parsed("trace_maintenance", timeout_s=240)
    base = f"http://{spec.address}"
    assert httpx.get(f"{base}/api/v2/dags", timeout=30).status_code == 401  # no token
    assert httpx.get(f"{base}/auth/token", timeout=30).status_code == 403  # not everyone is admin
    with pytest.raises(AuthError, match="401"):
        AirflowClient(base, "admin", credentials.password(stack, "viewer"))

    viewer = spec.client("viewer")
    assert viewer.is_paused("trace_maintenance") is False  # a viewer reads
    body = {"dag_run_id": f"viewer-{int(time.time())}", "logical_date": None, "conf": {}}
    assert viewer.http.post("/api/v2/dags/trace_maintenance/dagRuns", json=body).status_code == 403
    assert viewer.http.patch("/api/v2/dags/trace_maintenance", json={"is_paused": True}).status_code == 403
    assert admin.get("/api/v2/dags/trace_maintenance")["is_paused"] is False


def test_the_scheduled_maintenance_run_applies_retention(airflow):
    stack, _, client = airflow
    lake = LakeSettings(root=str(stack.root / "lake"))
    client.wait_dag_parsed("trace_maintenance", timeout_s=240)
    # created active, the DAG gets today's run from the scheduler (catchup=False: the latest midnight)
    deadline, run = time.monotonic() + 300, None
    while run is None or run["state"] not in ("success", "failed"):
        assert time.monotonic() < deadline, run
        time.sleep(2)
        runs = client.get("/api/v2/dags/trace_maintenance/dagRuns")["dag_runs"]
        run = next((r for r in runs if r["run_type"] == "scheduled"), None)
    assert run["state"] == "success", client.task_states("trace_maintenance", run["dag_run_id"])
    report = client.xcom("trace_maintenance", run["dag_run_id"], "retention")
    assert report["deleted_files"] >= 1, report
    assert report["cutoff_date"] == str(
        (datetime.fromisoformat(run["logical_date"]) - timedelta(days=7)).date()
    )
    assert DeltaTable(lake.traces_uri).to_pyarrow_table(columns=["event_id"]).num_rows == KEPT


def test_triggered_maintenance_run_applies_retention(airflow):
    stack, _, client = airflow
    lake = LakeSettings(root=str(stack.root / "lake"))
    now = STARTED
    client.wait_dag_parsed("trace_maintenance", timeout_s=240)
    run_id = client.trigger("trace_maintenance", {}, f"test-{int(time.time())}")
    assert run_id in client.active_runs("trace_maintenance")  # what the demo checks before each cycle
    deadline = time.monotonic() + 300
    while (state := client.run_state("trace_maintenance", run_id)) not in ("success", "failed"):
        assert time.monotonic() < deadline, (state, client.task_states("trace_maintenance", run_id))
        time.sleep(2)
    assert state == "success", client.task_states("trace_maintenance", run_id)
    assert run_id not in client.active_runs("trace_maintenance")

    # the scheduler's run and this one: whichever ran first deleted the expired day
    runs = client.get("/api/v2/dags/trace_maintenance/dagRuns")["dag_runs"]
    reports = [client.xcom("trace_maintenance", r["dag_run_id"], "retention") for r in runs]
    assert sum(r["deleted_files"] for r in reports if r) >= 1, reports
    report = client.xcom("trace_maintenance", run_id, "retention")
    assert report["cutoff_date"] in {str((now - timedelta(days=d)).date()) for d in (6, 7)}  # near midnight
    dt = DeltaTable(lake.traces_uri)
    assert dt.to_pyarrow_table(columns=["event_id"]).num_rows == KEPT  # only the expired day went


def test_a_window_announced_on_kafka_starts_a_flywheel_run(airflow):
    """The ingest's announcement (published here by the ingest's own code) reaches the triggerer's watcher,
    becomes a trace_windows asset event with the announcement as its payload, and the scheduler creates an
    asset-triggered drafter_flywheel run from it, whose window task reads the announced version."""
    stack, spec, client = airflow
    client.wait_dag_parsed("drafter_flywheel", timeout_s=240)
    lake = LakeSettings(root=str(stack.root / "lake"))
    window = pick_window(lake, minutes=60 * 24 * 60, min_rows=1)  # the lake as it is now: its newest version
    record = announcement(window, window.rows, time.time())
    producer = Producer(spec.kafka.client_config())
    ids = SchemaIds.connect(spec.kafka)
    assert publish(producer, spec.kafka.windows_topic, record, ids, timeout_s=30) is None

    deadline = time.monotonic() + 240
    run_id, found = _run_announcing(client, window.key, deadline)
    assert found["extra"]["from_trigger"] is True and found["name"] == "trace_windows", found
    payload = found["extra"]["payload"]
    assert (payload["version"], payload["rows"], payload["table"]) == (
        window.version,
        window.rows,
        lake.traces_uri,
    )
    assert payload["window_end"] == window.end.isoformat()

    # the run reads the announced version and skips (too few rows for this module's setting): no training
    while (state := client.run_state("drafter_flywheel", run_id)) not in ("success", "failed"):
        assert time.monotonic() < deadline + 120, (state, client.task_states("drafter_flywheel", run_id))
        time.sleep(2)
    tasks = client.task_states("drafter_flywheel", run_id)
    assert state == "success" and tasks["window"] == "skipped" and tasks["train"] == "skipped", tasks

    # the watcher goes on consuming: the next announcement is the next asset event
    later = pick_window(lake, minutes=60, min_rows=1)
    assert later.key != window.key
    assert publish(producer, spec.kafka.windows_topic, announcement(later, 1, time.time()), ids, 30) is None
    _run_announcing(client, later.key, deadline + 240)


def _run_announcing(client: AirflowClient, key: str, deadline: float) -> tuple[str, dict]:
    """(run id, asset event) of the asset-triggered drafter_flywheel run whose events include window ``key``."""
    while time.monotonic() < deadline:
        time.sleep(2)
        for run in client.get("/api/v2/dags/drafter_flywheel/dagRuns")["dag_runs"]:
            # a queued run (no start_date yet) fails the API's own response model there: wait until it starts
            if run["run_type"] != "asset_triggered" or run["start_date"] is None:
                continue
            path = f"/api/v2/dags/drafter_flywheel/dagRuns/{run['dag_run_id']}/upstreamAssetEvents"
            for event in client.get(path)["asset_events"]:
                if (event["extra"] or {}).get("payload", {}).get("key") == key:
                    return run["dag_run_id"], event
    raise AssertionError(
        f"no drafter_flywheel run for window {key}: {client.get('/api/v2/dags/drafter_flywheel/dagRuns')}"
    )
