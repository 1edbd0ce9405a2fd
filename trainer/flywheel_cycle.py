"""One flywheel cycle, as the functions the Airflow DAGs call (one task = one function).

window -> train challenger -> served evaluation -> gate -> promote or reject; plus the two watchers that
start cycles: enough new traces (a window) and drift (live tau below the champion's evaluated tau).

Every step is keyed on its input (the window, the model version) and looks for its own earlier result
before doing work, so a retried task or a re-run DAG never trains, registers or promotes twice.
Nothing here reads the wall clock: windows end at the newest trace of a table version.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from deltalake import DeltaTable

from flywheel.settings import CycleSettings, LakeSettings, MlflowSettings, ServingSettings, TrainingSettings
from trainer.promotion_gate import ArmMeasurement, GatePolicy, decide
from trainer.registry import DrafterRegistry

REPO = Path(__file__).resolve().parents[1]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _registry() -> DrafterRegistry:
    return DrafterRegistry(ServingSettings().target_model)


def _micros(ts: datetime) -> int:
    return int((ts - EPOCH) / timedelta(microseconds=1))


def _traces(version: int | None = None, columns: list[str] | None = None, filters=None):
    lake = LakeSettings()
    table = DeltaTable(lake.traces_uri, version=version, storage_options=lake.storage_options or None)
    return table, table.to_pyarrow_dataset().to_table(columns=columns, filter=filters)


# --- window ------------------------------------------------------------------------------------------


def pick_window(cycle: CycleSettings, version: int | None = None) -> dict[str, Any] | None:
    """The training window: ``window_minutes`` of traces up to the newest one at table ``version``.

    None if the window holds fewer than ``min_window_rows`` traces. Domain shares decide what the served
    evaluation measures.
    """
    table, rows = _traces(version, ["finish_time", "domain"])
    if rows.num_rows == 0:
        return None
    end = pc.max(rows["finish_time"]).as_py() + timedelta(microseconds=1)
    start = end - timedelta(minutes=cycle.window_minutes)
    in_window = rows.filter(pc.greater_equal(rows["finish_time"], start))
    if in_window.num_rows < cycle.min_window_rows:
        return None
    counts = {
        d["values"] or "unlabelled": d["counts"] for d in pc.value_counts(in_window["domain"]).to_pylist()
    }
    v = table.version()
    return {
        "table": LakeSettings().traces_uri,
        "version": v,
        "start": start.isoformat(),
        "end": end.isoformat(),
        "rows": in_window.num_rows,
        "domains": counts,
        "key": f"v{v}-{_micros(start)}-{_micros(end)}",
    }


def window_of(version: str, domains: list[str] | None = None) -> dict[str, Any]:
    """The window a registered version was trained on, from its lineage tags (for a manual evaluation).

    ``domains`` replaces the window's domain mix (each then counts equally); a version registered without
    window tags is evaluated on every prompt domain.
    """
    from flywheel.prompts import DOMAINS

    tags = _registry().get(version).tags
    mix = json.loads(tags["window_domains"]) if "window_domains" in tags else {d: 1 for d in DOMAINS}
    return {
        "key": tags.get("window_key", f"manual-v{version}"),
        "table": tags.get("window_table"),
        "version": int(tags["table_version"]) if "table_version" in tags else None,
        "start": tags.get("window_start"),
        "end": tags.get("window_end"),
        "rows": int(tags["window_rows"]) if "window_rows" in tags else None,
        "domains": {d: 1 for d in domains} if domains else mix,
    }


def eval_domains(window: dict[str, Any], cycle: CycleSettings) -> list[str]:
    from flywheel.prompts import DOMAINS

    total = sum(window["domains"].values())
    return [d for d in DOMAINS if window["domains"].get(d, 0) / total >= cycle.eval_share]


# --- train -------------------------------------------------------------------------------------------


def train_challenger(cycle: CycleSettings, window: dict[str, Any]) -> dict[str, Any]:
    """Train on the window and register the challenger.

    Warm start from the lineage head (``cycle.warm_start='lineage'``, the newest trained version) or the
    champion; from scratch when the registry has neither.
    """
    from trainer.recipes import load_recipe
    from trainer.train_loop import git_sha, run_recipe

    registry = _registry()
    existing = registry.client.search_model_versions(
        f"name='{registry.name}' and tags.window_key='{window['key']}'"
    )
    if existing:
        return {"version": existing[0].version, "reused": True}
    parent = registry.lineage_head() if cycle.warm_start == "lineage" else registry.by_alias("champion")
    overrides = [
        f"window.table={window['table']}",
        f"window.version={window['version']}",
        f"window.start={window['start']}",
        f"window.end={window['end']}",
        f"output_dir={TrainingSettings().output_dir / window['key']}",
        f"target={ServingSettings().target_dir}",
        "serving_drafters=registry",
        "mlflow.enabled=true",
        f"mlflow.tracking_uri={MlflowSettings().tracking_uri}",
        f"mlflow.experiment={MlflowSettings().experiment}",
        f"mlflow.run_name=train-{window['key']}",
    ]
    if cycle.train_max_steps:
        overrides.append(f"max_steps={cycle.train_max_steps}")
    if parent is not None:
        parent_dir = registry.download(parent.version, TrainingSettings().output_dir / "served")
        recipe = load_recipe(REPO / cycle.refresh_recipe, [*overrides, f"init.from_dir={parent_dir}"])
    else:
        recipe = load_recipe(REPO / cycle.scratch_recipe, overrides)
    trained = run_recipe(recipe, argv=["airflow:drafter_flywheel/train", *overrides])
    replay = trained.final_replay.metrics() if getattr(trained, "final_replay", None) else {}
    run_id = trained.mlflow_run.info.run_id
    import mlflow

    artifact_uri = mlflow.get_run(run_id).info.artifact_uri + "/drafter"
    version = registry.register(
        run_id,
        artifact_uri,
        trained.out_dir / "drafter",
        {
            "window_key": window["key"],
            "window_table": window["table"],
            "window_start": window["start"],
            "window_end": window["end"],
            "table_version": window["version"],
            "window_rows": window["rows"],
            "window_domains": json.dumps(window["domains"]),
            "parent_version": parent.version if parent else "scratch",
            "git_sha": git_sha() or "unknown",
            "spec_method": "eagle3",
            "num_spec_tokens": 3,
            **{(k if k.startswith("replay_") else f"replay_{k}"): round(v, 4) for k, v in replay.items()},
        },
    )
    return {"version": version.version, "reused": False, "replay": replay}


# --- evaluate, gate, promote -------------------------------------------------------------------------


def _eval_config(cycle: CycleSettings, domains: list[str]):
    from trainer.served_eval import ServedEvalConfig

    return ServedEvalConfig(
        domains=tuple(domains),
        requests_per_domain=cycle.eval_requests_per_domain,
        concurrencies=tuple(cycle.eval_concurrencies),
        decision_concurrency=cycle.eval_concurrencies[0],
        rounds=cycle.eval_rounds,
        max_tokens=cycle.eval_max_tokens,
        base_port=cycle.eval_ports[0],
        spec_port=cycle.eval_ports[1],
        serving=cycle.eval_serving,
    )


def evaluate_challenger(
    cycle: CycleSettings, version: str, window: dict[str, Any], force: bool = False
) -> dict[str, Any]:
    """Served benchmark of challenger vs champion vs no speculation, logged to MLflow and as version tags.

    The result is stored on the version (``eval_report``) and reused on a retry unless ``force``.
    """
    import mlflow

    from trainer.served_eval import CHALLENGER, CHAMPION, EvalServers, served_benchmark

    registry = _registry()
    tags = registry.get(version).tags
    if "eval_report" in tags and not force:
        return json.loads(tags["eval_report"])
    cache = TrainingSettings().output_dir / "served"
    challenger_dir = registry.download(version, cache)
    champion = registry.by_alias("champion")
    champion_dir = (
        registry.download(champion.version, cache) if champion and champion.version != version else None
    )
    config = _eval_config(cycle, eval_domains(window, cycle))
    servers = EvalServers(config, challenger_dir)
    report = served_benchmark(servers, challenger_dir, champion_dir, config, on_step=print)
    result = {
        "version": version,
        "champion_version": champion.version if champion_dir else None,
        "domains": list(config.domains),
        "metrics": report.metrics(),
        CHALLENGER: report.measurement(CHALLENGER).__dict__,
        CHAMPION: report.measurement(CHAMPION).__dict__ if champion_dir else None,
    }
    mlflow.set_tracking_uri(MlflowSettings().tracking_uri)
    mlflow.set_experiment(MlflowSettings().experiment)
    with mlflow.start_run(run_name=f"evaluate-v{version}") as run:
        mlflow.log_params(
            {
                "challenger": version,
                "champion": result["champion_version"],
                "window": window["key"],
                "domains": ",".join(config.domains),
                "concurrencies": str(config.concurrencies),
                "rounds": config.rounds,
                "requests_per_domain": config.requests_per_domain,
            }
        )
        mlflow.log_metrics(report.metrics())
        mlflow.log_dict({"rounds": report.rounds, **result}, "served_eval.json")
    result["eval_run_id"] = run.info.run_id
    measured = report.measurement(CHALLENGER)
    registry.tag(
        version,
        {
            "eval_run_id": run.info.run_id,
            "eval_speedup": round(measured.speedup, 4),
            "eval_tau": round(measured.tau, 4),
            **{f"eval_tau_{d}": round(t, 4) for d, t in measured.tau_by_domain.items()},
            "eval_report": json.dumps(result),
        },
    )
    return result


def gate_challenger(cycle: CycleSettings, evaluation: dict[str, Any]) -> dict[str, Any]:
    from trainer.served_eval import CHALLENGER, CHAMPION

    policy = GatePolicy(
        cycle.gate_min_speedup, cycle.gate_margin, cycle.gate_domain_tau_tolerance, cycle.gate_min_samples
    )
    champion = ArmMeasurement(**evaluation[CHAMPION]) if evaluation.get(CHAMPION) else None
    decision = decide(ArmMeasurement(**evaluation[CHALLENGER]), champion, policy)
    tags = {
        "gate_decision": "promote" if decision.promote else "reject",
        "gate_summary": decision.summary(),
        "gate_reasons": json.dumps(decision.reasons),
    }
    _registry().tag(evaluation["version"], tags)
    if evaluation.get("eval_run_id"):
        from mlflow import MlflowClient

        client = MlflowClient(MlflowSettings().tracking_uri)
        for key, value in tags.items():
            client.set_tag(evaluation["eval_run_id"], key, value)
    return {
        "promote": decision.promote,
        "summary": decision.summary(),
        "reasons": list(decision.reasons),
        "version": evaluation["version"],
    }


def promote_challenger(decision: dict[str, Any]) -> dict[str, Any]:
    event = _registry().promote(decision["version"], reason=decision["summary"])
    return {
        "promoted": decision["version"],
        "previous": event["previous_version"],
        "event_id": event["event_id"],
    }


def reject_challenger(decision: dict[str, Any]) -> dict[str, Any]:
    registry = _registry()
    registry.tag(decision["version"], {"rejected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    champion = registry.by_alias("champion")
    return {
        "rejected": decision["version"],
        "champion": champion.version if champion else None,
        "reasons": decision["reasons"],
    }


# --- watchers ----------------------------------------------------------------------------------------


def new_window(cycle: CycleSettings, announced_version: int | None) -> dict[str, Any] | None:
    """A window worth training on, if enough traces arrived since the last announced table version."""
    table, rows = _traces(columns=["finish_time"])
    if announced_version is not None and rows.num_rows - _count_at(announced_version) < cycle.min_window_rows:
        return None
    return pick_window(cycle, table.version())


def _count_at(version: int) -> int:
    try:
        return _traces(version, ["finish_time"])[1].num_rows
    except Exception:  # the announced version was vacuumed away: count everything as new
        return 0


def detect_drift(cycle: CycleSettings) -> dict[str, Any] | None:
    """Domains whose live tau under the champion fell ``drift_margin`` below its evaluated tau.

    A domain the champion was never evaluated on is compared with its overall evaluated tau.
    """
    registry = _registry()
    champion = registry.by_alias("champion")
    if champion is None or "eval_tau" not in champion.tags:
        return None
    _, rows = _traces(columns=["finish_time", "domain", "drafter_version", "per_step_accepted"])
    if rows.num_rows == 0:
        return None
    end = pc.max(rows["finish_time"]).as_py()
    live = rows.filter(
        pc.and_(
            pc.greater_equal(rows["finish_time"], end - timedelta(minutes=cycle.drift_window_minutes)),
            pc.equal(rows["drafter_version"], champion.version),
        )
    )
    drifted = {}
    for domain in set(live["domain"].to_pylist()):
        steps = pc.list_flatten(live.filter(pc.equal(live["domain"], domain))["per_step_accepted"])
        if len(steps) < cycle.drift_min_steps:
            continue
        tau_live = 1 + pc.mean(steps).as_py()
        tau_eval = float(champion.tags.get(f"eval_tau_{domain}", champion.tags["eval_tau"]))
        if tau_live < tau_eval * (1 - cycle.drift_margin):
            drifted[domain] = {"tau_live": round(tau_live, 3), "tau_evaluated": tau_eval, "steps": len(steps)}
    if not drifted:
        return None
    return {"champion": champion.version, "domains": drifted, "until": end.isoformat()}
