"""Assets shared by the flywheel DAGs (a plain module in the DAG folder: no tasks, no I/O)."""

from airflow.sdk import Asset

# A new window of traces is ready (extra: table version, rows, window key).
TRACES = Asset(name="trace_windows", uri="delta://flywheel/traces", group="flywheel")
# Live tau under the champion fell below its evaluated tau (extra: domains, taus).
DRIFT = Asset(name="champion_drift", uri="flywheel://drift/champion", group="flywheel")


def cycle_settings(params: dict):
    """CycleSettings from the environment, overridden by the run's ``cycle`` param (dag.test / UI)."""
    from flywheel.settings import CycleSettings

    return CycleSettings(**(params.get("cycle") or {}))
