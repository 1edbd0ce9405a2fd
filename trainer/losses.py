"""Drafter losses: pure functions ``(draft_logits, *batch fields) -> per-(step, position) tensor``.

Shapes: S = TTT unroll steps, N = positions (slots), Vd = draft vocabulary, G = rollouts per slot.
- ``draft_logits`` (S, N, Vd): step i at slot t predicts token t+2+i.
- ``target_logp`` (S, N, Vd): target log-probs for the same tokens, normalised over the FULL target
  vocabulary and gathered at the draft ids.
- ``target_argmax`` (S, N): the target's greedy token in draft ids, -1 outside the draft vocabulary.
- ``temperature`` (N,): the sampling temperature of each slot's trace (0 = greedy verification).
- ``rejected`` (S, N): draft ids of the serving drafter's rejected proposals (``discard``).
- ``mask`` (S, N) bool: where the term is defined.
Every loss returns (S, N) float32, zero where ``mask`` is False; a mixer weighs steps and positions.
``LOSSES`` names the UnrollBatch fields each loss takes after ``draft_logits``.

Pruned draft vocabulary D: p is never renormalised over D. The drafter can only propose tokens in D
(vLLM maps draft ids through d2t), so target mass m = sum_{v in D} p_v is all it can ever match:
- forward KL is taken to p/m, the target renormalised over D, and weighted by m: m KL(p/m || q) =
  sum_{v in D} p_v log(p_v / q_v) - m log m, minimised at q = p/m; a position whose target mass is mostly
  outside D counts little (Aurora instead renormalises and masks positions whose argmax is outside D);
- acceptance alpha = sum_{v in D} min(p_v, q_v) is exact: q_v = 0 outside D.

Verification rule. Greedy requests (temperature 0) accept a draft iff it is the target's argmax; sampled
ones (T > 0) accept x ~ q with probability min(1, p(x)/q(x)). The acceptance objectives and the RL reward
follow the rule of each slot's trace. p is the target at temperature 1 (what the features hold); a trace
sampled at another temperature is verified against p^(1/T), which these terms approximate by p.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

LossFn = Callable[..., torch.Tensor]


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


def greedy_acceptance_probability(draft_logits: torch.Tensor, target_argmax: torch.Tensor) -> torch.Tensor:
    """a = q(argmax p): chance that a token sampled from q is the target's greedy token, the only token
    greedy verification accepts; 0 where that token is outside the draft vocabulary (id -1)."""
    logq = draft_logits.float().log_softmax(-1)
    a = logq.gather(-1, target_argmax.clamp(min=0).unsqueeze(-1)).squeeze(-1).exp()  # (S, N)
    return torch.where(target_argmax >= 0, a, torch.zeros_like(a))


def _negative_chain(alpha: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entry k = -prod_{i<=k} alpha_i; a masked step ends the chain (alpha = 0 there and after)."""
    return -torch.cumprod(torch.where(mask, alpha, torch.zeros_like(alpha)), dim=0)  # (S, N)


