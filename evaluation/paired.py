"""Paired statistics of the served evaluation: per-prompt ratios, their interval, the arm order.

Every held-out prompt is served by every arm in every round, so the unit of comparison is the prompt: the
ratio of an arm's tokens/s to the reference arm's on the *same* prompt in the *same* round removes the
prompt's own length and difficulty from the comparison. A prompt's ratio over several rounds is their
geometric mean; the interval is a t interval on the log ratios across prompts (ratios are multiplicative,
and their logs are close to symmetric), mapped back with exp.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Interval:
    """Geometric-mean ratio with its two-sided interval over ``n`` paired prompts."""

    point: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.point:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"


def t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student t quantile, e.g. 2.776 for 95 % and 4 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, dof))


def ratio_interval(ratios: Sequence[float], confidence: float = 0.95) -> Interval | None:
    """t interval of the mean log ratio, as ratios. None without data; [0, inf] for a single prompt."""
    if any(r <= 0 for r in ratios):
        raise ValueError("ratios of tokens/s must be positive")
    n = len(ratios)
    if n == 0:
        return None
    logs = [math.log(r) for r in ratios]
    mean = sum(logs) / n
    if n == 1:
        return Interval(math.exp(mean), 0.0, math.inf, 1, confidence)
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = t_quantile(confidence, n - 1) * sd / math.sqrt(n)
    return Interval(math.exp(mean), math.exp(mean - half), math.exp(mean + half), n, confidence)


def per_prompt_ratios(
    rates: Mapping[str, Mapping[str, Sequence[float]]], arm: str, reference: str
) -> list[float]:
    """Per prompt: the geometric mean over rounds of ``arm``'s rate ÷ ``reference``'s rate in that round.

    ``rates[arm][prompt]`` lists one tokens/s per round (same round order for every arm). Prompts that
    either arm lacks are left out.
    """
    out = []
    for prompt, mine in rates[arm].items():
        theirs = rates[reference].get(prompt)
        if not theirs:
            continue
        pairs = list(zip(mine, theirs, strict=False))
        out.append(math.exp(sum(math.log(a / b) for a, b in pairs) / len(pairs)))
    return out


def latin_square(arms: Sequence[str], rounds: int) -> list[list[str]]:
    """Arm order per round, balanced for position and for carry-over (a Williams design): even rounds take
    the cyclic rotations of ``arms``, odd rounds those of the reversed order. Over ``2 * len(arms)`` rounds
    every arm runs in every position equally often and follows every other arm equally often, so no arm
    always runs first, right after a swap, or right after a given other arm on the same server."""
    k = len(arms)
    rows = []
    for r in range(rounds):
        base = list(arms) if r % 2 == 0 else list(reversed(arms))
        shift = (r // 2) % k
        rows.append(base[shift:] + base[:shift])
    return rows
