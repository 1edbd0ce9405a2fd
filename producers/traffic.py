"""Replay real prompts through an OpenAI-compatible endpoint on a schedule, e.g. ``code:300,prose:300``.

Each request carries its domain (and an optional tenant) as ``vllm_xargs``, which the capture plugin turns
into trace labels. Responses include vLLM's per-request spec-decode metrics, so the replayer reports the
acceptance length tau per domain as it goes (tau = 1 + mean accepted draft tokens per verify step).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from core.prompts import Prompt, load_prompts, split
from core.tau import tau_of


@dataclass(frozen=True)
class Phase:
    domain: str
    requests: int


def parse_schedule(schedule: str) -> list[Phase]:
    """``"code:300,prose:300"`` -> phases in order. Raises ValueError with the expected form."""
    phases = []
    for part in filter(None, (p.strip() for p in schedule.split(","))):
        domain, sep, count = part.partition(":")
        if not sep or not count.isdigit() or int(count) <= 0:
            raise ValueError(f"bad schedule part {part!r}: expected DOMAIN:COUNT, e.g. code:300,prose:300")
        load_prompts(domain)  # unknown domains raise with the valid names
        phases.append(Phase(domain, int(count)))
    if not phases:
        raise ValueError("empty schedule")
    return phases


def prompt_stream(domain: str, subset: str, seed: int) -> Iterator[Prompt]:
    """Endless deterministic stream of a domain's prompts: shuffled, cycled. subset: all | train | heldout."""
    prompts = load_prompts(domain)
    if subset != "all":
        train, held = split(prompts)
        prompts = tuple(train if subset == "train" else held)
    order = list(prompts)
    rng = random.Random(f"{seed}-{domain}")
    while True:
        rng.shuffle(order)
        yield from order


@dataclass
class RequestResult:
    domain: str
    prompt_id: str
    ok: bool
    latency_s: float
    output_tokens: int = 0
    per_step_accepted: list[int] = field(default_factory=list)
    error: str | None = None


@dataclass
class TrafficReport:
    results: list[RequestResult]
    wall_s: float

    def by_domain(self) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {}
        for domain in dict.fromkeys(r.domain for r in self.results):
            rs = [r for r in self.results if r.domain == domain]
            steps = [a for r in rs for a in r.per_step_accepted]
            out[domain] = {
                "requests": len(rs),
                "failed": sum(not r.ok for r in rs),
                "output_tokens": sum(r.output_tokens for r in rs),
                "tau": tau_of(steps),
            }
        return out

    @property
    def output_tokens_per_s(self) -> float:
        return sum(r.output_tokens for r in self.results) / self.wall_s if self.wall_s else 0.0


def spec_steps(body: dict[str, Any]) -> list[int]:
    """per_step_accepted from a vLLM response's ``metrics.speculative_decoding`` (empty if absent)."""
    spec = (body.get("metrics") or {}).get("speculative_decoding") or {}
    return list(spec.get("per_step_accepted") or [])


async def _one(
    client: httpx.AsyncClient,
    model: str,
    prompt: Prompt,
    max_tokens: int,
    temperature: float,
    tenant: str | None,
    extra: dict[str, Any],
) -> RequestResult:
    xargs = {"domain": prompt.domain, **({"tenant": tenant} if tenant else {}), **extra}
    payload = {
        "model": model,
        "messages": prompt.messages(),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "vllm_xargs": xargs,
    }
    started = time.perf_counter()
    try:
        resp = await client.post("/v1/chat/completions", json=payload)
        resp.raise_for_status()
        body = resp.json()
    except (httpx.HTTPError, ValueError) as e:
        return RequestResult(
            prompt.domain, prompt.prompt_id, False, time.perf_counter() - started, error=str(e)
        )
    return RequestResult(
        prompt.domain,
        prompt.prompt_id,
        True,
        time.perf_counter() - started,
        output_tokens=body.get("usage", {}).get("completion_tokens", 0),
        per_step_accepted=spec_steps(body),
    )


async def replay(
    base_url: str,
    model: str,
    phases: list[Phase],
    *,
    concurrency: int = 4,
    max_tokens: int = 128,
    temperature: float = 0.0,
    tenant: str | None = None,
    subset: str = "all",
    seed: int = 0,
    extra_xargs: dict[str, Any] | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
    timeout_s: float = 600.0,
) -> TrafficReport:
    """Send every phase's requests in order (phase after phase), ``concurrency`` at a time."""
    streams = {p.domain: prompt_stream(p.domain, subset, seed) for p in phases}
    queue = [next(streams[p.domain]) for p in phases for _ in range(p.requests)]
    results: list[RequestResult] = []
    sem = asyncio.Semaphore(concurrency)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s) as client:

        async def run(prompt: Prompt) -> None:
            async with sem:
                result = await _one(client, model, prompt, max_tokens, temperature, tenant, extra_xargs or {})
            results.append(result)
            if on_result is not None:
                on_result(result)

        await asyncio.gather(*(run(p) for p in queue))
    return TrafficReport(results, time.perf_counter() - started)
