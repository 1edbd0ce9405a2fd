"""The promotion gate: a pure decision on measured results, every check explained.

A challenger becomes champion only if, at the decision concurrency:
1. both arms were measured on at least ``min_samples`` requests;
2. its measured speedup over no speculation is at least ``min_speedup`` (1.0: never slower than none);
3. it beats the champion's speedup by the relative ``margin``;
4. no domain's acceptance length tau drops more than ``domain_tau_tolerance`` (relative) below the
   champion's on that domain.
Without a champion, checks 3 and 4 pass by definition. A challenger with no measured verify step (tau None)
fails: there is nothing to promote on.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from core.settings import CycleSettings


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class ArmMeasurement(_Frozen):
    """What the served benchmark measured for one drafter at the decision concurrency."""

    speedup: float  # output tokens/s with this drafter / without speculation, same run
    tau: float | None  # None: no verify step was measured
    tau_by_domain: dict[str, float | None] = {}
    samples: int = 0


class GatePolicy(_Frozen):
    """The thresholds; their one default each lives in ``CycleSettings`` (``gate_*``)."""

    min_speedup: float
    margin: float
    domain_tau_tolerance: float
    min_samples: int

    @classmethod
    def from_settings(cls, cycle: CycleSettings) -> GatePolicy:
        return cls(
            min_speedup=cycle.gate_min_speedup,
            margin=cycle.gate_margin,
            domain_tau_tolerance=cycle.gate_domain_tau_tolerance,
            min_samples=cycle.gate_min_samples,
        )


class GateDecision(_Frozen):
    promote: bool
    reasons: tuple[str, ...]

    def summary(self) -> str:
        verdict = "PROMOTE" if self.promote else "REJECT"
        failed = [r for r in self.reasons if r.startswith("FAIL")]
        return f"{verdict}: " + ("; ".join(failed) if failed else "all checks passed")


class GateResult(_Frozen):
    """The gate step's output (one XCom value in the DAG): the decision for one registered version."""

    version: str
    promote: bool
    summary: str
    reasons: list[str]


def _check(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'} {text}"


def decide(challenger: ArmMeasurement, champion: ArmMeasurement | None, policy: GatePolicy) -> GateDecision:
    reasons = [
        _check(
            challenger.samples >= policy.min_samples
            and (champion is None or champion.samples >= policy.min_samples),
            f"samples: challenger {challenger.samples}"
            + (f", champion {champion.samples}" if champion else "")
            + f" (minimum {policy.min_samples})",
        ),
        _check(
            challenger.speedup >= policy.min_speedup,
            f"speedup floor: {challenger.speedup:.3f} >= {policy.min_speedup:.3f}",
        ),
    ]
    if challenger.tau is None:
        reasons.append(_check(False, "tau: no verify step measured for the challenger"))
    if champion is None:
        reasons.append(_check(True, "no champion yet: margin and per-domain checks do not apply"))
    else:
        needed = champion.speedup * (1 + policy.margin)
        reasons.append(
            _check(
                challenger.speedup >= needed,
                f"beats champion: {challenger.speedup:.3f} >= {champion.speedup:.3f} x {1 + policy.margin:.2f}"
                f" = {needed:.3f}",
            )
        )
        for domain in sorted(challenger.tau_by_domain.keys() & champion.tau_by_domain.keys()):
            new, old = challenger.tau_by_domain[domain], champion.tau_by_domain[domain]
            if old is None:
                continue  # nothing to regress from
            if new is None:
                reasons.append(_check(False, f"tau[{domain}]: no verify step measured (champion {old:.3f})"))
                continue
            floor = old * (1 - policy.domain_tau_tolerance)
            reasons.append(
                _check(
                    new >= floor,
                    f"tau[{domain}]: {new:.3f} >= {old:.3f} - {policy.domain_tau_tolerance:.0%} = {floor:.3f}",
                )
            )
    return GateDecision(promote=all(r.startswith("PASS") for r in reasons), reasons=tuple(reasons))
