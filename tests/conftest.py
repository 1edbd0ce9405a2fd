"""Shared fixtures: the real local stack (started if needed), fresh topics per test, settings."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from core.settings import KafkaSettings, MlflowSettings, StackSettings

SESSION_SERVICES = ("kafka", "mlflow")
# Every vLLM server the suite starts skips torch.compile: 97 s instead of 171 s to start on 2 cores, ~12 %
# fewer tokens/s (bench/ measures the compiled default). Subprocesses (dag.test, the CLI) inherit it.
os.environ.setdefault("FLYWHEEL_SERVING_ENFORCE_EAGER", "true")


@pytest.fixture(scope="session")
def stack_settings() -> StackSettings:
    return StackSettings()


@pytest.fixture(scope="session")
def local_stack(stack_settings: StackSettings) -> Iterator[StackSettings]:
    """Bring Kafka + MLflow up (or reuse healthy ones); stop at the end only what this session started.

    A service that cannot start is a failure, never a skip. Airflow standalone is not part of it: its four
    processes would tax 2 cores for the whole session, so test_airflow_standalone starts its own and
    the DAG tests run `dag.test()`.
    """
    from infra import stack

    before = {s.name for s in stack.status(stack_settings) if s.running}
    stack.up(stack_settings, only=list(SESSION_SERVICES))
    yield stack_settings
    started_here = [name for name in SESSION_SERVICES if name not in before]
    stack.down(stack_settings, only=started_here)


@pytest.fixture(scope="session")
def session_services() -> tuple[str, ...]:
    """The services ``local_stack`` brings up for the whole session."""
    return SESSION_SERVICES


@pytest.fixture(scope="session")
def kafka_settings(local_stack: StackSettings) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=f"{local_stack.host}:{local_stack.kafka_port}")


@pytest.fixture(scope="session")
def mlflow_settings(local_stack: StackSettings) -> MlflowSettings:
    return MlflowSettings(tracking_uri=f"http://{local_stack.host}:{local_stack.mlflow_port}")


@pytest.fixture
def topic_factory(kafka_settings: KafkaSettings) -> Iterator[Callable[..., str]]:
    """`topic_factory(partitions=1, **config)` -> a fresh uuid-named topic, deleted after the test."""
    from infra.topics import TopicSpec, admin_client, delete_topics, ensure_topics

    admin = admin_client(kafka_settings)
    made: list[str] = []

    def make(partitions: int = 1, prefix: str = "test", **config: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        ensure_topics(
            admin, [TopicSpec(name, partitions, {k.replace("_", "."): v for k, v in config.items()})]
        )
        made.append(name)
        return name

    yield make
    if made:
        delete_topics(admin, made)


@pytest.fixture(scope="session")
def target_model():
    """The prepared SmolLM2 target (converted once from the GGUF wheel, checksummed after that)."""
    from core.settings import ServingSettings
    from core.target_model import prepare_target

    return prepare_target(ServingSettings().models_dir)
