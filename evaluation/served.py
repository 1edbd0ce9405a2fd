"""Served evaluation: challenger, champion and no speculation on the same held-out prompts, paired.

Two vLLM servers with the same flags but for speculation run side by side: one without speculation (the
baseline), one with an EAGLE-3 drafter that is hot-swapped between champion and challenger through vLLM's
draft-weight update routes. In every round every held-out prompt is served by every arm, at the decision
concurrency; the arm order follows a Latin square (each arm takes each position equally often). Nothing is timed
on an engine until it has served every prompt once (a fresh engine runs its first requests slower), and
every arm's turn starts with warm-up requests that are not measured. Speedup is the per-prompt paired ratio of
tokens/s (evaluation/paired.py) with a 95 % interval; rounds continue until the gate's question is decided
(the deciding interval lies on one side of its threshold) or the request budget is spent. tau comes from
the per-request spec-decode metrics of the responses.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from core import process
from core.settings import ServingSettings, StackSettings
from core.tau import pooled_tau, tau_of
from evaluation.gate import ArmMeasurement, GatePolicy, RatioInterval
from evaluation.heldout_traffic import HeldoutPrompt, PromptResult, replay_prompts
from evaluation.paired import latin_square, per_prompt_ratios, ratio_interval
from producers.hot_swap import swap_server
from producers.vllm_server import VllmServer, cpu_environment, serve_args

BASELINE, CHAMPION, CHALLENGER = "baseline", "champion", "challenger"


@dataclass(frozen=True, kw_only=True)
class ServedEvalConfig:
    """Sizes of one served evaluation; a flywheel cycle builds it from CycleSettings (``eval_*``), which
    hold the defaults."""

    concurrency: int  # the decision concurrency: every measured request runs at it
    min_rounds: int
    max_requests: int  # measured requests over all arms and rounds (warm-ups not counted)
    warmup_requests: int  # before every arm's turn in every block (after a swap, after idling), not measured
    # prompts per block: every arm serves a block's prompts back to back, so a slow or fast spell of the
    # machine hits both sides of a prompt's pair and no other prompt (1: the per-prompt interval holds it)
    block_prompts: int
    confidence: float
    base_port: int
    spec_port: int
    num_spec_tokens: int = 3
    # ServingSettings fields for both servers (e.g. enforce_eager, kv_cache_space_gib); the rest come from
    # the settings of the process that starts them
    serving: dict[str, Any] = field(default_factory=dict)


class Evaluation(BaseModel):
    """The evaluate step's output (one XCom value in the DAG; ``evaluation.json`` in its MLflow run)."""

    model_config = ConfigDict(frozen=True)

    version: str
    champion_version: str | None
    window_key: str
    traffic: str  # "lake": the window's held-out traces; "builtin": the fallback prompt sets
    domains: list[str]  # strata measured (domain labels, or tenant:<t>)
    rounds: int
    requests_used: int
    metrics: dict[str, float]
    challenger: ArmMeasurement
    champion: ArmMeasurement | None = None
    eval_run_id: str | None = None


