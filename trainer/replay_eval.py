"""Offline replay tau: the acceptance length a drafter would reach on recorded traces (docs/architecture.md).

For each trace: recompute the target's greedy tokens g_t over prompt+output, run the drafter's K-step
unroll at every slot, then walk the output as vLLM's greedy chain drafting would: the first verify step
is rooted at the last prompt slot (output[0] comes from prefill); step i of the chain rooted at slot t
proposes x_{t+2+i} and is accepted iff it equals g_{t+1+i} and every earlier draft was accepted; the
step then emits accepted+1 tokens and the next root is t + accepted + 1. tau = 1 + mean(accepted).
Drafts are fed the recorded tokens, which equal the target's greedy tokens on greedy traffic (on sampled
traffic this is greedy verification along the recorded path, an approximation: ``sampled`` counts those
traces). Traces of another target than the replaying one (by revision, else by model id) are skipped and
counted in ``other_target``: the target's greedy tokens say nothing about another model's traffic.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from core.tau import tau
from trainer.eagle3_drafter import Eagle3Drafter
from trainer.target_features import TargetFeatures, TargetModel
from trainer.trace_window import TraceSequence


def chain_accepts(proposals: torch.Tensor, greedy: torch.Tensor, prompt_len: int) -> list[int]:
    """Per-step accepted counts. proposals (K, T) target ids (entry [i, t] drafts x_{t+2+i});
    greedy (T,) target argmax (g_t predicts x_{t+1})."""
    K, T = proposals.shape
    accepts, t = [], prompt_len - 1
    while t + 2 <= T - 1:
        a = 0
        while a < K and t + 2 + a <= T - 1 and int(proposals[a, t]) == int(greedy[t + 1 + a]):
            a += 1
        accepts.append(a)
        t += a + 1
    return accepts


@torch.no_grad()
def drafter_proposals(drafter: Eagle3Drafter, feats: TargetFeatures, k: int) -> torch.Tensor:
    """(K, T) greedy draft token (target ids) of unroll step i at every slot."""
    T = len(feats)
    logits = drafter(
        feats.embeds[None], feats.aux[None], torch.arange(T)[None], torch.zeros(1, T, dtype=torch.long), k
    )
    return torch.stack([drafter.draft_to_target[lg[0].argmax(-1)] for lg in logits])


@dataclass
class DomainReplay:
    traces: int = 0
    steps: int = 0
    accepted: int = 0
    recorded_steps: int = 0
    recorded_accepted: int = 0
    sampled: int = 0  # traces served at temperature > 0 (replayed with greedy verification)

    @property
    def tau(self) -> float | None:
        return tau(self.accepted, self.steps)

    @property
    def recorded_tau(self) -> float | None:
        """tau the serving drafter actually reached on these traces (from per_step_accepted)."""
        return tau(self.recorded_accepted, self.recorded_steps)


@dataclass
class ReplayReport:
    k: int
    domains: dict[str, DomainReplay] = field(default_factory=lambda: defaultdict(DomainReplay))
    per_trace: list[tuple[str, list[int], list[int]]] = field(
        default_factory=list
    )  # (event, replay, recorded)
    other_target: int = 0  # sequences skipped: recorded on another target (model id / revision)

    @property
    def overall(self) -> DomainReplay:
        total = DomainReplay()
        for d in self.domains.values():
            for f in ("traces", "steps", "accepted", "recorded_steps", "recorded_accepted", "sampled"):
                setattr(total, f, getattr(total, f) + getattr(d, f))
        return total

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow; a domain without verify steps has no tau and is left out."""
        out = {"replay_tau": self.overall.tau}
        out |= {f"replay_tau.{name}": d.tau for name, d in sorted(self.domains.items())}
        return {k: v for k, v in out.items() if v is not None}

    def as_dict(self) -> dict:
        rows = {name: d for name, d in sorted(self.domains.items())} | {"all": self.overall}
        return {
            name: {
                "traces": d.traces,
                "steps": d.steps,
                "tau": d.tau,
                "recorded_tau": d.recorded_tau,
                "sampled": d.sampled,
            }
            for name, d in rows.items()
        }


def replay_sequences(
    drafter: Eagle3Drafter, target: TargetModel, seqs: Iterable[TraceSequence], k: int, progress=None
) -> ReplayReport:
    report = ReplayReport(k)
    identity = getattr(target, "model_id", None), getattr(target, "revision", None)
    for seq in seqs:
        if not same_target(seq, *identity):
            report.other_target += 1
            continue
        if len(seq) - seq.prompt_len < 2:
            continue
        feats = target.features(torch.from_numpy(seq.tokens), drafter.draft_to_target)
        accepts = chain_accepts(drafter_proposals(drafter, feats, k), feats.argmax, seq.prompt_len)
        d = report.domains[seq.domain or "unknown"]
        d.traces += 1
        d.steps += len(accepts)
        d.accepted += sum(accepts)
        d.sampled += bool(seq.temperature)
        if seq.per_step_accepted:
            d.recorded_steps += len(seq.per_step_accepted)
            d.recorded_accepted += sum(seq.per_step_accepted)
        report.per_trace.append((seq.event_id, accepts, seq.per_step_accepted))
        if progress is not None:
            progress()
    return report


def same_target(seq: TraceSequence, model_id: str | None, revision: str | None) -> bool:
    """Whether ``seq`` was served by the target (model_id, revision): revisions decide when both are known
    (a content hash), else model ids when both are known; unknown identities never exclude a trace."""
    known = lambda v: v not in (None, "unknown")  # noqa: E731  (capture writes 'unknown' without a manifest)
    if known(seq.target_revision) and known(revision):
        return seq.target_revision == revision
    if seq.target_model_id is not None and model_id is not None:
        return seq.target_model_id == model_id
    return True


def random_drafter_like(drafter: Eagle3Drafter, seed: int = 0) -> Eagle3Drafter:
    """An untrained head with the same config and vocabulary (the baseline a trained drafter must beat)."""
    torch.manual_seed(seed)
    rnd = Eagle3Drafter(drafter.config)
    rnd.d2t.copy_(drafter.d2t)
    return rnd.eval()
