"""The Airflow DAGs import cleanly and are wired as documented (DagBag, no scheduler needed)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow-home")))
    sys.path.insert(0, str(DAGS))
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_no_import_errors_and_all_dags_present(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == {"drafter_flywheel", "trace_watch", "trace_maintenance"}


def test_flywheel_dag_wiring(dagbag):
    dag = dagbag.dags["drafter_flywheel"]
    assert dag.max_active_runs == 1 and not dag.catchup
    tasks = {t.task_id: t for t in dag.tasks}
    assert set(tasks) == {"window", "train", "evaluate", "gate", "decide", "promote", "reject"}
    assert tasks["train"].pool == "training"
    assert tasks["window"].downstream_task_ids == {"train", "evaluate"}
    assert tasks["decide"].downstream_task_ids == {"promote", "reject"}
    assert tasks["gate"].upstream_task_ids == {"evaluate"}
    # AssetOrTimeSchedule: a window announcement or drift starts a run; the timetable catches a lost one
    assert {a.name for a in dag.timetable.asset_condition.objects} == {"trace_windows", "champion_drift"}
    assert "CronTriggerTimetable" in type(dag.timetable.timetable).__name__


def test_window_announcements_on_kafka_schedule_the_flywheel(dagbag):
    """trace_windows is watched by the Kafka provider's message-queue trigger on the windows topic; it
    schedules drafter_flywheel and trace_watch (drift), and no DAG polls on a cron for windows."""
    from airflow.providers.common.compat.module_loading import import_string
    from flywheel_assets import KAFKA_CONN_ID, TRACES, announced

    from consumers.window_announcements import asset_event
    from core.settings import KafkaSettings

    (watcher,) = TRACES.watchers
    path, kwargs = watcher.trigger.serialize()  # what the triggerer gets
    assert path.endswith("kafka.triggers.await_message.AwaitMessageTrigger")
    assert kwargs["topics"] == [KafkaSettings().windows_topic] and kwargs["kafka_config_id"] == KAFKA_CONN_ID
    assert import_string(kwargs["apply_function"]) is asset_event
    # the run reads the announced table version from the event's payload (or an extra posted by hand)
    assert announced({"from_trigger": True, "payload": {"version": 7, "key": "v7-1-2"}})["version"] == 7
    assert announced({"version": 8})["version"] == 8
    watch = dagbag.dags["trace_watch"]
    assert watch.timetable.asset_condition.name == "trace_windows"
    assert "Cron" not in type(watch.timetable).__name__
    assert {t.task_id: [o.name for o in t.outlets] for t in watch.tasks} == {
        "check_drift": ["champion_drift"]
    }


def test_every_dag_has_an_owner_a_failure_callback_and_task_docs(dagbag):
    from flywheel_assets import OWNER, on_failure

    for dag in dagbag.dags.values():
        assert dag.default_args["owner"] == OWNER and dag.default_args["on_failure_callback"] is on_failure
        assert dag.doc_md, dag.dag_id
        for t in dag.tasks:
            assert t.owner == OWNER, (dag.dag_id, t.task_id)
            assert on_failure in _callbacks(t.on_failure_callback), (dag.dag_id, t.task_id)
            assert t.doc_md and len(t.doc_md) > 20, (dag.dag_id, t.task_id)


def _callbacks(cb) -> list:
    return list(cb) if isinstance(cb, list | tuple) else [cb]


@pytest.fixture
def webhook():
    """A real HTTP endpoint on loopback that records the JSON bodies POSTed to it."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/alerts", received
    server.shutdown()


def test_a_failed_task_is_logged_and_notified_only_when_configured(dagbag, webhook, monkeypatch, caplog):
    from types import SimpleNamespace

    from flywheel_assets import on_failure

    url, received = webhook
    ti = SimpleNamespace(dag_id="drafter_flywheel", task_id="train", run_id="r1", try_number=2)
    context = {"ti": ti, "exception": RuntimeError("CUDA out of memory")}
    monkeypatch.delenv("FLYWHEEL_ALERT_WEBHOOK_URL", raising=False)
    with caplog.at_level("ERROR", logger="flywheel.dags"):
        on_failure(context)
    assert "drafter_flywheel" in caplog.text and "CUDA out of memory" in caplog.text
    assert received == []  # off by default

    monkeypatch.setenv("FLYWHEEL_ALERT_WEBHOOK_URL", url)
    on_failure(context)
    (body,) = received
    assert body["dag_id"] == "drafter_flywheel" and body["task_id"] == "train" and body["try_number"] == 2
    assert "CUDA out of memory" in body["text"] and "CUDA out of memory" in body["exception"]

    monkeypatch.setenv("FLYWHEEL_ALERT_WEBHOOK_URL", "http://127.0.0.1:9/alerts")  # nothing listens
    with caplog.at_level("WARNING", logger="flywheel.alerts"):
        on_failure(context)  # logged, never raised: the task has failed already
    assert "failure notification to 127.0.0.1 failed" in caplog.text


