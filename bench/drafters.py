"""`flywheel bench drafters`: served tau and speedup of several drafters on the same held-out prompts.

One run, three vLLM servers with identical flags: no speculation (the baseline), EAGLE-3 (each named drafter
dir is hot-swapped in through vLLM's draft-weight update routes) and, optionally, ngram. Every round replays
the held-out prompts of each domain through every arm, arms in rotated order; greedy, so each arm sees the
same prompts and the target produces the same text.

Per arm:
- ``tau``: docs/architecture.md's acceptance length, 1 + mean(per_step_accepted) over the verify steps vLLM
  reports. vLLM reports only steps that proposed tokens: an EAGLE-3 head proposes at every step, ngram only
  where the output repeats an earlier n-gram, so ngram's tau is over a favourable subset of its steps;
- ``tokens_per_forward``: output tokens ÷ target forwards (output tokens − accepted draft tokens), the
  figure speculation turns into speed. Equal to tau, up to the prefill, for a drafter that always proposes;
- ``speedup``: output tokens/s ÷ the baseline's in the same round (median over rounds), at concurrency 1.
"""

from __future__ import annotations

import asyncio
import statistics
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core import process
from core.prompts import DOMAINS
from core.settings import Settings
from core.tau import tau_of
from evaluation.served import EvalServers
from producers.traffic import Phase, replay

NGRAM = "ngram"
BASELINE = "baseline"


@dataclass(frozen=True, kw_only=True)
class DraftersBenchConfig:
    """Sizes of this benchmark (its CLI options), on ports of its own: the evaluation servers' pair plus
    the ngram server."""

    domains: tuple[str, ...] = DOMAINS
    requests_per_domain: int = 6
    decision_concurrency: int = 1
    rounds: int = 1
    max_tokens: int = 96
    num_spec_tokens: int = 3
    seed: int = 0
    base_port: int = 8051
    spec_port: int = 8052
    ngram_port: int = 8053
    serving: dict[str, Any] = field(default_factory=dict)


def _tau(accepted: list[int]) -> float | None:
    value = tau_of(accepted)
    return round(value, 4) if value is not None else None


def _per_forward(output_tokens: int, accepted: list[int]) -> float | None:
    forwards = output_tokens - sum(accepted)  # every forward emits its accepted drafts + one target token
    return round(output_tokens / forwards, 4) if forwards > 0 else None


def run(
    drafters: dict[str, Path],
    ngram: bool = True,
    config: DraftersBenchConfig | None = None,
    on_step: Callable[[str], None] | None = None,
    *,
    settings: Settings,
) -> dict[str, Any]:
    """Replay held-out prompts through the baseline, every EAGLE-3 drafter and ngram; tau and speedup per arm."""
    if not drafters:
        raise ValueError("give at least one EAGLE-3 drafter dir (name=DIR)")
    cfg = config or DraftersBenchConfig()
    stack, serving = settings.stack, settings.serving.model_copy(update=cfg.serving)
    first = next(iter(drafters.values()))
    servers = EvalServers(cfg.base_port, cfg.spec_port, cfg.num_spec_tokens, first, stack, serving)
    ngram_server = None
    if ngram:
        ngram_server = EvalServers.server(stack, serving, cfg.ngram_port, NGRAM, None, cfg.num_spec_tokens)
    arms = [BASELINE, *drafters, *([NGRAM] if ngram else [])]
    phases = [Phase(d, cfg.requests_per_domain) for d in cfg.domains]
    tps: dict[str, list[float]] = defaultdict(list)
    steps: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    out_tokens: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    try:
        with ThreadPoolExecutor(1) as pool:  # the ngram engine starts alongside the other two
            ngram_started = pool.submit(process.start, ngram_server, 1500) if ngram_server else None
            servers.start()
            if ngram_started is not None:
                ngram_started.result()
        for r in range(cfg.rounds):
            order = arms[r % len(arms) :] + arms[: r % len(arms)]
            for arm in order:
                if arm == BASELINE:
                    server = servers.base
                elif arm == NGRAM:
                    server = ngram_server
                else:
                    servers.load(drafters[arm], arm)
                    server = servers.spec
                report = asyncio.run(
                    replay(
                        f"http://{server.address}",
                        servers.model,
                        phases,
                        concurrency=cfg.decision_concurrency,
                        max_tokens=cfg.max_tokens,
                        subset="heldout",
                        seed=cfg.seed,
                    )
                )
                failed = [x for x in report.results if not x.ok]
                if failed:
                    raise RuntimeError(f"{arm}: {len(failed)} requests failed, first: {failed[0].error}")
                tps[arm].append(report.output_tokens_per_s)
                for x in report.results:
                    out_tokens[arm][x.domain] += x.output_tokens
                    steps[arm][x.domain].extend(x.per_step_accepted)
                if on_step is not None:
                    on_step(f"round {r + 1}/{cfg.rounds} {arm}: {report.output_tokens_per_s:.1f} tok/s")
    finally:
        servers.stop()
        if ngram_server is not None:
            process.stop(ngram_server)
    result: dict[str, Any] = {"config": asdict(cfg), "drafters": {k: str(v) for k, v in drafters.items()}}
    result["arms"] = {}
    for arm in arms:
        entry: dict[str, Any] = {
            "tokens_per_s": round(statistics.median(tps[arm]), 3),
            "speedup": round(
                statistics.median(a / b for a, b in zip(tps[arm], tps[BASELINE], strict=True)), 4
            ),
            "output_tokens": sum(out_tokens[arm].values()),
        }
        if arm != BASELINE:
            accepted = [a for d in steps[arm].values() for a in d]
            entry |= {
                "tau": _tau(accepted),
                "tokens_per_forward": _per_forward(entry["output_tokens"], accepted),
                "verify_steps": len(accepted),
                "tau_by_domain": {d: _tau(a) for d, a in steps[arm].items()},
                "tokens_per_forward_by_domain": {
                    d: _per_forward(out_tokens[arm][d], a) for d, a in steps[arm].items()
                },
            }
        result["arms"][arm] = entry
    return result
