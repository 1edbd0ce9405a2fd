"""Every drafter loss against numbers worked out by hand (torchtune style)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import (
    LOSSES,
    UnrollBatch,
    acceptance,
    acceptance_probability,
    discard,
    expected_acceptance,
    forward_kl,
    get_loss,
    greedy_acceptance,
    mix_losses,
    needed_fields,
    staleness_weight,
    step_weights,
    version_ages,
)

LN3 = math.log(3.0)


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_forward_kl_full_vocab():
    # q = softmax([0, 0]) = [.5, .5]; p = [.75, .25]
    # KL = .75 ln(.75/.5) + .25 ln(.25/.5) = .75 * 0.405465 - .25 * 0.693147 = 0.130812
    logits = _t([[[0.0, 0.0]]])  # (S=1, N=1, V=2)
    logp = _t([[[0.75, 0.25]]]).log()
    out = forward_kl(logits, logp, torch.ones(1, 1, dtype=torch.bool))
    assert out.shape == (1, 1)
    assert out.item() == pytest.approx(0.130812, abs=1e-5)


def test_forward_kl_pruned_vocab_weights_by_reachable_mass():
    # draft vocab holds 2 of the target's tokens with p = [.5, .25]: m = .75, p/m = [2/3, 1/3]
    # KL(p/m || q=[.5,.5]) = 2/3 ln(4/3) + 1/3 ln(2/3) = 0.191788 - 0.135155 = 0.056633
    # loss = m * KL = .75 * 0.056633 = 0.042475  (= sum_D p ln(p/q) - m ln m = -0.173287 + 0.215762)
    logits = _t([[[0.0, 0.0]]])
    logp = _t([[[0.5, 0.25]]]).log()
    out = forward_kl(logits, logp, torch.ones(1, 1, dtype=torch.bool))
    assert out.item() == pytest.approx(0.042475, abs=1e-5)
    # at q = p/m the loss is exactly zero
    best = forward_kl(_t([[[math.log(2.0), 0.0]]]), logp, torch.ones(1, 1, dtype=torch.bool))
    assert best.item() == pytest.approx(0.0, abs=1e-6)


def test_forward_kl_mask_zeroes_positions():
    logits = _t([[[0.0, 0.0], [0.0, 0.0]]])  # N=2
    logp = _t([[[0.75, 0.25], [0.75, 0.25]]]).log()
    out = forward_kl(logits, logp, torch.tensor([[True, False]]))
    assert out[0, 0].item() == pytest.approx(0.130812, abs=1e-5)
    assert out[0, 1].item() == 0.0


def test_acceptance_probability_is_sum_of_minima():
    # q = softmax([ln3, 0, 0]) = [.6, .2, .2]; p = [.5, .1, .4]
    # alpha = min(.6,.5) + min(.2,.1) + min(.2,.4) = .5 + .1 + .2 = .8
    alpha = acceptance_probability(_t([[[LN3, 0.0, 0.0]]]), _t([[[0.5, 0.1, 0.4]]]).log())
    assert alpha.item() == pytest.approx(0.8, abs=1e-6)


def test_expected_acceptance_length_over_unroll():
    # step 0: q = [.5,.5], p = [.75,.25] -> alpha0 = .5 + .25 = .75
    # step 1: q = softmax([ln3, 0]) = [.75,.25], p = [.5,.5] -> alpha1 = .5 + .25 = .75
    # terms: -alpha0 = -.75, -alpha0*alpha1 = -.5625; E[accepted] = .75 + .5625 = 1.3125
    logits = _t([[[0.0, 0.0]], [[LN3, 0.0]]])  # (S=2, N=1, V=2)
    logp = _t([[[0.75, 0.25]], [[0.5, 0.5]]]).log()
    out = expected_acceptance(logits, logp, torch.ones(2, 1, dtype=torch.bool))
    assert out[:, 0].tolist() == pytest.approx([-0.75, -0.5625], abs=1e-6)
    assert out.sum().item() == pytest.approx(-1.3125, abs=1e-6)
    # a masked step ends the chain: the step-1 term and everything after it vanish
    cut = expected_acceptance(logits, logp, torch.tensor([[True], [False]]))
    assert cut[:, 0].tolist() == pytest.approx([-0.75, 0.0], abs=1e-6)


def test_expected_acceptance_perfect_draft_reaches_unroll_length():
    # q == p at every step -> alpha = 1 -> E = S
    logits = torch.zeros(3, 1, 4)
    logp = torch.full((3, 1, 4), 0.25).log()
    assert expected_acceptance(
        logits, logp, torch.ones(3, 1, dtype=torch.bool)
    ).sum().item() == pytest.approx(-3.0)


def test_greedy_acceptance_uses_the_draft_probability_of_the_target_argmax():
    # q = softmax([ln3, 0, 0]) = [.6, .2, .2] at every (step, slot)
    # slot 0: argmax p = 0 then 2 -> a = .6, .2 -> entries -.6, -.6 * .2 = -.12
    # slot 1: argmax p outside the draft vocabulary (-1) at step 0 -> a0 = 0 ends the chain: 0, 0
    logits = _t([[[LN3, 0.0, 0.0]] * 2] * 2)  # (S=2, N=2, V=3)
    argmax = torch.tensor([[0, -1], [2, 0]])
    out = greedy_acceptance(logits, argmax, torch.ones(2, 2, dtype=torch.bool))
    assert out[:, 0].tolist() == pytest.approx([-0.6, -0.12], abs=1e-6)
    assert out[:, 1].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    # a masked step ends the chain
    cut = greedy_acceptance(logits, argmax, torch.tensor([[True, True], [False, True]]))
    assert cut[:, 0].tolist() == pytest.approx([-0.6, 0.0], abs=1e-6)


def test_greedy_acceptance_gradient_raises_only_the_argmax_logit():
    # d(-q_a)/dz_v = -q_a (1[v=a] - q_v): q = [.6, .2, .2], a = 1 -> [.6*.2, -.2*.8, .2*.2] = [.12, -.16, .04]
    logits = _t([[[LN3, 0.0, 0.0]]]).requires_grad_()
    greedy_acceptance(logits, torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.bool)).sum().backward()
    assert logits.grad[0, 0].tolist() == pytest.approx([0.12, -0.16, 0.04], abs=1e-6)


def test_acceptance_follows_each_traces_verification_rule():
    # both slots: step 0 q = [.5, .5], p = [.75, .25], argmax 0; step 1 q = softmax([ln3, 0]) = [.75, .25],
    # p = [.5, .5] with the target's argmax given as 1.
    # slot 0 greedy (T = 0): a = q(argmax) = .5, .25 -> -.5, -.125
    # slot 1 sampled (T = .7): alpha = sum min = .75, .75 -> -.75, -.5625
    logits = _t([[[0.0, 0.0], [0.0, 0.0]], [[LN3, 0.0], [LN3, 0.0]]])  # (S=2, N=2, V=2)
    logp = _t([[[0.75, 0.25]] * 2, [[0.5, 0.5]] * 2]).log()
    argmax = torch.tensor([[0, 0], [1, 1]])
    out = acceptance(logits, logp, argmax, _t([0.0, 0.7]), torch.ones(2, 2, dtype=torch.bool))
    assert out[:, 0].tolist() == pytest.approx([-0.5, -0.125], abs=1e-6)
    assert out[:, 1].tolist() == pytest.approx([-0.75, -0.5625], abs=1e-6)


def test_discard_pushes_down_the_rejected_token():
    # q = softmax([ln3, 0, 0]) = [.6, .2, .2]; rejected token 0 -> -ln(1 - .6) = -ln .4 = 0.916291
    # rejected token 2 -> -ln(1 - .2) = -ln .8 = 0.223144; -1 (no proposal) -> 0
    logits = _t([[[LN3, 0.0, 0.0], [LN3, 0.0, 0.0], [LN3, 0.0, 0.0]]])  # (1, 3, 3)
    rejected = torch.tensor([[0, 2, -1]])
    out = discard(logits, rejected, torch.ones(1, 3, dtype=torch.bool))
    assert out[0].tolist() == pytest.approx([0.916291, 0.223144, 0.0], abs=1e-5)
    masked = discard(logits, rejected, torch.tensor([[False, True, True]]))
    assert masked[0, 0].item() == 0.0


def test_discard_is_stable_when_the_draft_is_certain():
    # q_r = 1 - e^-50: -log(1 - q_r) = 50 (a naive log1p(-softmax) would give inf)
    out = discard(_t([[[50.0, 0.0]]]), torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.bool))
    assert out.item() == pytest.approx(50.0, abs=1e-4)


def test_discard_gradient_lowers_the_rejected_logit():
    logits = _t([[[LN3, 0.0, 0.0]]]).requires_grad_()
    discard(logits, torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.bool)).sum().backward()
    # d/dz_r [-log(1 - q_r)] = q_r = .6 ; d/dz_v = -q_v q_r/(1-q_r) = -.2*.6/.4 = -.3
    assert logits.grad[0, 0].tolist() == pytest.approx([0.6, -0.3, -0.3], abs=1e-5)


def test_mix_losses_weights_steps_positions_and_terms():
    # S=2, N=2, V=2. Slot 1 is masked at both steps; slot 0 valid. denominator = #valid step-0 slots = 1.
    # forward_kl: step0 slot0 = 0.130812 (q=[.5,.5], p=[.75,.25]); step1 slot0: q = p -> 0.
    # expected_acceptance: step0 = -.75, step1 = -.75 * 1.0 = -.75 (decay 1)
    # forward_kl with decay .8: 0.130812 + .8 * 0 = 0.130812, position weight 2.0 -> 0.261624
    # expected_acceptance weight 0.5, position weight 2.0: (-.75 - .75) * 2 = -3.0 -> term -3.0
    # total = 1.0 * 0.261624 + 0.5 * -3.0 = -1.238376
    logits = _t([[[0.0, 0.0], [0.0, 0.0]], [[LN3, 0.0], [0.0, 0.0]]])
    logp = _t([[[0.75, 0.25], [0.75, 0.25]], [[0.75, 0.25], [0.75, 0.25]]]).log()
    mask = torch.tensor([[True, False], [True, False]])
    batch = UnrollBatch(
        draft_logits=logits,
        target_logp=logp,
        mask=mask,
        rejected=torch.full((2, 2), -1),
        rejected_mask=torch.zeros(2, 2, dtype=torch.bool),
        weight=_t([2.0, 5.0]),
    )
    total, parts = mix_losses(
        batch,
        {"forward_kl": 1.0, "expected_acceptance": 0.5},
        {"forward_kl": 0.8, "expected_acceptance": 1.0},
    )
    assert parts["forward_kl"] == pytest.approx(0.261624, abs=1e-5)
    assert parts["expected_acceptance"] == pytest.approx(-3.0, abs=1e-5)
    assert total.item() == pytest.approx(-1.238376, abs=1e-5)


def test_mix_losses_passes_each_loss_its_fields_and_names_a_missing_one():
    # greedy_acceptance reads target_argmax: q = [.5, .5], argmax 0 -> -.5 at the one valid slot
    batch = UnrollBatch(
        draft_logits=torch.zeros(1, 1, 2),
        target_logp=_t([[[0.75, 0.25]]]).log(),
        mask=torch.ones(1, 1, dtype=torch.bool),
        rejected=torch.full((1, 1), -1),
        rejected_mask=torch.zeros(1, 1, dtype=torch.bool),
        weight=_t([1.0]),
        target_argmax=torch.tensor([[0]]),
    )
    total, parts = mix_losses(batch, {"greedy_acceptance": 1.0}, {})
    assert parts["greedy_acceptance"] == pytest.approx(-0.5) and total.item() == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="acceptance.*temperature"):
        mix_losses(batch, {"acceptance": 1.0}, {})


def test_needed_fields_are_the_union_of_the_losses_arguments():
    assert needed_fields(["forward_kl"]) == {"target_logp", "mask"}
    assert needed_fields(["forward_kl", "rl_acceptance", "reference_kl"]) == {
        "target_logp",
        "mask",
        "rollout",
        "reference_logits",
    }


def test_step_weights_decay():
    assert step_weights(3, 0.8).tolist() == pytest.approx([1.0, 0.8, 0.64])


def test_staleness_weight_halves_per_half_life():
    # half-life 2 versions: age 0 -> 1, 1 -> 2^-0.5 = 0.707107, 2 -> .5, 4 -> .25
    w = staleness_weight(torch.tensor([0, 1, 2, 4]), 2.0)
    assert w.tolist() == pytest.approx([1.0, 0.707107, 0.5, 0.25], abs=1e-6)
    assert staleness_weight(torch.tensor([0, 3]), None).tolist() == [1.0, 1.0]


def test_version_ages_count_back_from_the_newest():
    # order oldest -> newest: v0, v1, v2. v0 is 2 versions old, v1 one; unknown counts as the oldest;
    # traces without a drafter (no speculation) have age 0
    ages = version_ages(["v0", "v1", "v2", None, "lost"], ["v0", "v1", "v2"])
    assert ages.tolist() == [2, 1, 0, 0, 2]


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get_loss("reverse_kl")
    msg = str(e.value)
    assert "reverse_kl" in msg
    for name in LOSSES:
        assert name in msg
