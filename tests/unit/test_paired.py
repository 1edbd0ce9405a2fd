"""Paired statistics and the held-out split, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from core.heldout import is_held_out, prompt_digest
from evaluation.heldout_traffic import select
from evaluation.paired import latin_square, per_prompt_ratios, ratio_interval, t_quantile


def test_t_quantiles():
    assert t_quantile(0.95, 2) == pytest.approx(4.302653, abs=1e-6)
    assert t_quantile(0.95, 4) == pytest.approx(2.776445, abs=1e-6)


def test_ratio_interval_by_hand():
    # log ratios 0, 0.1, 0.2: mean 0.1, sd 0.1, half width 4.302653 x 0.1 / sqrt(3) = 0.248414
    iv = ratio_interval([1.0, math.exp(0.1), math.exp(0.2)])
    assert iv.n == 3
    assert iv.point == pytest.approx(math.exp(0.1))
    assert iv.low == pytest.approx(math.exp(0.1 - 0.248414), rel=1e-5)  # 0.86207
    assert iv.high == pytest.approx(math.exp(0.1 + 0.248414), rel=1e-5)  # 1.41684
    same = ratio_interval([1.25, 1.25, 1.25])
    assert (same.point, same.low, same.high) == pytest.approx((1.25, 1.25, 1.25))


def test_no_data_and_one_prompt():
    assert ratio_interval([]) is None
    one = ratio_interval([1.3])
    assert one.point == pytest.approx(1.3) and (one.low, one.high) == (0.0, math.inf)
    with pytest.raises(ValueError):
        ratio_interval([1.0, 0.0])


def test_a_drafter_against_itself_holds_one():
    """A/A: per-prompt ratios scattered around 1 give an interval that contains 1."""
    iv = ratio_interval([0.97, 1.04, 1.01, 0.99, 1.02, 0.98, 1.03, 0.96])
    assert iv.low < 1.0 < iv.high


def test_per_prompt_ratios_pair_within_rounds():
    rates = {"a": {"p1": [2.0, 8.0], "p2": [3.0], "p3": [1.0]}, "b": {"p1": [1.0, 2.0], "p2": [3.0]}}
    ratios = per_prompt_ratios(rates, "a", "b")
    assert ratios == pytest.approx([math.sqrt(2.0 * 4.0), 1.0])  # p3: b never served it


def test_arm_order_balances_positions_and_carry_over():
    rows = latin_square(["x", "y", "z"], 6)
    assert rows[:4] == [["x", "y", "z"], ["z", "y", "x"], ["y", "z", "x"], ["y", "x", "z"]]
    for position in range(3):
        assert sorted(r[position] for r in rows) == ["x", "x", "y", "y", "z", "z"]
    follows = [(a, b) for r in rows for a, b in zip(r, r[1:], strict=False)]
    assert all(
        follows.count(pair) == 2
        for pair in {("x", "y"), ("y", "x"), ("x", "z"), ("z", "x"), ("y", "z"), ("z", "y")}
    )
    # the first two rounds already put the two drafters in both orders
    assert rows[0].index("y") < rows[0].index("z") and rows[1].index("y") > rows[1].index("z")


def test_held_out_split_is_a_pure_function_of_the_prompt():
    prompts = [[i, i + 1, 7] for i in range(2000)]
    held = [p for p in prompts if is_held_out(p, 0.1)]
    assert 150 < len(held) < 250  # about 10 %
    assert held == [p for p in prompts if is_held_out(list(p), 0.1)]  # same answer every time
    assert not any(is_held_out(p, 0.0) for p in prompts)
    assert set(map(tuple, held)) <= {tuple(p) for p in prompts if is_held_out(p, 0.2)}  # nested
    assert prompt_digest([1, 2]) != prompt_digest([2, 1])


def test_held_out_prompts_are_distinct_capped_and_stratified():
    rows = [
        {"prompt_token_ids": [1, 2], "output_token_ids": [0] * 300, "domain": "code", "temperature": 0.0},
        {"prompt_token_ids": [1, 2], "output_token_ids": [0] * 10, "domain": "code"},  # same prompt again
        {"prompt_token_ids": [3], "output_token_ids": [0] * 5, "domain": "code"},
        {"prompt_token_ids": [4], "output_token_ids": [0] * 5, "domain": None, "tenant": "acme"},
        {"prompt_token_ids": [5], "output_token_ids": [0] * 5, "domain": None, "tenant": None},
    ]
    prompts, counts = select(rows, per_stratum=5, max_tokens_cap=96)
    assert counts == {"code": 3, "tenant:acme": 1, "unlabelled": 1}
    assert sorted(p.stratum for p in prompts) == ["code", "code", "tenant:acme", "unlabelled"]
    first = next(p for p in prompts if p.prompt_token_ids == (1, 2))
    assert first.max_tokens == 96  # the recorded output length, capped
    assert len(select(rows, per_stratum=1, max_tokens_cap=96)[0]) == 3  # one per stratum


def test_blocks_pair_every_arm_on_one_prompt_back_to_back_with_balanced_order():
    from evaluation.served import block_schedule

    arms = ["challenger", "baseline", "champion"]
    schedule = block_schedule(4, arms, rounds=3, block=1, warmup=1)
    assert [(b.round, b.measured) for b in schedule] == [(r, (p,)) for r in range(3) for p in range(4)]
    assert all(b.warmup == ((b.measured[0] + 1) % 4,) for b in schedule)  # another prompt, never itself
    # 12 blocks = two full Williams squares of 3 arms: each arm first, second, third equally often
    for position in range(3):
        assert sorted(b.order[position] for b in schedule) == sorted(arms * 4)
    pairs = [block_schedule(5, arms, 1, 2, 2)[i] for i in range(3)]
    assert [(b.measured, b.warmup) for b in pairs] == [((0, 1), (2, 3)), ((2, 3), (4, 0)), ((4,), (1, 2))]
