"""The promotion gate: a pure decision on measured results, every check explained.

A challenger becomes champion only if, at the decision concurrency:
1. both arms were measured on at least ``min_samples`` requests;
2. its measured speedup over no speculation is at least ``min_speedup`` (1.0: never slower than none);
3. it beats the champion's speedup by the relative ``margin``;
4. no domain's acceptance length tau drops more than ``domain_tau_tolerance`` (relative) below the
   champion's on that domain.
Without a champion, checks 3 and 4 pass by definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArmMeasurement:
    """What the served benchmark measured for one drafter at the decision concurrency."""

    speedup: float  # output tokens/s with this drafter / without speculation, same run
    tau: float
    tau_by_domain: dict[str, float] = field(default_factory=dict)
    samples: int = 0


@dataclass(frozen=True)
class GatePolicy:
    min_speedup: float = 1.0
    margin: float = 0.02
    domain_tau_tolerance: float = 0.05
    min_samples: int = 32


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: tuple[str, ...]

    def summary(self) -> str:
        verdict = "PROMOTE" if self.promote else "REJECT"
        failed = [r for r in self.reasons if r.startswith("FAIL")]
        return f"{verdict}: " + ("; ".join(failed) if failed else "all checks passed")


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
            floor = old * (1 - policy.domain_tau_tolerance)
            reasons.append(
                _check(
                    new >= floor,
                    f"tau[{domain}]: {new:.3f} >= {old:.3f} - {policy.domain_tau_tolerance:.0%} = {floor:.3f}",
                )
            )
    return GateDecision(all(r.startswith("PASS") for r in reasons), tuple(reasons))
