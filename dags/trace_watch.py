"""trace_watch: announce new trace windows and champion drift as asset events (starting drafter_flywheel).

Wiring only. `announce_window` emits TRACES when enough traces arrived since the last announcement (read
from the asset's own event history); `check_drift` emits DRIFT when live tau under the champion falls
below its evaluated tau by the configured margin. Skipped tasks emit nothing.
"""

import os

import pendulum
from airflow.sdk import DAG, CronTriggerTimetable, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException
from flywheel_assets import DRIFT, TRACES, cycle_param, paused_upon_creation, run_settings

with DAG(
    dag_id="trace_watch",
    description="New trace windows and drift -> asset events that start drafter_flywheel",
    schedule=CronTriggerTimetable(os.environ.get("FLYWHEEL_WATCH_CRON", "*/5 * * * *"), timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    is_paused_upon_creation=paused_upon_creation("trace_watch"),
    params={"cycle": cycle_param()},
    tags=["flywheel"],
    doc_md=__doc__,
) as dag:

    @task(inlets=[TRACES], outlets=[TRACES])
    def announce_window(*, inlet_events, outlet_events) -> dict:
        from flywheel.cycle import new_window

        history = inlet_events[TRACES]
        last = history[-1].extra.get("version") if len(history) else None
        window = new_window(run_settings(get_current_context()["params"]), last)
        if window is None:
            raise AirflowSkipException(f"fewer new traces than a window needs since table version {last}")
        outlet_events[TRACES].extra = {"version": window.version, "rows": window.rows, "key": window.key}
        return window.model_dump(mode="json")

    @task(outlets=[DRIFT])
    def check_drift(*, outlet_events) -> dict:
        from flywheel.cycle import detect_drift

        drift = detect_drift(run_settings(get_current_context()["params"]))
        if drift is None:
            raise AirflowSkipException("no drift")
        outlet_events[DRIFT].extra = drift.model_dump(mode="json")
        return drift.model_dump(mode="json")

    announce_window()
    check_drift()