@dataclass
class PairedReport:
    """Per arm and prompt, one tokens/s per round; per arm and stratum, the verify steps."""

    arms: list[str]
    confidence: float
    rates: dict[str, dict[str, list[float]]] = field(default_factory=lambda: defaultdict(dict))
    steps: dict[str, dict[str, list[int]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    rounds: list[dict[str, Any]] = field(default_factory=list)
    requests_used: int = 0

    def ratio(self, arm: str, reference: str) -> RatioInterval:
        interval = ratio_interval(per_prompt_ratios(self.rates, arm, reference), self.confidence)
        if interval is None:
            raise ValueError(f"no prompt was measured by both {arm} and {reference}")
        return RatioInterval(point=interval.point, low=interval.low, high=interval.high, n=interval.n)

    def measurement(self, arm: str) -> ArmMeasurement:
        vs_champion = self.ratio(arm, CHAMPION) if arm == CHALLENGER and CHAMPION in self.arms else None
        return ArmMeasurement(
            speedup=self.ratio(arm, BASELINE),
            tau=pooled_tau(self.steps[arm].values()),
            tau_by_domain={s: tau_of(v) for s, v in self.steps[arm].items()},
            samples=len(per_prompt_ratios(self.rates, arm, BASELINE)),
            vs_champion=vs_champion,
        )

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow (an arm or stratum without verify steps has no tau and is left out)."""
        out: dict[str, float | None] = {"rounds": len({r["round"] for r in self.rounds})}
        out["requests_used"] = self.requests_used
        for arm in self.arms:
            if arm == BASELINE:
                continue
            m = self.measurement(arm)
            out |= {f"speedup_{arm}": m.speedup.point, f"speedup_{arm}_low": m.speedup.low}
            out |= {f"speedup_{arm}_high": m.speedup.high, f"tau_{arm}": m.tau}
            out |= {f"tau_{arm}_{d}": t for d, t in m.tau_by_domain.items()}
            if m.vs_champion is not None:
                out |= {"vs_champion": m.vs_champion.point, "vs_champion_low": m.vs_champion.low}
                out |= {"vs_champion_high": m.vs_champion.high}
        for arm in self.arms:
            rates = [r for per_prompt in self.rates[arm].values() for r in per_prompt]
            out[f"tokens_per_s_{arm}"] = sum(rates) / len(rates) if rates else None
        return {k: float(v) for k, v in out.items() if v is not None}

    def record(self, round_: int, arm: str, results: list[PromptResult]) -> None:
        for r in results:
            self.rates[arm].setdefault(r.key, []).append(r.tokens_per_s)
            self.steps[arm][r.stratum].extend(r.per_step_accepted)
        self.requests_used += len(results)
        rates = [r.tokens_per_s for r in results]
        self.rounds.append({"round": round_, "arm": arm, "mean_tokens_per_s": sum(rates) / len(rates)})


class EvalServers:
    """The baseline and the speculative evaluation servers (started once, reused across evaluations)."""

    def __init__(
        self,
        base_port: int,
        spec_port: int,
        num_spec_tokens: int,
        first_drafter: Path,
        stack: StackSettings,
        serving: ServingSettings,
    ):
        self.state = stack.root / "eval-servers"
        self.model = serving.target_model
        self.base = self.server(stack, serving, base_port, "none", None, num_spec_tokens)
        self.spec = self.server(stack, serving, spec_port, "eagle3", first_drafter, num_spec_tokens)
        self.loaded: tuple[str, Path] | None = None  # (label, drafter dir) the speculative server serves
        self.warmed: set[str] = (
            set()
        )  # servers that served a full warm-up pass since this object started them

    @classmethod
    def for_config(
        cls, config: ServedEvalConfig, first_drafter: Path, stack: StackSettings, serving: ServingSettings
    ) -> EvalServers:
        serving = serving.model_copy(update=config.serving)
        return cls(config.base_port, config.spec_port, config.num_spec_tokens, first_drafter, stack, serving)

    @staticmethod
    def server(
        stack: StackSettings, serving: ServingSettings, port: int, method: str, drafter: Path | None, k: int
    ) -> VllmServer:
        """One evaluation server: capture and promotion-following off, weight-update routes on; its state
        (PID file, log, spill) under ``<state dir>/eval-servers/<port>``. Every server gets the same
        flags from ``serving`` and runs without a prefix cache; only the speculative ones add the
        speculative config."""
        state = stack.root / "eval-servers"
        serving = serving.model_copy(update={"port": port, "spill_dir": state / f"spill-{port}"})
        env = cpu_environment(serving) | {
            "VLLM_SERVER_DEV_MODE": "1",  # the weight-update routes used to swap drafters
            "FLYWHEEL_SERVING_CAPTURE_ENABLED": "false",  # evaluation traffic is not production traffic
            "FLYWHEEL_SERVING_FOLLOW_PROMOTIONS": "false",
        }
        # no prefix cache: otherwise the second arm on the speculative server would find the prompts the
        # first arm just served already cached (an A/A run measured the second arm 3 % faster)
        args = serve_args(serving, method, drafter, k, ["--no-enable-prefix-caching"])
        server = VllmServer(stack.model_copy(update={"state_dir": state / str(port)}), serving, args, env)
        server.name = f"vllm-eval-{port}"
        return server

    def start(self) -> None:
        """Start both (or reuse running ones) concurrently and wait until both are healthy."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(process.start, s, 1500) for s in (self.base, self.spec)]:
                done.result()

    def stop(self) -> None:
        for server in (self.base, self.spec):
            process.stop(server)
        self.loaded = None
        self.warmed = set()

    def warm_up(self, prompts: list[HeldoutPrompt], concurrency: int) -> int:
        """Every prompt once, unmeasured, on each server that has not had a full pass yet; the number of
        requests served. A fresh engine runs its first requests several percent slower (an A/A run
        whose first timed turn fell on a just-started engine measured 0.965 [0.943, 0.988] at 99 %)."""
        served = 0
        for server in (self.base, self.spec):
            if server.name in self.warmed:
                continue
            replay_prompts(f"http://{server.address}", self.model, prompts, concurrency=concurrency)
            self.warmed.add(server.name)
            served += len(prompts)
        return served

    def load(self, drafter: Path, label: str) -> bool:
        """Swap the speculative server's drafter (vLLM draft-weight update API over HTTP); True if it did."""
        if self.loaded == (label, drafter):
            return False
        swap_server(f"http://{self.spec.address}", drafter, label)
        self.loaded = (label, drafter)
        return True


@dataclass(frozen=True)
class Block:
    """One block of a round: the prompts (indices) every arm serves, in ``order``, each turn after the
    ``warmup`` prompts (unmeasured)."""

    round: int
    measured: tuple[int, ...]
    warmup: tuple[int, ...]
    order: tuple[str, ...]


def block_schedule(n_prompts: int, arms: list[str], rounds: int, block: int, warmup: int) -> list[Block]:
    """Every round goes through the prompts in blocks of ``block``; the arm order of consecutive blocks
    follows a Williams design (evaluation/paired.py), so over the blocks every arm runs in every position
    and after every other arm equally often. The warm-up prompts are the ones after the block (another
    prompt's tokens, nothing of the measured one cached)."""
    block = max(1, block)
    starts = range(0, n_prompts, block)
    orders = iter(latin_square(arms, rounds * len(starts)))
    return [
        Block(
            r,
            tuple(range(s, min(s + block, n_prompts))),
            tuple((s + block + i) % n_prompts for i in range(warmup)),
            tuple(next(orders)),
        )
        for r in range(rounds)
        for s in starts
    ]


def paired_benchmark(
    servers: EvalServers,
    prompts: list[HeldoutPrompt],
    challenger: Path,
    champion: Path | None,
    config: ServedEvalConfig,
    policy: GatePolicy,
    on_step: Callable[[str], None] | None = None,
) -> PairedReport:
    """Rounds of every arm over every prompt until ``policy`` can decide, or the request budget is spent.

    A round goes through the prompts in blocks of ``config.block_prompts``; within a block every arm
    serves the block's prompts in turn (the order balanced across blocks), each turn after unmeasured
    warm-up requests. A prompt's pair is thus measured minutes or seconds apart, never a whole round apart:
    a turn that ran in a slow spell of a shared machine moves one prompt's ratio, which the per-prompt
    interval accounts for, instead of every prompt's ratio alike, which it cannot (an A/A run with one
    turn per arm per round measured 1.040 [1.027, 1.054] at 99 % on a busy machine).
    """
    if not prompts:
        raise ValueError("no held-out prompt to measure on")
    # no speculation between the two drafters: with the order reversed every other round, challenger and
    # champion then swap first and last places each pair of rounds and never follow each other on the
    # speculative server (an A/A run whose challenger always ran second measured it 5 % slower than itself)
    arms = [CHALLENGER, BASELINE] + ([CHAMPION] if champion is not None else [])
    drafters = {CHALLENGER: challenger, CHAMPION: champion}
    report = PairedReport(arms, config.confidence)
    per_round = len(prompts) * len(arms)
    max_rounds = max(config.min_rounds, config.max_requests // per_round)
    servers.start()
    if (warmed := servers.warm_up(prompts, config.concurrency)) and on_step is not None:
        on_step(f"warm-up: {warmed} unmeasured requests on fresh engines")
    schedule = block_schedule(len(prompts), arms, max_rounds, config.block_prompts, config.warmup_requests)
    for r, blocks in itertools.groupby(schedule, key=lambda block: block.round):
        for block in blocks:
            measured, warmup = [prompts[i] for i in block.measured], [prompts[i] for i in block.warmup]
            for arm in block.order:
                server = servers.base if arm == BASELINE else servers.spec
                if arm != BASELINE:
                    servers.load(drafters[arm], arm)
                # every arm, every block: after a swap, and after its server sat idle while the other one
                # ran, caches and threads settle before anything is timed (an A/A run without this measured
                # the arm that followed the idle spell 3 % slower)
                replay_prompts(f"http://{server.address}", servers.model, warmup)
                results = replay_prompts(
                    f"http://{server.address}", servers.model, measured, concurrency=config.concurrency
                )
                failed = [x for x in results if not x.ok]
                if failed:
                    raise RuntimeError(f"{arm}: {len(failed)} requests failed, e.g. {failed[0].error}")
                report.record(r, arm, results)
        if on_step is not None:
            done = [t for t in report.rounds if t["round"] == r]
            rates = {a: [t["mean_tokens_per_s"] for t in done if t["arm"] == a] for a in arms}
            on_step(
                f"round {r + 1}: " + ", ".join(f"{a} {sum(v) / len(v):.1f} tok/s" for a, v in rates.items())
            )
        if r + 1 < config.min_rounds:
            continue
        vs_champion = report.ratio(CHALLENGER, CHAMPION) if champion is not None else None
        if policy.decisive(report.ratio(CHALLENGER, BASELINE), vs_champion):
            break
        if report.requests_used + per_round > config.max_requests:
            break
    return report
