"""`flywheel` commands of the trainer stage (registered by flywheel/cli.py). Keep top-level imports light."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from pydantic import ValidationError

console = Console()
errors = Console(stderr=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, never wrapped, then exit."""
    from rich.markup import escape

    errors.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def _summary(e: ValidationError) -> str:
    """A pydantic ValidationError on one line: ``field.path: message`` per error."""
    return "; ".join(
        f"{'.'.join(str(part) for part in err['loc']) or 'recipe'}: {err['msg']}" for err in e.errors()
    )


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the main app."""
    app.command("train")(train)
    app.command("replay-eval")(replay_eval)


def train(
    recipe: Annotated[Path, typer.Option("--recipe", help="recipe YAML (see trainer/recipes/)", exists=True)],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted overrides: optim.lr=1e-4 max_steps=50")
    ] = None,
) -> None:
    """Train an EAGLE-3 drafter on a traces window (target features recomputed on the fly).

    Under torchrun the same command runs DDP (NCCL on GPUs, gloo on CPU): `torchrun --nproc-per-node 2 -m trainer.train_loop R.yaml`.
    """
    import sys

    from pydantic import ValidationError

    from core.settings import get_settings
    from trainer.recipes import load_recipe
    from trainer.trace_window import WindowError

    try:
        cfg = load_recipe(recipe, overrides or [])
    except ValidationError as e:
        _fail(f"invalid recipe {recipe}: {_summary(e)}", 2)
    except ValueError as e:
        _fail(f"invalid recipe {recipe}: {e}", 2)
    from trainer.train_loop import run_recipe

    settings = get_settings()
    cfg = cfg.with_defaults(settings)
    try:
        result = run_recipe(cfg, settings, argv=sys.argv)
    except WindowError as e:
        _fail(str(e))
    last = result.history[-1] if result.history else {}
    console.print(
        f"trained {result.step} steps; loss {last.get('loss', float('nan')):.4f}; "
        f"drafter at {cfg.resolved_output_dir() / 'drafter'}"
    )
    if getattr(result, "final_replay", None) is not None:
        console.print(replay_table(result.final_replay.as_dict(), "held-out replay"))


def _fmt(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def replay_table(rows: dict, title: str) -> Table:
    table = Table("domain", "traces", "verify steps", "replay tau", "recorded tau", title=title)
    for name, r in rows.items():
        table.add_row(name, str(r["traces"]), str(r["steps"]), _fmt(r["tau"]), _fmt(r["recorded_tau"]))
    return table


def replay_eval(
    drafter: Annotated[Path, typer.Option("--drafter", help="drafter dir (vLLM eagle3 format)", exists=True)],
    table: Annotated[
        str | None, typer.Option("--table", help="traces Delta table (default: the lake's)")
    ] = None,
    start: Annotated[datetime | None, typer.Option(help="window start (ingest_time, UTC)")] = None,
    end: Annotated[datetime | None, typer.Option(help="window end (exclusive)")] = None,
    version: Annotated[int | None, typer.Option(help="table snapshot version")] = None,
    after_version: Annotated[int | None, typer.Option(help="only rows appended after this version")] = None,
    newest_fraction: Annotated[
        float, typer.Option(help="replay only the newest fraction (held-out part)")
    ] = 1.0,
    k: Annotated[int, typer.Option("-k", "--num-spec-tokens", help="draft tokens per verify step")] = 3,
    max_traces: Annotated[int | None, typer.Option(help="replay at most this many traces")] = None,
    target: Annotated[Path | None, typer.Option(help="HF target dir (default: the served target)")] = None,
    baseline: Annotated[
        bool, typer.Option(help="also replay an untrained head with the same vocabulary")
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the result as JSON")] = None,
) -> None:
    """Offline replay tau of a drafter on a traces window, per domain (greedy verification)."""
    import itertools

    from rich.progress import Progress

    from core.settings import get_settings
    from trainer.eagle3_drafter import Eagle3Drafter
    from trainer.replay_eval import random_drafter_like, replay_sequences
    from trainer.target_features import TargetModel
    from trainer.trace_window import Window, WindowError, WindowReader, target_identity

    settings = get_settings()
    target_dir = target or settings.serving.target_dir
    model_id, revision = target_identity(target_dir)
    try:
        reader = WindowReader(
            Window(
                table or settings.lake.traces_uri,
                start,
                end,
                version,
                after_version,
                storage_options=settings.lake.delta_options(),
                target_model_id=model_id,
                target_revision=revision,
            )
        )
    except WindowError as e:
        _fail(str(e))
    cutoff = reader.holdout_cutoff(newest_fraction) if newest_fraction < 1.0 else None
    total = reader.num_rows(start=cutoff)
    total = min(total, max_traces) if max_traces else total
    tm = TargetModel(target_dir)
    models = {"drafter": Eagle3Drafter.from_pretrained(drafter).eval()}
    if baseline:
        models["random head"] = random_drafter_like(models["drafter"])
    result = {}
    for name, model in models.items():
        with Progress(console=console) as bar:
            task = bar.add_task(f"replay {name}", total=total)
            seqs = itertools.islice(reader.sequences(start=cutoff), max_traces)
            report = replay_sequences(model, tm, seqs, k, progress=lambda t=task, b=bar: b.advance(t))
        result[name] = report.as_dict()
        console.print(replay_table(result[name], f"{name}: {drafter} (K={k}, table v{reader.version})"))
    if json_out:
        json_out.write_text(json.dumps({"window": reader.provenance(), "k": k, "results": result}, indent=2))
