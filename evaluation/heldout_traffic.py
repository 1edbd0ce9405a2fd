"""The traffic a drafter is judged on: held-out prompts of the deployment's own window, replayed as served.

The held-out split (core/heldout.py) keeps a share of prompts out of every training window. The served
evaluation replays those prompts of the window it judges: their token ids go to vLLM's completions API
as a token-id prompt, with the sampling parameters the trace recorded and its output length as the cap,
stratified by domain label (by tenant where a trace has no domain). Only when the window holds no
held-out trace does it fall back to the held-out split of the built-in prompt sets, and says so.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

import httpx

from core.heldout import prompt_digest
from core.prompts import load_prompts, split
from producers.traffic import spec_steps


@dataclass(frozen=True)
class HeldoutPrompt:
    key: str  # prompt digest prefix: pairs the same prompt across arms and rounds
    stratum: str  # domain label, else "tenant:<t>", else "unlabelled"
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None


@dataclass
class HeldoutTraffic:
    prompts: list[HeldoutPrompt]
    source: str  # "lake" | "builtin"
    strata: dict[str, int] = field(default_factory=dict)  # held-out traces per stratum in the window


def stratum_of(domain: str | None, tenant: str | None) -> str:
    return domain or (f"tenant:{tenant}" if tenant else "unlabelled")


def select(
    rows: list[dict], per_stratum: int, max_tokens_cap: int
) -> tuple[list[HeldoutPrompt], dict[str, int]]:
    """Distinct prompts, ``per_stratum`` of each stratum in a fixed pseudo-random order (by digest),
    interleaved by stratum. Pure: rows hold the trace columns the evaluation replays."""
    by_stratum: dict[str, dict[str, HeldoutPrompt]] = defaultdict(dict)
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        ids = tuple(row["prompt_token_ids"])
        stratum = stratum_of(row.get("domain"), row.get("tenant"))
        counts[stratum] += 1
        key = prompt_digest(ids).hex()[:16]
        by_stratum[stratum].setdefault(
            key,
            HeldoutPrompt(
                key=key,
                stratum=stratum,
                prompt_token_ids=ids,
                max_tokens=max(1, min(max_tokens_cap, len(row["output_token_ids"]))),
                temperature=float(row.get("temperature") or 0.0),
                top_p=float(row.get("top_p") or 1.0),
                top_k=int(row["top_k"]) if row.get("top_k") is not None else -1,
                seed=row.get("seed"),
            ),
        )
    columns = [[p for _, p in sorted(by_stratum[s].items())][:per_stratum] for s in sorted(by_stratum)]
    interleaved = [p for row in zip_longest(*columns) for p in row if p is not None]
    return interleaved, dict(counts)


REPLAY_COLUMNS = [
    "prompt_token_ids",
    "output_token_ids",
    "domain",
    "tenant",
    "temperature",
    "top_p",
    "top_k",
    "seed",
]


def from_lake(reader, per_stratum: int, max_tokens_cap: int) -> HeldoutTraffic:
    """Held-out prompts of a window (a ``trainer.trace_window.WindowReader`` with ``heldout='only'``, narrowed
    to the served target's traces by its ``target_model_id``/``target_revision``, and opened with the lake's
    ``storage_options``)."""
    rows = [r for b in reader.batches(REPLAY_COLUMNS, batch_size=1024) for r in b.to_pylist()]
    prompts, counts = select(rows, per_stratum, max_tokens_cap)
    return HeldoutTraffic(prompts, "lake", counts)


def from_builtin(target_dir: Path, domains: list[str], per_stratum: int, max_tokens: int) -> HeldoutTraffic:
    """Fallback: the held-out split of the built-in prompt sets, rendered with the target's chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    rows = []
    for domain in domains:
        _, held = split(load_prompts(domain))
        for prompt in held:
            text = tokenizer.apply_chat_template(
                prompt.messages(), add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append({"prompt_token_ids": ids, "output_token_ids": [0] * max_tokens, "domain": domain})
    prompts, counts = select(rows, per_stratum, max_tokens)
    return HeldoutTraffic(prompts, "builtin", counts)


@dataclass(frozen=True)
class PromptResult:
    key: str
    stratum: str
    ok: bool
    latency_s: float
    output_tokens: int = 0
    per_step_accepted: tuple[int, ...] = ()
    error: str | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.latency_s if self.ok and self.latency_s > 0 else 0.0


async def _one(client: httpx.AsyncClient, model: str, p: HeldoutPrompt) -> PromptResult:
    payload = {
        "model": model,
        "prompt": list(p.prompt_token_ids),
        "max_tokens": p.max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "top_k": p.top_k,
        "seed": p.seed,
        "vllm_xargs": {"flywheel_opt_out": 1},  # evaluation traffic is not production traffic
    }
    started = time.perf_counter()
    try:
        resp = await client.post("/v1/completions", json=payload)
        resp.raise_for_status()
        body = resp.json()
    except (httpx.HTTPError, ValueError) as e:
        return PromptResult(p.key, p.stratum, False, time.perf_counter() - started, error=str(e))
    return PromptResult(
        p.key,
        p.stratum,
        True,
        time.perf_counter() - started,
        output_tokens=body.get("usage", {}).get("completion_tokens", 0),
        per_step_accepted=tuple(spec_steps(body)),
    )


def replay_prompts(
    base_url: str,
    model: str,
    prompts: list[HeldoutPrompt],
    concurrency: int = 1,
    on_result: Callable[[PromptResult], None] | None = None,
    timeout_s: float = 600.0,
) -> list[PromptResult]:
    """Serve every prompt once, ``concurrency`` at a time; results in prompt order."""

    async def run_all() -> list[PromptResult]:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s) as client:

            async def run(p: HeldoutPrompt) -> PromptResult:
                async with sem:
                    result = await _one(client, model, p)
                if on_result is not None:
                    on_result(result)
                return result

            return list(await asyncio.gather(*(run(p) for p in prompts)))

    return asyncio.run(run_all())
