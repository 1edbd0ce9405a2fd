"""The gate decides on paired intervals: every case below is a hand-made measurement and its verdict."""

from __future__ import annotations

import pytest

from evaluation.gate import ArmMeasurement, GatePolicy, RatioInterval, decide

POLICY = GatePolicy(min_speedup=1.0, margin=0.02, domain_tau_tolerance=0.05, min_samples=24)


def iv(point: float, low: float, high: float, n: int = 24) -> RatioInterval:
    return RatioInterval(point=point, low=low, high=high, n=n)


CHAMP = ArmMeasurement(
    speedup=iv(1.25, 1.2, 1.3), tau=2.0, tau_by_domain={"code": 2.2, "prose": 1.8}, samples=24
)


def arm(speedup=iv(1.3, 1.25, 1.35), vs=iv(1.06, 1.03, 1.10), code=2.3, prose=1.85, samples=24, tau=2.1):
    return ArmMeasurement(
        speedup=speedup,
        tau=tau,
        tau_by_domain={"code": code, "prose": prose},
        samples=samples,
        vs_champion=vs,
    )


@pytest.mark.parametrize(
    ("challenger", "champion", "promote", "failing"),
    [
        (arm(), CHAMP, True, []),
        (arm(vs=None), None, True, []),  # first champion: the floor and the samples only
        (arm(speedup=iv(0.94, 0.90, 0.98)), None, False, ["speedup floor"]),  # clearly below
        (arm(speedup=iv(1.01, 0.97, 1.05)), None, False, ["speedup floor"]),  # inconclusive: contains 1.0
        (arm(speedup=iv(1.05, 1.00, 1.10)), None, True, []),  # the floor is inclusive
        (arm(vs=iv(1.04, 1.01, 1.08)), CHAMP, False, ["beats champion"]),  # 1.01 < 1.02: not sure enough
        (arm(vs=iv(1.05, 1.02, 1.08)), CHAMP, True, []),  # the margin is inclusive
        (arm(vs=iv(1.00, 0.97, 1.03)), CHAMP, False, ["beats champion"]),  # A/A: the interval holds 1.0
        (arm(prose=1.70), CHAMP, False, ["tau[prose]"]),  # 1.70 < 1.8 x 0.95 = 1.71
        (arm(prose=1.71), CHAMP, True, []),
        (arm(samples=23), CHAMP, False, ["samples"]),
        (arm(vs=None), CHAMP, False, ["beats champion"]),  # a champion but no paired comparison with it
    ],
)
def test_gate_table(challenger, champion, promote, failing):
    decision = decide(challenger, champion, POLICY)
    assert decision.promote is promote, decision.reasons
    failed = [r.split(" ", 1)[1] for r in decision.reasons if r.startswith("FAIL")]
    assert [next(f for f in failing if r.startswith(f)) for r in failed] == failing
    assert decision.summary().startswith("PROMOTE" if promote else "REJECT")


def test_inconclusive_is_a_rejection_that_says_so():
    decision = decide(arm(vs=iv(1.04, 1.01, 1.08)), CHAMP, POLICY)
    assert any("inconclusive, the interval contains 1.020" in r for r in decision.reasons)


def test_a_challenger_faster_than_the_champion_is_promoted_wherever_the_floor_stands():
    """With a champion serving, beating it with confidence is the test: the floor is not asked again.
    The champion serves at 0.79x of no speculation; a challenger at 0.93x that beats it is promoted (and,
    still slower than none, served with speculation off). A challenger that beats the champion but whose
    interval against no speculation straddles 1.0 is promoted too: serving it cannot slow the fleet (cycle
    B2 of the 2026-12-04 full demo: 1.046 [1.022, 1.072] over the champion, 1.140 [0.994, 1.306] over none,
    rejected by the old rule that asked the floor as well)."""
    slow_champion = CHAMP.model_copy(update={"speedup": iv(0.79, 0.75, 0.83)})
    faster = arm(speedup=iv(0.93, 0.90, 0.96), vs=iv(1.17, 1.12, 1.22))
    decision = decide(faster, slow_champion, POLICY)
    assert decision.promote and decision.disable_speculation
    assert not any(r.startswith("FAIL") for r in decision.reasons)
    b2 = arm(speedup=iv(1.140, 0.994, 1.306), vs=iv(1.046, 1.022, 1.072))
    decision = decide(b2, CHAMP.model_copy(update={"speedup": iv(1.089, 0.951, 1.247)}), POLICY)
    assert decision.promote and not decision.disable_speculation, decision.reasons
    assert any(
        r.startswith("NOTE challenger ÷ no speculation 1.140 [0.994, 1.306]") for r in decision.reasons
    )


