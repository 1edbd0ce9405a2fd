"""`flywheel bench ...`: benchmarks that print JSON (registered by flywheel/cli.py). Light top-level imports."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def _fail(message: str, code: int = 1) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def bench_capture(
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the JSON here")] = None,
    rounds: Annotated[
        int, typer.Option(help="timed round pairs per concurrency level (after a warm-up pair)")
    ] = 10,
    levels: Annotated[
        str, typer.Option(help="comma-separated concurrency levels; the highest should saturate the server")
    ] = "1,8,32",
    requests: Annotated[
        int | None, typer.Option(help="requests per round (default: max(6, 2 x concurrency))")
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(help="also sample both API servers with py-spy under load; collapsed stacks go here"),
    ] = None,
    profile_s: Annotated[int, typer.Option(help="seconds of sampling per server")] = 30,
    crossover: Annotated[
        bool,
        typer.Option(
            help="half the rounds with the plugin on each server (restarts both once); off: one half"
        ),
    ] = True,
    plugin_env: Annotated[
        list[str] | None,
        typer.Option(
            "--plugin-env",
            help="KEY=VALUE for the plugin server only (repeatable), for controls: "
            "VLLM_PLUGINS=lora_filesystem_resolver,lora_hf_hub_resolver makes it stock too (an A/A); "
            "FLYWHEEL_SERVING_CAPTURE_ENABLED=false loads the plugin but captures nothing",
        ),
    ] = None,
) -> None:
    """Plugin overhead: tokens/s with the plugin ÷ without, with a 95 % interval per concurrency level.

    Starts two vLLM servers (ports 8021/8022; the plugin disabled on one) on the local stack and measures them
    one at a time (the other frozen with SIGSTOP), in ABBA order on the same prompts. Per level: ratio and
    interval, per-round tokens/s, p50/p99 latency ratios, the emitter's queue peak and drops. Also wire bytes
    per token, emitter events/s, API-server RSS; with --profile, where the API server's time goes.
    """
    import bench
    from bench.capture import run
    from core.settings import get_settings

    console = Console(stderr=True)
    try:
        parsed = tuple(int(x) for x in levels.split(",") if x.strip())
    except ValueError:
        _fail(f"--levels must be comma-separated integers, got {levels!r}")
    if not parsed or min(parsed) < 1 or rounds < 1:
        _fail("--levels needs at least one concurrency >= 1 and --rounds at least 1")
    extra = dict(kv.split("=", 1) for kv in plugin_env or [] if "=" in kv)
    if len(extra) != len(plugin_env or []):
        _fail("--plugin-env takes KEY=VALUE")
    result = run(
        get_settings(),
        rounds=rounds,
        levels=parsed,
        requests_per_round=requests,
        profile_dir=profile,
        profile_s=profile_s,
        plugin_env=extra,
        crossover=crossover,
        progress=lambda line: console.print(f"[dim]bench capture:[/] {line}"),
    )
    bench.emit("capture", result, json_path)


def bench_ingest(
    json_path: Annotated[Path, typer.Option("--json", help="write the result JSON here")] = Path(
        "bench/results/ingest.json"
    ),
    events: Annotated[int, typer.Option(help="events to produce and ingest")] = 300_000,
    partitions: Annotated[int, typer.Option(help="partitions of the fresh bench topic")] = 6,
    seed: Annotated[int, typer.Option(help="random seed of the synthetic traces")] = 0,
    pool: Annotated[
        int, typer.Option(help="distinct events built (then replayed with fresh event ids)")
    ] = 60_000,
) -> None:
    """Ingest benchmark: `flywheel ingest` vs a bare confluent-kafka consumer on the same fresh topic, same run.

    Prints JSON (and writes it to --json): ingest_ratio, at_rest_bytes_per_token, events, rows, duplicates, consumer_peak_rss_mib, CPU per event, decode-only and write-only rates. Events are real text tokenized with the target tokenizer (bench/realistic_traces.py).
    """
    from bench.ingest import run
    from core.settings import get_settings

    result = run(
        get_settings(),
        events=events,
        partitions=partitions,
        seed=seed,
        pool=pool,
        console=Console(stderr=True),
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2))
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


def bench_train(
    json_path: Annotated[Path, typer.Option("--json", help="write the result here")],
    table: Annotated[
        str | None, typer.Option("--table", help="traces table (default: build one from real traffic)")
    ] = None,
    steps: Annotated[int, typer.Option(help="timed training steps per mode")] = 6,
    draft_vocab_size: Annotated[int, typer.Option(help="draft vocabulary size")] = 8192,
) -> None:
    """Trainer benchmark: recompute_ratio, trace vs hidden-state bytes, peak RSS for two window sizes."""
    import bench
    from bench.train import run
    from core.settings import get_settings

    bench.emit(
        "train", run(get_settings(), table=table, steps=steps, draft_vocab_size=draft_vocab_size), json_path
    )


def bench_drafters(
    json_path: Annotated[Path, typer.Option("--json", help="write the result here")],
    drafter: Annotated[
        list[str], typer.Option("--drafter", help="NAME=DIR of an EAGLE-3 drafter (repeatable)")
    ],
    ngram: Annotated[bool, typer.Option(help="also serve an ngram arm (prompt lookup)")] = True,
    per_domain: Annotated[int, typer.Option(help="held-out requests per domain and round")] = 6,
    rounds: Annotated[int, typer.Option(help="rounds (arm order rotates per round)")] = 1,
    max_tokens: Annotated[int, typer.Option(help="max tokens per response")] = 96,
    k: Annotated[int, typer.Option("-k", "--num-spec-tokens", help="draft tokens per verify step")] = 3,
) -> None:
    """Served tau and speedup of EAGLE-3 drafters (and ngram) on the same held-out prompts, one run.

    Starts three vLLM servers (no speculation, EAGLE-3 with the drafters swapped in by name, ngram).
    Example: `flywheel bench drafters --json d.json --drafter random=DIR1 --drafter trained=DIR2`.
    """
    from bench.drafters import DraftersBenchConfig, run

    named = {}
    for item in drafter:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            _fail(f"--drafter wants NAME=DIR with an existing drafter dir, got {item!r}", 2)
        named[name] = Path(path)
    cfg = DraftersBenchConfig(
        requests_per_domain=per_domain, rounds=rounds, max_tokens=max_tokens, num_spec_tokens=k
    )
    import bench

    err = Console(stderr=True)  # progress on stderr, the JSON alone on stdout
    from core.settings import get_settings

    result = run(
        named,
        ngram=ngram,
        config=cfg,
        on_step=lambda line: err.print(line, style="dim"),
        settings=get_settings(),
    )
    bench.emit("drafters", result, json_path)


def bench_all(
    json_path: Annotated[Path, typer.Option("--json", help="write the gathered JSON here")],
    quick: Annotated[bool, typer.Option(help="smaller sizes for every benchmark")] = False,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="capture | ingest | train (repeatable)")
    ] = None,
) -> None:
    """Every benchmark (capture, ingest, train), each in its own process, gathered into one JSON with the
    docs/architecture.md definitions. Exit 1 if any benchmark failed (its error is in the JSON)."""
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


def bench_gate(
    drafter: Annotated[
        Path, typer.Option("--drafter", help="a trained EAGLE-3 drafter dir (A)", exists=True)
    ],
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the JSON here")] = None,
    table: Annotated[
        str | None,
        typer.Option("--table", help="traces table whose held-out split is replayed (default: the lake's)"),
    ] = None,
) -> None:
    """Does the gate tell a drafter from itself, and a better one from a worse one? A/A (the drafter against
    itself) and A/B (the drafter against an untrained head of the same vocabulary) on held-out traffic, paired,
    through the cycle's own measurement; sizes from FLYWHEEL_CYCLE_EVAL_* and FLYWHEEL_CYCLE_GATE_*.
    Starts two vLLM servers (ports 8061/8062)."""
    import bench
    from bench.gate import run
    from core.settings import get_settings

    err = Console(stderr=True)
    result = run(get_settings(), drafter, table, on_step=lambda line: err.print(line, style="dim"))
    bench.emit("gate", result, json_path)


def bench_objectives(
    parent: Annotated[
        Path | None,
        typer.Option(help="drafter dir every objective starts from (default: from scratch, no KL anchor)"),
    ] = None,
    steps: Annotated[int, typer.Option(help="optimizer steps per objective")] = 60,
    objectives: Annotated[
        str, typer.Option(help="comma-separated objectives (recipes trainer/recipes/objective_<name>.yaml)")
    ] = "kl,acceptance,rl",
    table: Annotated[
        str | None,
        typer.Option("--table", help="traces table to train on and judge by (default: the lake's)"),
    ] = None,
    served: Annotated[bool, typer.Option(help="also measure served tau through a vLLM server")] = True,
    per_domain: Annotated[int, typer.Option(help="held-out prompts per domain for served tau")] = 8,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the JSON here")] = None,
) -> None:
    """Which training objective makes the better drafter? The same window, parent, steps and seed once per
    objective (distillation KL; KL + expected acceptance under the served verification rule; KL + RL on the
    accepted length), each head judged on the window's held-out prompts: offline replay tau and served tau,
    per domain. Starts one vLLM server (port 8064) unless --no-served."""
    import bench
    from bench.objectives import run
    from core.settings import get_settings

    settings = get_settings()
    err = Console(stderr=True)
    result = run(
        settings,
        table or settings.lake.traces_uri,
        parent,
        steps,
        tuple(o.strip() for o in objectives.split(",") if o.strip()),
        served=served,
        per_domain=per_domain,
        on_step=lambda line: err.print(line, style="dim"),
    )
    bench.emit("objectives", result, json_path)


def register(bench: typer.Typer) -> None:
    """Add every benchmark to `flywheel bench`."""
    bench.command("capture")(bench_capture)
    bench.command("ingest")(bench_ingest)
    bench.command("train")(bench_train)
    bench.command("drafters")(bench_drafters)
    bench.command("gate")(bench_gate)
    bench.command("objectives")(bench_objectives)
    bench.command("all")(bench_all)
