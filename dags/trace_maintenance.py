"""trace_maintenance: daily retention of the `traces` table (delete expired days, compact closed hours,
vacuum, checkpoint and trim the log). Wiring only; keyed on the run's logical date (a manual run: its
run_after), never on now(). Created unpaused (FLYWHEEL_STACK_TRACE_MAINTENANCE_ACTIVE): the documented
retention only holds if this runs."""

import pendulum
from airflow.sdk import DAG, task
from flywheel_assets import default_args, paused_upon_creation

with DAG(
    dag_id="trace_maintenance",
    description="Bound the traces table: retention, compaction, vacuum",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    is_paused_upon_creation=paused_upon_creation("trace_maintenance"),  # active unless configured off
    max_active_runs=1,
    default_args=default_args(retries=2),
    tags=["flywheel", "lake"],
    doc_md=__doc__,
) as dag:

    @task
    def retention(*, logical_date=None, data_interval_end=None, dag_run=None) -> dict:
        """Delete expired days, compact closed hours, vacuum and checkpoint `traces`; returns what it removed."""
        from consumers.retention import run_retention
        from core.settings import Settings

        # a manual run has no logical date or interval (Airflow 3): it applies retention as of when it ran
        report = run_retention(Settings().lake, data_interval_end or logical_date or dag_run.run_after)
        return {
            "cutoff_date": str(report.plan.cutoff_date),
            "deleted_files": report.deleted_files,
            "compacted": report.compacted,
            "vacuumed_files": len(report.vacuumed),
        }

    retention()
