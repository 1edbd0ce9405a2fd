"""`flywheel bench objectives`: which training objective makes the better drafter, measured, not asserted.

The same window, the same parent head, the same steps and seed, once per objective recipe
(``trainer/recipes/objective_<name>.yaml``, which differ only in their loss terms):

- ``kl``: forward KL to the target (distillation, EAGLE-3's / Aurora's loss);
- ``acceptance``: KL + the expected accepted length under the verification rule each trace was served with
  (greedy: the draft must equal the target's argmax; T>0: sum min(p, q));
- ``rl``: KL + a policy gradient on the accepted length of chains sampled from the head itself, slots where
  the served drafter was rejected weighted up, anchored to the parent by KL.

Every head, and the parent, is then judged on the window's *held-out* prompts (the lake's split by prompt
hash, which no recipe trains on): offline replay tau (trainer/replay_eval.py) over their recorded traces and,
unless ``served=False``, served tau: the prompts replayed through one vLLM server with the head swapped in
(vLLM's per-request spec-decode counts). Both per domain. Keys: ``objectives`` (per objective: train
seconds, final loss terms, ``replay_tau``, ``served_tau``, per domain), ``parent`` (same measurements),
``best_replay``, ``best_served``, ``heldout_prompts``, ``steps``, ``wall_s``.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.settings import Settings
from core.tau import pooled_tau, tau_of

OBJECTIVES = ("kl", "acceptance", "rl")
RECIPES = Path(__file__).resolve().parents[1] / "trainer" / "recipes"
SPEC_PORT = 8064  # not the cycle's 8031-8033, bench drafters' 8051-8053 nor bench gate's 8061-8063


def recipe_for(objective: str, table: str, parent: Path | None, steps: int, out: Path, settings: Settings):
    """The objective's recipe on ``table`` from ``parent`` (None: from scratch, without the KL anchor to a
    random init) for ``steps`` steps, writing under ``out``; MLflow off (a benchmark, not a candidate)."""
    from trainer.recipes import load_recipe

    cfg = load_recipe(
        RECIPES / f"objective_{objective}.yaml",
        window={"table": table, "holdout_fraction": 0.0},
        max_steps=steps,
        output_dir=out / objective,
        mlflow={"enabled": False},
        eval={"replay_at_end": False},
    )
    init = cfg.init.model_copy(update={"from_dir": parent})
    losses = (
        cfg.losses if parent is not None else {k: v for k, v in cfg.losses.items() if k != "reference_kl"}
    )
    return cfg.model_copy(update={"init": init, "losses": losses}).with_defaults(settings)


def heldout_reader(settings: Settings, table: str):
    from trainer.trace_window import Window, WindowReader, target_identity

    model_id, revision = target_identity(settings.serving.target_dir)
    lake = settings.lake
    return WindowReader(
        Window(
            table,
            storage_options=lake.delta_options(),
            heldout_fraction=lake.heldout_fraction,
            heldout="only",
            target_model_id=model_id,
            target_revision=revision,
        )
    )


def replay_taus(heads: dict[str, Path], settings: Settings, table: str, k: int) -> dict[str, dict]:
    """Offline replay tau of each head over the held-out traces, overall and per domain."""
    from trainer.eagle3_drafter import Eagle3Drafter
    from trainer.replay_eval import replay_sequences
    from trainer.target_features import TargetModel

    target = TargetModel(settings.serving.target_dir)
    seqs = list(heldout_reader(settings, table).sequences())
    out = {}
    for name, path in heads.items():
        report = replay_sequences(Eagle3Drafter.from_pretrained(path).eval(), target, seqs, k)
        out[name] = {d: v["tau"] for d, v in report.as_dict().items()}
    return out


def served_taus(
    heads: dict[str, Path], settings: Settings, table: str, per_domain: int, max_tokens: int, k: int
) -> tuple[dict[str, dict], int]:
    """Served tau of each head: the held-out prompts through one vLLM server, each head swapped in turn."""
    from core import process
    from evaluation.heldout_traffic import from_lake, replay_prompts
    from evaluation.served import EvalServers

    traffic = from_lake(heldout_reader(settings, table), per_domain, max_tokens)
    if not traffic.prompts:
        raise ValueError(f"{table} has no held-out prompts of the served target to replay")
    first = next(iter(heads.values()))
    server = EvalServers.server(settings.stack, settings.serving, SPEC_PORT, "eagle3", first, k)
    out = {}
    try:
        process.start(server, 1500)
        url = f"http://{server.address}"
        from producers.hot_swap import swap_server

        replay_prompts(url, settings.serving.target_model, traffic.prompts[:2])  # warm-up, not counted
        for name, path in heads.items():
            swap_server(url, path, f"bench-{name}")
            steps: dict[str, list[int]] = defaultdict(list)
            for r in replay_prompts(url, settings.serving.target_model, traffic.prompts):
                if not r.ok:
                    raise RuntimeError(f"{name}: a held-out request failed: {r.error}")
                steps[r.stratum].extend(r.per_step_accepted)
            out[name] = {d: tau_of(v) for d, v in sorted(steps.items())} | {"all": pooled_tau(steps.values())}
    finally:
        process.stop(server)
    return out, len(traffic.prompts)


def run(
    settings: Settings,
    table: str,
    parent: Path | None,
    steps: int,
    objectives: tuple[str, ...] = OBJECTIVES,
    served: bool = True,
    per_domain: int = 8,
    max_tokens: int = 96,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    from trainer.train_loop import run_recipe

    say = on_step or (lambda _line: None)
    started = time.monotonic()
    result: dict[str, Any] = {"table": table, "parent": str(parent) if parent else None, "steps": steps}
    heads: dict[str, Path] = {}
    trained: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-objectives-") as tmp:
        for objective in objectives:
            cfg = recipe_for(objective, table, parent, steps, Path(tmp), settings)
            say(f"training {objective}: {', '.join(cfg.losses)} for {steps} steps")
            t0 = time.monotonic()
            recipe = run_recipe(cfg, settings, argv=["bench", "objectives", objective])
            last = recipe.history[-1]
            trained[objective] = {
                "losses": sorted(cfg.losses),
                "train_s": round(time.monotonic() - t0, 1),
                "final": {
                    k: round(v, 4) for k, v in last.items() if k.startswith(("loss", "acc.", "sim_", "rl."))
                },
            }
            heads[objective] = recipe.out_dir / "drafter"
        if parent is not None:
            heads = {"parent": parent} | heads
        k = 3
        say("offline replay tau on the held-out traces")
        replay = replay_taus(heads, settings, table, k)
        served_tau: dict[str, dict] = {}
        if served:
            say("served tau on the held-out prompts")
            served_tau, result["heldout_prompts"] = served_taus(
                heads, settings, table, per_domain, max_tokens, k
            )
    result["objectives"] = {
        o: trained[o] | {"replay_tau": replay[o], "served_tau": served_tau.get(o)} for o in objectives
    }
    if parent is not None:
        result["parent"] = {
            "dir": str(parent),
            "replay_tau": replay["parent"],
            "served_tau": served_tau.get("parent"),
        }
    result["best_replay"] = max(objectives, key=lambda o: replay[o].get("all") or 0.0)
    if served_tau:
        result["best_served"] = max(objectives, key=lambda o: served_tau[o].get("all") or 0.0)
    return result | {"wall_s": round(time.monotonic() - started, 1)}
