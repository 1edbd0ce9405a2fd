"""One packed training batch for the TTT unroll: target features, aligned targets, masks, rejected
proposals regenerated from the serving drafter, per-position weights.

Slots: the pack's sequences are concatenated (N slots); slot t of a sequence holds (x_t, target features
at t). Unroll step i at slot t predicts x_{t+2+i}, so its target distribution is the target's at t+1+i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.drafter_store import DrafterStore
from trainer.losses import (
    Rollout,
    chain_rewards,
    group_advantages,
    sampled_acceptance,
    staleness_weight,
    version_ages,
)
from trainer.target_features import TargetFeatures, TargetModel
from trainer.trace_window import Label, TraceSequence


@dataclass
class PackFeatures:
    seqs: list[TraceSequence]
    feats: TargetFeatures  # N slots, all sequences of the pack concatenated
    pos: torch.Tensor  # (N,) rope position inside its sequence
    seg: torch.Tensor  # (N,) index of the sequence in the pack
    offsets: list[int]  # first slot of each sequence

    @property
    def num_slots(self) -> int:
        return len(self.pos)

    def to(self, device: torch.device | str) -> PackFeatures:
        """The pack's tensors on ``device`` (the same tensors when they are already there)."""
        f = self.feats
        feats = TargetFeatures(*(t.to(device) for t in (f.embeds, f.aux, f.logp, f.argmax)))
        return PackFeatures(self.seqs, feats, self.pos.to(device), self.seg.to(device), self.offsets)


def pack_features(
    target: TargetModel, seqs: list[TraceSequence], draft_ids: torch.Tensor | None
) -> PackFeatures:
    feats = [target.features(torch.from_numpy(s.tokens), draft_ids) for s in seqs]
    return assemble(seqs, feats)


def assemble(seqs: list[TraceSequence], feats: list[TargetFeatures]) -> PackFeatures:
    offsets, n = [], 0
    for s in seqs:
        offsets.append(n)
        n += len(s)
    pos = torch.cat([torch.arange(len(s)) for s in seqs])
    seg = torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)])
    return PackFeatures(seqs, TargetFeatures.cat(feats), pos, seg, offsets)


def unroll_mask(pf: PackFeatures, steps: int, train_on_prompt: bool = False) -> torch.Tensor:
    """(S, N) bool: step i at slot t is trained iff token t+2+i exists in the same sequence (and is an
    output token unless ``train_on_prompt``)."""
    dev = pf.pos.device
    length = torch.tensor([len(s) for s in pf.seqs], device=dev)[pf.seg]  # (N,)
    prompt = torch.tensor([s.prompt_len for s in pf.seqs], device=dev)[pf.seg]
    pred = pf.pos[None] + 2 + torch.arange(steps, device=dev)[:, None]  # (S, N) index of the predicted token
    ok = pred < length[None]
    return ok if train_on_prompt else ok & (pred >= prompt[None])


def shifted(x: torch.Tensor, steps: int) -> torch.Tensor:
    """(S, N, ...) view with [i, t] = x[t + 1 + i] (zero rows past the end), no copy of x's rows."""
    pad = x.new_zeros((steps + 1, *x.shape[1:]))
    full = torch.cat([x, pad])
    row = full[0].numel()
    return full.as_strided(
        (steps, x.shape[0], *x.shape[1:]), (row, row, *full.stride()[1:]), storage_offset=row
    )


def trace_temperature(seq: TraceSequence) -> float:
    """The trace's sampling temperature; unknown (None, traces recorded before temperatures were) counts
    as greedy, as the rest of the trainer assumed until then."""
    return seq.temperature or 0.0


def slot_temperature(pf: PackFeatures) -> torch.Tensor:
    """(N,) float32 sampling temperature of each slot's trace (0 = greedy verification)."""
    temps = torch.tensor([trace_temperature(s) for s in pf.seqs], dtype=torch.float32)
    return temps.to(pf.seg.device)[pf.seg]


