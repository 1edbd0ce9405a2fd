"""Shared fixtures: the suite's own local stack (started if needed), fresh topics per test, settings.

The suite never works on the user's stack (the one `make demo` and `flywheel stack up` use): before any
settings are built, the environment is re-pointed at a state dir and ports of the suite's own
(``tests/user_state.py``: ``.flywheel/test-stack``, Kafka 19092/19093, schema registry 18081, MLflow 15000,
Airflow 18080), so
every fixture, CLI subprocess, ``dag.test()`` and vLLM server registers models, creates topics, writes
lakes and runs DAGs there. Only what is read-only and expensive is shared with the user's state: the
prepared target model and the downloaded jars (Kafka, Ivy). ``test_isolation.py``, run last, checks the
user's registry and topics are as they were when the session started.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from user_state import TEST_STACK_ENV, USER_PATH_VARIABLES, snapshot, user_stack

from core import process
from core.settings import KafkaSettings, LakeSettings, MlflowSettings, ServingSettings, StackSettings
from infra.stack.schema_registry import registry_url
from schemas.schema_ids import SchemaIds, register_all

USER_STACK = user_stack()  # read before the environment is re-pointed below
USER_MODELS_DIR = (
    ServingSettings().models_dir
    if os.environ.get("FLYWHEEL_SERVING_MODELS_DIR")
    else USER_STACK.root / "models"
).resolve()
os.environ.update(TEST_STACK_ENV)  # set, not defaulted: an exported user address must not win here
for _name in USER_PATH_VARIABLES:
    os.environ.pop(_name, None)
os.environ["FLYWHEEL_STACK_CACHE_DIR"] = str(USER_STACK.cache_dir)  # Kafka jars, Ivy: fetched once
os.environ["FLYWHEEL_SERVING_MODELS_DIR"] = str(USER_MODELS_DIR)  # the prepared target, converted once

SESSION_SERVICES = ("kafka", "registry", "mlflow")
# Every vLLM server the suite starts skips torch.compile: 97 s instead of 171 s to start on 2 cores, ~12 %
# fewer tokens/s (bench/ measures the compiled default). Subprocesses (dag.test, the CLI) inherit it.
os.environ.setdefault("FLYWHEEL_SERVING_ENFORCE_EAGER", "true")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """test_isolation.py runs last: it compares the user's stack after everything else ran."""
    items.sort(key=lambda item: item.path.name == "test_isolation.py")  # stable: the rest keep their order


@pytest.fixture(scope="session")
def user_stack_settings() -> StackSettings:
    """The user's stack (state dir, ports) as the shell that ran pytest describes it. Never started."""
    return USER_STACK


@pytest.fixture(scope="session", autouse=True)
def user_state_at_start(user_stack_settings: StackSettings) -> dict:
    """The user's registry and topics before any other fixture of the session ran (autouse, session)."""
    return snapshot(user_stack_settings)


@pytest.fixture(scope="session")
def stack_settings() -> StackSettings:
    return StackSettings()


@pytest.fixture(scope="session")
def local_stack(stack_settings: StackSettings) -> Iterator[StackSettings]:
    """Bring the suite's Kafka, schema registry and MLflow up (or reuse healthy ones); stop at the end only
    what it started.

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
    """The suite's broker and registry, with the window-announcement topic `flywheel ingest` publishes to (as
    `flywheel topics create` would make it; tests make their own traces and DLQ topics)."""
    from infra.topics import admin_client, ensure_topics, project_topics

    kafka = KafkaSettings(
        bootstrap_servers=f"{local_stack.host}:{local_stack.kafka_port}",
        schema_registry_url=registry_url(local_stack),
    )
    ensure_topics(admin_client(kafka), [s for s in project_topics(kafka) if s.name == kafka.windows_topic])
    return kafka


@pytest.fixture(scope="session")
def schema_ids(kafka_settings: KafkaSettings) -> SchemaIds:
    """The suite registry's ids, every schema version registered as `flywheel topics create` does (under
    the default topics' subjects; a schema id is valid on any topic)."""
    ids = SchemaIds.connect(kafka_settings)
    register_all(kafka_settings, ids)
    return ids


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
def object_store(stack_settings: StackSettings) -> Iterator[StackSettings]:
    """The suite's S3 server (service ``s3``, SeaweedFS on 18333), started on first use and kept for the
    session; stopped at the end only if started here. A server that cannot start fails the test."""
    from infra import stack

    ran = process.read_pid(stack.service("s3", stack_settings)) is not None
    stack.up(stack_settings, only=["s3"])
    yield stack_settings
    if not ran:
        stack.down(stack_settings, only=["s3"])


@pytest.fixture(params=["local", "s3"])
def lake(request: pytest.FixtureRequest, tmp_path) -> LakeSettings:
    """The test's own lake, once on local disk and once on the suite's S3 server (a fresh prefix of its
    bucket), with the settings a deployment would use: ``FLYWHEEL_LAKE_ROOT=s3://...`` and the keys."""
    if request.param == "local":
        return LakeSettings(root=str(tmp_path / "lake"))
    from infra.stack.object_store import lake_env

    env = lake_env(request.getfixturevalue("object_store"))
    return LakeSettings(
        root=f"{env['FLYWHEEL_LAKE_ROOT']}/{uuid.uuid4().hex[:12]}",
        s3_endpoint=env["FLYWHEEL_LAKE_S3_ENDPOINT"],
        s3_access_key_id=env["FLYWHEEL_LAKE_S3_ACCESS_KEY_ID"],
        s3_secret_access_key=env["FLYWHEEL_LAKE_S3_SECRET_ACCESS_KEY"],
    )


@pytest.fixture(scope="session")
def target_model():
    """The prepared SmolLM2 target (converted once from the GGUF wheel, checksummed after that)."""
    from core.settings import ServingSettings
    from core.target_model import prepare_target

    return prepare_target(ServingSettings().models_dir)
