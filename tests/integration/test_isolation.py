"""The suite leaves the user's stack alone: its registry and topics are as they were when the session started.

conftest.py re-points the environment at the suite's own state dir and ports before any settings are built
and snapshots the user's MLflow store (sqlite, read-only) and Kafka data dir first thing in the session
(autouse). This module runs last (conftest reorders it) and registers a drafter in the suite's registry
through the same fixtures every other test uses, so the snapshot it compares was taken before, and is
compared after, everything the suite did. Were the suite on the user's stack, the drafter registered here
would be a new row in the user's store. A user's demo working on its own stack during the run would show
up as a change too: run the suite while the demo is idle.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import pytest
from user_state import TEST_PORTS, TEST_STATE_DIR, mlflow_db, snapshot

from core.settings import (
    KafkaSettings,
    LakeSettings,
    MlflowSettings,
    ServingSettings,
    SparkSettings,
    StackSettings,
    TrainingSettings,
)
from promotion.drafter_registry import DrafterRegistry

pytestmark = pytest.mark.integration


def _default(settings: type, field: str):
    return settings.model_fields[field].default


def _register_in_the_suites_registry(mlflow_settings, kafka_settings, tmp_path) -> str:
    drafter = tmp_path / "drafter"
    drafter.mkdir()
    (drafter / "config.json").write_text('{"architectures": ["LlamaForCausalLMEagle3"]}')
    (drafter / "model.safetensors").write_bytes(b"\0" * 64)
    mlflow.set_tracking_uri(mlflow_settings.tracking_uri)
    mlflow.set_experiment("isolation-test")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(drafter), "drafter")
        uri = mlflow.get_artifact_uri("drafter")
    registry = DrafterRegistry(f"isolation-{uuid.uuid4().hex[:8]}", mlflow_settings, kafka_settings)
    registry.register(run.info.run_id, uri, drafter, {"spec_method": "eagle3"})
    assert registry.by_alias("challenger") is not None  # it is in the suite's registry
    return registry.name


def test_the_users_registry_and_topics_are_unchanged(
    local_stack, mlflow_settings, kafka_settings, user_stack_settings, user_state_at_start, tmp_path
):
    name = _register_in_the_suites_registry(mlflow_settings, kafka_settings, tmp_path)
    user_db = mlflow_db(user_stack_settings)

    now = snapshot(user_stack_settings)
    if user_state_at_start["registry"] is None:
        assert not user_db.exists(), f"the suite created the user's MLflow store {user_db}"
    else:
        rows = [repr(row) for table in now["registry"].values() for row in table]
        assert not any(name in row for row in rows), f"{name} was registered in the user's store {user_db}"
        assert now["registry"] == user_state_at_start["registry"], f"the user's registry {user_db} changed"
    assert now["kafka_partitions"] == user_state_at_start["kafka_partitions"], "the user's topics changed"


def test_the_suite_runs_on_its_own_state_dir_and_ports(
    local_stack, mlflow_settings, kafka_settings, user_stack_settings
):
    user = user_stack_settings
    assert local_stack.root == TEST_STATE_DIR.resolve() != user.root
    assert not user.root.is_relative_to(local_stack.root)
    port_fields = (
        "kafka_port",
        "kafka_controller_port",
        "registry_port",
        "mlflow_port",
        "airflow_port",
        "s3_port",
    )
    ours = {getattr(local_stack, f) for f in port_fields}
    assert ours == set(TEST_PORTS.values())
    assert ours.isdisjoint({getattr(user, f) for f in port_fields})
    assert ours.isdisjoint({_default(StackSettings, f) for f in port_fields})

    # what subprocesses (CLI, dag.test, vLLM servers) build from the environment is the suite's stack too
    assert mlflow_settings.tracking_uri == f"http://{local_stack.host}:{local_stack.mlflow_port}"
    assert MlflowSettings().tracking_uri == mlflow_settings.tracking_uri
    assert mlflow_settings.tracking_uri != _default(MlflowSettings, "tracking_uri")
    assert kafka_settings.bootstrap_servers == f"{local_stack.host}:{local_stack.kafka_port}"
    assert KafkaSettings().bootstrap_servers == kafka_settings.bootstrap_servers
    assert kafka_settings.bootstrap_servers != _default(KafkaSettings, "bootstrap_servers")
    assert KafkaSettings().schema_registry_url == kafka_settings.schema_registry_url
    assert kafka_settings.schema_registry_url != _default(KafkaSettings, "schema_registry_url")
    assert StackSettings().root == local_stack.root
    for path in (
        LakeSettings().root,
        MlflowSettings().artifact_cache_dir,
        ServingSettings().spill_dir,
        TrainingSettings().output_dir,
        SparkSettings().warehouse_dir,
    ):
        assert Path(path).resolve().is_relative_to(local_stack.root), path

    # shared with the user's state, read-only: the downloaded jars and the prepared target model
    assert local_stack.cache_dir == user.cache_dir
    assert not ServingSettings().models_dir.resolve().is_relative_to(local_stack.root)
