"""drafter_flywheel with its train and evaluate tasks as Kubernetes pods (FLYWHEEL_CLUSTER_TASKS=kubernetes):
the DagBag imports it with the same wiring as the local mode, and the pods the operators build (from the
chart's rendered pod templates) are valid Kubernetes 1.37 objects whose command lines flywheel/cluster_job.py
accepts. Nothing is launched: no cluster runs here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes.client import ApiClient
from test_deploy_chart import CASES, render, task_pods

from consumers.windows import TraceWindow

DAGS = Path(__file__).resolve().parents[2] / "dags"
WINDOW = {"table": "s3://b/lake/traces", "version": 7, "key": "v7", "rows": 400, "domains": {"code": 400}}


def bag(monkeypatch, tmp_path, **env):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow-home"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if str(DAGS) not in sys.path:
        sys.path.insert(0, str(DAGS))
    from airflow.dag_processing.dagbag import DagBag

    dagbag = DagBag(dag_folder=str(DAGS / "drafter_flywheel.py"))
    assert dagbag.import_errors == {}
    return dagbag.dags["drafter_flywheel"]


def wiring(dag) -> dict[str, set[str]]:
    return {t.task_id: t.downstream_task_ids for t in dag.tasks}


@pytest.fixture
def templates(tmp_path) -> Path:
    """The chart's trainer.yaml / evaluator.yaml, rendered as a deployment would mount them."""
    out = tmp_path / "task-pods"
    out.mkdir()
    for name, pod in task_pods(render(*CASES["external"])).items():
        (out / name).write_text(yaml.safe_dump(pod))
    return out


def test_local_and_pod_modes_wire_the_same_dag(monkeypatch, tmp_path, templates):
    local = bag(monkeypatch, tmp_path, FLYWHEEL_CLUSTER_TASKS="local")
    pods = bag(
        monkeypatch,
        tmp_path,
        FLYWHEEL_CLUSTER_TASKS="kubernetes",
        FLYWHEEL_CLUSTER_POD_TEMPLATE_DIR=str(templates),
    )
    assert wiring(local) == wiring(pods)
    assert wiring(pods)["window"] == {"train", "evaluate"} and wiring(pods)["evaluate"] == {"gate"}
    kinds = {t.task_id: type(t).__name__ for t in pods.tasks}
    assert kinds["train"] == kinds["evaluate"] == "KubernetesPodOperator"
    assert {t.task_id: type(t).__name__ for t in local.tasks}["train"] != "KubernetesPodOperator"
    train = pods.get_task("train")
    assert train.pool == "training" and local.get_task("train").pool == "training"
    assert train.execution_timeout == local.get_task("train").execution_timeout


def _pod(op, context: dict) -> dict:
    """The pod the operator would create, with its templated fields rendered for ``context``."""
    op.render_template_fields(context)
    return ApiClient().sanitize_for_serialization(op.build_pod_request_obj())


class _TI:
    """What the arguments' templates read from the task instance: the upstream XComs."""

    def xcom_pull(self, task_ids: str):
        return {"window": WINDOW, "train": {"version": "12", "reused": False, "replay": {}}}[task_ids]


def kubeconfig(tmp_path: Path) -> str:
    """A kubeconfig for a cluster that is never contacted: building a pod reads the client config only."""
    path = tmp_path / "kubeconfig"
    cluster = {"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}
    user = {"name": "u", "user": {"token": "t"}}
    context = {"name": "x", "context": {"cluster": "c", "user": "u"}}
    config = {"apiVersion": "v1", "kind": "Config", "clusters": [cluster], "users": [user]}
    path.write_text(yaml.safe_dump(config | {"contexts": [context], "current-context": "x"}))
    return str(path)


@pytest.mark.parametrize("gpus", ["4", "0"])
def test_rendered_pods_are_valid_and_run_the_cluster_job(monkeypatch, tmp_path, templates, gpus):
    dag = bag(
        monkeypatch,
        tmp_path,
        FLYWHEEL_CLUSTER_KUBE_CONFIG=kubeconfig(tmp_path),
        FLYWHEEL_CLUSTER_IN_CLUSTER="false",
        FLYWHEEL_CLUSTER_TASKS="kubernetes",
        FLYWHEEL_CLUSTER_POD_TEMPLATE_DIR=str(templates),
        FLYWHEEL_CLUSTER_TRAIN_GPUS=gpus,
        FLYWHEEL_CLUSTER_WORKER_IMAGE="registry.example/flywheel-worker:1",
        FLYWHEEL_CLUSTER_SERVING_IMAGE="registry.example/flywheel-serving:1",
    )
    context = {"ti": _TI(), "params": {"cycle": {"train_max_steps": 40}}}
    train = _pod(dag.get_task("train"), context)
    evaluate = _pod(dag.get_task("evaluate"), context)
    for pod in (train, evaluate):
        kubernetes_validate.validate(pod, "1.37.0", strict=True)
        (base,) = [c for c in pod["spec"]["containers"] if c["name"] == "base"]
        # the chart's template is merged in: identity, config map, the trainer principal's secret
        assert pod["spec"]["serviceAccountName"] == "flywheel-spec-flywheel"
        assert base["envFrom"][0]["configMapRef"]["name"] == "flywheel-spec-flywheel-config"
        assert {e["name"] for e in base["env"]} >= {"FLYWHEEL_KAFKA_SASL_PASSWORD"}
        assert any(c["name"] == "airflow-xcom-sidecar" for c in pod["spec"]["containers"])
        args = base["args"]
        window = TraceWindow.model_validate_json(args[args.index("--window") + 1])
        assert window.version == 7 and json.loads(args[args.index("--cycle") + 1]) == {"train_max_steps": 40}
    (tbase,) = [c for c in train["spec"]["containers"] if c["name"] == "base"]
    assert tbase["image"] == "registry.example/flywheel-worker:1"
    if gpus == "0":
        assert tbase["command"] == ["python"] and "nvidia.com/gpu" not in (
            tbase["resources"].get("limits") or {}
        )
    else:
        assert tbase["command"] == ["torchrun"] and "--nproc-per-node=4" in tbase["args"]
        assert tbase["resources"]["limits"]["nvidia.com/gpu"] == "4"
    (ebase,) = [c for c in evaluate["spec"]["containers"] if c["name"] == "base"]
    assert ebase["image"] == "registry.example/flywheel-serving:1"
    assert (
        ebase["args"][:4] == ["-m", "flywheel.cluster_job", "evaluate", "--version"]
        and ebase["args"][4] == "12"
    )


def test_the_cluster_job_refuses_bad_input_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from flywheel.cluster_job import app

    xcom = tmp_path / "x.json"
    out = CliRunner().invoke(app, ["train", "--window", "{not json", "--xcom", str(xcom)])
    assert out.exit_code == 2 and "Invalid value" in out.output and not xcom.exists()
    out = CliRunner().invoke(app, ["train", "--window", json.dumps(WINDOW), "--cycle", '{"no_such_knob": 1}'])
    assert out.exit_code == 2 and "no_such_knob" in out.output
    helped = CliRunner().invoke(app, ["--help"])
    assert helped.exit_code == 0 and "train" in helped.output and "evaluate" in helped.output
