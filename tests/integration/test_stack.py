"""The local stack is real: a KRaft broker that keeps data across restarts and an MLflow server."""

from __future__ import annotations

import uuid

import httpx
import pytest
from confluent_kafka import Consumer, Producer

from core import process
from infra import stack

pytestmark = pytest.mark.integration


def _consume_all(kafka_settings, topic: str, expected: int, timeout_s: float = 30.0) -> list[bytes]:
    conf = kafka_settings.client_config() | {
        "group.id": f"g-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }
    consumer = Consumer(conf)
    consumer.subscribe([topic])
    values: list[bytes] = []
    try:
        import time

        deadline = time.monotonic() + timeout_s
        while len(values) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                values.append(msg.value())
    finally:
        consumer.close()
    return values


def _produce(kafka_settings, topic: str, values: list[bytes]) -> None:
    producer = Producer(
        kafka_settings.client_config() | {"enable.idempotence": True, "compression.type": "zstd"}
    )
    for i, v in enumerate(values):
        producer.produce(topic, value=v, key=str(i).encode())
    assert producer.flush(30) == 0, "messages still in flight after 30s"


def test_status_reports_both_services_healthy(local_stack):
    rows = {r.name: r for r in stack.status(local_stack)}
    assert rows["kafka"].healthy and rows["kafka"].address == f"{local_stack.host}:{local_stack.kafka_port}"
    assert (
        rows["mlflow"].healthy and rows["mlflow"].address == f"{local_stack.host}:{local_stack.mlflow_port}"
    )


def test_up_is_idempotent(local_stack, session_services):
    pids = {r.name: r.pid for r in stack.status(local_stack) if r.name in session_services}
    again = {r.name: r.pid for r in stack.up(local_stack, only=list(session_services))}
    assert again == pids and all(pids.values())


def test_produce_consume_round_trip(kafka_settings, topic_factory):
    topic = topic_factory(partitions=3)
    values = [f"event-{i}".encode() for i in range(200)]
    _produce(kafka_settings, topic, values)
    assert sorted(_consume_all(kafka_settings, topic, len(values))) == sorted(values)


def test_committed_messages_survive_broker_restart(local_stack, kafka_settings, topic_factory):
    topic = topic_factory(partitions=2)
    values = [uuid.uuid4().bytes for _ in range(50)]
    _produce(kafka_settings, topic, values)
    broker = stack.service("kafka", local_stack)
    assert process.stop(broker)
    assert not process.status(broker).running
    process.start(broker, local_stack.start_timeout_s)
    assert sorted(_consume_all(kafka_settings, topic, len(values))) == sorted(values)


def test_mlflow_run_logged_and_read_back_over_http(mlflow_settings):
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_settings.tracking_uri)
    exp_id = client.create_experiment(f"stack-test-{uuid.uuid4().hex[:8]}")
    run = client.create_run(exp_id)
    client.log_param(run.info.run_id, "window", "2026-12-01T00")
    client.log_metric(run.info.run_id, "tau", 2.5, step=3)
    client.set_terminated(run.info.run_id)
    assert mlflow.get_tracking_uri() is not None
    got = httpx.get(
        f"{mlflow_settings.tracking_uri}/api/2.0/mlflow/runs/get",
        params={"run_id": run.info.run_id},
        timeout=10,
    ).json()["run"]
    assert {p["key"]: p["value"] for p in got["data"]["params"]} == {"window": "2026-12-01T00"}
    assert [(m["key"], m["value"], m["step"]) for m in got["data"]["metrics"]] == [("tau", 2.5, 3)]
    assert got["info"]["status"] == "FINISHED"
