"""`flywheel bench gate`: does the gate's measurement tell a drafter from itself, and a better one from a
worse one? A/A and A/B on held-out traffic, in one run, through the same servers and code as a cycle.

- A/A: the trained drafter as champion and, again, as challenger. Paired on the same prompts, the interval
  of challenger ÷ champion should hold 1.0 and the gate must not promote.
- A/B: an untrained head with the same vocabulary as champion, the trained drafter as challenger: the gate
  should promote.

Traffic: the held-out split of a traces table (``--table``, default the lake's), the built-in prompt sets'
held-out split only when it has none. Keys: ``aa_ci_low``, ``aa_ci_high``, ``aa_promoted``, ``ab_ci_low``,
``ab_ci_high``, ``ab_promoted``, ``requests_used``, ``wall_s``, with each side's full measurement and its
per-prompt ratios.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from core.settings import Settings
from evaluation.gate import GatePolicy, decide
from evaluation.heldout_traffic import HeldoutTraffic, from_builtin, from_lake
from evaluation.paired import per_prompt_ratios
from evaluation.served import CHALLENGER, CHAMPION, EvalServers, ServedEvalConfig, paired_benchmark

BASE_PORT, SPEC_PORT = 8061, 8062  # not the cycle's 8031/8032 nor bench drafters' 8051-8053


def traffic(settings: Settings, table: str | None) -> HeldoutTraffic:
    from deltalake import DeltaTable

    from core.prompts import DOMAINS
    from trainer.trace_window import Window, WindowReader, target_identity

    cycle, lake = settings.cycle, settings.lake
    uri = table or lake.traces_uri
    options = lake.delta_options()
    if lake.heldout_fraction > 0 and DeltaTable.is_deltatable(uri, storage_options=options):
        model_id, revision = target_identity(settings.serving.target_dir)  # the served target's traces
        reader = WindowReader(
            Window(
                uri,
                storage_options=options,
                heldout_fraction=lake.heldout_fraction,
                heldout="only",
                target_model_id=model_id,
                target_revision=revision,
            )
        )
        held = from_lake(reader, cycle.eval_prompts_per_domain, cycle.eval_max_tokens)
        if held.prompts:
            return held
    return from_builtin(
        settings.serving.target_dir, list(DOMAINS), cycle.eval_prompts_per_domain, cycle.eval_max_tokens
    )


def run(
    settings: Settings,
    drafter: Path,
    table: str | None = None,
    on_step=None,
    ports: tuple[int, int] = (BASE_PORT, SPEC_PORT),
    keep_servers: bool = False,
) -> dict[str, Any]:
    """A/A then A/B through evaluation servers on ``ports`` (running ones are reused); stopped at the end
    unless ``keep_servers``."""
    from trainer.eagle3_drafter import Eagle3Drafter
    from trainer.replay_eval import random_drafter_like

    started = time.monotonic()
    cycle = settings.cycle
    config = ServedEvalConfig(
        concurrency=cycle.eval_concurrency,
        min_rounds=cycle.eval_min_rounds,
        max_requests=cycle.eval_max_requests,
        warmup_requests=cycle.eval_warmup_requests,
        block_prompts=cycle.eval_block_prompts,
        confidence=cycle.eval_confidence,
        base_port=ports[0],
        spec_port=ports[1],
        serving=cycle.eval_serving,
    )
    policy = GatePolicy.from_settings(cycle)
    held = traffic(settings, table)
    servers = EvalServers.for_config(config, drafter, settings.stack, settings.serving)
    result: dict[str, Any] = {"traffic": held.source, "prompts": len(held.prompts), "strata": held.strata}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
            untrained = random_drafter_like(Eagle3Drafter.from_pretrained(drafter)).save_pretrained(
                Path(tmp) / "untrained"
            )
            used = 0
            for name, challenger, champion in (("aa", drafter, drafter), ("ab", drafter, untrained)):
                report = paired_benchmark(
                    servers, held.prompts, challenger, champion, config, policy, on_step
                )
                measured, against = report.measurement(CHALLENGER), report.measurement(CHAMPION)
                decision = decide(measured, against, policy)
                vs = measured.vs_champion
                result |= {
                    f"{name}_ci_low": vs.low,
                    f"{name}_ci_high": vs.high,
                    f"{name}_ratio": vs.point,
                    f"{name}_promoted": decision.promote,
                    f"{name}_reasons": list(decision.reasons),
                    f"{name}_challenger": measured.model_dump(),
                    f"{name}_champion": against.model_dump(),
                    f"{name}_rounds": len({r["round"] for r in report.rounds}),
                    # per prompt, challenger ÷ champion (geometric mean over rounds): what the interval is of
                    f"{name}_ratios": per_prompt_ratios(report.rates, CHALLENGER, CHAMPION),
                }
                used += report.requests_used
            if keep_servers:  # the untrained head's files go with this run: leave the drafter served
                servers.load(drafter, CHALLENGER)
    finally:
        if not keep_servers:
            servers.stop()
    return result | {"requests_used": used, "wall_s": round(time.monotonic() - started, 1)}
