"""`flywheel bench drafters`: the per-arm figures (running it needs three vLLM servers: bench/)."""

from __future__ import annotations

import pytest

from bench.drafters import _per_forward, _tau, run
from core.settings import Settings


def test_tau_is_one_plus_mean_accepted_over_reported_steps():
    assert _tau([0, 3, 1, 2]) == 2.5
    assert _tau([]) is None


def test_tokens_per_forward_counts_the_steps_that_proposed_nothing():
    # ngram-like: 20 output tokens, vLLM reported 2 drafting steps that accepted 3 and 1 tokens.
    # forwards = 20 - 4 = 16 (the 2 drafting steps + 14 plain ones), so 1.25 tokens per forward,
    # while tau over the reported steps is 3.0
    assert _per_forward(20, [3, 1]) == 1.25
    assert _tau([3, 1]) == 3.0
    # a drafter that proposes at every step: 1 prefill token + 4 steps emitting 3, 1, 4, 2 tokens
    assert _per_forward(11, [2, 0, 3, 1]) == pytest.approx(11 / 5)


def test_no_eagle3_drafter_is_refused_before_any_server_starts():
    with pytest.raises(ValueError, match="at least one EAGLE-3 drafter"):
        run({}, settings=Settings())
