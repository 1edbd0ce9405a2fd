"""Drafter training recipe: setup() / train() / cleanup(), torchrun-ready (DDP over gloo on CPU, NCCL on
CUDA: ``device`` of the recipe, default FLYWHEEL_TRAINING_DEVICE=auto, CUDA when torch sees a GPU).

    recipe = DrafterTrainingRecipe(load_recipe("trainer/recipes/scratch.yaml").with_defaults(settings))
    recipe.setup(); recipe.train(); recipe.cleanup()

Each step: next pack of the streamed train window -> frozen target forward (features recomputed, never
written to disk; ``data.feature_cache_gb`` memoises them in memory across epochs) -> TTT unroll of the
drafter on the training device -> mixed loss -> AdamW with clipping. Rank r of W takes every W-th pack.
Rank 0 shows progress, logs to MLflow, writes checkpoints (model config, step, optimizer, window, git SHA,
argv, recipe) and exports the drafter in vLLM's eagle3 format. A checkpoint holds tensors and plain data
only and is read back with ``torch.load(weights_only=True)``: resuming from a file never runs code in it.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import pickle
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import date
from enum import Enum
from pathlib import Path, PurePath
from typing import Any

import torch

from core.settings import MlflowSettings, Settings
from trainer.devices import device_plan, weights_digest
from trainer.drafter_store import open_store
from trainer.eagle3_drafter import Eagle3Config, Eagle3Drafter
from trainer.losses import UnrollBatch, mix_losses, needed_fields
from trainer.recipes import TrainRecipeConfig
from trainer.target_features import CachedTarget, TargetModel
from trainer.trace_window import Window, WindowReader, packs, shuffled, target_identity, version_order
from trainer.unroll_batch import (
    PackFeatures,
    accuracy_by_step,
    drafter_inputs,
    pack_features,
    position_weights,
    regenerate_rejected,
    rejection_roots,
    sample_rollout,
    shifted,
    simulated_accept_length,
    slot_temperature,
    target_index,
    unroll_mask,
)


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def top_token_ids(counts, k: int) -> torch.Tensor:
    """The k most frequent token ids (ties -> lower id), sorted ascending."""
    counts = torch.as_tensor(counts)
    order = torch.argsort(-counts, stable=True)[:k]
    return torch.sort(order).values


class DrafterTrainingRecipe:
    def __init__(
        self,
        cfg: TrainRecipeConfig,
        argv: list[str] | None = None,
        mlflow: MlflowSettings | None = None,
        storage_options: dict[str, str] | None = None,
    ):
        self.cfg = cfg
        # the lake's object-store credentials: beside the recipe, never in it (recipes go to MLflow)
        self.storage_options = storage_options
        self.mlflow_settings = mlflow  # the registry of served drafters (serving_drafters='registry')
        self.argv = argv if argv is not None else list(sys.argv)
        self.history: list[dict] = []
        self.step = 0

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.plan = device_plan(cfg.device or "auto", int(os.environ.get("LOCAL_RANK", "0")))
        self.device = self.plan.device
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(self.plan.backend)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        torch.manual_seed(cfg.init.seed)
        self.out_dir = cfg.resolved_output_dir()
        w = cfg.window
        model_id, revision = target_identity(cfg.target)
        # the lake's held-out prompts are the served evaluation's: never trained on
        self.reader = WindowReader(
            Window(
                w.table,
                w.start,
                w.end,
                w.version,
                w.after_version,
                storage_options=self.storage_options,
                heldout_fraction=w.heldout_prompt_fraction or 0.0,
                heldout="exclude",
                # a shared table mixes targets: train on the traces of the target being trained for
                target_model_id=w.target_model_id or model_id,
                target_revision=w.target_revision or revision,
            )
        )
        self.reader.require_target_rows()
        self.cutoff = self.reader.holdout_cutoff(w.holdout_fraction)
        self.versions = version_order(self.reader)
        self.target = TargetModel(cfg.target, chunk_tokens=cfg.data.target_chunk_tokens)
        # the train packs' feature source: the target itself, or a memo of it across epochs
        self.features = self.target
        if cfg.data.feature_cache_gb:
            self.features = CachedTarget(self.target, int(cfg.data.feature_cache_gb * 2**30))
        self.drafter = self._init_drafter()
        # selects the target's logp columns: stays beside the target (CPU)
        self.draft_ids = self.drafter.draft_to_target.clone()
        self.draft_index = target_index(self.draft_ids, self.drafter.config.vocab_size).to(self.device)
        self.fields = needed_fields(cfg.losses)
        # the KL anchor's reference: the drafter as it starts (the parent on a warm start), also on resume
        self.reference = None
        if "reference_logits" in self.fields:
            self.reference = copy.deepcopy(self.drafter).eval().requires_grad_(False).to(self.device)
        self.drafter.to(self.device)
        self.store = open_store(cfg.serving_drafters, Path(cfg.target).name, self.mlflow_settings)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.drafter.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay
        )
        if cfg.resume:
            self._load_checkpoint(cfg.resume)
        self.model = self.drafter
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.drafter, device_ids=ids, broadcast_buffers=False
            )
        self.mlflow_run = self._start_mlflow() if cfg.mlflow.enabled and self.rank == 0 else None
        self.model_info = None  # mlflow ModelInfo of the exported drafter (model_uri, model_id) once logged

    def _init_drafter(self) -> Eagle3Drafter:
        cfg = self.cfg
        if cfg.init.from_dir:
            return Eagle3Drafter.from_pretrained(cfg.init.from_dir).train()
        vocab = self.target.config["vocab_size"]
        size = min(cfg.init.draft_vocab_size or vocab, vocab)
        drafter = Eagle3Drafter(Eagle3Config.from_target(self.target.config, size))
        if size < vocab:
            # every rank computes the same counts from the same train window, so vocabularies agree
            drafter.set_vocab(top_token_ids(self.reader.token_counts(vocab, end=self.cutoff), size))
        return drafter.train()

    def _start_mlflow(self):
        import mlflow

        m = self.cfg.mlflow
        mlflow.set_tracking_uri(m.tracking_uri)
        mlflow.set_experiment(m.experiment)
        run = mlflow.start_run(run_name=m.run_name or self.cfg.name)
        flat = _flatten(self.cfg.model_dump(mode="json"))
        flat |= {f"window.{k}": v for k, v in self.provenance()["window"].items()}
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        mlflow.set_tags({"git_sha": git_sha() or "unknown", "world_size": str(self.world)})
        return run

    # -- data ---------------------------------------------------------------------------------------
    def train_packs(self) -> Iterator[list]:
        """Endless stream of this rank's packs over the train part of the window, reshuffled per epoch."""
        d = self.cfg.data
        for epoch in itertools.count():
            rng = random.Random(self.cfg.init.seed * 1_000_003 + epoch)
            seqs = shuffled(self.reader.sequences(end=self.cutoff), d.shuffle_buffer, rng)
            mine = itertools.islice(packs(seqs, d.pack_tokens, d.max_seq_len), self.rank, None, self.world)
            got = False
            for pack in mine:
                got = True
                yield pack
            if not got:
                raise RuntimeError(
                    f"rank {self.rank}: the train window has no pack for this rank (epoch {epoch})"
                )

    def autocast(self):
        """bf16 autocast on the training device when the recipe asks for it."""
        return torch.autocast(self.plan.autocast, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def active_slots(self, pf: PackFeatures, steps: int) -> torch.Tensor | None:
        """(S, 1, N) the unroll's logits the losses read (``unroll_mask``) when prompts are not trained on:
        the drafter then skips the LM head elsewhere and the steps of slots no later step trains
        (their logits are zeros, read by no loss or metric: all of them mask). None: every logit."""
        if self.cfg.data.train_on_prompt:
            return None
        return unroll_mask(pf, steps, False)[:, None]

    def loss_rows(self, pf: PackFeatures, steps: int) -> torch.Tensor:
        """(R,) the slots some unroll step trains (``unroll_mask`` at any step), ascending: the only rows
        the losses and metrics read (every other slot is masked at every step), so the unroll returns and
        the losses compute just these (with prompts not trained on, about half of a pack's slots)."""
        return unroll_mask(pf, steps, self.cfg.data.train_on_prompt).any(0).nonzero().squeeze(1)

    def make_batch(
        self,
        pf: PackFeatures,
        logits: list[torch.Tensor],
        active: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> UnrollBatch:
        """The losses' view of the unroll; rollouts and the reference unroll only for the terms that read
        them (other recipes pay nothing). ``pf`` is on the training device; ``active``: what the unroll
        computed (``active_slots``); ``rows``: the slots the unroll returned (``loss_rows``: its logits
        are (R, Vd) per step, and every per-slot field is taken at those slots), None: every slot
        ((1, N, Vd) per step)."""
        S = len(logits)
        mask = unroll_mask(pf, S, self.cfg.data.train_on_prompt)
        rejected, rejected_mask = regenerate_rejected(pf, S, self.store, self.draft_index)
        weight = position_weights(pf, self.versions, self.cfg.staleness_half_life)
        temperature = slot_temperature(pf)
        logp, argmax = shifted(pf.feats.logp, S), self.draft_index[shifted(pf.feats.argmax, S)]
        roots = rejection_roots(pf) if "rollout" in self.fields else None
        if rows is None:
            draft_logits = torch.stack([lg[0] for lg in logits])
        else:  # the same fields at the returned slots only: (S, R, ...) and (R,)
            draft_logits = torch.stack(logits)
            mask, rejected, rejected_mask = mask[:, rows], rejected[:, rows], rejected_mask[:, rows]
            logp, argmax = logp[:, rows], argmax[:, rows]
            weight, temperature = weight[rows], temperature[rows]
            roots = roots[rows] if roots is not None else None
        batch = UnrollBatch(
            draft_logits=draft_logits,
            target_logp=logp,
            mask=mask,
            rejected=rejected,
            rejected_mask=rejected_mask & mask,
            weight=weight,
            target_argmax=argmax,
            temperature=temperature,
        )
        if "rollout" in self.fields:
            rl = self.cfg.rl
            weight = torch.where(roots, rl.rejected_weight, 1.0)
            batch.rollout = sample_rollout(
                batch.draft_logits,
                batch.target_logp,
                batch.target_argmax,
                batch.temperature,
                mask,
                weight,
                rl.group_size,
                rl.clip,
                self.rollout_generator(),
            )
        if "reference_logits" in self.fields:
            with torch.no_grad(), self.autocast():
                ref = self.reference(*drafter_inputs(pf), steps=S, active=active, rows=rows)
            batch.reference_logits = torch.stack(ref if rows is not None else [lg[0] for lg in ref])
        return batch

    def rollout_generator(self) -> torch.Generator:
        """The rollouts' sampler: seeded by (recipe seed, step, rank), so a rerun draws the same chains."""
        seed = (self.cfg.init.seed * 1_000_003 + self.step) * 1_009 + self.rank
        return torch.Generator(device=self.device).manual_seed(seed)

    # -- train --------------------------------------------------------------------------------------
    def train_step(self, pf: PackFeatures) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        pf = pf.to(self.device)
        active = self.active_slots(pf, cfg.ttt_steps)
        rows = self.loss_rows(pf, cfg.ttt_steps)
        with self.autocast():
            logits = self.model(*drafter_inputs(pf), steps=cfg.ttt_steps, active=active, rows=rows)
        batch = self.make_batch(pf, logits, active, rows)
        loss, parts = mix_losses(
            batch,
            {k: v.weight for k, v in cfg.losses.items()},
            {k: v.step_decay for k, v in cfg.losses.items()},
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), cfg.optim.grad_clip or float("inf"))
        for g in self.optimizer.param_groups:
            g["lr"] = learning_rate(cfg, self.step)
        self.optimizer.step()
        draft_logits = batch.draft_logits.detach()
        acc = accuracy_by_step(draft_logits, batch.target_argmax, batch.mask)
        metrics = {
            "loss": float(loss.detach()),
            **{f"loss.{k}": v for k, v in parts.items()},
            **{f"acc.step{i}": float(a) for i, a in enumerate(acc)},
            "sim_accept_len": float(simulated_accept_length(draft_logits, batch.target_argmax, batch.mask)),
            "grad_norm": float(gnorm),
            "lr": self.optimizer.param_groups[0]["lr"],
            "tokens": pf.num_slots,
            "drafter_s": time.perf_counter() - t0,
            "rejected_proposals": int(batch.rejected_mask.sum()),
            # target mass the pruned draft vocabulary can reach (1.0 without pruning)
            "draft_vocab_mass": float(batch.target_logp[0][batch.mask[0]].exp().sum(-1).mean()),
        }
        if batch.rollout is not None:  # mean accepted length of the sampled chains
            metrics["rl.reward"] = float(batch.rollout.rewards[:, batch.mask[0]].mean())
        return metrics

    def train(self) -> list[dict]:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        cfg = self.cfg
        stream = self.train_packs()
        for _ in range(self.step):  # a resumed run continues the data order where it stopped
            next(stream)
        console = Console(stderr=True)
        columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(
            *columns, TextColumn("{task.fields[info]}"), console=console, disable=self.rank != 0
        ) as bar:
            task = bar.add_task("train", total=cfg.max_steps, completed=self.step, info="")
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                pf = pack_features(self.features, next(stream), self.draft_ids)
                target_s = time.perf_counter() - t0
                m = self.train_step(pf) | {"target_s": target_s}
                if isinstance(self.features, CachedTarget):
                    m["feature_cache_gb"] = self.features.nbytes / 2**30
                    m["feature_cache_hits"] = self.features.hits
                m["tokens_per_s"] = m["tokens"] / (time.perf_counter() - t0)
                self.step += 1
                self.history.append({"step": self.step, **m})
                info = f"loss {m['loss']:.3f} acc0 {m['acc.step0']:.2f} {m['tokens_per_s']:.0f} tok/s"
                bar.update(task, advance=1, info=info)
                if self.rank == 0 and not console.is_terminal and self.step % max(10, cfg.log_every) == 0:
                    console.print(f"step {self.step}/{cfg.max_steps} {info}")  # plain lines for job logs
                self._log_step(m)
        self.replica_digests = self.gather_replica_digests()
        self.save_checkpoint()
        self.drafter.cpu()  # export and the held-out replay run beside the target, on the CPU
        drafter_dir = self.export()
        if self.rank == 0 and cfg.eval.replay_at_end and self.cutoff is not None:
            self.final_replay = self.replay_heldout()
        if self.mlflow_run and drafter_dir is not None:
            self._log_model_and_figures(drafter_dir)
        return self.history

    def _log_model_and_figures(self, drafter_dir: Path) -> None:
        """The drafter as an MLflow Model with its window as the dataset input, and the figures a person
        would rather look at than read: the training curves and held-out replay τ per domain."""
        import mlflow

        from trainer.drafter_model import log_drafter_model
        from trainer.figures import replay_tau_figure, training_curves_figure

        self.model_info = log_drafter_model(drafter_dir, window=self.provenance()["window"])
        if self.history:
            mlflow.log_figure(training_curves_figure(self.history, self.cfg.name), "training_curves.png")
        if getattr(self, "final_replay", None) is not None and self.final_replay.domains:
            mlflow.log_figure(replay_tau_figure(self.final_replay, self.cfg.name), "replay_tau_by_domain.png")

    def _log_step(self, m: dict) -> None:
        cfg = self.cfg
        if self.mlflow_run and self.step % cfg.log_every == 0:  # rank 0 only
            import mlflow

            mlflow.log_metrics(m, step=self.step)
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
            self.save_checkpoint()

    def replay_heldout(self):
        from trainer.replay_eval import replay_sequences

        seqs = itertools.islice(self.reader.sequences(start=self.cutoff), self.cfg.eval.max_sequences)
        report = replay_sequences(self.drafter.eval(), self.target, seqs, self.cfg.eval.num_spec_tokens)
        self.drafter.train()
        if self.mlflow_run:
            import mlflow

            mlflow.log_metrics(report.metrics(), step=self.step)
        return report

    def gather_replica_digests(self) -> list[str]:
        """sha256 of every rank's weights (DDP replicas must be bit-identical); recorded in the checkpoint."""
        digest = weights_digest(self.drafter)
        if self.world == 1:
            return [digest]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, digest)
        if len(set(out)) != 1:
            raise RuntimeError(f"DDP replicas diverged: {out}")
        return out

    # -- checkpoints ----------------------------------------------------------------------------------
    def provenance(self) -> dict:
        return {
            "window": self.reader.provenance()
            | {"holdout_cutoff": self.cutoff.isoformat() if self.cutoff else None},
            "git_sha": git_sha(),
            "argv": self.argv,
            "recipe": self.cfg.model_dump(mode="json"),
            "world_size": self.world,
        }

    def save_checkpoint(self) -> Path | None:
        if self.rank != 0:
            return None
        path = self.out_dir / "checkpoints" / f"step_{self.step:06d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "model_config": asdict(self.drafter.config),
            "step": self.step,
            "replica_digests": getattr(self, "replica_digests", None),
            **self.provenance(),
        }
        state = {"model": self.drafter.state_dict(), "optimizer": self.optimizer.state_dict()}
        torch.save(state | plain(meta), path)
        return path

    def _load_checkpoint(self, path: Path) -> None:
        state = load_checkpoint(path)
        self.drafter.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def export(self) -> Path | None:
        """The drafter in vLLM's eagle3 format under ``output_dir/drafter`` (rank 0)."""
        if self.rank != 0:
            return None
        meta = {"name": self.cfg.name, "step": self.step, "parent": str(self.cfg.init.from_dir or "scratch")}
        return self.drafter.save_pretrained(self.out_dir / "drafter", extra=meta | self.provenance())

    def cleanup(self) -> None:
        """End the MLflow run (``mlflow_run`` stays readable: callers register its artifacts) and DDP."""
        if self.mlflow_run is not None and not getattr(self, "_mlflow_ended", False):
            import mlflow

            mlflow.end_run()
            self._mlflow_ended = True
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def learning_rate(cfg: TrainRecipeConfig, step: int) -> float:
    """Linear warmup to ``lr``, then constant or cosine down to ``min_lr_ratio * lr`` at ``max_steps``."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    frac = (step - o.warmup_steps) / max(1, cfg.max_steps - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def load_checkpoint(path: Path | str) -> dict:
    """A checkpoint :meth:`DrafterTrainingRecipe.save_checkpoint` wrote, on the CPU. Read with
    ``weights_only``: tensors and plain data only; a pickled object of any other class is refused
    (``pickle.UnpicklingError``), never constructed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if "WeightsUnpickler" in line]
        why = (lines[0] if lines else str(e)).split(" Please use")[0]
        raise pickle.UnpicklingError(
            f"checkpoint {path} holds more than tensors and plain data; refused, nothing in it ran ({why})"
        ) from None


