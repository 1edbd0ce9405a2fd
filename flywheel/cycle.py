"""One flywheel cycle, as the functions the Airflow DAG tasks call (one task = one function).

window -> train challenger -> served evaluation -> gate -> promote or reject; plus the drift check (live tau
below the champion's evaluated tau) that starts a cycle too. New windows are announced by the ingest
(consumers/window_announcements.py), not looked for here.

Every function takes the ``Settings`` its caller built (the DAG task, the CLI, a test) and exchanges typed
models with the next step (``TraceWindow``, ``TrainedVersion``, ``Evaluation``, ``GateResult``); the DAG
serialises them once, at the XCom boundary. Every step is keyed on its input (the window, the model
version) and looks for its own earlier result before doing work, so a retried task or a re-run DAG never
trains, registers or promotes twice. Nothing here reads the wall clock: windows end at the newest trace of
a table version.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from consumers import windows
from consumers.windows import TraceWindow
from core.prompts import DOMAINS
from core.settings import CycleSettings, Settings
from evaluation.gate import GatePolicy, GateResult, decide
from evaluation.heldout_traffic import HeldoutTraffic, from_builtin, from_lake
from evaluation.served import (
    CHALLENGER,
    CHAMPION,
    EvalServers,
    Evaluation,
    ServedEvalConfig,
    paired_benchmark,
)
from promotion.drafter_registry import DrafterRegistry

if TYPE_CHECKING:
    from trainer.recipes import TrainRecipeConfig

REPO = Path(__file__).resolve().parents[1]
EVALUATION_ARTIFACT = "evaluation.json"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class TrainedVersion(_Frozen):
    """The train step's output: the registered challenger (``reused`` when a retry found it)."""

    version: str
    reused: bool = False
    replay: dict[str, float] = {}


class Promoted(_Frozen):
    promoted: str
    previous: str | None
    event_id: str
    speculation_off: bool = False  # promoted as the better drafter, but no drafter is served (gate)


class Rejected(_Frozen):
    rejected: str
    champion: str | None
    reasons: list[str]
    speculation_off: bool = False  # the gate's "no drafter" decision was published


class Drift(_Frozen):
    champion: str
    domains: dict[str, dict[str, float]]  # domain -> tau_live, tau_evaluated, steps
    until: datetime


def registry(settings: Settings) -> DrafterRegistry:
    return DrafterRegistry(settings.serving.target_model, settings.mlflow, settings.kafka)


# --- window ------------------------------------------------------------------------------------------


def pick_window(
    settings: Settings, version: int | None = None, start: datetime | None = None
) -> TraceWindow | None:
    """The training window: ``window_minutes`` of traces up to the newest one at table ``version`` (or from
    ``start``, a DAG run parameter). None if it holds fewer than ``min_window_rows`` traces."""
    cycle = settings.cycle
    return windows.pick_window(settings.lake, cycle.window_minutes, cycle.min_window_rows, version, start)


def window_of(settings: Settings, version: str, domains: list[str] | None = None) -> TraceWindow:
    """The window a registered version was trained on, from its lineage tags (for a manual evaluation).

    ``domains`` replaces the window's domain mix (each then counts equally); a version registered without
    window tags is evaluated on every prompt domain.
    """
    tags = registry(settings).get(version).tags
    mix = json.loads(tags["window_domains"]) if "window_domains" in tags else {d: 1 for d in DOMAINS}
    return TraceWindow(
        key=tags.get("window_key", f"manual-v{version}"),
        table=tags.get("window_table"),
        version=int(tags["table_version"]) if "table_version" in tags else None,
        start=tags.get("window_start"),
        end=tags.get("window_end"),
        rows=int(tags["window_rows"]) if "window_rows" in tags else None,
        domains={d: 1 for d in domains} if domains else mix,
    )


def eval_domains(window: TraceWindow, cycle: CycleSettings) -> list[str]:
    total = sum(window.domains.values())
    return [d for d in DOMAINS if window.domains.get(d, 0) / total >= cycle.eval_share]


# --- train -------------------------------------------------------------------------------------------


def cycle_recipe(cycle: CycleSettings, warm: bool) -> TrainRecipeConfig:
    """The recipe a cycle trains with: ``refresh_recipe`` when it warm-starts from a parent, else
    ``scratch_recipe`` (repo-relative paths; a DAG run names them, core/run_params.py).

    A recipe that sets ``resume`` is refused: a cycle trains a new challenger per window, its start the
    parent the registry gives (``init.from_dir``), never a checkpoint file named in a recipe.
    """
    from trainer.recipes import load_recipe

    path = REPO / (cycle.refresh_recipe if warm else cycle.scratch_recipe)
    recipe = load_recipe(path)
    if recipe.resume is not None:
        raise ValueError(
            f"recipe {path} sets resume={recipe.resume}: a flywheel cycle never resumes from a checkpoint "
            "file (it trains a new challenger from the registry's parent); remove `resume` from the recipe"
        )
    return recipe


