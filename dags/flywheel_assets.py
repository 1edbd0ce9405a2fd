"""Assets, params and settings shared by the flywheel DAGs (a plain module in the DAG folder: no tasks, no
I/O)."""

from airflow.sdk import Asset, Param

# A new window of traces is ready (extra: table version, rows, window key).
TRACES = Asset(name="trace_windows", uri="delta://flywheel/traces", group="flywheel")
# Live tau under the champion fell below its evaluated tau (extra: domains, taus).
DRIFT = Asset(name="champion_drift", uri="flywheel://drift/champion", group="flywheel")


def cycle_param() -> Param:
    """The ``cycle`` param: CycleSettings overrides from an allow-list, bounded (core/run_params.py); the
    trigger form shows and enforces the schema, :func:`run_settings` checks again at every task."""
    from core.run_params import cycle_param_schema

    return Param(
        {},
        description="CycleSettings overrides for this run: the listed keys only, within their bounds; "
        "recipes by name (trainer/recipes/<name>.yaml)",
        schema=cycle_param_schema(),
    )


def window_start_param() -> Param:
    from core.run_params import window_start_schema

    return Param(
        None,
        description="ISO-8601 start of the training window with a UTC offset, e.g. 2026-01-01T12:00:00+00:00 "
        "(default: window_minutes before the newest trace)",
        schema=window_start_schema(),
    )


def run_settings(params: dict):
    """The settings of one DAG run: the environment, with the run's ``cycle`` param (dag.test / UI / REST)
    overriding CycleSettings once core.run_params has checked it against its allow-list. Built here, at the
    task's entry, and passed down."""
    from core.run_params import cycle_settings
    from core.settings import Settings

    return Settings(cycle=cycle_settings(params))


def paused_upon_creation(dag_id: str) -> bool:
    """Whether Airflow creates ``dag_id`` paused: not its ``FLYWHEEL_STACK_<DAG>_ACTIVE`` setting (Airflow
    pauses new DAGs by default; these run unless a deployment says otherwise, see core/settings.py)."""
    from core.settings import StackSettings

    return not StackSettings().dags_active()[dag_id]
