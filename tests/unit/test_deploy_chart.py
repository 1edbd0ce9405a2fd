"""The Helm chart in deploy/helm: `helm lint`, `helm template` with each values file, every rendered object
(and the task pod templates inside the ConfigMap) valid against Kubernetes 1.37's schemas, offline
(kubernetes-validate's bundled schemas), and what the manifests set agrees with the code: every
``FLYWHEEL_*`` variable is a setting, the Strimzi topics are infra/topics.py's, the ingest is sized by
partitions.

helm is the one `flywheel stack install` builds into the cache (infra/helm.py); a missing one fails here.
"""

from __future__ import annotations

import inspect
import math
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic_settings import BaseSettings

from core import settings as settings_module
from core.settings import KafkaSettings, StackSettings
from infra.helm import helm_path
from infra.topics import project_topics

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "spec-flywheel"
VALUES = REPO / "deploy" / "helm" / "values"
K8S = "1.37.0"
BASE = ["--set", "kafka.bootstrapServers=kafka:9092"]
# the values combinations rendered: defaults, the external SASL_SSL Kafka + Strimzi topics + MLflow client
CASES = {
    "defaults": BASE,
    "external": ["-f", str(VALUES / "kafka-external.yaml"), "-f", str(VALUES / "mlflow-client.yaml")],
    "plaintext": [*BASE, "--set", "kafka.securityProtocol=PLAINTEXT", "--set", "lake.objectStoreSecret="],
}
# Strimzi's KafkaTopic (kafka.strimzi.io/v1beta2) as far as the chart writes it: no CRD schema is bundled.
KAFKA_TOPIC = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kafka.strimzi.io/v1beta2"},
        "metadata": {
            "type": "object",
            "required": ["name", "labels"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "labels": {"type": "object", "required": ["strimzi.io/cluster"]},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["topicName", "partitions", "replicas", "config"],
            "properties": {
                "topicName": {"type": "string"},
                "partitions": {"type": "integer", "minimum": 1},
                "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
                "config": {
                    "type": "object",
                    "additionalProperties": {"type": ["string", "integer", "boolean"]},
                },
            },
        },
    },
}


def helm(*args: str) -> subprocess.CompletedProcess:
    path = helm_path(StackSettings().cache_dir)
    assert path.exists(), f"helm is missing at {path}: run `flywheel stack install` (make setup) to build it"
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=60)


def render(*args: str) -> list[dict]:
    out = helm("template", "flywheel", str(CHART), *args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=sorted(CASES))
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(*CASES[request.param])


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def task_pods(docs: list[dict]) -> dict[str, dict]:
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-task-pods")]
    return {name: yaml.safe_load(text) for name, text in cm["data"].items()}


def test_helm_lint():
    for args in CASES.values():
        out = helm("lint", "--strict", str(CHART), *args)
        assert out.returncode == 0, out.stdout + out.stderr


def test_a_missing_bootstrap_is_one_clear_error():
    out = helm("template", "flywheel", str(CHART))
    assert out.returncode != 0 and "kafka.bootstrapServers is required" in out.stderr


def test_every_object_is_valid_kubernetes(rendered):
    case, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    for doc in docs:
        if doc["kind"] == "KafkaTopic":
            jsonschema.validate(doc, KAFKA_TOPIC)
        else:
            kubernetes_validate.validate(doc, K8S, strict=True)
    for pod in task_pods(docs).values():
        kubernetes_validate.validate(pod, K8S, strict=True)


def test_the_validator_rejects_a_broken_object(rendered):
    _, docs = rendered
    deployment = by_kind(docs, "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S, strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "Always"
    deployment["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1  # no such field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S, strict=True)


def setting_names() -> set[str]:
    """``FLYWHEEL_<PREFIX><FIELD>`` of every settings class in core/settings.py."""
    names = set()
    for _, cls in inspect.getmembers(settings_module, inspect.isclass):
        if issubclass(cls, BaseSettings) and cls is not BaseSettings:
            prefix = cls.model_config["env_prefix"]
            names |= {f"{prefix}{field}".upper() for field in cls.model_fields}
    return names


def flywheel_variables(text: str) -> set[str]:
    return set(re.findall(r"\bFLYWHEEL_[A-Z0-9_]+\b", text))


def test_every_flywheel_variable_the_manifests_set_is_a_setting(rendered):
    _, docs = rendered
    text = yaml.safe_dump_all(docs) + "".join(yaml.safe_dump(p) for p in task_pods(docs).values())
    used = flywheel_variables(text)
    assert {"FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS", "FLYWHEEL_SERVING_NODE_ID", "FLYWHEEL_LAKE_ROOT"} <= used
    assert used - setting_names() == set()


def test_values_files_and_images_name_only_settings():
    files = [*VALUES.glob("*.yaml"), *(REPO / "deploy" / "docker").glob("*.Dockerfile")]
    files += [CHART / "values.yaml", *(CHART / "templates").glob("*")]
    used = set().union(*(flywheel_variables(f.read_text()) for f in files))
    assert "FLYWHEEL_CLUSTER_TASKS" in used
    assert used - setting_names() == set(), "FLYWHEEL_* names that no settings class defines"
    assert "FLYWHEEL_NOT_A_SETTING" not in setting_names()


def test_serving_requests_gpus_and_follows_promotions():
    docs = render(*CASES["external"])
    (serving,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-serving")]
    pod = serving["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e for e in c["env"]}
    assert env["FLYWHEEL_SERVING_FOLLOW_PROMOTIONS"]["value"] == "true"
    assert env["FLYWHEEL_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "flywheel-serving"
    assert serving["spec"]["replicas"] == 4


@pytest.mark.parametrize(("partitions", "per", "replicas"), [(6, 2, 3), (24, 4, 6), (7, 2, 4), (1, 4, 1)])
def test_ingest_is_sized_by_partitions(partitions, per, replicas):
    docs = render(
        *BASE, "--set", f"kafka.tracesPartitions={partitions}", "--set", f"ingest.partitionsPerConsumer={per}"
    )
    (ingest,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-ingest")]
    assert ingest["spec"]["replicas"] == replicas == math.ceil(partitions / per)


def test_strimzi_topics_are_the_projects():
    docs = render(*CASES["external"])
    topics = {d["spec"]["topicName"]: d["spec"] for d in by_kind(docs, "KafkaTopic")}
    kafka = KafkaSettings(traces_partitions=24, replication_factor=3, min_insync_replicas=2)
    expected = project_topics(kafka)
    assert set(topics) == {t.name for t in expected}
    for t in expected:
        assert topics[t.name]["partitions"] == t.partitions
        assert topics[t.name]["replicas"] == 3
        assert topics[t.name]["config"] == t.config | {"min.insync.replicas": "2"}


def test_secrets_are_referenced_never_written():
    for args in CASES.values():
        docs = render(*args)
        assert by_kind(docs, "Secret") == []
        config = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config")][0]
        assert not any("PASSWORD" in k or "SECRET" in k for k in config["data"])