def train_challenger(settings: Settings, window: TraceWindow) -> TrainedVersion:
    """Train on the window and register the challenger.

    Warm start from ``DrafterRegistry.training_parent``: the lineage head (``cycle.warm_start='lineage'``,
    the newest trained version; before anything was trained, a day-0 champion) or the champion; from
    scratch when there is none.
    """
    from trainer.train_loop import git_sha, run_recipe

    cycle, reg = settings.cycle, registry(settings)
    existing = reg.client.search_model_versions(f"name='{reg.name}' and tags.window_key='{window.key}'")
    if existing:
        return TrainedVersion(version=existing[0].version, reused=True)
    parent = reg.training_parent(cycle.warm_start)
    base = cycle_recipe(cycle, warm=parent is not None)
    update: dict[str, Any] = {
        "window": base.window.model_copy(
            update={
                "table": window.table,
                "version": window.version,
                "start": window.start,
                "end": window.end,
            }
        ),
        "output_dir": settings.training.output_dir / window.key,
        "target": settings.serving.target_dir,
        "serving_drafters": "registry",
        "mlflow": base.mlflow.model_copy(
            update={
                "enabled": True,
                "tracking_uri": settings.mlflow.tracking_uri,
                "experiment": settings.mlflow.experiment,
                "run_name": f"train-{window.key}",
            }
        ),
    }
    if cycle.train_max_steps:
        update["max_steps"] = cycle.train_max_steps
    if parent is not None:
        update["init"] = base.init.model_copy(update={"from_dir": reg.download(parent.version)})
    recipe = base.model_copy(update=update)
    trained = run_recipe(recipe, settings, argv=["airflow:drafter_flywheel/train", f"window={window.key}"])
    if trained.rank != 0:  # under torchrun (flywheel/cluster_job.py) every rank trains, rank 0 registers
        return TrainedVersion(version="", replay={})
    replay = trained.final_replay.metrics() if getattr(trained, "final_replay", None) else {}
    run_id = trained.mlflow_run.info.run_id
    info = trained.model_info
    version = reg.register(
        run_id,
        info.model_uri,
        trained.out_dir / "drafter",
        {
            "window_key": window.key,
            "window_table": window.table,
            "window_start": window.start.isoformat() if window.start else None,
            "window_end": window.end.isoformat() if window.end else None,
            "table_version": window.version,
            "window_rows": window.rows,
            "window_domains": json.dumps(window.domains),
            "parent_version": parent.version if parent else "scratch",
            "git_sha": git_sha() or "unknown",
            "spec_method": "eagle3",
            "num_spec_tokens": 3,
            **{(k if k.startswith("replay_") else f"replay_{k}"): round(v, 4) for k, v in replay.items()},
        },
        model_id=info.model_id,
        description=training_description(window, trained.step, parent.version if parent else None, replay),
    )
    return TrainedVersion(version=version.version, replay=replay)


def training_description(
    window: TraceWindow, steps: int, parent: str | None, replay: dict[str, float]
) -> str:
    """What a version was trained on, for the registry UI (the gate's verdict is appended when it is judged)."""
    span = (
        f"{window.start:%Y-%m-%d %H:%M} to {window.end:%Y-%m-%d %H:%M} UTC"
        if window.start and window.end
        else "all"
    )
    domains = ", ".join(f"{d} {n}" for d, n in sorted(window.domains.items())) or "-"
    start = f"warm-started from v{parent}" if parent else "trained from scratch"
    tau = f"; held-out replay τ {replay['replay_tau']:.3f}" if "replay_tau" in replay else ""
    return (
        f"EAGLE-3 head {start}, {steps} steps on traces {window.table} at version {window.version} "
        f"({window.rows} rows, {span}; domains: {domains}), the held-out prompts excluded{tau}."
    )


# --- evaluate, gate, promote -------------------------------------------------------------------------


def eval_config(cycle: CycleSettings) -> ServedEvalConfig:
    return ServedEvalConfig(
        concurrency=cycle.eval_concurrency,
        min_rounds=cycle.eval_min_rounds,
        max_requests=cycle.eval_max_requests,
        warmup_requests=cycle.eval_warmup_requests,
        block_prompts=cycle.eval_block_prompts,
        confidence=cycle.eval_confidence,
        base_port=cycle.eval_ports[0],
        spec_port=cycle.eval_ports[1],
        serving=cycle.eval_serving,
    )


