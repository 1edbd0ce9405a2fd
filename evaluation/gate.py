"""The promotion gate: a pure decision on paired, interval-bounded measurements, every check explained.

A challenger becomes champion only if, at the decision concurrency, on held-out traffic:
1. it was measured on at least ``min_samples`` paired prompts, and accepted drafts at all (tau measured);
2. without a champion (or while speculation is off): the lower bound of challenger ÷ no speculation clears
   ``min_speedup`` (the floor);
3. with a champion serving: the lower bound of challenger ÷ champion clears ``1 + margin``. The floor is
   not asked again: the fleet already speculates with the champion, and a drafter faster than it with
   confidence cannot make the fleet slower, wherever the two stand against no speculation;
4. no domain's acceptance length tau drops more than ``domain_tau_tolerance`` below the champion's.
An interval that contains its threshold is *inconclusive*: a rejection that says so.

The gate never leaves the fleet slower than no speculation: when the drafter that serves after the
decision (the challenger if promoted, else the champion) measures below 1.0x with confidence (upper bound
< 1), the decision adds "no drafter" (``disable_speculation``): the nodes stop speculating until a
challenger clears the floor. The champion stays loaded, and while speculation is off a challenger is
judged like the first one: against no speculation, on the floor.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from core.settings import CycleSettings


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class RatioInterval(_Frozen):
    """A paired ratio of tokens/s (geometric mean over prompts) with its interval."""

    point: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.point:.3f} [{self.low:.3f}, {self.high:.3f}], n={self.n}"


class ArmMeasurement(_Frozen):
    """What the served evaluation measured for one drafter at the decision concurrency."""

    speedup: RatioInterval  # this arm ÷ no speculation, per prompt, same rounds
    tau: float | None  # None: no verify step was measured
    tau_by_domain: dict[str, float | None] = {}
    samples: int = 0  # paired prompts at the decision concurrency
    vs_champion: RatioInterval | None = None  # the challenger's arm only, when there is a champion


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

    def decisive(self, challenger: RatioInterval, vs_champion: RatioInterval | None) -> bool:
        """Whether more rounds can no longer change the speed verdict: the deciding interval lies wholly
        on one side of its threshold (the served evaluation stops early then)."""
        interval, threshold = (
            (vs_champion, 1 + self.margin) if vs_champion is not None else (challenger, self.min_speedup)
        )
        return interval.low >= threshold or interval.high < threshold


class GateDecision(_Frozen):
    promote: bool
    reasons: tuple[str, ...]
    disable_speculation: bool = False  # "no drafter": the drafter that would serve is slower than none

    def summary(self) -> str:
        verdict = ("PROMOTE" if self.promote else "REJECT") + (
            ", SPECULATION OFF" if self.disable_speculation else ""
        )
        failed = [r for r in self.reasons if r.startswith(("FAIL", "NO DRAFTER"))]
        return f"{verdict}: " + ("; ".join(failed) if failed else "all checks passed")


class GateResult(_Frozen):
    """The gate step's output (one XCom value in the DAG): the decision for one registered version."""

    version: str
    promote: bool
    summary: str
    reasons: list[str]
    disable_speculation: bool = False


def _check(ok: bool, text: str) -> str:
    """A check's line: PASS or FAIL, then why."""
    return f"{'PASS' if ok else 'FAIL'} {text}"


def _decision(reasons: list[str]) -> GateDecision:
    """Promote unless a check failed (a NOTE line reports a figure no check asks of)."""
    return GateDecision(promote=not any(r.startswith("FAIL") for r in reasons), reasons=tuple(reasons))


def _bound(name: str, interval: RatioInterval, threshold: float) -> str:
    """PASS when the lower bound clears ``threshold``; FAIL below it, or inconclusive when it straddles."""
    if interval.low >= threshold:
        return _check(True, f"{name}: lower bound {interval.low:.3f} >= {threshold:.3f} ({interval})")
    if interval.high < threshold:
        return _check(False, f"{name}: upper bound {interval.high:.3f} < {threshold:.3f} ({interval})")
    return _check(False, f"{name}: inconclusive, the interval contains {threshold:.3f} ({interval})")


def decide(
    challenger: ArmMeasurement,
    champion: ArmMeasurement | None,
    policy: GatePolicy,
    speculation_off: bool = False,
) -> GateDecision:
    """The decision on ``challenger``; ``speculation_off``: the fleet serves no drafter now (a disable)."""
    decision = _decide(challenger, None if speculation_off else champion, policy, speculation_off)
    if speculation_off or champion is None:
        return decision
    name, served = ("challenger", challenger) if decision.promote else ("champion", champion)
    if served.speedup.high < 1.0:  # the drafter the fleet would serve is slower than none
        note = f"NO DRAFTER: the {name}, which would serve, is slower than no speculation: {served.speedup}"
        return decision.model_copy(update={"reasons": (*decision.reasons, note), "disable_speculation": True})
    return decision


def _decide(
    challenger: ArmMeasurement, champion: ArmMeasurement | None, policy: GatePolicy, speculation_off: bool
) -> GateDecision:
    reasons = [
        _check(
            challenger.samples >= policy.min_samples,
            f"samples: {challenger.samples} paired prompts (minimum {policy.min_samples})",
        )
    ]
    if challenger.tau is None:
        reasons.append(_check(False, "tau: no verify step measured for the challenger"))
    if champion is None:
        reasons.append(
            _bound("speedup floor (challenger ÷ no speculation)", challenger.speedup, policy.min_speedup)
        )
        reasons.append(
            _check(
                True,
                "speculation is off: judged against no speculation, as the first drafter is"
                if speculation_off
                else "no champion yet: margin and per-domain checks do not apply",
            )
        )
        return _decision(reasons)
    if challenger.vs_champion is None:
        reasons.append(_check(False, "beats champion: no paired measurement against the champion"))
    else:
        reasons.append(
            _bound("beats champion (challenger ÷ champion)", challenger.vs_champion, 1 + policy.margin)
        )
    reasons.append(
        f"NOTE challenger ÷ no speculation {challenger.speedup}: the floor is not asked with a champion "
        "serving (faster than the champion with confidence cannot slow the fleet)"
    )
    for domain in sorted(challenger.tau_by_domain.keys() & champion.tau_by_domain.keys()):
        new, old = challenger.tau_by_domain[domain], champion.tau_by_domain[domain]
        if old is None:
            continue  # nothing to regress from
        if new is None:
            reasons.append(_check(False, f"tau[{domain}]: no verify step measured (champion {old:.3f})"))
            continue
        tolerated = old * (1 - policy.domain_tau_tolerance)
        reasons.append(
            _check(
                new >= tolerated,
                f"tau[{domain}]: {new:.3f} >= {old:.3f} - {policy.domain_tau_tolerance:.0%} = {tolerated:.3f}",
            )
        )
    return _decision(reasons)
