"""TraceEvents with a realistic token distribution, built from real text and the target's tokenizer.

No serving traces exist yet, so events are assembled from what a serving node would see:

- prompt ids: the target's chat template (system prompt + user turn) around a window of real text of the
  prompt's domain (HumanEval code, Newton's Opticks prose, Python reference docs), with window lengths
  drawn from the real prompts' token lengths;
- output ids: a window of real text of the same domain at another position; a fraction of requests hit
  ``max_tokens`` (finish_reason ``length``), the others end with EOS (``stop``);
- per-step accept arrays for a K-token drafter, consistent with the output length (see ``accept_steps``).

Windows at random offsets rather than whole prompts keep events distinct: repeating the ~800 real prompts
verbatim would let zstd find whole-event matches inside one Parquet page and flatter bytes/token.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.prompts import DOMAINS, load_prompts

# Per-token probability that the drafter's next token is accepted, per domain: code is the most
# predictable; the numbers sit in the range EAGLE-style heads report (tau ~2.5-3.2 at K=3).
DOMAIN_ACCEPT_RATE = {"code": 0.8, "docs": 0.7, "prose": 0.6}
SENTINEL = "\x00SENTINEL\x00"


@dataclass(frozen=True)
class TokenCorpus:
    """Token streams per domain plus the chat template's head/tail ids around a user message."""

    streams: dict[str, np.ndarray]  # domain -> int32 ids of all that domain's prompt texts, concatenated
    prompt_lengths: dict[str, np.ndarray]  # domain -> token lengths of the real prompts
    template_head: list[int]
    template_tail: list[int]
    eos_id: int

    @property
    def tokens(self) -> int:
        return int(sum(len(s) for s in self.streams.values()))


def load_corpus(model_dir: Path) -> TokenCorpus:
    """Tokenize every real prompt of every domain with the target tokenizer (takes a few seconds)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    templated = tok.apply_chat_template(
        [{"role": "user", "content": SENTINEL}], add_generation_prompt=True, tokenize=False
    )
    head_text, tail_text = templated.split(SENTINEL)
    streams, lengths = {}, {}
    for domain in DOMAINS:
        ids = [tok(p.text, add_special_tokens=False)["input_ids"] for p in load_prompts(domain)]
        streams[domain] = np.fromiter((t for seq in ids for t in seq), dtype=np.int32)
        lengths[domain] = np.array([len(seq) for seq in ids], dtype=np.int32)
    return TokenCorpus(
        streams=streams,
        prompt_lengths=lengths,
        template_head=tok(head_text, add_special_tokens=False)["input_ids"],
        template_tail=tok(tail_text, add_special_tokens=False)["input_ids"],
        eos_id=int(tok.eos_token_id),
    )


def accept_steps(
    rng: np.random.Generator, output_len: int, accept_rate: float, k: int
) -> tuple[list[int], list[int]]:
    """Per-step (accepted, drafted) for a greedy K-token drafter that produced ``output_len`` tokens.

    The first output token comes from prefill (no draft); each verify step then emits its accepted drafts
    plus one target token, so ``output_len == 1 + sum(a_i + 1)`` minus what max_tokens cut off the last
    step. Accepted counts follow the leading run of Bernoulli(accept_rate) successes, capped at K.
    """
    if output_len <= 1:
        return [], []
    trials = rng.random((output_len, k)) < accept_rate  # output_len steps always suffice
    accepted = np.where(trials.all(axis=1), k, np.argmin(trials, axis=1))
    emitted = 1 + np.cumsum(accepted + 1)
    steps = int(np.searchsorted(emitted, output_len)) + 1  # the step that reaches output_len
    return accepted[:steps].tolist(), [k] * steps


def _window(rng: np.random.Generator, stream: np.ndarray, length: int) -> list[int]:
    length = max(1, min(length, len(stream) - 1))
    start = int(rng.integers(0, len(stream) - length))
    return stream[start : start + length].tolist()


def realistic_record(
    rng: np.random.Generator,
    corpus: TokenCorpus,
    finish_time_us: int,
    *,
    k: int = 3,
    max_tokens: int = 256,
    length_share: float = 0.3,
) -> dict[str, Any]:
    """One TraceEvent record (schemas/avro/trace_event) with a fresh event id."""
    domain = DOMAINS[int(rng.integers(0, len(DOMAINS)))]
    stream = corpus.streams[domain]
    lengths = corpus.prompt_lengths[domain]
    body_len = int(lengths[rng.integers(0, len(lengths))])
    prompt = corpus.template_head + _window(rng, stream, body_len) + corpus.template_tail
    if rng.random() < length_share:
        output, reason = _window(rng, stream, max_tokens), "length"
    else:
        n = int(np.clip(rng.lognormal(np.log(90), 0.7), 4, max_tokens - 1))
        output, reason = _window(rng, stream, n - 1) + [corpus.eos_id], "stop"
    accepted, drafted = accept_steps(rng, len(output), DOMAIN_ACCEPT_RATE[domain], k)
    ttft_us = int(rng.integers(5_000, 60_000))  # queueing + prefill
    latency_us = ttft_us + len(output) * 4_000 + int(rng.integers(0, 100_000))
    return {
        "schema_version": 1,
        "event_id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
        "request_id": f"chatcmpl-{rng.bytes(12).hex()}",
        "arrival_time": finish_time_us - latency_us,
        "first_token_time": finish_time_us - latency_us + ttft_us,
        "finish_time": finish_time_us,
        "serving_node": f"vllm-{int(rng.integers(0, 4))}",
        "target_model_id": "SmolLM2-135M-Instruct",
        "target_revision": "7ef915c9bf9d94d8",
        "drafter_id": "drafter-SmolLM2-135M-Instruct",
        "drafter_version": str(int(rng.integers(1, 4))),
        "spec_method": "eagle3",
        "num_spec_tokens": k,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "seed": None,
        "prompt_token_ids": prompt,
        "output_token_ids": output,
        "per_step_accepted": accepted,
        "per_step_drafted": drafted,
        "finish_reason": reason,
        "domain": domain,
        "tenant": f"tenant-{int(rng.integers(0, 8))}",
        "capture_sample_rate": 1.0,
    }
