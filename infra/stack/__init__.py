"""The embedded local stack: Kafka (KRaft), MLflow and Airflow standalone, started and stopped as one unit.

Each service is a ServiceSpec, so adding one is one class and one line in ``services()``.
"""

from __future__ import annotations

from core import process
from core.process import ServiceSpec, ServiceStatus, StackError
from core.settings import StackSettings
from infra.stack.airflow_server import AirflowStandalone, DagState
from infra.stack.kafka_broker import KafkaBroker
from infra.stack.mlflow_server import MlflowServer

__all__ = ["StackError", "ServiceStatus", "DagState", "services", "up", "down", "status", "service", "dags"]


def services(stack: StackSettings) -> list[ServiceSpec]:
    """Every service of the local stack, in start order."""
    return [KafkaBroker(stack), MlflowServer(stack), AirflowStandalone(stack)]


def service(name: str, stack: StackSettings) -> ServiceSpec:
    by_name = {s.name: s for s in services(stack)}
    if name not in by_name:
        raise StackError(f"unknown service {name!r}; valid: {', '.join(by_name)}")
    return by_name[name]


def up(stack: StackSettings, only: list[str] | None = None) -> list[ServiceStatus]:
    return [
        process.start(s, stack.start_timeout_s) for s in services(stack) if only is None or s.name in only
    ]


def down(stack: StackSettings, only: list[str] | None = None) -> list[str]:
    """Stop services in reverse start order; returns the names that were running."""
    return [s.name for s in reversed(services(stack)) if (only is None or s.name in only) and process.stop(s)]


def status(stack: StackSettings) -> list[ServiceStatus]:
    return [process.status(s) for s in services(stack)]


def dags(stack: StackSettings) -> list[DagState]:
    """The flywheel DAGs' paused state in the local Airflow vs their settings; empty while it is down."""
    airflow = AirflowStandalone(stack)
    return airflow.dag_states() if process.status(airflow).healthy else []