def expected_acceptance(
    draft_logits: torch.Tensor, target_logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Negative expected accepted length under rejection sampling (T > 0), split by step: entry k =
    -prod_{i<=k} alpha_i, alpha = sum min(p, q).

    Summed over k this is -E[accepted drafts] = -sum_k prod_{i<=k} alpha_i for a chain rooted at the slot
    (TTT feeds the true tokens, i.e. conditions step i on the earlier drafts being accepted). A masked
    step ends the chain: alpha = 0 there and after.
    """
    return _negative_chain(acceptance_probability(draft_logits, target_logp), mask)


def greedy_acceptance(
    draft_logits: torch.Tensor, target_argmax: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Negative expected accepted length under greedy verification: entry k = -prod_{i<=k} q_i(argmax p_i).

    The served drafter proposes argmax q, accepted iff it equals argmax p: a step function of the
    weights. q(argmax p) is its smooth surrogate (the acceptance chance of a draft sampled from q); unlike
    sum min(p, q) it puts no value on matching p below its argmax, which greedy verification never rewards.
    """
    return _negative_chain(greedy_acceptance_probability(draft_logits, target_argmax), mask)


def acceptance(
    draft_logits: torch.Tensor,
    target_logp: torch.Tensor,
    target_argmax: torch.Tensor,
    temperature: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """The verification-matched objective: ``greedy_acceptance`` on slots of greedy traces (temperature
    0), ``expected_acceptance`` on slots of sampled ones (T > 0)."""
    sampled = (temperature > 0)[None]  # (1, N)
    alpha = torch.where(
        sampled,
        acceptance_probability(draft_logits, target_logp),
        greedy_acceptance_probability(draft_logits, target_argmax),
    )
    return _negative_chain(alpha, mask)


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


# -- RL on the acceptance reward (GTO arXiv 2509.22134, Draft-OPD) ------------------------------------
# G chains per slot are sampled from the detached draft distributions of the TTT unroll: step i of the
# unroll is conditioned on the true tokens, i.e. on steps < i being accepted, which under greedy
# verification is exactly the state the served drafter is in when its step-i draft is verified (the
# accepted drafts are the target's greedy tokens, which the trace holds). Under sampling the accepted
# prefix is the drafts themselves, not the trace's tokens, so there the chains are an approximation.


def sampled_acceptance(
    samples: torch.Tensor,
    draft_logp: torch.Tensor,
    target_logp: torch.Tensor,
    target_argmax: torch.Tensor,
    temperature: torch.Tensor,
) -> torch.Tensor:
    """(G, S, N) chance that each sampled draft (``samples`` (G, S, N) draft ids drawn from q, whose
    log-probs are ``draft_logp`` (S, N, Vd)) survives its trace's verification: 1[x = argmax p] for greedy
    traces, min(1, p(x)/q(x)) for sampled ones (the expected value of the uniform test)."""
    idx = samples.permute(1, 2, 0)  # (S, N, G)
    logq = draft_logp.float().gather(-1, idx).permute(2, 0, 1)
    logp = target_logp.float().gather(-1, idx).permute(2, 0, 1)
    soft = (logp - logq).exp().clamp(max=1.0)
    hard = (samples == target_argmax[None]).float()
    return torch.where(temperature[None, None] > 0, soft, hard)


def chain_rewards(accept: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(G, N) reward of each sampled chain: its expected accepted length sum_k prod_{i<=k} accept_i
    (``accept`` (G, S, N) per-step survival chance); a masked step ends the chain."""
    a = torch.where(mask[None], accept, torch.zeros_like(accept))
    return a.cumprod(1).sum(1)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(G, N) (r - mean) / (std + eps) over the G chains of each slot (population std): GRPO's baseline,
    no value head. A slot whose chains all score the same has zero advantage, so it trains nothing."""
    mean = rewards.mean(0, keepdim=True)
    std = rewards.std(0, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


def policy_gradient_loss(
    draft_logits: torch.Tensor,
    samples: torch.Tensor,
    sample_logp: torch.Tensor,
    accept: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> torch.Tensor:
    """(S, N) PPO's clipped surrogate -min(r A, clip(r, 1-c, 1+c) A), r = q(x)/q_old(x), averaged over
    the G chains, for each step a chain reaches: step i counts with the chance that verification gets to
    it (prod_{j<i} accept_j: 1 up to and including the first greedy rejection, 0 after). Later steps
    cannot change the chain's reward, so they would only add noise.

    ``sample_logp`` (G, S, N) is log q_old(x) of the policy that sampled the chains; one update per
    rollout makes r = 1 in value, and the gradient is -A grad log q(x)."""
    logq = draft_logits.float().log_softmax(-1).gather(-1, samples.permute(1, 2, 0)).permute(2, 0, 1)
    ratio = (logq - sample_logp).exp()  # (G, S, N)
    adv = advantages[:, None]  # (G, 1, N)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    a = torch.where(mask[None], accept, torch.zeros_like(accept))
    reach = torch.cat([torch.ones_like(a[:, :1]), a.cumprod(1)[:, :-1]], 1)  # (G, S, N)
    per = -(reach * surrogate).mean(0)  # (S, N)
    return torch.where(mask, per, torch.zeros_like(per))


def kl_to_reference(
    draft_logits: torch.Tensor, reference_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """(S, N) KL(q || q_ref) to a frozen reference head (the parent drafter): the reverse KL of PPO/GRPO
    anchors, computed exactly over the draft vocabulary. It penalises mass q puts where the parent had
    little, so the policy gradient cannot drift into tokens the parent (and the KL term's target) rule out,
    while q may still sharpen onto the parent's modes."""
    logq = draft_logits.float().log_softmax(-1)
    logr = reference_logits.float().log_softmax(-1)
    kl = (logq.exp() * (logq - logr)).sum(-1)
    return torch.where(mask, kl, torch.zeros_like(kl))


@dataclass
class Rollout:
    """G sampled chains per slot and what the policy-gradient term needs of them."""

    samples: torch.Tensor  # (G, S, N) long draft ids drawn from the detached q
    sample_logp: torch.Tensor  # (G, S, N) log q_old(samples)
    accept: torch.Tensor  # (G, S, N) survival chance of each draft under its trace's verification
    rewards: torch.Tensor  # (G, N) expected accepted length of each chain
    advantages: torch.Tensor  # (G, N) group-normalised rewards
    weight: torch.Tensor  # (N,) rejected_weight at slots where serving's chain was rejected, else 1
    clip: float


def rl_acceptance(draft_logits: torch.Tensor, rollout: Rollout, mask: torch.Tensor) -> torch.Tensor:
    """Policy gradient on the accepted length of on-policy chains, weighted towards the slots where the
    served drafter was rejected (the positions serving says it gets wrong)."""
    per = policy_gradient_loss(
        draft_logits,
        rollout.samples,
        rollout.sample_logp,
        rollout.accept,
        rollout.advantages,
        mask,
        rollout.clip,
    )
    return per * rollout.weight[None]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    args: tuple[str, ...]  # the UnrollBatch fields the loss takes after draft_logits


LOSSES: dict[str, LossSpec] = {
    "forward_kl": LossSpec(forward_kl, ("target_logp", "mask")),
    "expected_acceptance": LossSpec(expected_acceptance, ("target_logp", "mask")),
    "greedy_acceptance": LossSpec(greedy_acceptance, ("target_argmax", "mask")),
    "acceptance": LossSpec(acceptance, ("target_logp", "target_argmax", "temperature", "mask")),
    "discard": LossSpec(discard, ("rejected", "rejected_mask")),
    "rl_acceptance": LossSpec(rl_acceptance, ("rollout", "mask")),
    "reference_kl": LossSpec(kl_to_reference, ("reference_logits", "mask")),
}


def get_loss(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}") from None


def needed_fields(names: Iterable[str]) -> set[str]:
    """The UnrollBatch fields the named losses read (the batch builds the costly ones only if needed)."""
    return {field for name in names for field in get_loss(name).args}


@dataclass
class UnrollBatch:
    """Everything the losses see for one packed batch (see module docstring for shapes). The optional
    fields are built only for the losses that read them."""

    draft_logits: torch.Tensor  # (S, N, Vd)
    target_logp: torch.Tensor  # (S, N, Vd)
    mask: torch.Tensor  # (S, N) bool
    rejected: torch.Tensor  # (S, N) long, draft ids, -1 = none
    rejected_mask: torch.Tensor  # (S, N) bool
    weight: torch.Tensor  # (N,) float32 per-position weight (staleness x label weights)
    target_argmax: torch.Tensor | None = None  # (S, N) long, draft ids, -1 outside the draft vocabulary
    temperature: torch.Tensor | None = None  # (N,) float32, 0 = greedy verification
    rollout: Rollout | None = None
    reference_logits: torch.Tensor | None = None  # (S, N, Vd) the frozen reference head's unroll


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
        args = [getattr(batch, field) for field in spec.args]
        if any(a is None for a in args):
            raise ValueError(f"loss {name!r} needs batch fields {spec.args}; the batch left one unset")
        per = spec.fn(batch.draft_logits, *args)  # (S, N)
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