def test_domains_only_compared_where_both_were_measured():
    challenger = ArmMeasurement(
        speedup=iv(1.5, 1.4, 1.6),
        tau=2.0,
        tau_by_domain={"code": 2.5, "docs": 1.0},
        samples=24,
        vs_champion=iv(1.2, 1.1, 1.3),
    )
    decision = decide(challenger, CHAMP, POLICY)
    assert decision.promote and not any("docs" in r or "prose" in r for r in decision.reasons)


def test_no_measured_tau_is_explicit_and_rejected():
    """A challenger with no verify step has no tau (None, not 1.0): the gate says so and rejects it."""
    silent = arm(tau=None, code=None)
    decision = decide(silent, CHAMP, POLICY)
    assert not decision.promote
    failed = [r for r in decision.reasons if r.startswith("FAIL")]
    assert any("tau: no verify step" in r for r in failed) and any(
        "tau[code]: no verify step" in r for r in failed
    )


def test_decisive_means_the_deciding_interval_is_on_one_side_of_its_threshold():
    assert POLICY.decisive(iv(1.2, 1.1, 1.3), None) and POLICY.decisive(iv(0.9, 0.85, 0.95), None)
    assert not POLICY.decisive(iv(1.0, 0.95, 1.05), None)
    assert not POLICY.decisive(iv(1.2, 1.1, 1.3), iv(1.03, 1.01, 1.05))  # vs the champion decides
    assert POLICY.decisive(iv(0.9, 0.85, 0.95), iv(1.05, 1.03, 1.07))


def test_policy_defaults_are_the_cycle_settings():
    from core.settings import CycleSettings

    cycle = CycleSettings()
    policy = GatePolicy.from_settings(cycle)
    assert (policy.min_speedup, policy.margin, policy.min_samples) == (
        cycle.gate_min_speedup,
        cycle.gate_margin,
        cycle.gate_min_samples,
    )


SLOW_CHAMP = ArmMeasurement(speedup=iv(0.79, 0.75, 0.83), tau=1.1, tau_by_domain={"prose": 1.1}, samples=24)


@pytest.mark.parametrize(
    ("challenger_speedup", "vs", "promote", "off"),
    [
        # promoted, and slower than no speculation with confidence: served as champion, speculation off
        (iv(0.85, 0.80, 0.90), iv(1.08, 1.04, 1.12), True, True),
        (iv(0.95, 0.90, 1.01), iv(1.08, 1.04, 1.12), True, False),  # it might reach 1.0: it serves
        (iv(1.10, 1.05, 1.15), iv(1.08, 1.04, 1.12), True, False),  # faster than none: it serves
        # rejected: the champion keeps serving, and it is slower than none with confidence
        (iv(0.95, 0.90, 1.01), iv(0.97, 0.94, 1.00), False, True),
        (iv(1.00, 0.95, 1.05), iv(1.01, 0.99, 1.03), False, True),  # inconclusive is a rejection
    ],
)
def test_no_drafter_when_the_drafter_that_would_serve_is_slower_than_none(
    challenger_speedup, vs, promote, off
):
    challenger = arm(speedup=challenger_speedup, vs=vs, prose=1.2)
    decision = decide(challenger, SLOW_CHAMP, POLICY)
    assert decision.promote is promote and decision.disable_speculation is off, decision.reasons
    if off and promote:
        assert decision.summary() == (
            "PROMOTE, SPECULATION OFF: NO DRAFTER: the challenger, which would serve, is slower than no "
            "speculation: 0.850 [0.800, 0.900], n=24"
        )
    if off and not promote:
        assert decision.summary().startswith("REJECT, SPECULATION OFF") and decision.summary().endswith(
            "NO DRAFTER: the champion, which would serve, is slower than no speculation: 0.790 [0.750, 0.830], n=24"
        )


def test_no_drafter_needs_a_champion():
    slow = arm(speedup=iv(0.85, 0.80, 0.90), vs=iv(0.7, 0.65, 0.75))
    assert decide(slow, None, POLICY).disable_speculation is False  # nothing served by the flywheel yet
    assert decide(slow, CHAMP, POLICY).disable_speculation is False  # the champion is faster than none


def test_with_speculation_off_a_challenger_is_judged_on_the_floor_alone():
    # the fleet serves no drafter: beating the (unserved) champion is not the question, the floor is
    behind = arm(speedup=iv(1.05, 1.02, 1.08), vs=iv(0.95, 0.92, 0.98))
    assert decide(behind, CHAMP, POLICY).promote is False
    decision = decide(behind, CHAMP, POLICY, speculation_off=True)
    assert decision.promote is True and any("speculation is off" in r for r in decision.reasons)
    slower = arm(speedup=iv(0.9, 0.85, 0.95))
    decision = decide(slower, SLOW_CHAMP, POLICY, speculation_off=True)
    assert decision.promote is False and decision.disable_speculation is False  # already off
