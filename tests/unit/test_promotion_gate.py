from __future__ import annotations

import pytest

from evaluation.gate import ArmMeasurement, GatePolicy, decide

POLICY = GatePolicy(min_speedup=1.0, margin=0.02, domain_tau_tolerance=0.05, min_samples=32)
CHAMP = ArmMeasurement(speedup=1.30, tau=2.0, tau_by_domain={"code": 2.2, "prose": 1.8}, samples=64)


def arm(speedup=1.40, tau=2.1, code=2.3, prose=1.85, samples=64) -> ArmMeasurement:
    return ArmMeasurement(
        speedup=speedup, tau=tau, tau_by_domain={"code": code, "prose": prose}, samples=samples
    )


@pytest.mark.parametrize(
    ("challenger", "champion", "promote", "failing"),
    [
        (arm(), CHAMP, True, []),
        (arm(), None, True, []),  # first champion: floor and samples only
        (arm(speedup=0.97), None, False, ["speedup floor"]),
        (arm(speedup=1.00), None, True, []),  # the floor is inclusive
        (arm(speedup=1.32), CHAMP, False, ["beats champion"]),  # 1.32 < 1.30 * 1.02 = 1.326
        (arm(speedup=1.326), CHAMP, True, []),
        (arm(prose=1.70), CHAMP, False, ["tau[prose]"]),  # 1.70 < 1.8 * 0.95 = 1.71
        (arm(prose=1.71), CHAMP, True, []),
        (arm(samples=31), CHAMP, False, ["samples"]),
        (
            arm(),
            ArmMeasurement(speedup=1.3, tau=2.0, tau_by_domain={"code": 2.2}, samples=10),
            False,
            ["samples"],
        ),
        (
            arm(speedup=0.9, prose=1.0, samples=5),
            CHAMP,
            False,
            ["samples", "speedup floor", "beats champion", "tau[prose]"],
        ),
    ],
)
def test_gate_table(challenger, champion, promote, failing):
    decision = decide(challenger, champion, POLICY)
    assert decision.promote is promote
    failed = [r.split(" ", 1)[1] for r in decision.reasons if r.startswith("FAIL")]
    assert [next(f for f in failing if r.startswith(f)) for r in failed] == failing
    assert decision.summary().startswith("PROMOTE" if promote else "REJECT")


def test_domains_only_compared_where_both_were_measured():
    challenger = ArmMeasurement(speedup=1.5, tau=2.0, tau_by_domain={"code": 2.5, "docs": 1.0}, samples=64)
    decision = decide(challenger, CHAMP, POLICY)
    assert decision.promote and not any("docs" in r or "prose" in r for r in decision.reasons)


def test_no_measured_tau_is_explicit_and_rejected():
    """A challenger with no verify step has no tau (None, not 1.0): the gate says so and rejects it."""
    silent = ArmMeasurement(speedup=1.2, tau=None, tau_by_domain={"code": None, "prose": 1.9}, samples=64)
    decision = decide(silent, CHAMP, POLICY)
    assert not decision.promote
    failed = [r for r in decision.reasons if r.startswith("FAIL")]
    assert any("tau: no verify step" in r for r in failed) and any(
        "tau[code]: no verify step" in r for r in failed
    )


def test_policy_defaults_are_the_cycle_settings():
    from core.settings import CycleSettings

    cycle = CycleSettings()
    policy = GatePolicy.from_settings(cycle)
    assert (policy.min_speedup, policy.margin, policy.min_samples) == (
        cycle.gate_min_speedup,
        cycle.gate_margin,
        cycle.gate_min_samples,
    )
