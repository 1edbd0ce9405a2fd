"""Training recipes: YAML files validated by pydantic; every field says what it does.

``flywheel train --recipe trainer/recipes/scratch.yaml optim.lr=1e-4 max_steps=50`` loads the YAML, applies
dotted ``key=value`` overrides (values parsed as YAML) and validates the result.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.settings import Settings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WindowConfig(_Strict):
    table: str | None = Field(
        None, description="Delta table URI of traces (default: the lake's traces table)"
    )
    start: datetime | None = Field(None, description="first ingest_time in the window (inclusive, UTC)")
    end: datetime | None = Field(None, description="end of the window (exclusive, UTC)")
    version: int | None = Field(None, description="table snapshot version to read (None = latest)")
    after_version: int | None = Field(None, description="only rows appended after this table version")
    holdout_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="newest fraction of rows held out for the end-of-run replay tau"
    )
    heldout_prompt_fraction: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="prompts of the lake's held-out split (by hash) are never trained on "
        "(default: FLYWHEEL_LAKE_HELDOUT_FRACTION; 0 reads every row)",
    )
    target_model_id: str | None = Field(
        None, description="train on traces of this served target id (default: the target dir's name)"
    )
    target_revision: str | None = Field(
        None, description="and of this target revision (default: the target dir's manifest revision)"
    )


class InitConfig(_Strict):
    from_dir: Path | None = Field(
        None, description="warm start from this drafter dir (lineage head or champion); None = scratch"
    )
    draft_vocab_size: int | None = Field(
        8192,
        description="prune the draft vocabulary to the window's most frequent tokens (None = full vocabulary; "
        "a warm start keeps its parent's vocabulary)",
    )
    seed: int = Field(0, description="init and data-order seed")


class LossTerm(_Strict):
    weight: float = Field(1.0, description="weight of this term in the mixed loss")
    step_decay: float = Field(1.0, description="weight decay**i of unroll step i (EAGLE-3/Aurora use 0.8)")


class DataConfig(_Strict):
    pack_tokens: int = Field(1024, description="tokens per packed batch (sequences are not split)")
    max_seq_len: int = Field(2048, description="longer traces are cut to this many tokens")
    shuffle_buffer: int = Field(128, description="sequences held by the streaming shuffle")
    train_on_prompt: bool = Field(False, description="also distil on prompt positions")
    target_chunk_tokens: int = Field(512, description="target forward chunk (bounds activation memory)")
    feature_cache_gb: float = Field(
        0.0,
        ge=0.0,
        description="keep up to this many GB of target features (aux + final hidden) in memory so epochs "
        "after the first rerun only the target's LM head; 0 = recompute every epoch (memory flat in the "
        "window's length)",
    )


class OptimConfig(_Strict):
    lr: float = Field(3e-4, description="AdamW peak learning rate")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    grad_clip: float = Field(1.0, description="clip the global grad norm to this (0 = off)")
    warmup_steps: int = Field(10, description="linear warmup steps")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after warmup: constant or cosine"
    )
    min_lr_ratio: float = Field(0.1, description="cosine floor as a fraction of lr")


class RLConfig(_Strict):
    """Settings of the ``rl_acceptance`` term (trainer.losses): on-policy chains scored by accepted length."""

    group_size: int = Field(
        4, ge=2, description="draft chains sampled per slot; advantages are normalised within the group"
    )
    clip: float = Field(0.2, gt=0.0, description="PPO ratio clip of the policy-gradient surrogate")
    rejected_weight: float = Field(
        2.0,
        ge=0.0,
        description="weight of slots whose served draft chain the target rejected (times the staleness "
        "weight; other slots weigh 1)",
    )


class MlflowConfig(_Strict):
    enabled: bool = Field(False, description="log params, metrics and the drafter to MLflow")
    tracking_uri: str | None = Field(
        None, description="tracking server (default: FLYWHEEL_MLFLOW_TRACKING_URI)"
    )
    experiment: str | None = Field(None, description="experiment name (default: FLYWHEEL_MLFLOW_EXPERIMENT)")
    run_name: str | None = Field(None, description="run name (default: recipe name)")


class EvalConfig(_Strict):
    replay_at_end: bool = Field(True, description="offline replay tau on the held-out part after training")
    max_sequences: int | None = Field(64, description="cap on held-out traces replayed")
    num_spec_tokens: int = Field(3, description="K drafted per verify step in replay")


class TrainRecipeConfig(_Strict):
    name: str = Field(description="run name; output goes to output_dir")
    target: Path | None = Field(None, description="HF target model dir (default: the served target)")
    window: WindowConfig = Field(default_factory=WindowConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    ttt_steps: int = Field(3, ge=1, description="training-time-test unroll length (draft steps trained)")
    losses: dict[str, LossTerm] = Field(
        default_factory=lambda: {"forward_kl": LossTerm(weight=1.0, step_decay=0.8)},
        description="loss terms by registry name (trainer.losses.LOSSES) and their weights",
    )
    rl: RLConfig = Field(default_factory=RLConfig)
    staleness_half_life: float | None = Field(
        None, description="down-weight traces by drafter-version age: 0.5**(age/half_life); None = off"
    )
    serving_drafters: str | None = Field(
        None,
        description="where served drafter versions come from for the discard term: 'registry' (the MLflow "
        "drafter registry of the target) or a dir of version dirs (<drafter_id>/<version>/)",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    log_every: int = Field(1, description="metric logging interval (steps)")
    checkpoint_every: int = Field(0, description="checkpoint interval (0 = only at the end)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="drafter compute: fp32 or bf16 autocast")
    device: str | None = Field(
        None,
        description="drafter device: auto (cuda if available, else cpu), cpu or cuda (each rank on its LOCAL_RANK GPU, NCCL between ranks); "
        "default FLYWHEEL_TRAINING_DEVICE",
    )
    num_threads: int | None = Field(
        None, description="torch threads (default: FLYWHEEL_TRAINING_NUM_THREADS, else torch's)"
    )
    output_dir: Path | None = Field(
        None, description="checkpoints + exported drafter (default: FLYWHEEL_TRAINING_OUTPUT_DIR/name)"
    )
    resume: Path | None = Field(None, description="resume from this checkpoint file")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, v: dict[str, LossTerm]) -> dict[str, LossTerm]:
        from trainer.losses import get_loss

        for name in v:
            get_loss(name)  # raises with the valid names
        if not v:
            raise ValueError("at least one loss term is required")
        return v

    def with_defaults(self, settings: Settings) -> TrainRecipeConfig:
        """Fill what the recipe leaves to the deployment (target, table, MLflow server, output dir, threads,
        device) from ``settings``; a value the recipe sets is kept."""
        update: dict = {}
        if self.target is None:
            update["target"] = settings.serving.target_dir
        window = {}
        if self.window.table is None:
            window["table"] = settings.lake.traces_uri
        if self.window.heldout_prompt_fraction is None:
            window["heldout_prompt_fraction"] = settings.lake.heldout_fraction
        if window:
            update["window"] = self.window.model_copy(update=window)
        if self.output_dir is None:
            update["output_dir"] = settings.training.output_dir / self.name
        if self.num_threads is None:
            update["num_threads"] = settings.training.num_threads
        if self.device is None:
            update["device"] = settings.training.device
        if self.mlflow.tracking_uri is None or self.mlflow.experiment is None:
            update["mlflow"] = self.mlflow.model_copy(
                update={
                    "tracking_uri": self.mlflow.tracking_uri or settings.mlflow.tracking_uri,
                    "experiment": self.mlflow.experiment or settings.mlflow.experiment,
                }
            )
        return self.model_copy(update=update)

    def missing(self) -> list[str]:
        """Fields a run needs that neither the recipe nor :meth:`with_defaults` has set."""
        needed = {"target": self.target, "window.table": self.window.table, "output_dir": self.output_dir}
        if self.mlflow.enabled:
            needed |= {
                "mlflow.tracking_uri": self.mlflow.tracking_uri,
                "mlflow.experiment": self.mlflow.experiment,
            }
        return [name for name, value in needed.items() if value is None]

    def resolved_output_dir(self) -> Path:
        if self.output_dir is None:
            raise ValueError(
                f"recipe {self.name!r} has no output_dir: resolve it with with_defaults(settings)"
            )
        return self.output_dir.resolve()


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``a.b=value`` pairs (value parsed as YAML) applied to nested dicts."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        node = data
        *parents, leaf = key.strip().split(".")
        for depth, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                section = ".".join(parents[: depth + 1])
                raise ValueError(
                    f"override {item!r}: {section} is a value ({node!r}), not a section with keys"
                )
        try:
            node[leaf] = _value(raw)
        except yaml.YAMLError as e:
            raise ValueError(
                f"override {item!r}: the value is not YAML ({getattr(e, 'problem', e)})"
            ) from None
    return data


def _value(raw: str):
    """YAML scalar, except that exponent floats YAML 1.1 reads as strings ("1e-4") become floats."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_recipe(
    path: Path | str | None = None, overrides: list[str] | None = None, **fields
) -> TrainRecipeConfig:
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    data = apply_overrides(data or {}, overrides or [])
    return TrainRecipeConfig.model_validate(data | fields)
