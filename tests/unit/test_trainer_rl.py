"""RL on the acceptance reward and the batch pieces around it (rollouts, rejection roots, per-slot
temperatures, the simulated accept length), against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.losses import (
    Rollout,
    chain_rewards,
    group_advantages,
    kl_to_reference,
    policy_gradient_loss,
    rl_acceptance,
    sampled_acceptance,
)
from trainer.target_features import TargetFeatures
from trainer.trace_window import Label, TraceSequence, output_labels
from trainer.unroll_batch import (
    assemble,
    regenerate_rejected,
    rejection_roots,
    sample_rollout,
    simulated_accept_length,
    slot_temperature,
)

LN3 = math.log(3.0)


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_sampled_acceptance_per_verification_rule():
    # both slots: q = [.6, .2, .2], p = [.3, .4, .3], argmax p = 1. G=2 samples: g0 = (0, 0), g1 = (1, 2)
    # slot 0 greedy: g0 drew 0 != 1 -> 0; g1 drew 1 -> 1
    # slot 1 T=.7: g0 drew 0 -> min(1, .3/.6) = .5; g1 drew 2 -> min(1, .3/.2) = 1
    logq = _t([[[0.6, 0.2, 0.2]] * 2]).log()  # (S=1, N=2, V=3)
    logp = _t([[[0.3, 0.4, 0.3]] * 2]).log()
    samples = torch.tensor([[[0, 0]], [[1, 2]]])  # (G=2, S=1, N=2)
    out = sampled_acceptance(samples, logq, logp, torch.tensor([[1, 1]]), _t([0.0, 0.7]))
    assert out.shape == (2, 1, 2)
    assert out[:, 0].tolist() == [pytest.approx([0.0, 0.5]), pytest.approx([1.0, 1.0])]


def test_chain_rewards_are_expected_accepted_lengths():
    # g0: 1, 1, 0 -> 1 + 1 + 0 = 2; g1: .5, .5, 1 -> .5 + .25 + .25 = 1; g2: 0, 1, 1 -> 0
    accept = _t([[[1.0], [1.0], [0.0]], [[0.5], [0.5], [1.0]], [[0.0], [1.0], [1.0]]])  # (G=3, S=3, N=1)
    full = chain_rewards(accept, torch.ones(3, 1, dtype=torch.bool))
    assert full[:, 0].tolist() == pytest.approx([2.0, 1.0, 0.0])
    # a masked step 2 ends every chain there: g1 = .5 + .25 = .75
    cut = chain_rewards(accept, torch.tensor([[True], [True], [False]]))
    assert cut[:, 0].tolist() == pytest.approx([2.0, 0.75, 0.0])


def test_group_advantages_normalise_within_each_slot():
    # slot 0: r = 2, 0, 1, 1: mean 1, population std sqrt(2/4) = .707107 -> A = 1.414212, -1.414212, 0, 0
    # slot 1: all equal -> 0 (nothing to learn from a group that scores the same)
    r = _t([[2.0, 3.0], [0.0, 3.0], [1.0, 3.0], [1.0, 3.0]])  # (G=4, N=2)
    adv = group_advantages(r)
    assert adv[:, 0].tolist() == pytest.approx([1.414212, -1.414212, 0.0, 0.0], abs=1e-5)
    assert adv[:, 1].tolist() == [0.0] * 4


def _two_chains():
    # S=2, N=1, V=2, q = [.5, .5] at both steps. g0 drew (0, 0), accepted then rejected, A = +1;
    # g1 drew (1, 1), rejected at step 0, A = -1. Reach: g0 (1, 1), g1 (1, 0): g1's step 1 never verified.
    samples = torch.tensor([[[0], [0]], [[1], [1]]])  # (G=2, S=2, N=1)
    accept = _t([[[1.0], [0.0]], [[0.0], [1.0]]])
    return samples, accept, _t([[1.0], [-1.0]])


def test_policy_gradient_counts_steps_up_to_the_first_rejection():
    samples, accept, adv = _two_chains()
    logits = torch.zeros(2, 1, 2, requires_grad=True)
    old = torch.full((2, 2, 1), math.log(0.5))  # sampled by the current policy: ratio 1
    out = policy_gradient_loss(logits, samples, old, accept, adv, torch.ones(2, 1, dtype=torch.bool), 0.2)
    # step 0: -(1 * 1 + 1 * -1) / 2 = 0; step 1: -(1 * 1 + 0 * -1) / 2 = -.5
    assert out[:, 0].tolist() == pytest.approx([0.0, -0.5])
    out.sum().backward()
    # grad log q(0) wrt z = [.5, -.5], grad log q(1) = [-.5, .5]
    # step 0: -(1/2)([.5, -.5] - [-.5, .5]) = [-.5, .5]; step 1: -(1/2)[.5, -.5] = [-.25, .25]
    assert logits.grad[0, 0].tolist() == pytest.approx([-0.5, 0.5])
    assert logits.grad[1, 0].tolist() == pytest.approx([-0.25, 0.25])


def test_policy_gradient_clips_the_ratio_like_ppo():
    # q = [.5, .5]; both chains were sampled at q_old = 1/3: ratio 1.5, clip .2
    # g0 A = +1: min(1.5, 1.2) = 1.2 (clipped, no gradient); g1 A = -1: min(-1.5, -1.2) = -1.5
    # loss = -(1.2 - 1.5) / 2 = .15; grad = (1/2) * 1.5 * grad log q(1) = .75 * [-.5, .5] = [-.375, .375]
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    samples = torch.tensor([[[0]], [[1]]])
    old = torch.full((2, 1, 1), math.log(1 / 3))
    out = policy_gradient_loss(
        logits,
        samples,
        old,
        torch.ones(2, 1, 1),
        _t([[1.0], [-1.0]]),
        torch.ones(1, 1, dtype=torch.bool),
        0.2,
    )
    assert out.item() == pytest.approx(0.15, abs=1e-6)
    out.sum().backward()
    assert logits.grad[0, 0].tolist() == pytest.approx([-0.375, 0.375], abs=1e-6)


def test_rl_acceptance_weights_the_rejected_slots():
    samples, accept, adv = _two_chains()
    old = torch.full((2, 2, 1), math.log(0.5))
    rollout = Rollout(samples, old, accept, _t([[1.0], [0.0]]), adv, weight=_t([2.0]), clip=0.2)
    out = rl_acceptance(torch.zeros(2, 1, 2), rollout, torch.ones(2, 1, dtype=torch.bool))
    assert out[:, 0].tolist() == pytest.approx([0.0, -1.0])  # 2 x (0, -.5)


def test_kl_to_reference_is_kl_of_the_draft_from_the_parent():
    # q = softmax([ln3, 0]) = [.75, .25], q_ref = [.5, .5]:
    # KL(q || q_ref) = .75 ln 1.5 + .25 ln .5 = .304099 - .173287 = .130812 (KL(q_ref || q) would be .143841)
    out = kl_to_reference(_t([[[LN3, 0.0], [LN3, 0.0]]]), torch.zeros(1, 2, 2), torch.tensor([[True, False]]))
    assert out[0].tolist() == pytest.approx([0.130812, 0.0], abs=1e-6)
    same = kl_to_reference(_t([[[LN3, 0.0]]]), _t([[[LN3, 0.0]]]), torch.ones(1, 1, dtype=torch.bool))
    assert same.item() == pytest.approx(0.0, abs=1e-7)


def test_sample_rollout_scores_chains_and_is_seeded():
    # near-one-hot q: every chain is step 0 -> token 0, step 1 -> token 1
    # slot 0's target argmax (0, 1): both accepted, reward 2; slot 1's (0, 2): reward 1; no spread, A = 0
    logits = _t([[[30.0, 0.0, 0.0]] * 2, [[0.0, 30.0, 0.0]] * 2])  # (S=2, N=2, V=3)
    argmax = torch.tensor([[0, 0], [1, 2]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    logp = torch.full((2, 2, 3), math.log(1 / 3))

    def roll(lg, seed):
        gen = torch.Generator().manual_seed(seed)
        return sample_rollout(lg, logp, argmax, torch.zeros(2), mask, _t([1.0, 2.0]), 3, 0.2, gen)

    r = roll(logits, 0)
    assert r.samples.shape == (3, 2, 2) and r.rewards.tolist() == [[2.0, 1.0]] * 3
    assert r.advantages.abs().max().item() == 0.0
    assert torch.allclose(r.sample_logp, torch.zeros(3, 2, 2), atol=1e-6)  # log q(x) = log 1
    # a flat q: the same seed draws the same chains, another seed other ones
    flat = torch.zeros(2, 2, 3)
    assert torch.equal(roll(flat, 7).samples, roll(flat, 7).samples)
    assert not torch.equal(roll(flat, 7).samples, roll(flat, 8).samples)


def test_simulated_accept_length_is_a_per_slot_expectation():
    # draft top-1 is token 0 everywhere; a hit where the target's argmax is 0 (-1: outside the vocabulary)
    # slot 0: hits 1, 1, 0 -> 2; slot 1: 0, 1, 1 -> 0; slot 2: 1, 1, (masked) -> 2; slot 3 masked at step 0
    # mean over the three valid step-0 slots = 4/3 (the product of per-step accuracies would give 5/3)
    logits = torch.zeros(3, 4, 2)
    logits[..., 0] = 1.0
    argmax = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, -1, 0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False], [True, True, False, False]])
    assert simulated_accept_length(logits, argmax, mask).item() == pytest.approx(4 / 3)


def _seq(prompt_len: int, n_out: int, accepted, drafted, temperature=None, version="v1") -> TraceSequence:
    labels, depth = output_labels(n_out, accepted, drafted)
    return TraceSequence(
        tokens=np.arange(prompt_len + n_out, dtype=np.int64),
        prompt_len=prompt_len,
        labels=labels,
        depth=depth,
        spec_method="eagle3",
        drafter_id="d",
        drafter_version=version,
        temperature=temperature,
    )


def _pack(seqs):
    feats = [
        TargetFeatures(
            torch.zeros(len(s), 1), torch.zeros(len(s), 3), torch.zeros(len(s), 2), torch.zeros(len(s))
        )
        for s in seqs
    ]
    return assemble(seqs, feats)


def test_rejection_roots_are_the_slots_that_rooted_rejected_chains():
    # prompt 3, steps accepting 2 of 3, 0 of 3, 1 of 3: outputs PLAIN, A, A, C(depth 2), C(0), A, C(1)
    # a correction at output j with depth d was drafted from slot 3 + j - d - 2: j=3 -> 2, j=4 -> 5, j=6 -> 6
    # the second trace accepts everything (a bonus, no correction): no root
    first = _seq(3, 7, [2, 0, 1], [3, 3, 3])
    assert first.labels.tolist()[3:5] == [Label.CORRECTION, Label.CORRECTION]
    roots = rejection_roots(_pack([first, _seq(2, 5, [3], [3])]))
    assert roots.nonzero()[:, 0].tolist() == [2, 5, 6]


def test_slot_temperature_counts_unknown_as_greedy():
    pf = _pack([_seq(1, 2, [], [], temperature=None), _seq(1, 1, [], [], temperature=0.7)])
    assert slot_temperature(pf).tolist() == pytest.approx([0.0, 0.0, 0.0, 0.7, 0.7])


def test_regenerate_rejected_uses_greedy_traces_only():
    # under sampling a rejection does not make the proposal wrong: the T=.7 trace's drafter is never loaded
    class Store:
        def __init__(self):
            self.loaded = []

        def load(self, drafter_id, version):
            self.loaded.append(version)
            return None

    store = Store()
    greedy, sampled = _seq(3, 7, [2, 0, 1], [3, 3, 3], 0.0, "v0"), _seq(3, 7, [2, 0, 1], [3, 3, 3], 0.7, "v1")
    rejected, mask = regenerate_rejected(_pack([greedy, sampled]), 3, store, torch.arange(2))
    assert store.loaded == ["v0"] and not mask.any()
