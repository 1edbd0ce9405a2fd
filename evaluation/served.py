"""Served benchmark: measured speedup of champion and challenger over no speculation, in one run.

Two vLLM servers with identical flags run side by side: one without speculation (the baseline), one with
an EAGLE-3 drafter that is hot-swapped between champion and challenger through vLLM's draft-weight update
routes. For each concurrency level and round, the arms are replayed in rotated order on the same held-out
prompts; speedup = arm output tokens/s / baseline tokens/s of the same round (median over rounds). tau and
per-domain tau come from the per-request spec-decode metrics of the responses.
"""

from __future__ import annotations

import asyncio
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from core import process
from core.settings import ServingSettings, StackSettings
from core.tau import pooled_tau, tau_of
from evaluation.gate import ArmMeasurement
from producers.hot_swap import swap_server
from producers.traffic import Phase, replay
from producers.vllm_server import VllmServer, cpu_environment, serve_args

BASELINE, CHAMPION, CHALLENGER = "baseline", "champion", "challenger"


@dataclass(frozen=True, kw_only=True)
class ServedEvalConfig:
    """Sizes of one served evaluation; a flywheel cycle builds it from CycleSettings (``eval_*``), which
    hold the defaults."""

    domains: tuple[str, ...]
    requests_per_domain: int  # per arm, round and concurrency level
    concurrencies: tuple[int, ...]
    decision_concurrency: int
    rounds: int
    max_tokens: int
    base_port: int
    spec_port: int
    num_spec_tokens: int = 3
    seed: int = 0
    # ServingSettings fields for both servers (e.g. enforce_eager, kv_cache_space_gib); the rest come from
    # the environment of the process that starts them
    serving: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServedEvalReport:
    config: ServedEvalConfig
    speedup: dict[str, dict[int, float]]  # arm -> concurrency -> median speedup
    tokens_per_s: dict[str, dict[int, float]]
    tau: dict[str, float | None]
    tau_by_domain: dict[str, dict[str, float | None]]
    samples: dict[str, int]
    rounds: list[dict] = field(default_factory=list)

    def measurement(self, arm: str) -> ArmMeasurement:
        c = self.config.decision_concurrency
        return ArmMeasurement(
            speedup=self.speedup[arm][c],
            tau=self.tau[arm],
            tau_by_domain=self.tau_by_domain[arm],
            samples=self.samples[arm],
        )

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow."""
        out: dict[str, float] = {}
        for arm, by_c in self.speedup.items():
            for c, v in by_c.items():
                out[f"speedup_c{c}_{arm}"] = v
                out[f"tokens_per_s_c{c}_{arm}"] = self.tokens_per_s[arm][c]
        for arm, tau in self.tau.items():
            out[f"tau_{arm}"] = tau
            out |= {f"tau_{arm}_{d}": t for d, t in self.tau_by_domain[arm].items()}
        return {k: v for k, v in out.items() if v is not None}  # no verify step: no tau to log


class Evaluation(BaseModel):
    """The evaluate step's output (one XCom value in the DAG; ``evaluation.json`` in its MLflow run)."""

    model_config = ConfigDict(frozen=True)

    version: str
    champion_version: str | None
    window_key: str
    domains: list[str]
    metrics: dict[str, float]
    challenger: ArmMeasurement
    champion: ArmMeasurement | None = None
    eval_run_id: str | None = None


class EvalServers:
    """The baseline and the speculative evaluation servers (started once, reused across evaluations)."""

    def __init__(
        self, config: ServedEvalConfig, first_drafter: Path, stack: StackSettings, serving: ServingSettings
    ):
        self.config = config
        self.state = stack.root / "eval-servers"
        self.model = serving.target_model
        k = config.num_spec_tokens
        serving = serving.model_copy(update=config.serving)
        self.base = self.server(stack, serving, config.base_port, "none", None, k)
        self.spec = self.server(stack, serving, config.spec_port, "eagle3", first_drafter, k)
        self.loaded: str | None = None

    @staticmethod
    def server(
        stack: StackSettings, serving: ServingSettings, port: int, method: str, drafter: Path | None, k: int
    ) -> VllmServer:
        """One evaluation server: capture and promotion-following off, weight-update routes on; its state
        (PID file, log, spill) under ``<state dir>/eval-servers/<port>``."""
        state = stack.root / "eval-servers"
        serving = serving.model_copy(update={"port": port, "spill_dir": state / f"spill-{port}"})
        env = cpu_environment(serving) | {
            "VLLM_SERVER_DEV_MODE": "1",  # the weight-update routes used to swap drafters
            "FLYWHEEL_SERVING_CAPTURE_ENABLED": "false",  # evaluation traffic is not production traffic
            "FLYWHEEL_SERVING_FOLLOW_PROMOTIONS": "false",
        }
        server = VllmServer(
            stack.model_copy(update={"state_dir": state / str(port)}),
            serving,
            serve_args(serving, method, drafter, k),
            env,
        )
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

    def load(self, drafter: Path, label: str) -> None:
        """Swap the speculative server's drafter (vLLM draft-weight update API over HTTP)."""
        if self.loaded == label:
            return
        swap_server(f"http://{self.spec.address}", drafter, label)
        self.loaded = label


def served_benchmark(
    servers: EvalServers,
    challenger: Path,
    champion: Path | None,
    config: ServedEvalConfig,
    on_step: Callable[[str], None] | None = None,
) -> ServedEvalReport:
    arms = [BASELINE, CHALLENGER] + ([CHAMPION] if champion is not None else [])
    drafters = {CHALLENGER: challenger, CHAMPION: champion}
    phases = [Phase(d, config.requests_per_domain) for d in config.domains]
    tps: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    steps: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    samples: dict[str, int] = defaultdict(int)
    rounds = []
    servers.start()
    for c in config.concurrencies:
        for r in range(config.rounds):
            order = arms[r % len(arms) :] + arms[: r % len(arms)]
            for arm in order:
                if arm != BASELINE:
                    servers.load(drafters[arm], arm)
                server = servers.base if arm == BASELINE else servers.spec
                report = asyncio.run(
                    replay(
                        f"http://{server.address}",
                        servers.model,
                        phases,
                        concurrency=c,
                        max_tokens=config.max_tokens,
                        subset="heldout",
                        seed=config.seed + r,
                    )
                )
                if any(not x.ok for x in report.results):
                    raise RuntimeError(f"{arm}: {sum(not x.ok for x in report.results)} requests failed")
                tps[arm][c].append(report.output_tokens_per_s)
                samples[arm] += len(report.results)
                for x in report.results:
                    steps[arm][x.domain].extend(x.per_step_accepted)
                rounds.append(
                    {"concurrency": c, "round": r, "arm": arm, "tokens_per_s": report.output_tokens_per_s}
                )
                if on_step is not None:
                    on_step(
                        f"c={c} round {r + 1}/{config.rounds} {arm}: {report.output_tokens_per_s:.1f} tok/s"
                    )
    speedup = {
        arm: {
            c: statistics.median(a / b for a, b in zip(tps[arm][c], tps[BASELINE][c], strict=True))
            for c in config.concurrencies
        }
        for arm in arms
    }
    tau = {arm: pooled_tau(steps[arm].values()) for arm in arms if arm != BASELINE}
    tau_by_domain = {arm: {d: tau_of(s) for d, s in steps[arm].items()} for arm in arms if arm != BASELINE}
    return ServedEvalReport(
        config,
        speedup,
        {arm: {c: statistics.median(v) for c, v in by_c.items()} for arm, by_c in tps.items()},
        tau,
        tau_by_domain,
        dict(samples),
        rounds,
    )
