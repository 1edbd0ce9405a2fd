"""Recipes: the shipped YAML files validate, overrides apply, bad loss names are rejected; LR schedule;
where a rank trains (device, process-group backend)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from trainer.devices import device_plan
from trainer.losses import needed_fields
from trainer.recipes import TrainRecipeConfig, apply_overrides, load_recipe
from trainer.train_loop import learning_rate

RECIPE_DIR = Path(__file__).resolve().parents[2] / "trainer" / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate(path):
    cfg = load_recipe(path)
    assert cfg.name and cfg.losses and cfg.ttt_steps >= 1


def test_overrides_are_dotted_yaml_values():
    data = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=1e-4", "max_steps=7", "init.from_dir=null"])
    assert data == {"optim": {"lr": 1e-4}, "max_steps": 7, "init": {"from_dir": None}}
    cfg = load_recipe(RECIPES[0], ["optim.lr=2e-5", "losses.discard.weight=0.3"])
    assert cfg.optim.lr == 2e-5 and cfg.losses["discard"].weight == 0.3
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["max_steps"])


def test_unknown_loss_and_unknown_field_are_rejected():
    with pytest.raises(ValidationError, match="valid: acceptance, discard, expected_acceptance, forward_kl"):
        TrainRecipeConfig(name="x", losses={"reverse_kl": {}})
    with pytest.raises(ValidationError, match="extra"):
        TrainRecipeConfig(name="x", optim={"learning_rate": 1.0})


def test_objective_recipes_differ_only_in_their_losses():
    """objective_{kl,acceptance,rl}.yaml: one per objective, for a benchmark to compare like with like."""
    kl, acc, rl = (load_recipe(RECIPE_DIR / f"objective_{o}.yaml") for o in ("kl", "acceptance", "rl"))
    assert list(kl.losses) == ["forward_kl"]
    assert list(acc.losses) == ["forward_kl", "acceptance"]
    assert list(rl.losses) == ["forward_kl", "rl_acceptance", "reference_kl"]
    same = {"name", "losses"}
    assert kl.model_dump(exclude=same) == acc.model_dump(exclude=same) == rl.model_dump(exclude=same)
    # only the RL recipe pays for rollouts and the reference head's unroll
    assert {"rollout", "reference_logits"} <= needed_fields(rl.losses)
    assert not {"rollout", "reference_logits"} & (needed_fields(kl.losses) | needed_fields(acc.losses))


def test_rl_group_needs_two_chains():
    with pytest.raises(ValidationError, match="group_size"):
        TrainRecipeConfig(name="x", rl={"group_size": 1})


def test_device_plan_picks_backend_and_autocast_per_device():
    cpu = device_plan("cpu", local_rank=3)
    assert (cpu.device, cpu.backend, cpu.autocast) == (torch.device("cpu"), "gloo", "cpu")
    gpu = device_plan("cuda", local_rank=1)  # each rank on its LOCAL_RANK GPU
    assert (gpu.device, gpu.backend, gpu.autocast) == (torch.device("cuda", 1), "nccl", "cuda")
    assert device_plan("cuda:0", local_rank=1).device == torch.device("cuda", 0)  # an explicit index is kept
    auto = device_plan("auto", local_rank=1)  # the default: NCCL on a GPU machine, gloo on this CPU one
    assert auto.backend == ("nccl" if torch.cuda.is_available() else "gloo")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        device_plan("mps")


def test_learning_rate_warmup_then_cosine():
    cfg = TrainRecipeConfig(
        name="x",
        max_steps=110,
        optim={"lr": 1.0, "warmup_steps": 10, "schedule": "cosine", "min_lr_ratio": 0.1},
    )
    assert learning_rate(cfg, 0) == pytest.approx(0.1)  # step 1 of 10 warmup
    assert learning_rate(cfg, 9) == pytest.approx(1.0)
    assert learning_rate(cfg, 10) == pytest.approx(1.0)  # cosine starts at the peak
    assert learning_rate(cfg, 60) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5
    assert learning_rate(cfg, 110) == pytest.approx(0.1)
    flat = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"schedule": "constant"})})
    assert learning_rate(flat, 80) == 1.0


def test_what_a_recipe_leaves_open_comes_from_the_injected_settings(tmp_path):
    from core.settings import LakeSettings, MlflowSettings, Settings, TrainingSettings

    cfg = load_recipe(RECIPES[0], ["mlflow.enabled=true"])
    assert set(cfg.missing()) == {
        "target",
        "window.table",
        "output_dir",
        "mlflow.tracking_uri",
        "mlflow.experiment",
    }
    settings = Settings(
        lake=LakeSettings(root=str(tmp_path / "lake")),
        mlflow=MlflowSettings(tracking_uri="http://127.0.0.1:1", experiment="e"),
        training=TrainingSettings(output_dir=tmp_path / "out", num_threads=3),
    )
    resolved = cfg.with_defaults(settings)
    assert resolved.missing() == []
    assert resolved.window.table == str((tmp_path / "lake" / "traces").resolve())
    assert resolved.output_dir == tmp_path / "out" / cfg.name and resolved.num_threads == 3
    assert resolved.device == "auto"  # TrainingSettings.device
    assert (resolved.mlflow.tracking_uri, resolved.mlflow.experiment) == ("http://127.0.0.1:1", "e")
    pinned = cfg.model_copy(update={"num_threads": 1, "device": "cuda"}).with_defaults(settings)
    assert pinned.num_threads == 1 and pinned.device == "cuda"  # what the recipe sets is kept
