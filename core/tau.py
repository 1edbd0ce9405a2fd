"""Acceptance length tau: the one definition every test, benchmark, gate and report uses.

tau = mean tokens emitted per verify step = 1 + mean(per_step_accepted), pooled over the verify steps of
the requests it describes (a request with more steps weighs more). With no verify step there is nothing to
measure: the answer is ``None``, never 1.0 (which would read as "a drafter that is never accepted") or NaN
(which compares false with everything). Callers decide what no data means for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def tau(accepted: int | float, steps: int) -> float | None:
    """tau from a total of accepted draft tokens over ``steps`` verify steps; None when ``steps`` is 0."""
    if steps < 0 or accepted < 0:
        raise ValueError(f"accepted ({accepted}) and steps ({steps}) must be >= 0")
    return 1.0 + accepted / steps if steps else None


def tau_of(per_step_accepted: Sequence[int]) -> float | None:
    """tau of one request's (or any flat list of) per-step accepted counts."""
    return tau(sum(per_step_accepted), len(per_step_accepted))


def pooled_tau(requests: Iterable[Sequence[int]]) -> float | None:
    """tau over every verify step of ``requests``."""
    accepted = steps = 0
    for r in requests:
        accepted, steps = accepted + sum(r), steps + len(r)
    return tau(accepted, steps)


def rolling_tau(requests: Sequence[Sequence[int]], window: int) -> list[float | None]:
    """tau over the trailing ``window`` requests, at every request (fewer at the start)."""
    if window < 1:
        raise ValueError("window must be >= 1")
    accepted = steps = 0
    out: list[float | None] = []
    for i, r in enumerate(requests):
        accepted, steps = accepted + sum(r), steps + len(r)
        if i >= window:
            old = requests[i - window]
            accepted, steps = accepted - sum(old), steps - len(old)
        out.append(tau(accepted, steps))
    return out