def eval_servers(settings: Settings, first_drafter: Path) -> EvalServers:
    """The evaluation servers the cycle's settings describe (started on first use)."""
    return EvalServers.for_config(
        eval_config(settings.cycle), first_drafter, settings.stack, settings.serving
    )


def heldout_traffic(settings: Settings, window: TraceWindow) -> HeldoutTraffic:
    """The window's held-out traces; the built-in prompt sets' held-out split only when it has none."""
    cycle, lake = settings.cycle, settings.lake
    if window.table is not None and lake.heldout_fraction > 0:
        from trainer.trace_window import Window, WindowReader, target_identity

        # the served target's own traces only: another model's prompts and lengths are not its traffic
        model_id, revision = target_identity(settings.serving.target_dir)
        reader = WindowReader(
            Window(
                window.table,
                window.start,
                window.end,
                window.version,
                storage_options=lake.delta_options(),
                heldout_fraction=lake.heldout_fraction,
                heldout="only",
                target_model_id=model_id,
                target_revision=revision,
            )
        )
        traffic = from_lake(reader, cycle.eval_prompts_per_domain, cycle.eval_max_tokens)
        if traffic.prompts:
            return traffic
    domains = eval_domains(window, cycle) or list(DOMAINS)
    return from_builtin(
        settings.serving.target_dir, domains, cycle.eval_prompts_per_domain, cycle.eval_max_tokens
    )


def stored_evaluation(settings: Settings, version: str) -> Evaluation | None:
    """The evaluation stored with ``version`` (its MLflow run's ``evaluation.json``), if any."""
    run_id = registry(settings).get(version).tags.get("eval_run_id")
    if run_id is None:
        return None
    import tempfile

    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="evaluation-") as tmp:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"runs:/{run_id}/{EVALUATION_ARTIFACT}",
            dst_path=tmp,
            tracking_uri=settings.mlflow.tracking_uri,
        )
        return Evaluation.model_validate_json(Path(path).read_text())


def evaluate_challenger(
    settings: Settings, version: str, window: TraceWindow, force: bool = False
) -> Evaluation:
    """Paired served evaluation of challenger vs champion vs no speculation on the window's held-out
    traffic, logged to MLflow (metrics, ``evaluation.json``, an interval figure) and as version tags.

    The evaluation is stored once, as its MLflow run's ``evaluation.json``, and reused on a retry unless
    ``force``; the version's tags carry the headline figures and the run id.
    """
    import mlflow

    reg = registry(settings)
    if not force and (stored := stored_evaluation(settings, version)) is not None:
        return stored
    challenger_dir = reg.download(version)
    champion = reg.by_alias("champion")
    champion_dir = reg.download(champion.version) if champion and champion.version != version else None
    traffic = heldout_traffic(settings, window)
    config = eval_config(settings.cycle)
    servers = EvalServers.for_config(config, challenger_dir, settings.stack, settings.serving)
    policy = GatePolicy.from_settings(settings.cycle)
    report = paired_benchmark(servers, traffic.prompts, challenger_dir, champion_dir, config, policy, print)
    mlflow.set_tracking_uri(settings.mlflow.tracking_uri)
    mlflow.set_experiment(settings.mlflow.experiment)
    with mlflow.start_run(run_name=f"evaluate-v{version}") as run:
        evaluation = Evaluation(
            version=version,
            champion_version=champion.version if champion_dir else None,
            window_key=window.key,
            traffic=traffic.source,
            domains=sorted({p.stratum for p in traffic.prompts}),
            rounds=len({r["round"] for r in report.rounds}),
            requests_used=report.requests_used,
            metrics=report.metrics(),
            challenger=report.measurement(CHALLENGER),
            champion=report.measurement(CHAMPION) if champion_dir else None,
            eval_run_id=run.info.run_id,
        )
        mlflow.log_params(
            {
                "challenger": version,
                "champion": evaluation.champion_version,
                "window": window.key,
                "traffic": traffic.source,
                "prompts": len(traffic.prompts),
                "concurrency": config.concurrency,
                "confidence": config.confidence,
                "max_requests": config.max_requests,
            }
        )
        mlflow.log_metrics(evaluation.metrics)
        mlflow.log_dict(evaluation.model_dump(mode="json"), EVALUATION_ARTIFACT)
        mlflow.log_dict({"rounds": report.rounds, "strata": traffic.strata}, "served_eval_rounds.json")
        mlflow.log_figure(interval_figure(evaluation), "speedup_intervals.png")
    measured = evaluation.challenger
    headline = {
        "eval_speedup": measured.speedup.point,
        "eval_speedup_low": measured.speedup.low,
        "eval_speedup_high": measured.speedup.high,
        "eval_tau": measured.tau,
        "eval_samples": measured.samples,
        "eval_traffic": traffic.source,
    }
    if measured.vs_champion is not None:
        headline |= {
            "eval_vs_champion": measured.vs_champion.point,
            "eval_vs_champion_low": measured.vs_champion.low,
        }
    headline |= {f"eval_tau_{d}": t for d, t in measured.tau_by_domain.items()}
    reg.tag(
        version,
        {"eval_run_id": run.info.run_id}
        | {k: round(v, 4) if isinstance(v, float) else v for k, v in headline.items() if v is not None},
    )
    return evaluation


