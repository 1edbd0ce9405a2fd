"""Assets, params, default args and the failure callback shared by the flywheel DAGs (a plain module in the
DAG folder: no tasks, no I/O at import).

``TRACES`` is event-driven: an ``AssetWatcher`` runs the Kafka provider's message-queue trigger in Airflow's
triggerer, consuming the window announcements the ingest publishes (``FLYWHEEL_KAFKA_WINDOWS_TOPIC``,
consumers/window_announcements.py) through the connection ``flywheel_kafka`` (infra/stack/airflow_server.py
sets it as ``AIRFLOW_CONN_FLYWHEEL_KAFKA`` from the Kafka settings). Each announcement becomes one asset event
whose extra is ``{"from_trigger": true, "payload": {table, version, key, rows, ...}}``.
"""

import logging

from airflow.providers.apache.kafka.triggers.msg_queue import KafkaMessageQueueTrigger
from airflow.sdk import Asset, AssetWatcher, Param

KAFKA_CONN_ID = "flywheel_kafka"
OWNER = "flywheel"
log = logging.getLogger("flywheel.dags")


def window_watcher() -> AssetWatcher:
    """The triggerer's consumer of window announcements (the topic is read from the settings at parse time)."""
    from core.settings import KafkaSettings

    return AssetWatcher(
        name="window_announcements",
        trigger=KafkaMessageQueueTrigger(
            topics=[KafkaSettings().windows_topic],
            kafka_config_id=KAFKA_CONN_ID,
            apply_function="consumers.window_announcements.asset_event",
            poll_timeout=1,
            poll_interval=1,
        ),
    )


# A new window of traces is committed (extra.payload: table version, rows, window key), announced by the ingest.
TRACES = Asset(
    name="trace_windows", uri="delta://flywheel/traces", group="flywheel", watchers=[window_watcher()]
)
# Live tau under the champion fell below its evaluated tau (extra: domains, taus), emitted by trace_watch.
DRIFT = Asset(name="champion_drift", uri="flywheel://drift/champion", group="flywheel")


def announced(extra: dict) -> dict:
    """The announcement an asset event of ``TRACES`` carries: the trigger's payload (the event's ``extra``
    itself for an event posted by hand through the REST API)."""
    return extra.get("payload", extra) if extra.get("from_trigger") else extra


def on_failure(context) -> None:
    """Every flywheel task's ``on_failure_callback``: log the failure, and notify when
    ``FLYWHEEL_ALERT_WEBHOOK_URL`` is set (core/alerts.py)."""
    from core.alerts import notify
    from core.settings import AlertSettings

    ti = context["ti"]
    summary = {
        "dag_id": ti.dag_id,
        "task_id": ti.task_id,
        "run_id": ti.run_id,
        "try_number": ti.try_number,
        "exception": repr(context.get("exception")),
    }
    log.error("flywheel task failed: %s", summary)
    notify(AlertSettings(), summary)


def default_args(**task_args) -> dict:
    """The default args of every flywheel DAG: its owner and the failure callback, plus ``task_args``."""
    return {"owner": OWNER, "on_failure_callback": on_failure} | task_args


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
