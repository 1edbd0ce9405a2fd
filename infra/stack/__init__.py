"""The embedded local stack: Kafka (KRaft), the schema registry, MLflow, an S3 object store (SeaweedFS) and
Airflow standalone, started and stopped as one unit.

Each service is a ServiceSpec, so adding one is one class and one line in ``services()``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from core import process
from core.process import ServiceSpec, ServiceStatus, StackError
from core.settings import StackSettings
from infra.stack.airflow_server import AirflowStandalone, DagState
from infra.stack.kafka_broker import AUTH_CLUSTER, KafkaBroker, bootstrap_servers
from infra.stack.mlflow_server import MlflowServer
from infra.stack.object_store import ObjectStore
from infra.stack.schema_registry import SchemaRegistry, registry_url

__all__ = [
    "bootstrap_servers",
    "registry_url",
    "StackError",
    "ServiceStatus",
    "DagState",
    "services",
    "up",
    "down",
    "status",
    "service",
    "dags",
]


def kafka_nodes(stack: StackSettings) -> int:
    """Nodes of the local Kafka: the setting, or more where PID files show a bigger cluster still running
    (so `stack down`/`status` without ``--kafka-brokers`` find every node `stack up --kafka-brokers N` ran)."""
    running = [
        int(pid.stem.removeprefix("kafka-"))
        for pid in (stack.root / "run").glob("kafka-*.pid")
        if pid.stem.removeprefix("kafka-").isdigit()
    ]
    return max([stack.kafka_brokers, *running])


def services(stack: StackSettings) -> list[ServiceSpec]:
    """Every service of the local stack, in start order (Kafka nodes first: kafka, kafka-2, ...)."""
    nodes = kafka_nodes(stack)
    kafka = [KafkaBroker(stack, node, nodes) for node in range(1, nodes + 1)]
    return [*kafka, SchemaRegistry(stack), MlflowServer(stack), ObjectStore(stack), AirflowStandalone(stack)]


def _chosen(spec: ServiceSpec, only: list[str] | None) -> bool:
    """``--only kafka`` means every Kafka node; ``--only kafka-2`` that node."""
    if only is None:
        return True
    return spec.name in only or ("kafka" in only and isinstance(spec, KafkaBroker))


def service(name: str, stack: StackSettings) -> ServiceSpec:
    by_name = {s.name: s for s in services(stack)}
    if name not in by_name:
        raise StackError(f"unknown service {name!r}; valid: {', '.join(by_name)}")
    return by_name[name]


def up(stack: StackSettings, only: list[str] | None = None) -> list[ServiceStatus]:
    chosen = [s for s in services(stack) if _chosen(s, only)]
    nodes = [s for s in chosen if isinstance(s, KafkaBroker) and s.cluster]
    if stack.auth and kafka_nodes(stack) > 1:
        raise StackError(AUTH_CLUSTER)
    for node in nodes:  # a KRaft quorum elects no leader, so no node is healthy, until a majority runs
        process.launch(node)
    return [process.start(s, stack.start_timeout_s) for s in chosen]


def down(stack: StackSettings, only: list[str] | None = None) -> list[str]:
    """Stop services in reverse start order; returns the names that were running."""
    chosen = [s for s in reversed(services(stack)) if _chosen(s, only)]
    nodes = [s for s in chosen if isinstance(s, KafkaBroker) and s.cluster]
    stopped = [s.name for s in chosen if s not in nodes and process.stop(s)]
    # a cluster's nodes stop together: the last of a sequence would wait out its timeout for a quorum
    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        return stopped + [s.name for s, ran in zip(nodes, pool.map(process.stop, nodes), strict=True) if ran]


def status(stack: StackSettings) -> list[ServiceStatus]:
    return [process.status(s) for s in services(stack)]


def dags(stack: StackSettings) -> list[DagState]:
    """The flywheel DAGs' paused state in the local Airflow vs their settings; empty while it is down."""
    airflow = AirflowStandalone(stack)
    return airflow.dag_states() if process.status(airflow).healthy else []
