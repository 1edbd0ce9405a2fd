"""Assets and settings shared by the flywheel DAGs (a plain module in the DAG folder: no tasks, no I/O)."""

from airflow.sdk import Asset

# A new window of traces is ready (extra: table version, rows, window key).
TRACES = Asset(name="trace_windows", uri="delta://flywheel/traces", group="flywheel")
# Live tau under the champion fell below its evaluated tau (extra: domains, taus).
DRIFT = Asset(name="champion_drift", uri="flywheel://drift/champion", group="flywheel")


def run_settings(params: dict):
    """The settings of one DAG run: the environment, with the run's ``cycle`` param (dag.test / UI / REST)
    overriding CycleSettings. Built here, at the task's entry, and passed down."""
    from core.settings import CycleSettings, Settings

    return Settings(cycle=CycleSettings(**(params.get("cycle") or {})))


def paused_upon_creation(dag_id: str) -> bool:
    """Whether Airflow creates ``dag_id`` paused: not its ``FLYWHEEL_STACK_<DAG>_ACTIVE`` setting (Airflow
    pauses new DAGs by default; these run unless a deployment says otherwise, see core/settings.py)."""
    from core.settings import StackSettings

    return not StackSettings().dags_active()[dag_id]
