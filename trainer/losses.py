"""Drafter losses: pure functions ``(draft_logits, target, mask) -> per-(step, position) tensor``.

Shapes: S = TTT unroll steps, N = positions (slots), Vd = draft vocabulary.
- ``draft_logits`` (S, N, Vd): step i at slot t predicts token t+2+i.
- ``target``: (S, N, Vd) target log-probs for the same tokens, normalised over the FULL target
  vocabulary and gathered at the draft ids (``forward_kl``, ``expected_acceptance``), or (S, N) target ids
  of the serving drafter's rejected proposals mapped into draft ids (``discard``).
- ``mask`` (S, N) bool: where the term is defined.
Every loss returns (S, N) float32, zero where ``mask`` is False; a mixer weighs steps and positions.

Pruned draft vocabulary D: p is never renormalised over D. The drafter can only propose tokens in D
(vLLM maps draft ids through d2t), so target mass m = sum_{v in D} p_v is all it can ever match:
- forward KL is taken to p/m, the target renormalised over D, and weighted by m: m KL(p/m || q) =
  sum_{v in D} p_v log(p_v / q_v) - m log m, minimised at q = p/m; a position whose target mass is mostly
  outside D counts little (Aurora instead renormalises and masks positions whose argmax is outside D);
- acceptance alpha = sum_{v in D} min(p_v, q_v) is exact: q_v = 0 outside D.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def forward_kl(draft_logits: torch.Tensor, target_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """m * KL(p/m || q): forward KL to the target over the draft vocabulary (Aurora's / EAGLE-3's
    distillation loss), m = target mass inside it. Equals sum_D p log(p/q) - m log m: the constant shift
    keeps the value >= 0 (0 at q = p/m) without changing the gradient."""
    logq = draft_logits.float().log_softmax(-1)  # (S, N, Vd)
    logp = target_logp.float()
    p = logp.exp()
    m = p.sum(-1)  # (S, N) reachable mass, 1 without pruning
    kl = (p * (logp - logq)).sum(-1) - m * m.clamp(min=1e-30).log()  # (S, N)
    return torch.where(mask, kl, torch.zeros_like(kl))


def acceptance_probability(draft_logits: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """alpha = sum_v min(p_v, q_v): chance that a token sampled from q survives verification against p."""
    q = draft_logits.float().softmax(-1)
    return torch.minimum(q, target_logp.float().exp()).sum(-1)  # (S, N)


def expected_acceptance(
    draft_logits: torch.Tensor, target_logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Negative expected accepted length, split by step: entry k = -prod_{i<=k} alpha_i.

    Summed over k this is -E[accepted drafts] = -sum_k prod_{i<=k} alpha_i for a chain rooted at the slot
    (TTT feeds the true tokens, i.e. conditions step i on the earlier drafts being accepted). A masked
    step ends the chain: alpha = 0 there and after.
    """
    alpha = torch.where(mask, acceptance_probability(draft_logits, target_logp), 0.0)
    return -torch.cumprod(alpha, dim=0)  # (S, N)


def discard(draft_logits: torch.Tensor, rejected: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-log(1 - q(r)) for the token r the serving drafter proposed where the target rejected it.

    Pushes the draft probability of known-wrong proposals down (Aurora's "discard" signal, here from
    proposals regenerated from the serving drafter version instead of streamed from the server).
    """
    logits = draft_logits.float()
    r = rejected.clamp(min=0).unsqueeze(-1)  # (S, N, 1)
    lse = logits.logsumexp(-1)  # (S, N)
    others = logits.scatter(-1, r, float("-inf")).logsumexp(-1)  # log sum_{v != r} e^z
    loss = lse - others  # = -log(1 - q_r), stable as q_r -> 1
    return torch.where(mask & (rejected >= 0), loss, torch.zeros_like(loss))


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    target: str  # which UnrollBatch field is the loss's ``target``: "target_logp" | "rejected"
    mask: str  # which mask: "mask" | "rejected_mask"


LOSSES: dict[str, LossSpec] = {
    "forward_kl": LossSpec(forward_kl, "target_logp", "mask"),
    "expected_acceptance": LossSpec(expected_acceptance, "target_logp", "mask"),
    "discard": LossSpec(discard, "rejected", "rejected_mask"),
}


def get_loss(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}") from None


@dataclass
class UnrollBatch:
    """Everything the losses see for one packed batch (see module docstring for shapes)."""

    draft_logits: torch.Tensor  # (S, N, Vd)
    target_logp: torch.Tensor  # (S, N, Vd)
    mask: torch.Tensor  # (S, N) bool
    rejected: torch.Tensor  # (S, N) long, draft ids, -1 = none
    rejected_mask: torch.Tensor  # (S, N) bool
    weight: torch.Tensor  # (N,) float32 per-position weight (staleness x label weights)


def step_weights(steps: int, decay: float) -> torch.Tensor:
    """(S,) decay**i, EAGLE-3/Aurora's 0.8**i over the unroll."""
    return decay ** torch.arange(steps, dtype=torch.float32)


def mix_losses(
    batch: UnrollBatch, weights: dict[str, float], decay: dict[str, float]
) -> tuple[torch.Tensor, dict]:
    """sum_name w_name * sum_{i,t} decay_name**i * weight_t * loss_name[i, t] / #valid step-0 slots.

    Returns the scalar to minimise and each term's value (detached floats) for logging.
    """
    S = batch.draft_logits.shape[0]
    denom = batch.mask[0].float().sum().clamp(min=1.0)
    total, parts = batch.draft_logits.new_zeros((), dtype=torch.float32), {}
    for name, w in weights.items():
        spec = get_loss(name)
        per = spec.fn(batch.draft_logits, getattr(batch, spec.target), getattr(batch, spec.mask))  # (S, N)
        per = per * step_weights(S, decay.get(name, 1.0))[:, None] * batch.weight[None]
        term = per.sum() / denom
        parts[name] = float(term.detach())
        total = total + w * term
    return total, parts


def staleness_weight(age: torch.Tensor, half_life: float | None) -> torch.Tensor:
    """0.5 ** (age / half_life) for drafter-version ages (0 = newest); None disables (all ones)."""
    if half_life is None:
        return torch.ones_like(age, dtype=torch.float32)
    return 0.5 ** (age.float() / half_life)


def version_ages(versions: list[str | None], order: list[str]) -> torch.Tensor:
    """Age of each trace's drafter version in ``order`` (oldest -> newest): newest = 0; unknown = oldest."""
    rank = {v: i for i, v in enumerate(order)}
    newest = len(order) - 1
    return torch.tensor([newest - rank.get(v, 0) if v is not None else 0 for v in versions], dtype=torch.long)
