"""The training recipe on real traces: losses mixed by config, checkpoints with provenance, export, resume,
MLflow logging against the real server, DDP over gloo with 2 processes, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
import yaml
from trainer_data import (
    DRAFTER_ID,
    trace_table_fixture,  # noqa: F401  (registers the session fixture `trace_table`)
)
from typer.testing import CliRunner

from trainer.devices import weights_digest
from trainer.eagle3_drafter import Eagle3Drafter
from trainer.recipes import TrainRecipeConfig
from trainer.train_loop import load_checkpoint, run_recipe

pytestmark = pytest.mark.integration


def _recipe(trace_table, target_model, out: Path, **over) -> dict:
    data = {
        "name": "test-train",
        "target": str(target_model.path),
        "window": {"table": trace_table.uri, "holdout_fraction": 0.2},
        "init": {"draft_vocab_size": 4096, "seed": 0},
        "ttt_steps": 3,
        "losses": {
            "forward_kl": {"weight": 1.0, "step_decay": 0.8},
            "expected_acceptance": {"weight": 0.5},
            "discard": {"weight": 0.1},
        },
        "staleness_half_life": 2.0,
        "serving_drafters": str(trace_table.store),
        "data": {"pack_tokens": 768},
        "max_steps": 3,
        "output_dir": str(out),
        "eval": {"max_sequences": 3},
    }
    for k, v in over.items():
        data[k] = v
    return data


def test_recipe_trains_checkpoints_exports_and_resumes(trace_table, target_model, tmp_path):
    # a time window over the eagle3 traffic (served after the ngram traffic): packs hold corrections
    first = min(r["finish_time"] for r in trace_table.records if r["spec_method"] == "eagle3")
    start = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=first)
    window = {"table": trace_table.uri, "holdout_fraction": 0.2, "start": start.isoformat()}
    cfg = TrainRecipeConfig.model_validate(
        _recipe(trace_table, target_model, tmp_path, checkpoint_every=2, window=window)
    )
    recipe = run_recipe(cfg, argv=["pytest", "train"])
    hist = recipe.history
    assert [h["step"] for h in hist] == [1, 2, 3]
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert {"loss.forward_kl", "loss.expected_acceptance", "loss.discard", "acc.step2"} <= hist[0].keys()
    assert sum(h["rejected_proposals"] for h in hist) > 0  # the discard term saw regenerated proposals

    ckpts = sorted((tmp_path / "checkpoints").glob("*.pt"))
    assert [c.name for c in ckpts] == ["step_000002.pt", "step_000003.pt"]
    state = load_checkpoint(ckpts[-1])
    assert state["step"] == 3 and state["argv"] == ["pytest", "train"]
    assert state["model_config"]["draft_vocab_size"] == 4096 and state["optimizer"]["state"]
    assert state["window"]["table_version"] == 2 and state["window"]["holdout_cutoff"]
    assert state["window"]["uri"] == trace_table.uri and state["window"]["trace_bytes"] > 0
    assert state["window"]["start"] == start.isoformat() and state["window"]["end"] is None
    assert state["recipe"]["losses"]["discard"]["weight"] == 0.1
    assert "git_sha" in state and state["replica_digests"] == [weights_digest(recipe.drafter)]

    exported = Eagle3Drafter.from_pretrained(tmp_path / "drafter")
    torch.testing.assert_close(
        exported.lm_head.weight, recipe.drafter.lm_head.weight.detach().bfloat16().float()
    )
    assert torch.equal(exported.d2t, recipe.drafter.d2t)
    meta = json.loads((tmp_path / "drafter" / "flywheel-drafter.json").read_text())
    assert meta["step"] == 3 and meta["window"]["table_version"] == 2
    assert recipe.final_replay.overall.traces == 3 and recipe.final_replay.overall.steps > 0

    resumed = run_recipe(cfg.model_copy(update={"resume": ckpts[0], "max_steps": 4}), argv=["resume"])
    assert [h["step"] for h in resumed.history] == [3, 4]


def test_mlflow_gets_params_metrics_and_the_drafter(trace_table, target_model, mlflow_settings, tmp_path):
    from mlflow.tracking import MlflowClient

    run_name = f"test-{uuid.uuid4().hex[:8]}"
    data = _recipe(trace_table, target_model, tmp_path, max_steps=2)
    data["mlflow"] = {
        "enabled": True,
        "tracking_uri": mlflow_settings.tracking_uri,
        "experiment": "trainer-tests",
        "run_name": run_name,
    }
    trained = run_recipe(TrainRecipeConfig.model_validate(data))
    client = MlflowClient(mlflow_settings.tracking_uri)
    exp = client.get_experiment_by_name("trainer-tests")
    (run,) = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{run_name}'")
    assert trained.mlflow_run.info.run_id == run.info.run_id and run.info.status == "FINISHED"
    assert run.data.params["ttt_steps"] == "3" and run.data.params["losses.discard.weight"] == "0.1"
    assert run.data.params["window.table_version"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert "replay_tau" in run.data.metrics and "tokens_per_s" in run.data.metrics
    figures = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"training_curves.png", "replay_tau_by_domain.png"} <= figures
    # the window is the run's dataset input: the Delta table at the version trained on
    (dataset,) = [i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs]
    source = json.loads(dataset.source)
    assert dataset.source_type == "delta_table" and source["delta_table_version"] == 2
    assert source["path"] == str(trace_table.uri)

    # registered from the logged MLflow Model; the discard term fetches the served version back through it
    import mlflow.pyfunc
    import pandas as pd

    from core.settings import KafkaSettings
    from promotion.drafter_registry import DrafterRegistry
    from trainer.drafter_store import RegistryDrafterStore

    info = trained.model_info
    registry = DrafterRegistry(f"test-{uuid.uuid4().hex[:8]}", mlflow_settings, KafkaSettings())
    mv = registry.register(run.info.run_id, info.model_uri, tmp_path / "drafter", {}, model_id=info.model_id)
    assert registry.get(mv.version).source == info.model_uri  # the logged model, not loose artifacts
    served = RegistryDrafterStore(registry.name, mlflow_settings).load(registry.name, mv.version)
    assert torch.equal(
        served.lm_head.weight, Eagle3Drafter.from_pretrained(tmp_path / "drafter").lm_head.weight
    )
    assert RegistryDrafterStore(registry.name, mlflow_settings).load("someone-else", mv.version) is None

    # ... and it is an MLflow Model: pyfunc loads it, and predict replays token ids against the target
    mlflow.set_tracking_uri(mlflow_settings.tracking_uri)
    mlflow.set_registry_uri(mlflow_settings.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{registry.name}/{mv.version}")
    rows = pd.DataFrame(
        {"prompt_token_ids": [[1, 9690, 198, 504]], "output_token_ids": [list(range(600, 640))]}
    )
    out = model.predict(rows, params={"target_dir": str(target_model.path)})
    assert len(out) == 1 and len(out["accepted"][0]) >= 10 and out["tau"][0] >= 1.0
    assert out["tau"][0] == pytest.approx(1 + sum(out["accepted"][0]) / len(out["accepted"][0]))


def test_torchrun_ddp_two_ranks_end_identical(trace_table, target_model, tmp_path):
    recipe = tmp_path / "ddp.yaml"
    data = _recipe(trace_table, target_model, tmp_path / "out", max_steps=2, num_threads=1)
    data["eval"] = {"replay_at_end": False}
    recipe.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "trainer.train_loop", str(recipe)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = load_checkpoint(tmp_path / "out" / "checkpoints" / "step_000002.pt")
    assert state["world_size"] == 2
    digests = state["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks hold bit-identical weights
    drafter = Eagle3Drafter(Eagle3Drafter.from_pretrained(tmp_path / "out" / "drafter").config)
    drafter.load_state_dict(state["model"])
    assert weights_digest(drafter) == digests[0]


def test_cli_train_and_replay_eval(trace_table, target_model, tmp_path):
    from flywheel.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(trace_table, target_model, tmp_path / "out")))
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--recipe", str(recipe), "max_steps=1", "eval.replay_at_end=false"])
    assert res.exit_code == 0, res.output
    assert "trained 1 steps" in res.output
    out = tmp_path / "replay.json"
    args = ["replay-eval", "--drafter", str(tmp_path / "out" / "drafter"), "--table", trace_table.uri]
    args += [
        "--target",
        str(target_model.path),
        "--newest-fraction",
        "0.2",
        "--max-traces",
        "2",
        "--baseline",
        "--json",
        str(out),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"drafter", "random head"}
    assert result["results"]["drafter"]["all"]["traces"] == 2 and result["window"]["table_version"] == 2
    bad = runner.invoke(app, ["train", "--recipe", str(recipe), "losses={reverse_kl: {weight: 1}}"])
    assert bad.exit_code == 2 and "forward_kl" in bad.output and "discard" in bad.output


def test_store_resolves_the_serving_version(trace_table):
    from trainer.drafter_store import DrafterStore

    store = DrafterStore(trace_table.store)
    assert store.path(DRAFTER_ID, "v0") is not None and store.path(DRAFTER_ID, "v9") is None
    assert store.load(DRAFTER_ID, "v0") is store.load(DRAFTER_ID, "v0")