def interval_figure(evaluation: Evaluation):
    """Speedup of each drafter over no speculation (and challenger ÷ champion) with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("challenger ÷ none", evaluation.challenger.speedup)]
    if evaluation.champion is not None:
        rows.append(("champion ÷ none", evaluation.champion.speedup))
    if evaluation.challenger.vs_champion is not None:
        rows.append(("challenger ÷ champion", evaluation.challenger.vs_champion))
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.5 * len(rows)))
    for i, (_, iv) in enumerate(rows):
        ax.errorbar(
            iv.point, i, xerr=[[iv.point - iv.low], [min(iv.high, 10) - iv.point]], fmt="o", capsize=4
        )
        ax.annotate(f"{iv.point:.3f} [{iv.low:.3f}, {min(iv.high, 10):.3f}]", (iv.point, i + 0.2), fontsize=8)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_xlabel(
        f"tokens/s ratio, paired per prompt ({evaluation.challenger.samples} prompts, 95 % interval)"
    )
    ax.set_title(f"v{evaluation.version}: {evaluation.traffic} held-out traffic, {evaluation.rounds} rounds")
    fig.tight_layout()
    return fig


def gate_challenger(settings: Settings, evaluation: Evaluation) -> GateResult:
    reg = registry(settings)
    decision = decide(
        evaluation.challenger,
        evaluation.champion,
        GatePolicy.from_settings(settings.cycle),
        speculation_off=reg.speculation_off(),
    )
    result = GateResult(
        version=evaluation.version,
        promote=decision.promote,
        summary=decision.summary(),
        reasons=list(decision.reasons),
        disable_speculation=decision.disable_speculation,
    )
    tags = {
        "gate_decision": "promote" if result.promote else "reject",
        "gate_summary": result.summary,
        "gate_reasons": json.dumps(result.reasons),
    }
    reg.tag(evaluation.version, tags)
    reg.describe(evaluation.version, f"Gate ({evaluation.traffic} held-out traffic): {result.summary}")
    if evaluation.eval_run_id:
        for key, value in tags.items():
            reg.client.set_tag(evaluation.eval_run_id, key, value)
    return result


def promote_challenger(settings: Settings, decision: GateResult) -> Promoted:
    reg = registry(settings)
    event = reg.promote(decision.version, reason=decision.summary)
    if decision.disable_speculation:  # the new champion is slower than no speculation: stop drafting
        event = reg.disable(reason=decision.summary) | {"previous_version": event["previous_version"]}
    return Promoted(
        promoted=decision.version,
        previous=event["previous_version"],
        event_id=event["event_id"],
        speculation_off=decision.disable_speculation,
    )


def reject_challenger(settings: Settings, decision: GateResult) -> Rejected:
    reg = registry(settings)
    reg.tag(decision.version, {"rejected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    champion = reg.by_alias("champion")
    if decision.disable_speculation:  # the champion, still serving, is slower than none: stop drafting
        reg.disable(reason=decision.summary)
    return Rejected(
        rejected=decision.version,
        champion=champion.version if champion else None,
        reasons=decision.reasons,
        speculation_off=decision.disable_speculation,
    )


# --- drift ----------------------------------------------------------------------------------------


def detect_drift(settings: Settings) -> Drift | None:
    """Domains whose live tau under the champion fell ``drift_margin`` below its evaluated tau.

    A domain the champion was never evaluated on is compared with its overall evaluated tau; a domain with
    fewer than ``drift_min_steps`` verify steps is not judged.
    """
    cycle = settings.cycle
    champion = registry(settings).by_alias("champion")
    if champion is None or "eval_tau" not in champion.tags:
        return None
    until, live = windows.live_tau_by_domain(settings.lake, cycle.drift_window_minutes, champion.version)
    drifted = {}
    for domain, (tau_live, steps) in live.items():
        if steps < cycle.drift_min_steps or tau_live is None:
            continue
        tau_eval = float(champion.tags.get(f"eval_tau_{domain}", champion.tags["eval_tau"]))
        if tau_live < tau_eval * (1 - cycle.drift_margin):
            drifted[domain] = {"tau_live": round(tau_live, 3), "tau_evaluated": tau_eval, "steps": steps}
    if not drifted:
        return None
    return Drift(champion=champion.version, domains=drifted, until=until)
