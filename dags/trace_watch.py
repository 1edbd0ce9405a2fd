"""trace_watch: check the champion for drift each time the ingest announces a window (emits DRIFT, which
starts drafter_flywheel).

Wiring only, and event-driven: scheduled by the `trace_windows` asset, whose events come from the ingest's
window announcements on Kafka through the triggerer (dags/flywheel_assets.py), so there is no cron poll.
`check_drift` reads only the last `drift_window_minutes` of traces (their hours, the columns tau needs) and
emits DRIFT when live tau under the champion falls below its evaluated tau by the configured margin; a skip
emits nothing.
"""

import pendulum
from airflow.sdk import DAG, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException
from flywheel_assets import DRIFT, TRACES, cycle_param, default_args, paused_upon_creation, run_settings

with DAG(
    dag_id="trace_watch",
    description="Champion drift, checked on every window announcement -> an asset event for drafter_flywheel",
    schedule=TRACES,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    is_paused_upon_creation=paused_upon_creation("trace_watch"),
    default_args=default_args(),
    params={"cycle": cycle_param()},
    tags=["flywheel"],
    doc_md=__doc__,
) as dag:

    @task(outlets=[DRIFT])
    def check_drift(*, outlet_events) -> dict:
        """Compare live tau per domain under the champion with its evaluated tau; emit DRIFT if it fell."""
        from flywheel.cycle import detect_drift

        drift = detect_drift(run_settings(get_current_context()["params"]))
        if drift is None:
            raise AirflowSkipException("no drift")
        outlet_events[DRIFT].extra = drift.model_dump(mode="json")
        return drift.model_dump(mode="json")

    check_drift()