def target_index(draft_to_target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(V,) draft id of each target id, -1 outside the draft vocabulary."""
    index = torch.full((vocab_size,), -1, dtype=torch.long)
    index[draft_to_target] = torch.arange(len(draft_to_target))
    return index


@torch.no_grad()
def corrections(seq: TraceSequence) -> list[tuple[int, int, int]]:
    """(j, d, u) per correction of ``seq``: its output index j, depth d (the verify step's accepted count)
    and the slot u = prompt_len + j - 2 - d whose unroll step d replays the rejected proposal, the slot the
    served chain was rooted at (step d of a chain rooted at u drafts token u + 2 + d = prompt_len + j)."""
    return [
        (j, int(d), seq.prompt_len + j - 2 - int(d))
        for j, (lab, d) in enumerate(zip(seq.labels, seq.depth, strict=True))
        if lab == Label.CORRECTION
    ]


def regenerate_rejected(
    pf: PackFeatures, steps: int, store: DrafterStore | None, draft_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rejected (S, N) draft ids or -1, mask (S, N)): at each correction the serving drafter's proposal,
    rerun from its stored version at the slot and step ``corrections`` gives.

    Only greedy traces: there a rejection proves the proposal is not the target's token. Under rejection
    sampling (T > 0) the target's own sample decides, and a rejected proposal may be its likeliest token."""
    dev = pf.pos.device
    rejected = torch.full((steps, pf.num_slots), -1, dtype=torch.long, device=dev)
    if store is None:
        return rejected, rejected >= 0
    for s, off in zip(pf.seqs, pf.offsets, strict=True):
        if trace_temperature(s) > 0:
            continue
        where = [(j, d, u) for j, d, u in corrections(s) if d < steps]
        drafter = store.load(s.drafter_id, s.drafter_version) if where and s.spec_method == "eagle3" else None
        if drafter is None:
            continue
        drafter.to(dev)  # the store keeps the moved module: later loads find it there
        f = pf.feats
        sl = slice(off, off + len(s))
        T = len(s)
        logits = drafter(
            f.embeds[sl][None],
            f.aux[sl][None],
            torch.arange(T, device=dev)[None],
            torch.zeros(1, T, dtype=torch.long, device=dev),
            1 + max(d for _, d, _ in where),
        )
        for j, i, u in where:
            proposal = int(drafter.draft_to_target[logits[i][0, u].argmax()])
            if proposal != int(
                s.tokens[s.prompt_len + j]
            ):  # numerics can flip a proposal; keep true rejections
                rejected[i, off + u] = draft_index[proposal]
    return rejected, rejected >= 0


def position_weights(pf: PackFeatures, order: list[str], half_life: float | None) -> torch.Tensor:
    """(N,) staleness weight of each slot from its trace's drafter-version age."""
    ages = version_ages([s.drafter_version for s in pf.seqs], order)
    return staleness_weight(ages, half_life).to(pf.seg.device)[pf.seg]


def rejection_roots(pf: PackFeatures) -> torch.Tensor:
    """(N,) bool: slots where a served draft chain was rooted and then rejected (``corrections``)."""
    roots = torch.zeros(pf.num_slots, dtype=torch.bool)
    for s, off in zip(pf.seqs, pf.offsets, strict=True):
        for _, _, u in corrections(s):
            if 0 <= u < len(s):
                roots[off + u] = True
    return roots.to(pf.seg.device)


def sample_rollout(
    draft_logits: torch.Tensor,
    target_logp: torch.Tensor,
    target_argmax: torch.Tensor,
    temperature: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    group_size: int,
    clip: float,
    generator: torch.Generator,
) -> Rollout:
    """G = ``group_size`` draft chains per slot, step i's token drawn from the unroll's step-i distribution
    (detached), scored by the accepted length under the slot's verification rule. ``generator`` (on the
    logits' device) makes the draw reproducible."""
    S, N, Vd = draft_logits.shape
    logq = draft_logits.detach().float().log_softmax(-1)  # (S, N, Vd)
    flat = torch.multinomial(logq.exp().reshape(S * N, Vd), group_size, replacement=True, generator=generator)
    samples = flat.T.reshape(group_size, S, N)
    accept = sampled_acceptance(samples, logq, target_logp, target_argmax, temperature)
    rewards = chain_rewards(accept, mask)
    return Rollout(
        samples=samples,
        sample_logp=logq.gather(-1, samples.permute(1, 2, 0)).permute(2, 0, 1),
        accept=accept,
        rewards=rewards,
        advantages=group_advantages(rewards),
        weight=weight,
        clip=clip,
    )


def accuracy_by_step(
    draft_logits: torch.Tensor, target_argmax: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """(S,) fraction of valid slots where the draft's top-1 equals the target's greedy token (draft ids)."""
    hit = (draft_logits.argmax(-1) == target_argmax) & mask
    return hit.float().sum(-1) / mask.float().sum(-1).clamp(min=1)


def simulated_accept_length(
    draft_logits: torch.Tensor, target_argmax: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over valid step-0 slots of the greedy chain's accepted length sum_k prod_{i<=k} hit_i, hit =
    draft top-1 equals the target's greedy token: what greedy verification would accept from each slot.
    (The product of per-step batch accuracies is not this: hits of one slot's steps are correlated.)"""
    hit = (draft_logits.argmax(-1) == target_argmax) & mask  # (S, N)
    length = hit.long().cumprod(0).sum(0).float()  # (N,)
    valid = mask[0]
    return length[valid].sum() / valid.float().sum().clamp(min=1)


def drafter_inputs(pf: PackFeatures) -> tuple[torch.Tensor, ...]:
    """(embeds, aux, pos, seg) with a batch dim, as ``Eagle3Drafter.forward`` takes them."""
    return pf.feats.embeds[None], pf.feats.aux[None], pf.pos[None], pf.seg[None]
