"""One packed training batch for the TTT unroll: target features, aligned targets, masks, rejected
proposals regenerated from the serving drafter, per-position weights.

Slots: the pack's sequences are concatenated (N slots); slot t of a sequence holds (x_t, target features
at t). Unroll step i at slot t predicts x_{t+2+i}, so its target distribution is the target's at t+1+i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.drafter_store import DrafterStore
from trainer.losses import staleness_weight, version_ages
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
    length = torch.tensor([len(s) for s in pf.seqs])[pf.seg]  # (N,)
    prompt = torch.tensor([s.prompt_len for s in pf.seqs])[pf.seg]
    pred = pf.pos[None] + 2 + torch.arange(steps)[:, None]  # (S, N) index of the predicted token
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


def target_index(draft_to_target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(V,) draft id of each target id, -1 outside the draft vocabulary."""
    index = torch.full((vocab_size,), -1, dtype=torch.long)
    index[draft_to_target] = torch.arange(len(draft_to_target))
    return index


@torch.no_grad()
def regenerate_rejected(
    pf: PackFeatures, steps: int, store: DrafterStore | None, draft_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rejected (S, N) draft ids or -1, mask (S, N)): at each correction the serving drafter's proposal,
    rerun from its stored version. A correction at output index j with depth i (= the step's accepted
    count) was proposed by unroll step i at slot prompt_len + j - 2 - i."""
    rejected = torch.full((steps, pf.num_slots), -1, dtype=torch.long)
    if store is None:
        return rejected, rejected >= 0
    for s, off in zip(pf.seqs, pf.offsets, strict=True):
        where = [
            (j, int(d))
            for j, (lab, d) in enumerate(zip(s.labels, s.depth, strict=True))
            if lab == Label.CORRECTION and d < steps
        ]
        drafter = store.load(s.drafter_id, s.drafter_version) if where and s.spec_method == "eagle3" else None
        if drafter is None:
            continue
        f = pf.feats
        sl = slice(off, off + len(s))
        T = len(s)
        logits = drafter(
            f.embeds[sl][None],
            f.aux[sl][None],
            torch.arange(T)[None],
            torch.zeros(1, T, dtype=torch.long),
            1 + max(d for _, d in where),
        )
        for j, i in where:
            u = s.prompt_len + j - 2 - i
            proposal = int(drafter.draft_to_target[logits[i][0, u].argmax()])
            if proposal != int(
                s.tokens[s.prompt_len + j]
            ):  # numerics can flip a proposal; keep true rejections
                rejected[i, off + u] = draft_index[proposal]
    return rejected, rejected >= 0


def position_weights(pf: PackFeatures, order: list[str], half_life: float | None) -> torch.Tensor:
    """(N,) staleness weight of each slot from its trace's drafter-version age."""
    ages = version_ages([s.drafter_version for s in pf.seqs], order)
    return staleness_weight(ages, half_life)[pf.seg]


def accuracy_by_step(
    draft_logits: torch.Tensor, draft_to_target: torch.Tensor, argmax_next: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """(S,) fraction of valid slots where the draft's top-1 equals the target's greedy token."""
    hit = (draft_to_target[draft_logits.argmax(-1)] == argmax_next) & mask
    return hit.float().sum(-1) / mask.float().sum(-1).clamp(min=1)


def drafter_inputs(pf: PackFeatures) -> tuple[torch.Tensor, ...]:
    """(embeds, aux, pos, seg) with a batch dim, as ``Eagle3Drafter.forward`` takes them."""
    return pf.feats.embeds[None], pf.feats.aux[None], pf.pos[None], pf.seg[None]
