"""The losses on the trained slots only (``rows``): the unroll returns (R, Vd) per step for the slots some
step trains, and the batch takes every per-slot field there. Same loss, same gradients as the whole pack."""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
from test_eagle3_drafter import TINY

from trainer.eagle3_drafter import Eagle3Config, Eagle3Drafter
from trainer.losses import mix_losses
from trainer.target_features import TargetFeatures
from trainer.trace_window import Label, TraceSequence
from trainer.train_loop import DrafterTrainingRecipe
from trainer.unroll_batch import PackFeatures, assemble, drafter_inputs, rejection_roots, unroll_mask

S = 3


def _pack(lens: list[int], prompts: list[int], temps: list[float], seed: int = 0) -> PackFeatures:
    g = torch.Generator().manual_seed(seed)
    seqs, feats = [], []
    for n, p, t in zip(lens, prompts, temps, strict=True):
        out = n - p
        labels = np.array([Label.ACCEPTED, Label.CORRECTION] * out, dtype=np.int8)[:out]
        seqs.append(
            TraceSequence(
                tokens=torch.randint(0, 40, (n,), generator=g).numpy(),
                prompt_len=p,
                labels=labels,
                depth=np.zeros(out, dtype=np.int64),
                temperature=t,
                drafter_version=str(len(seqs) % 2),
            )
        )
        logits = torch.randn(n, 40, generator=g) * 2
        feats.append(
            TargetFeatures(
                torch.randn(n, 16, generator=g),
                torch.randn(n, 48, generator=g),
                logits.log_softmax(-1),
                logits.argmax(-1),
            )
        )
    return assemble(seqs, feats)


def _recipe(losses: dict[str, float], reference: Eagle3Drafter | None, train_on_prompt: bool = False):
    """What ``make_batch`` and ``loss_rows`` read of a recipe, and nothing else (no target, no lake)."""
    rl = types.SimpleNamespace(group_size=4, clip=0.2, rejected_weight=2.0)
    cfg = types.SimpleNamespace(
        data=types.SimpleNamespace(train_on_prompt=train_on_prompt),
        staleness_half_life=1.0,
        rl=rl,
        init=types.SimpleNamespace(seed=0),
    )
    from trainer.losses import needed_fields

    r = types.SimpleNamespace(
        cfg=cfg,
        store=None,
        draft_index=torch.arange(40),
        versions=["0", "1"],
        fields=needed_fields(losses),
        reference=reference,
        autocast=lambda: torch.autocast("cpu", enabled=False),
        rollout_generator=lambda: torch.Generator().manual_seed(7),
    )
    r.loss_rows = types.MethodType(DrafterTrainingRecipe.loss_rows, r)
    r.make_batch = types.MethodType(DrafterTrainingRecipe.make_batch, r)
    return r


@pytest.mark.parametrize("attention", ["sdpa", "dense"])
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_losses_on_the_trained_rows_equal_the_whole_pack(attention, train_on_prompt):
    torch.manual_seed(0)
    drafter = Eagle3Drafter(Eagle3Config(**TINY), attention=attention)
    for p in drafter.parameters():
        p.data.normal_(0, 0.3)
    parent = copy.deepcopy(drafter).requires_grad_(False)
    for p in parent.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    losses = {"forward_kl": 1.0, "acceptance": 0.5, "reference_kl": 0.1}
    recipe = _recipe(losses, parent, train_on_prompt)
    pf = _pack([9, 17, 4, 30], [5, 8, 4, 11], [0.0, 0.7, 0.0, 0.0])  # the third: all prompt
    mask = unroll_mask(pf, S, train_on_prompt)
    active = None if train_on_prompt else mask[:, None]
    rows = recipe.loss_rows(pf, S)
    assert 0 < len(rows) < pf.num_slots and bool(mask[:, rows].any(0).all())

    def loss_and_grads(rows):
        drafter.zero_grad(set_to_none=True)
        logits = drafter(*drafter_inputs(pf), steps=S, active=active, rows=rows)
        if rows is not None:
            assert all(lg.shape == (len(rows), 40) for lg in logits)
        batch = recipe.make_batch(pf, logits, active, rows)
        loss, parts = mix_losses(batch, losses, {"forward_kl": 0.8, "acceptance": 1.0, "reference_kl": 1.0})
        loss.backward()
        return float(loss), parts, {k: p.grad.clone() for k, p in drafter.named_parameters()}

    full, full_parts, full_grads = loss_and_grads(None)
    compact, parts, grads = loss_and_grads(rows)
    assert compact == pytest.approx(full, rel=1e-6)
    assert parts == pytest.approx(full_parts, rel=1e-5)
    for k, g in full_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-7)


def test_rl_rollouts_on_the_trained_rows_are_scored_at_those_slots():
    torch.manual_seed(0)
    drafter = Eagle3Drafter(Eagle3Config(**TINY))
    recipe = _recipe({"forward_kl": 1.0, "rl_acceptance": 1.0}, None)
    pf = _pack([12, 20], [6, 9], [0.0, 0.0])
    rows = recipe.loss_rows(pf, S)
    active = unroll_mask(pf, S, False)[:, None]
    batch = recipe.make_batch(
        pf, drafter(*drafter_inputs(pf), steps=S, active=active, rows=rows), active, rows
    )
    r = batch.rollout
    assert r.samples.shape == (4, S, len(rows)) and r.rewards.shape == (4, len(rows))
    # the CORRECTION labels root rejected chains: their rows, and only theirs, carry the rejected weight
    roots = rejection_roots(pf)[rows]
    assert roots.any() and torch.equal(r.weight, torch.where(roots, 2.0, 1.0))
    assert batch.mask.shape == (S, len(rows)) and batch.weight.shape == (len(rows),)


def test_active_slots_outside_rows_are_an_error():
    drafter = Eagle3Drafter(Eagle3Config(**TINY))
    pf = _pack([10], [2], [0.0])
    active = unroll_mask(pf, S, False)[:, None]
    with pytest.raises((IndexError, RuntimeError)):
        drafter(*drafter_inputs(pf), steps=S, active=active, rows=torch.tensor([0, 1]))
