"""drafter_flywheel: pick window -> train -> evaluate -> gate -> promote | reject.

Wiring only: each task lazily imports one function of trainer.flywheel_cycle and calls it. Runs when
trace_watch announces a new window or drift, and on a timetable; one run at a time; training is
serialised by the `training` pool. Every task is keyed on its input (window, model version), so retries
and re-runs never train or promote twice. The gate's reasons are the `gate` task's return value (XCom tab)
and are logged by `promote` / `reject`.
"""

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, Param, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException
from flywheel_assets import DRIFT, TRACES, cycle_settings


def _cycle():
    return cycle_settings(get_current_context()["params"])


def _announced_version() -> int | None:
    """Table version of the newest window announcement that triggered this run (None: use the latest)."""
    events = get_current_context().get("triggering_asset_events") or {}
    versions = [
        e.extra.get("version")
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
    default_args={"retries": 1, "retry_delay": timedelta(minutes=1)},
    params={"cycle": Param({}, type="object", description="CycleSettings overrides for this run")},
    tags=["flywheel"],
    doc_md=__doc__,
) as dag:

    @task
    def window() -> dict:
        from trainer.flywheel_cycle import pick_window

        picked = pick_window(_cycle(), _announced_version())
        if picked is None:
            raise AirflowSkipException("not enough traces in the window")
        return picked

    @task(pool="training", execution_timeout=timedelta(hours=2), retry_exponential_backoff=2.0)
    def train(w: dict) -> dict:
        from trainer.flywheel_cycle import train_challenger

        return train_challenger(_cycle(), w)

    @task(execution_timeout=timedelta(hours=1))
    def evaluate(trained: dict, w: dict) -> dict:
        from trainer.flywheel_cycle import evaluate_challenger

        return evaluate_challenger(_cycle(), trained["version"], w)

    @task
    def gate(evaluation: dict) -> dict:
        from trainer.flywheel_cycle import gate_challenger

        return gate_challenger(_cycle(), evaluation)

    @task.branch
    def decide(decision: dict) -> str:
        print(decision["summary"], *decision["reasons"], sep="\n")
        return "promote" if decision["promote"] else "reject"

    @task(retries=3)
    def promote(decision: dict) -> dict:
        from trainer.flywheel_cycle import promote_challenger

        print(decision["summary"])
        return promote_challenger(decision)

    @task
    def reject(decision: dict) -> dict:
        from trainer.flywheel_cycle import reject_challenger

        print(decision["summary"], *decision["reasons"], sep="\n")
        return reject_challenger(decision)

    w = window()
    decision = gate(evaluate(train(w), w))
    decide(decision) >> [promote(decision), reject(decision)]
