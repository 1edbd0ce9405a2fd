"""The demo's plan: how much traffic, training and evaluation each mode runs (sizes only, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo. A flywheel cycle runs after every traffic segment of a phase but the last."""

    mode: str
    # what F and S start from: "day0" = the day-0 drafter (`flywheel models prepare-drafter`, the normal
    # case: a deployment starts from an off-the-shelf head; S keeps it, F adapts it); "scratch" = a
    # randomly initialised head for F, and S trained once on phase A (the harder, from-scratch case)
    start: str
    segments_a: tuple[int, ...]  # code requests per segment before the shift
    segments_b: tuple[int, ...]  # prose requests per segment after it (to F and S alike)
    max_tokens: int
    concurrency: int
    train_steps: int  # optimizer steps per flywheel cycle (CycleSettings.train_max_steps)
    eval_prompts: int  # held-out prompts of the window replayed per evaluation (one domain per window)
    eval_min_rounds: int
    eval_max_requests: int
    gate_min_samples: int  # paired prompts the gate needs (the window's held-out share bounds what exists)
    window: int  # rolling window (requests) of the traffic's tau plot
    probe_prompts: int  # held-out prompts no server has seen, sent to F and S before and after the shift
    draft_vocab_size: int = 8192
    k: int = 3
    kv_cache_gib: int = 1
    ingest_flush_s: float = 5.0
    # the final champion's speedup: its own paired run on held-out prose (True), or, when the last
    # post-shift cycle kept it as champion, that cycle's paired measurement of it against no speculation
    # on the window's held-out prose (False: the quick demo, ~4 min saved; a champion promoted by the last
    # cycle still gets its own run: the figure that won a promotion overstates it)
    final_own_run: bool = True
    # F and S on the held-out prose right at the shift, before any post-shift cycle (the start of the
    # recovery curve). The day-0 start skips it in the quick demo: F and S serve the same head until a
    # promotion, so F's tau there is S's (greedy, the same prompts), measured at the end anyway
    probe_at_shift: bool = True
    # start the evaluate task's two servers while the demo's traffic runs, ready for the first cycle (~2
    # min saved). Off in the full run: its first cycle's trainer (its feature cache grows to 2 GB over a
    # 96-row window) beside four vLLM engines (~3.8 GB each) filled 24 GB and the machine thrashed
    prestart_eval_servers: bool = True
    # the in-domain reference of recovery (built once at set-up, served by S after the final probe); the
    # quick demo has one post-shift probe and no time for the reference's: its recovery is not measured
    reference: bool = True
    # skip vLLM's torch.compile warm-up (F started in 50-63 s instead of ~170 s on 2 cores; ~12 % fewer
    # tok/s for every arm alike, so measured speedups stay like for like)
    enforce_eager: bool = False

    @property
    def cycles_a(self) -> int:
        return len(self.segments_a) - 1

    @property
    def cycles_b(self) -> int:
        return len(self.segments_b) - 1

    @property
    def reference_steps(self) -> int:
        """Steps of the in-domain reference (recovery's bar): the head F starts from, trained on the new
        domain's train split with the budget S gets, F's lineage steps when F is last measured."""
        return self.static_steps

    @property
    def static_steps(self) -> int:
        """The static drafter gets the training budget of F's lineage when F and S are last measured (after
        the shift): every cycle continues the newest trained head, so that is every cycle's steps."""
        return self.train_steps * max(1, self.cycles_a + self.cycles_b)

    def cycle_conf(self, min_rows: int) -> dict[str, Any]:
        """The ``cycle`` parameter of a DAG run (CycleSettings overrides)."""
        return {
            "min_window_rows": min_rows,
            "train_max_steps": self.train_steps,
            "eval_prompts_per_domain": self.eval_prompts,
            "eval_min_rounds": self.eval_min_rounds,
            "eval_max_requests": self.eval_max_requests,
            "eval_max_tokens": self.max_tokens,
            "gate_min_samples": self.gate_min_samples,
            "eval_serving": self.serving_overrides,
        }

    @property
    def serving_overrides(self) -> dict[str, Any]:
        """The server flags of every server of the demo, the Airflow task's evaluation servers included."""
        return {"enforce_eager": self.enforce_eager, "kv_cache_space_gib": self.kv_cache_gib}


# The evaluation replays the window's held-out prompts (about FLYWHEEL_LAKE_HELDOUT_FRACTION of its
# traffic): a quick window holds only a handful, so its intervals are wide and the gate says so.
# The normal case in one cycle: F and S start from the day-0 drafter (trained on docs), serve code, then
# prose; F's one cycle adapts on the post-shift window. No cycle before the shift: it cost ~10 min (its
# train task shared the 2 cores with three starting vLLM engines) and the shift is what the demo is about.
QUICK = DemoPlan(
    "quick",
    "day0",
    segments_a=(48,),
    segments_b=(48, 16),
    max_tokens=48,
    concurrency=8,
    train_steps=30,
    eval_prompts=8,
    eval_min_rounds=1,
    eval_max_requests=48,
    gate_min_samples=3,
    window=8,
    probe_prompts=16,
    final_own_run=False,
    probe_at_shift=False,
    reference=False,
    enforce_eager=True,
)
# The recovery curve: F and S start from the day-0 drafter; after the shift F and S serve the held-out
# prose at the shift and after each of two 120-step cycles, beside the in-domain reference (the day-0 head
# trained 240 steps on the prose train split). No cycle before the shift: the shift is what it measures,
# and three cycles did not fit 45 minutes on 2 cores (each ~10 min: training, two evaluation engines
# starting, the paired evaluation). The from-scratch case is `--start scratch` (S trained once on phase A).
# Timed from a clean clone (2026-12-04, 2 cores) with 96-token answers, 128 code requests and a last
# segment of 64: 55.4 min of stages after set-up, the paired evaluations (7 and 12 min per cycle, 8.4 min
# for the final run) most of it. Answers capped at 64 tokens (every served stage ~25 % shorter; the
# measurement's method unchanged), 64 code requests (no cycle trains on them) and 32 after the last cycle.
FULL = DemoPlan(
    "full",
    "day0",
    segments_a=(64,),
    segments_b=(96, 64, 32),
    max_tokens=64,
    concurrency=4,
    train_steps=120,
    eval_prompts=12,
    eval_min_rounds=1,
    eval_max_requests=72,
    gate_min_samples=6,
    window=24,
    probe_prompts=24,
    prestart_eval_servers=False,
    enforce_eager=True,
)


def sized(
    quick: bool, train_steps: int | None = None, requests: int | None = None, start: str | None = None
) -> DemoPlan:
    """The plan of a mode; ``train_steps`` / ``requests`` (first segment of each phase; later ones get half)
    resize it, e.g. for a machine busier or faster than 2 idle cores; ``start`` replaces its start."""
    plan = QUICK if quick else FULL
    if start:
        if start not in ("day0", "scratch"):
            raise ValueError(f"start is day0 or scratch, not {start!r}")
        plan = replace(plan, start=start)
    if train_steps:
        plan = replace(plan, train_steps=train_steps)
    if requests:

        def resized(segments: tuple[int, ...]) -> tuple[int, ...]:
            return (requests,) + (max(1, requests // 2),) * (len(segments) - 1)

        plan = replace(
            plan,
            segments_a=resized(plan.segments_a),
            segments_b=resized(plan.segments_b),
        )
        plan = replace(plan, window=max(1, min(plan.window, requests // 4)))
    return plan
