"""Drafter registry on the real MLflow server; promotions published to the real broker."""

from __future__ import annotations

import time
import uuid

import mlflow
import pytest
from confluent_kafka import Consumer
from trace_events import decode, register_topics

from core.settings import KafkaSettings
from promotion.drafter_registry import DrafterRegistry, RegistryError
from schemas.registry import DRAFTER_PROMOTION

pytestmark = pytest.mark.integration


def _log_drafter(tmp_path, mlflow_settings, payload: bytes) -> tuple[str, str, object]:
    d = tmp_path / uuid.uuid4().hex
    d.mkdir()
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLMEagle3"]}')
    (d / "model.safetensors").write_bytes(payload)
    mlflow.set_tracking_uri(mlflow_settings.tracking_uri)
    mlflow.set_experiment("registry-test")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(d), "drafter")
        uri = mlflow.get_artifact_uri("drafter")
    return run.info.run_id, uri, d


def _registry(mlflow_settings, kafka_settings, topic_factory, target: str | None = None) -> DrafterRegistry:
    """A registry of ``target`` (default a fresh name) whose promotions go to a fresh compacted topic."""
    kafka = KafkaSettings(
        bootstrap_servers=kafka_settings.bootstrap_servers,
        promotions_topic=topic_factory(prefix="promotions", cleanup_policy="compact"),
    )
    register_topics(kafka)
    return DrafterRegistry(target or f"target-{uuid.uuid4().hex[:6]}", mlflow_settings, kafka)


def _promotions(kafka: KafkaSettings, n: int) -> list[dict]:
    consumer = Consumer(
        kafka.client_config() | {"group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([kafka.promotions_topic])
    events, deadline = [], time.monotonic() + 30
    while len(events) < n and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            events.append((msg.key().decode(), decode(kafka, msg.value(), DRAFTER_PROMOTION)))
    consumer.close()
    return events


def test_register_promote_rollback(tmp_path, mlflow_settings, kafka_settings, topic_factory):
    target = f"target-{uuid.uuid4().hex[:6]}"
    registry = _registry(mlflow_settings, kafka_settings, topic_factory, target)
    kafka = registry.kafka
    versions = []
    for i in range(2):
        run_id, uri, d = _log_drafter(tmp_path, mlflow_settings, bytes([i]) * 64)
        versions.append(registry.register(run_id, uri, d, {"window": f"w{i}", "spec_method": "eagle3"}))
    v1, v2 = versions
    assert registry.by_alias("challenger").version == v2.version and registry.by_alias("champion") is None
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback()
    with pytest.raises(RegistryError, match="no champion"):
        registry.disable()

    registry.promote(v1.version, reason="first")
    registry.promote(v2.version, reason="gate passed")
    assert (registry.by_alias("champion").version, registry.by_alias("previous").version) == (
        v2.version,
        v1.version,
    )

    # the gate's "no drafter": the champion stays champion, the fleet is told to stop speculating
    assert registry.speculation_off() is False
    registry.disable(reason="every drafter slower than none")
    assert registry.speculation_off() is True and registry.by_alias("champion").version == v2.version

    registry.rollback(reason="bad drafter")  # serving a drafter again switches speculation back on
    assert registry.by_alias("champion").version == v1.version and registry.by_alias("previous") is None
    assert "rolled_back_at" in registry.get(v2.version).tags and registry.speculation_off() is False

    events = _promotions(kafka, 4)
    assert [(e["action"], e["drafter_version"], e["previous_version"]) for _, e in events] == [
        ("promote", v1.version, None),
        ("promote", v2.version, v1.version),
        ("disable", v2.version, v2.version),
        ("rollback", v1.version, v2.version),
    ]
    assert all(key == target for key, _ in events)
    assert events[-1][1]["drafter_uri"] == f"models:/{registry.name}/{v1.version}"
    assert events[-1][1]["weights_sha256"] == v1.tags["weights_sha256"]

    for v, payload in ((v1, b"\x00" * 64), (v2, b"\x01" * 64)):  # every version stays loadable by version
        assert (registry.download(v.version) / "model.safetensors").read_bytes() == payload


def test_lineage_head_is_the_newest_trained_version_not_rolled_back(
    tmp_path, mlflow_settings, kafka_settings, topic_factory
):
    registry = _registry(mlflow_settings, kafka_settings, topic_factory)
    assert registry.lineage_head() is None  # nothing registered yet: the cycle trains from scratch
    trained = []
    for i in range(2):
        run_id, uri, d = _log_drafter(tmp_path, mlflow_settings, bytes([i]) * 64)
        trained.append(registry.register(run_id, uri, d, {"window_key": f"w{i}"}).version)
    run_id, uri, d = _log_drafter(tmp_path, mlflow_settings, b"m" * 64)
    manual = registry.register(run_id, uri, d, {"note": "registered by hand, no training window"}).version

    registry.promote(trained[0])  # the champion is older than the head: training continues from v2
    assert registry.lineage_head().version == trained[1] != manual
    registry.promote(trained[1])
    registry.rollback(reason="bad")  # a rolled-back version is a dead branch
    assert registry.lineage_head().version == trained[0]


def test_the_first_cycle_trains_from_a_day0_champion_never_from_a_random_one(
    tmp_path, mlflow_settings, kafka_settings, topic_factory
):
    registry = _registry(mlflow_settings, kafka_settings, topic_factory)
    assert registry.training_parent("lineage") is None and registry.training_parent("champion") is None

    run_id, uri, d = _log_drafter(tmp_path, mlflow_settings, b"r" * 64)
    random_head = registry.register(run_id, uri, d, {"init": "random"}).version
    registry.promote(random_head)
    assert registry.training_parent("lineage") is None  # from scratch: the window picks the vocabulary
    assert registry.training_parent("champion").version == random_head

    run_id, uri, d = _log_drafter(tmp_path, mlflow_settings, b"d" * 64)
    day0 = registry.register(run_id, uri, d, {"init": "day0"}).version
    registry.promote(day0)
    assert registry.training_parent("lineage").version == day0  # adapt the head the fleet started from

    run_id, uri, d = _log_drafter(tmp_path, mlflow_settings, b"t" * 64)
    trained = registry.register(run_id, uri, d, {"window_key": "w0", "parent_version": day0}).version
    assert registry.training_parent("lineage").version == trained  # then the lineage, promoted or not
    assert registry.training_parent("champion").version == day0


def test_a_drafter_dir_of_any_name_is_fetched_back_from_its_registered_version(
    tmp_path, mlflow_settings, kafka_settings, topic_factory
):
    """MLflow keeps an artifact dir under its own base name: a head logged from ``day0/`` (the demo's copy
    of the day-0 drafter) must still land where every reader looks, or the first cycle cannot download
    its parent (found by the quick demo: "Directory not empty" renaming the download into the cache)."""
    from flywheel.demo.services import register_drafter

    settings = mlflow_settings.model_copy(update={"artifact_cache_dir": tmp_path / "cache"})
    registry = _registry(settings, kafka_settings, topic_factory)
    day0 = tmp_path / "day0"
    day0.mkdir()
    (day0 / "config.json").write_text('{"architectures": ["LlamaForCausalLMEagle3"]}')
    (day0 / "model.safetensors").write_bytes(b"\x07" * 64)
    version = register_drafter(registry, settings, day0, "any-name", {"init": "day0"})
    fetched = registry.download(version)
    assert (fetched / "model.safetensors").read_bytes() == b"\x07" * 64
    assert registry.download(version) == fetched  # cached
