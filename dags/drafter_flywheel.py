"""drafter_flywheel: pick window -> train -> evaluate -> gate -> promote | reject.

Wiring only: each task builds the settings of this run (the environment, overridden by the run's `cycle`
param once it passed its allow-list, core/run_params.py), lazily imports one function of flywheel.cycle
and calls it; the typed results of flywheel.cycle cross task boundaries as JSON (XCom) and are validated
back into their models on the other side. Event-driven: a run starts on each window the ingest announces
on Kafka (the triggerer's AssetWatcher turns the message into a `trace_windows` event, dags/flywheel_assets.py)
and on drift found by trace_watch; the 6-hourly timetable only catches an announcement that was lost. One
run at a time; training is serialised by the `training` pool. Every task is keyed on its
input (window, model version), so retries and re-runs never train or promote twice. The gate's reasons are
the `gate` task's return value (XCom tab) and are logged by `promote` / `reject`.
"""

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException
from flywheel_assets import (
    DRIFT,
    TRACES,
    announced,
    cycle_param,
    default_args,
    paused_upon_creation,
    run_settings,
    window_start_param,
)
from flywheel_tasks import train_and_evaluate


def _settings():
    return run_settings(get_current_context()["params"])


def _announced_version() -> int | None:
    """Table version of the newest window announcement that triggered this run (None: use the latest)."""
    events = get_current_context().get("triggering_asset_events") or {}
    versions = [
        announced(e.extra).get("version")
        for key, evs in events.items()
        if getattr(key, "name", None) == TRACES.name
        for e in evs
    ]
    versions = [v for v in versions if v is not None]
    return max(versions) if versions else None


with DAG(
    dag_id="drafter_flywheel",
    description="Rolling fine-tune of the EAGLE-3 drafter from live traces, promoted only if measurably faster",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 */6 * * *", timezone="UTC"), assets=TRACES | DRIFT
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    is_paused_upon_creation=paused_upon_creation("drafter_flywheel"),
    default_args=default_args(retries=1, retry_delay=timedelta(minutes=1)),
    params={"cycle": cycle_param(), "window_start": window_start_param()},
    tags=["flywheel"],
    doc_md=__doc__,
) as dag:

    @task
    def window() -> dict:
        """Pick the training window at the announced table version (skips the run if it is too thin)."""
        from core.run_params import window_start
        from flywheel.cycle import pick_window

        start = window_start(get_current_context()["params"])
        picked = pick_window(_settings(), _announced_version(), start)
        if picked is None:
            raise AirflowSkipException("not enough traces in the window")
        return picked.model_dump(mode="json")

    @task
    def gate(evaluation: dict) -> dict:
        """Decide promote or reject from the evaluation's intervals; reasons are the XCom value."""
        from evaluation.served import Evaluation
        from flywheel.cycle import gate_challenger

        return gate_challenger(_settings(), Evaluation.model_validate(evaluation)).model_dump(mode="json")

    @task.branch
    def decide(decision: dict) -> str:
        """Branch to `promote` or `reject` on the gate's decision."""
        print(decision["summary"], *decision["reasons"], sep="\n")
        return "promote" if decision["promote"] else "reject"

    @task(retries=3)
    def promote(decision: dict) -> dict:
        """Make the challenger champion and publish the promotion to the serving nodes."""
        from evaluation.gate import GateResult
        from flywheel.cycle import promote_challenger

        print(decision["summary"])
        return promote_challenger(_settings(), GateResult.model_validate(decision)).model_dump(mode="json")

    @task
    def reject(decision: dict) -> dict:
        """Tag the challenger rejected (and switch speculation off if the gate said so)."""
        from evaluation.gate import GateResult
        from flywheel.cycle import reject_challenger

        print(decision["summary"], *decision["reasons"], sep="\n")
        return reject_challenger(_settings(), GateResult.model_validate(decision)).model_dump(mode="json")

    w = window()
    decision = gate(train_and_evaluate(w))  # in the worker or as pods: dags/flywheel_tasks.py
    decide(decision) >> [promote(decision), reject(decision)]