def plain(value: Any, where: str = "checkpoint") -> Any:
    """``value`` as data ``torch.load(weights_only=True)`` reads back: dicts, lists, tuples, str, int,
    float, bool, None and tensors; paths and dates become strings, enums and numpy values their Python ones.
    Anything else raises TypeError naming where it was (it would make the checkpoint unreadable)."""
    if value is None or isinstance(value, torch.Tensor) or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {plain(k, where): plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):  # subclasses (named tuples) become the plain container
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Enum):
        return plain(value.value, where)
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):  # scalars and arrays
        return plain(value.tolist(), where)
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return base(value)
    raise TypeError(f"{where}: {type(value).__qualname__} is not plain data a checkpoint can hold")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= _flatten(v, key + ".")
        else:
            out[key] = v
    return out


def run_recipe(
    cfg: TrainRecipeConfig, settings: Settings | None = None, argv: list[str] | None = None
) -> DrafterTrainingRecipe:
    """Train ``cfg`` (set-up, steps, clean-up). ``settings`` fill what the recipe leaves open
    (``TrainRecipeConfig.with_defaults``) and say where served drafters come from for the discard term."""
    if settings is not None:
        cfg = cfg.with_defaults(settings)
        settings.mlflow.export_credentials()
    if cfg.missing():
        raise ValueError(f"recipe {cfg.name!r} leaves {cfg.missing()} unset and no settings were given")
    recipe = DrafterTrainingRecipe(
        cfg,
        argv,
        settings.mlflow if settings is not None else None,
        storage_options=(settings.lake.delta_options()) if settings is not None else None,
    )
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe


def main(argv: list[str] | None = None) -> None:
    """torchrun entry: ``torchrun --nproc-per-node 2 -m trainer.train_loop RECIPE.yaml [key=value ...]``."""
    from core.settings import get_settings
    from trainer.recipes import load_recipe

    args = list(sys.argv[1:] if argv is None else argv)
    run_recipe(load_recipe(args[0], args[1:]), get_settings(), argv=sys.argv)


if __name__ == "__main__":
    main()
