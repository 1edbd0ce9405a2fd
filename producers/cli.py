"""`flywheel serve` and `flywheel traffic` (registered by flywheel/cli.py). Keep top-level imports light."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def serve(
    drafter: Annotated[
        Path | None, typer.Option(help="EAGLE-3 drafter dir (vLLM format) to serve with")
    ] = None,
    method: Annotated[
        str, typer.Option(help="eagle3 | ngram | none (default: eagle3 with --drafter, else none)")
    ] = "",
    num_spec_tokens: Annotated[int, typer.Option("-k", "--num-spec-tokens", help="draft length K")] = 3,
    detach: Annotated[
        bool, typer.Option(help="run in the background (PID/log under the state dir), wait healthy")
    ] = False,
    stop: Annotated[bool, typer.Option(help="stop a server started with --detach")] = False,
    dev_mode: Annotated[
        bool,
        typer.Option(
            help="expose vLLM's weight-update HTTP routes (VLLM_SERVER_DEV_MODE): unauthenticated, so the "
            "host must be loopback"
        ),
    ] = False,
    extra: Annotated[list[str] | None, typer.Argument(help="more `vllm serve` arguments, after --")] = None,
) -> None:
    """Serve the target with stock vLLM (OpenAI API on FLYWHEEL_SERVING_HOST:PORT, default 127.0.0.1:8000).

    The spec-flywheel plugin loads through vLLM's `vllm.general_plugins` entry point: every finished request
    becomes a TraceEvent on Kafka, and drafters promoted on the promotions topic are hot-swapped in.
    Run `flywheel models prepare` first.
    """
    from core import process
    from core.settings import get_settings
    from infra import stack
    from producers.vllm_server import VllmServer, cpu_environment, serve_args

    settings = get_settings()
    method = method or ("eagle3" if drafter else "none")
    args = serve_args(
        settings.serving, method, drafter.resolve() if drafter else None, num_spec_tokens, extra
    )
    env = cpu_environment(settings.serving) | ({"VLLM_SERVER_DEV_MODE": "1"} if dev_mode else {})
    server = VllmServer(settings.stack, settings.serving, args, env)
    if stop:
        console.print("stopped" if process.stop(server) else "no detached server was running")
        return
    if not settings.serving.target_dir.exists():
        console.print(f"[red]error:[/] {settings.serving.target_dir} missing: run `flywheel models prepare`")
        raise typer.Exit(1)
    if not detach:
        os.execve(sys.executable, server.command(), server.env())
    try:
        with console.status(f"starting vLLM on {server.address} (first start compiles; minutes on CPU)..."):
            st = process.start(server, timeout_s=900)
    except stack.StackError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None
    console.print(f"vLLM healthy at http://{st.address} (pid {st.pid}, log {st.log})")


def traffic(
    schedule: Annotated[str, typer.Argument(help="phases DOMAIN:COUNT in order, e.g. code:300,prose:300")],
    concurrency: Annotated[int, typer.Option("-c", help="requests in flight")] = 4,
    max_tokens: Annotated[int, typer.Option(help="max tokens per response")] = 128,
    temperature: Annotated[float, typer.Option(help="sampling temperature (0 = greedy)")] = 0.0,
    tenant: Annotated[str | None, typer.Option(help="tenant label sent as vllm_xargs.tenant")] = None,
    subset: Annotated[str, typer.Option(help="all | train | heldout prompts of each domain")] = "all",
    seed: Annotated[int, typer.Option(help="prompt order seed")] = 0,
    url: Annotated[str | None, typer.Option(help="server base URL (default from FLYWHEEL_SERVING_*)")] = None,
) -> None:
    """Replay real prompts by domain through the OpenAI API, with a live progress bar and tau per domain."""
    import asyncio

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from core.settings import get_settings
    from core.tau import tau_of
    from producers.traffic import parse_schedule, replay

    serving = get_settings().serving
    try:
        phases = parse_schedule(schedule)
    except ValueError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
    steps: list[int] = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("traffic", total=sum(p.requests for p in phases))

        def on_result(r) -> None:
            steps.extend(r.per_step_accepted)
            tau = tau_of(steps[-2000:])
            shown = f"{tau:.2f}" if tau is not None else "-"
            progress.update(task, advance=1, description=f"{r.domain:>6}  tau(recent) {shown}")

        report = asyncio.run(
            replay(
                url or f"http://{serving.host}:{serving.port}",
                serving.target_model,
                phases,
                concurrency=concurrency,
                max_tokens=max_tokens,
                temperature=temperature,
                tenant=tenant,
                subset=subset,
                seed=seed,
                on_result=on_result,
            )
        )
    table = Table("domain", "requests", "failed", "output tokens", "tau")
    for domain, row in report.by_domain().items():
        table.add_row(
            domain,
            str(row["requests"]),
            str(row["failed"]),
            str(row["output_tokens"]),
            f"{row['tau']:.3f}" if row["tau"] is not None else "-",
        )
    console.print(table)
    console.print(f"{report.output_tokens_per_s:.1f} output tokens/s over {report.wall_s:.1f}s")
    if any(not r.ok for r in report.results):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the main app."""
    app.command("serve", context_settings={"allow_extra_args": True})(serve)
    app.command("traffic")(traffic)