def test_dag_files_only_wire(dagbag):
    """No heavy imports at DAG top level: parsing must not pull torch, vllm, deltalake or mlflow."""
    import subprocess

    code = (
        f"import sys; sys.path.insert(0, {str(DAGS)!r})\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"DagBag(dag_folder={str(DAGS)!r})\n"
        "heavy = [m for m in ('torch', 'vllm', 'deltalake', 'mlflow', 'trainer.train_loop') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-2000:]


def test_dags_are_created_in_the_state_their_settings_say(dagbag, monkeypatch):
    """Airflow pauses new DAGs unless the DAG says otherwise: ours are active by default (retention must
    run), and FLYWHEEL_STACK_<DAG>_ACTIVE=false creates one paused, in the standalone and in a deployment."""
    import subprocess

    from core.settings import StackSettings
    from infra.stack.airflow_server import AirflowStandalone

    for name in ("TRACE_MAINTENANCE", "TRACE_WATCH", "DRAFTER_FLYWHEEL"):
        monkeypatch.delenv(f"FLYWHEEL_STACK_{name}_ACTIVE", raising=False)
    assert StackSettings().dags_active() == dict.fromkeys(
        ("trace_maintenance", "trace_watch", "drafter_flywheel"), True
    )
    assert set(StackSettings().dags_active()) == set(dagbag.dag_ids)
    code = (
        f"import sys; sys.path.insert(0, {str(DAGS)!r})\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(DAGS)!r})\n"
        "print({d: bag.dags[d].is_paused_upon_creation for d in sorted(bag.dag_ids)})\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_ACTIVE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == str(
        {"drafter_flywheel": False, "trace_maintenance": False, "trace_watch": False}
    ), out.stderr[-2000:]
    # the standalone hands its settings to the DAG processor, which creates the DAGs accordingly
    spec = AirflowStandalone(StackSettings(trace_watch_active=False, drafter_flywheel_active=False))
    env = spec.env()
    assert env["FLYWHEEL_STACK_TRACE_MAINTENANCE_ACTIVE"] == "true"
    assert (
        env["FLYWHEEL_STACK_TRACE_WATCH_ACTIVE"] == env["FLYWHEEL_STACK_DRAFTER_FLYWHEEL_ACTIVE"] == "false"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == str(
        {"drafter_flywheel": True, "trace_maintenance": False, "trace_watch": True}
    ), out.stderr[-2000:]


def test_run_params_carry_the_allow_list_and_a_bad_run_is_refused(dagbag):
    """The trigger form shows and enforces the allow-list (Airflow validates a run's conf against each
    Param's schema); the tasks' own check (run_settings) refuses what gets past it."""
    import copy

    from airflow.sdk.exceptions import ParamValidationError
    from flywheel_assets import run_settings

    from core.run_params import cycle_param_schema

    for dag_id, names in (("drafter_flywheel", {"cycle", "window_start"}), ("trace_watch", {"cycle"})):
        params = dagbag.dags[dag_id].params
        assert set(params) == names
        assert params.get_param("cycle").schema == cycle_param_schema()
        ok = copy.deepcopy(params)
        ok.update({"cycle": {"scratch_recipe": "scratch", "train_max_steps": 5}})
        for bad in ({"scratch_recipe": "/abs/recipe.yaml"}, {"resume": "x.pt"}, {"eval_concurrency": 0}):
            with pytest.raises(ParamValidationError):
                copy.deepcopy(params).update({"cycle": bad})
            with pytest.raises(ValueError, match="cycle"):
                run_settings({"cycle": bad})
    params = dagbag.dags["drafter_flywheel"].params
    assert params.get_param("window_start").schema["format"] == "date-time"
    assert run_settings({"cycle": {"train_max_steps": 5}}).cycle.train_max_steps == 5
    with pytest.raises(ValueError, match="window_start: 'soon' is not an ISO-8601 date-time"):
        run_settings({"window_start": "soon"})
