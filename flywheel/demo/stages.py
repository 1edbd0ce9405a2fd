"""`flywheel demo`: the whole flywheel end to end on the local stack, with a measured report.

Storyline (every number in the report is measured here, none is assumed):
0. set-up, built once and cached: the target, the day-0 drafter (a day-0 start), and the in-domain
   reference: the head F starts from trained on the post-shift domain's train split for F's steps.
1. stack up; the head F starts from (the day-0 drafter, or a randomly initialised one from scratch) is
   registered and promoted like any other drafter; the flywheel server F (capture on, follows promotions)
   serves it, and `flywheel ingest` lands its traces in the lake continuously.
2. Phase A: code traffic to F in segments; after each segment but the last, one `drafter_flywheel` run
   through the Airflow scheduler (window start = the phase start, a DAG run parameter) trains, evaluates,
   gates and promotes; F hot-swaps every promoted drafter. Each cycle continues the newest trained head
   (promoted or not), so training accumulates across cycles while the gate decides what F serves.
3. The static baseline S (capture off): the day-0 drafter, or from scratch a drafter trained once with
   `flywheel train` on phase A's code traces (as many steps as F's lineage will have trained when both are
   last measured). Then F and S both serve the same held-out code prompts (a split no traffic ever uses).
4. Phase B (abrupt shift to prose): the same prose prompts to F and S; the flywheel keeps cycling on the
   post-shift window; S stays as it is. F and S serve the same held-out prose prompts at the shift (the
   full run), after each post-shift cycle but the last, and at the end: the recovery curve. Then S swaps
   to the in-domain reference and serves the final held-out prose prompts again: recovery's bar.
5. The final champion against no speculation in its own paired run on held-out prose prompts (the
   evaluation servers, the gate's code path), with its interval.
6. Report: tau before/after the shift on the held-out prompts, recovery against the reference, the
   champion's speedup, bytes/token, promotions/rejections, stage times (flywheel/demo/report.py).

The demo is a client of the APIs a user has: the registry (register, promote, archive), the DAG and its
run parameters over Airflow's REST API, the CLI's `ingest` and `train`. Its settings are built once by
`main` and passed down.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from core.settings import CycleSettings, Settings
from evaluation.gate import GatePolicy
from flywheel.cycle import eval_servers, registry
from flywheel.day0 import Day0Spec, prepare_day0_isolated
from flywheel.demo import report as rep
from flywheel.demo import services as svc
from flywheel.demo.plan import DemoPlan, sized
from flywheel.demo.ui import StageBoard, _StageHandle, task_line
from infra.airflow_client import DONE_STATES, AirflowClient

REPO = Path(__file__).resolve().parents[2]
TASKS = ["window", "train", "evaluate", "gate", "decide", "promote", "reject"]
FLYWHEEL_PORT, STATIC_PORT = 8000, 8001  # the cycle's evaluation servers own 8031/8032
DAG_ID = "drafter_flywheel"


class Demo:
    def __init__(self, plan: DemoPlan, out_dir: Path, console: Console, settings: Settings):
        self.plan, self.out_dir, self.console = plan, out_dir, console
        # every server of the demo, the Airflow task's evaluation servers included, gets the plan's flags
        serving = settings.serving.model_copy(update=plan.serving_overrides)
        self.settings = settings.replace(
            serving=serving, cycle=settings.cycle.model_copy(update={"eval_serving": plan.serving_overrides})
        )
        self.stack = settings.stack
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
        self.probe_steps: dict[str, dict[str, int]] = {}  # phase -> training steps behind F's and S's drafter
        self.probes: list[dict[str, Any]] = []  # held-out probes in order, with the cycles run before each
        self.final_speedup: dict[str, Any] | None = None  # the final champion vs no speculation
        self.evaluations: dict[str, dict[str, Any]] = {}  # run id -> its evaluate task's Evaluation
        self.serving = serving
        self.registry = registry(self.settings)
        self.day0: dict[str, Any] | None = None  # the day-0 drafter's provenance, when the plan starts there
        self.reference: dict[str, Any] | None = None  # the in-domain reference's (recovery's bar)
        self.initial_steps = 0  # training steps behind the head F starts from
        self.static_steps = plan.static_steps  # behind S's drafter (the day-0 head's, in that mode)
        self.static_head: Path | None = None  # S's drafter dir

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
                if self.day0 is not None:
                    self._stage_static_day0()
                else:
                    self._stage_static(phase_a_start)
                self._probe("A", "code")
                shift = svc.utc_now()
                self._phase("B", "prose", self.plan.segments_b, shift)
                self._probe("B", "prose")
                if self.reference is not None:
                    self._stage_reference_probe()
                self._stage_champion_speedup()
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

        with self.board.stage("set-up: tools, target model") as st:
            for tool in ("java", "mvn"):
                if shutil.which(tool) is None:
                    raise RuntimeError(f"`{tool}` is not on PATH (the local Kafka broker needs it)")
            st.info("target model (converted once, checksummed)")
            prepared = prepare_target(self.serving.models_dir)
            st.info(f"{prepared.path.name} revision {prepared.revision}")
            self.target_revision = prepared.revision
        if self.plan.start == "day0":
            self._stage_day0()
        if self.plan.reference:
            self._stage_reference()

    def _day0_spec(self) -> Day0Spec:
        """The day-0 drafter's sizes: the head a day-0 start serves and the reference continues."""
        return Day0Spec(draft_vocab_size=self.plan.draft_vocab_size)

    def _stage_day0(self) -> None:
        """The day-0 drafter F and S start from: built once (about 11 min on 2 cores, set-up, reported
        apart from the demo's own time), verified and reused after that."""
        with self.board.stage("set-up: day-0 drafter (built once, checksummed)") as st:
            st.info("verified or built in a process of its own (about 11 min to build on 2 cores)")
            day0 = prepare_day0_isolated(self.serving.target_dir, self.serving.models_dir, self._day0_spec())
            self.day0 = day0.summary()
            self.initial_steps = self.static_steps = self.day0["steps"]
            st.info(self._built_line(self.day0))

    def _stage_reference(self) -> None:
        """The in-domain reference of recovery (docs/architecture.md): the head F starts from (the day-0
        drafter, or a new one from scratch) trained on the post-shift domain's train split for as many
        steps as F's lineage has when last measured. Built once like the day-0 drafter (set-up); S serves
        it on the final probe's held-out prompts after F and S have."""
        spec = Day0Spec(
            domains=("prose",),
            steps=self.plan.reference_steps,
            draft_vocab_size=self.plan.draft_vocab_size,
            base=self._day0_spec() if self.plan.start == "day0" else None,
        )
        with self.board.stage("set-up: in-domain reference drafter (built once, checksummed)") as st:
            st.info("verified or built in a process of its own (about 10 min to build on 2 cores)")
            built = prepare_day0_isolated(self.serving.target_dir, self.serving.models_dir, spec)
            self.reference = built.summary() | {"start": self.plan.start}
            start = "continuing the day-0 head" if self.plan.start == "day0" else "from scratch"
            st.info(f"{self._built_line(self.reference)} ({start})")

    @staticmethod
    def _built_line(head: dict[str, Any]) -> str:
        tau = f"{head['heldout_tau']:.2f}" if head["heldout_tau"] is not None else "n/a"
        verb = "verified" if head["reused"] else "built"
        domains = "+".join(head["domains"])
        return f"{verb}: {head['steps']} steps on {head['traces']} {domains} traces, held-out tau {tau}"

    def _stage_stack(self) -> None:
        from infra import stack
        from infra.topics import admin_client, cluster_topics, sync_topics
        from schemas.schema_ids import SchemaIds, register_all

        with self.board.stage("stack up (Kafka, schema registry, MLflow, Airflow)") as st:
            rows = stack.up(self.stack)
            kafka = self.settings.kafka
            admin = admin_client(kafka)
            sync_topics(admin, cluster_topics(kafka, admin))
            register_all(kafka, SchemaIds.connect(kafka))  # as `flywheel topics create` does
            st.info(", ".join(f"{r.name} {r.state}" for r in rows))
            self.airflow = AirflowClient(f"http://{self.stack.host}:{self.stack.airflow_port}")
            self.airflow.wait_dag_parsed(DAG_ID)

    def _stage_reset(self) -> None:
        """Archive earlier drafters of this target, then register and promote the head F starts from (the
        day-0 drafter, or a randomly initialised one) like any other drafter: F serves the newest promotion.
        Its ``init`` tag says which: the first cycle continues a day-0 head, never a random one."""
        label = "day-0 drafter" if self.plan.start == "day0" else "scratch drafter"
        with self.board.stage(f"reset: {label}, fresh registry") as st:
            archived = self.registry.archive()
            if archived:
                self.notes.append(f"earlier drafters of this target were archived as `{archived}`")
            self.demo_id = svc.run_id("demo")
            meta = {"drafter_id": self.plan.start, "demo": self.demo_id}
            if self.day0 is not None:
                self.initial = svc.copy_head(Path(self.day0["path"]), self.state / "drafters" / "day0", meta)
            else:
                self.initial = svc.random_head(
                    self.serving.target_dir,
                    self.state / "drafters" / "scratch",
                    self.plan.draft_vocab_size,
                    seed=0,
                    meta=meta,
                )
            st.info(f"registering the {label}")
            version = svc.register_drafter(
                self.registry,
                self.settings.mlflow,
                self.initial,
                f"{self.demo_id}-{self.plan.start}",
                {
                    "num_spec_tokens": self.plan.k,
                    "target_revision": self.target_revision,
                    "init": "day0" if self.day0 is not None else "random",
                },
            )
            self.initial_version = version
            reason = "the day-0 drafter" if self.day0 is not None else "a randomly initialised head"
            self.registry.promote(version, reason=f"{self.demo_id}: start from {reason}")
            self.evals = eval_servers(self.settings, self.initial)
            assert self.airflow is not None
            for dag, want in ((DAG_ID, False), ("trace_watch", True)):
                self.paused_before[dag] = self.airflow.is_paused(dag)
                self.airflow.set_paused(dag, want)
            st.info(f"{label} v{version} promoted; {DAG_ID} unpaused; trace_watch paused")

    def _stage_start_flywheel(self) -> None:
        """F in the foreground; S and the served-evaluation servers warm up in the background meanwhile."""
        from core import process

        with self.board.stage("start flywheel server F + ingest") as st:
            self.ingest.start()
            # F and S serve the same prompts side by side after the shift: one core each
            for label, port, capture, cpus in (
                ("flywheel", FLYWHEEL_PORT, True, "0"),
                ("static", STATIC_PORT, False, "1" if (os.cpu_count() or 1) > 1 else "0"),
            ):
                self.servers[label] = svc.demo_server(
                    label,
                    self.state,
                    self.stack,
                    self.serving.model_copy(update={"port": port}),
                    self.initial,
                    self.plan.k,
                    capture=capture,
                    follow=capture,
                    cpus=cpus,
                )
            flywheel = self.servers["flywheel"]
            st.info(f"vLLM on {flywheel.spec.address} (engine start takes minutes on CPU)")
            process.start(flywheel.spec, timeout_s=1500)
            if not self.ingest.alive():
                raise RuntimeError(f"`flywheel ingest` exited; see {self.ingest.log}")
            # S (serves from the end of phase A on) and the evaluate task's two servers (the DAG reuses
            # them across evaluations): started now, in the order they are needed; without a cycle before
            # the shift S comes first (the quick demo waited 264 s for S behind the two evaluation engines)
            static, evals = [self.servers["static"].spec], [self.evals.base, self.evals.spec]
            if not self.plan.prestart_eval_servers:  # the first evaluate task starts them (memory)
                evals = []
            self.background = svc.BackgroundStarts(evals + static if self.plan.cycles_a else static + evals)
            st.info(
                f"healthy, drafter {flywheel.weight_version()}; S {'+ eval servers ' if evals else ''}warming up"
            )

    def _phase(self, phase: str, domain: str, segments: tuple[int, ...], window_start: datetime) -> None:
        """Traffic segments with a cycle after each but the last. After the shift, F and S also serve the
        held-out prose at the shift (``plan.probe_at_shift``) and after every cycle but the last (whose
        probe is the phase's final one): held-out tau per cycle, the recovery curve."""
        if phase == "B" and self.plan.probe_at_shift:
            self._probe("B0", domain)
        for i, n in enumerate(segments):
            servers = ["flywheel"] + (["static"] if phase == "B" else [])
            self._traffic(phase, domain, n, servers, seed=(0 if phase == "A" else 100) + i)
            if i < len(segments) - 1:
                self._cycle(phase, i + 1, window_start)
                if phase == "B" and i + 1 < len(segments) - 1:
                    self._probe(f"B{i + 1}", domain)

    def _probe(self, phase: str, domain: str) -> None:
        """F and S serve the same held-out prompts, a split that phase traffic never sends (so no drafter
        trained on them): the tau figures of the report, with the steps behind each server's drafter."""
        self._traffic(
            f"{phase}-heldout",
            domain,
            self.plan.probe_prompts,
            ["flywheel", "static"],
            seed=900,
            subset="heldout",
        )
        self.probe_steps[phase] = {"flywheel": self._lineage_steps(), "static": self.static_steps}
        after = len(self.series.of("flywheel", "B")) if phase.startswith("B") else None
        self.probes.append(
            {"probe": phase, "domain": domain, "cycles": len(self.cycles), "requests_after_shift": after}
        )

    def _stage_reference_probe(self) -> None:
        """S, done as the static baseline, swaps to the in-domain reference and serves the final probe's
        held-out prompts again (``R-heldout``): recovery's bar, on the same prompts as F's curve."""
        server = self.servers["static"]
        with self.board.stage("static server S: load the in-domain reference") as st:
            head = svc.copy_head(
                Path(self.reference["path"]),
                self.state / "drafters" / "reference",
                {"drafter_id": "reference", "drafter_version": "reference", "demo": self.demo_id},
            )
            server.load_drafter(head, "reference")
            st.info(f"serving the reference ({server.weight_version()})")
        self.servers["reference"] = server  # the same process, recorded under its own label
        try:
            self._traffic(
                "R-heldout", "prose", self.plan.probe_prompts, ["reference"], seed=900, subset="heldout"
            )
        finally:
            del self.servers["reference"]

    def _lineage_steps(self) -> int:
        """Steps the flywheel has trained so far along its lineage (the newest trained head's)."""
        return max((c["lineage_steps"] or 0 for c in self.cycles), default=self.initial_steps)

    def _stage_champion_speedup(self) -> None:
        """The final champion against no speculation: in its own paired run (held-out prose prompts, the
        evaluation servers with the cycles' flags, rounds until the interval is clear or the budget spent),
        or, when the plan says so and the last post-shift cycle kept it as champion, from that cycle's
        paired evaluation (``report.measured_in_last_cycle``).

        The own run has S's head as a third arm on the same servers: F's champion ÷ S's head by served
        speed, paired per prompt (F and S side by side on their own servers are not comparable by speed:
        placement and the stack's other processes set that ratio)."""
        from evaluation.heldout_traffic import from_builtin
        from evaluation.served import CHALLENGER, CHAMPION, EvalServers, paired_benchmark
        from flywheel.cycle import eval_config

        champion = self.registry.by_alias("champion")
        if champion is None:
            return
        if not self.plan.final_own_run and (
            reused := rep.measured_in_last_cycle(self.cycles, self.evaluations, champion.version, "B")
        ):
            with self.board.stage("final champion vs no speculation: the last cycle's paired run") as st:
                self.final_speedup = reused
                st.info(
                    f"v{champion.version}: {reused['speedup']['point']:.3f} "
                    f"[{reused['speedup']['low']:.3f}, {reused['speedup']['high']:.3f}] x no speculation "
                    f"({reused['source']})"
                )
            return
        with self.board.stage("final champion vs no speculation: own paired run") as st:
            # F and S are done: their engines would only hold memory the evaluation servers need
            svc.stop_servers([s.spec for s in self.servers.values()])
            cycle = CycleSettings(**self.settings.cycle.model_dump() | self.plan.cycle_conf(1))
            config = eval_config(cycle)
            drafter = self.registry.download(champion.version)
            traffic = from_builtin(
                self.serving.target_dir, ["prose"], self.plan.eval_prompts, self.plan.max_tokens
            )
            servers = EvalServers.for_config(config, drafter, self.stack, self.serving)
            st.info(f"v{champion.version} and S's head on {len(traffic.prompts)} held-out prose prompts")
            policy = GatePolicy.from_settings(cycle)
            try:
                report = paired_benchmark(
                    servers, traffic.prompts, drafter, self.static_head, config, policy, st.info
                )
            finally:
                servers.stop()
            measured, static = report.measurement(CHALLENGER), report.measurement(CHAMPION)
            self.final_speedup = {
                "version": champion.version,
                "source": f"own paired run, {len(traffic.prompts)} held-out prose prompts",
                "speedup": measured.speedup.model_dump(),
                "tau": measured.tau,
                # S's head, the third arm: F's champion ÷ S by served speed, and S ÷ no speculation
                "vs_static": measured.vs_champion.model_dump() if measured.vs_champion else None,
                "static_speedup": static.speedup.model_dump(),
                "static_tau": static.tau,
                "rounds": len({r["round"] for r in report.rounds}),
                "requests": report.requests_used,
            }
            st.info(
                f"v{champion.version}: {measured.speedup} x no speculation, tau {measured.tau or 0:.2f}; "
                f"÷ S's head {measured.vs_champion}"
            )

    def _traffic(
        self, phase: str, domain: str, n: int, servers: list[str], seed: int, subset: str = "train"
    ) -> None:
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
                            r.prompt_id,
                        )
                    )
                    steps[server].extend(r.per_step_accepted)
                    st.advance()
                    st.info("  ".join(f"{s} {_tau_text(steps[s][-400:])}" for s in servers))

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
                            subset=subset,  # phases: train; probes: held-out prompts
                            # a probe opts out of capture: no drafter may train on the prompts it is judged
                            # on (the first full run's F trained on the probe at the shift, in B1's window)
                            extra_xargs={"flywheel_opt_out": "true"} if subset == "heldout" else None,
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
            rows, _ = svc.rows_from(self.settings.lake, "demo-flywheel", since)
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
            # the window starts at the phase start: a DAG run parameter, as a user would trigger it
            conf = {"cycle": self.plan.cycle_conf(int(0.8 * rows)), "window_start": window_start.isoformat()}
            run_id = self.airflow.trigger(DAG_ID, conf, svc.run_id(f"{self.demo_id}-{phase}{n}"))
            self.active_run = run_id
            started = time.monotonic()
            state = "queued"
            while state not in DONE_STATES:
                time.sleep(3)
                try:
                    state = self.airflow.run_state(DAG_ID, run_id)
                    tasks = task_line(self.airflow.task_states(DAG_ID, run_id), TASKS)
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
        for run_id in self.airflow.active_runs(DAG_ID):
            if not run_id.startswith(self.demo_id):
                st.info(f"stopping {run_id} (not the demo's)")
                self.airflow.fail_run(DAG_ID, run_id)
                self.notes.append(
                    f"`{DAG_ID}` run `{run_id}` (started by the scheduler, not by the demo) was marked "
                    "failed so that the demo's cycles could run"
                )

    def _cycle_result(self, run_id: str, phase: str, state: str, rows: int, seconds: float) -> dict[str, Any]:
        assert self.airflow is not None
        evaluation = self.airflow.xcom(DAG_ID, run_id, "evaluate") or {}
        self.evaluations[run_id] = evaluation
        gate = self.airflow.xcom(DAG_ID, run_id, "gate") or {}
        challenger = evaluation.get("challenger") or {}
        version = gate.get("version") or evaluation.get("version")
        parent = None
        if version is not None:
            parent = self.registry.get(version).tags.get("parent_version")
        # steps accumulate along the lineage (CycleSettings.warm_start): the parent's plus this cycle's
        earlier = {c["version"]: c["lineage_steps"] for c in self.cycles} | {
            self.initial_version: self.initial_steps
        }
        return {
            "run_id": run_id,
            "phase": phase,
            "state": state,
            "window_rows": rows,
            "version": version,
            "parent": parent,
            "lineage_steps": earlier.get(parent, 0) + self.plan.train_steps if version else None,
            "speedup": (challenger.get("speedup") or {}).get("point"),
            "speedup_interval": challenger.get("speedup"),
            "vs_champion": challenger.get("vs_champion"),
            "tau": challenger.get("tau"),
            "champion_speedup": ((evaluation.get("champion") or {}).get("speedup") or {}).get("point"),
            "champion_speedup_interval": (evaluation.get("champion") or {}).get("speedup"),
            "traffic": evaluation.get("traffic"),
            "decision": ("promote" if gate.get("promote") else "reject") if gate else None,
            "gate": gate.get("summary"),
            "speculation_off": bool(gate.get("disable_speculation")),
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

    def _stage_static_day0(self) -> None:
        with self.board.stage("static server S: the day-0 drafter, never changed") as st:
            server = self.servers["static"]
            st.info(f"waiting for vLLM on {server.spec.address} (capture off, no promotions)")
            self.background.wait(server.spec.name)
            self.static_head = self.initial
            st.info(f"serving the day-0 drafter ({server.weight_version()})")

    def _stage_static(self, phase_a_start: datetime) -> None:
        with self.board.stage("static drafter: train once on code") as st:
            sent = len(self.series.of("flywheel", "A"))
            self._wait_ingested(phase_a_start, sent, st)
            out = self.state / "drafters" / "static"
            shutil.rmtree(out, ignore_errors=True)
            window_end = svc.newest_arrival(self.settings.lake) + timedelta(microseconds=1)  # end: exclusive
            overrides = [
                f"window.start={phase_a_start.isoformat()}",
                f"window.end={window_end.isoformat()}",
                f"max_steps={self.plan.static_steps}",
                f"output_dir={out}",
                f"target={self.serving.target_dir}",
                "mlflow.enabled=false",
                "checkpoint_every=0",
            ]
            recipe = REPO / self.settings.cycle.scratch_recipe
            cmd = [sys.executable, "-m", "flywheel.cli", "train", "--recipe", str(recipe)]
            st.info(f"{self.plan.static_steps} steps, scratch recipe, phase A window ({sent} traces)")
            log = self.state / "logs" / "static-train.log"
            with log.open("wb") as f:
                done = subprocess.run([*cmd, *overrides], stdout=f, stderr=subprocess.STDOUT)
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
            self.static_head = out / "drafter"
            st.info(f"serving the static drafter ({server.weight_version()})")

    # --- report ------------------------------------------------------------------------------------

    def _report(self) -> dict[str, Any]:
        registry = self.registry
        figures = rep.compute_figures(self.series, self.probes)
        champion = registry.by_alias("champion")
        hidden = json.loads((self.serving.target_dir / "config.json").read_text())["hidden_size"]
        lake = svc.lake_bytes_per_token(self.settings.lake)
        decisions = [c["decision"] for c in self.cycles]
        report = {
            **figures,
            "speedup_champion": (self.final_speedup or {}).get("speedup", {}).get("point"),
            "speedup_champion_interval": (self.final_speedup or {}).get("speedup"),
            "speedup_champion_run": self.final_speedup,
            "flywheel_vs_static_speed": (self.final_speedup or {}).get("vs_static"),
            "static_speedup": (self.final_speedup or {}).get("static_speedup"),
            "static_steps": self.static_steps,
            "start": self.plan.start,
            "day0": self.day0,
            "reference": self.reference,
            "flywheel_trained_steps": self._lineage_steps(),
            "probe_steps": self.probe_steps,
            "trace_bytes_per_token": lake["trace_bytes_per_token"],
            "hidden_state_bytes_per_token": 4 * hidden * 2,  # 3 aux layers + last, bf16 (bench/train.py)
            "promotions": decisions.count("promote"),
            "promotions_after_shift": sum(
                c["decision"] == "promote" for c in self.cycles if c["phase"] == "B"
            ),
            "rejections": decisions.count("reject"),
            "stage_seconds": {k: round(v, 1) for k, v in self.board.seconds.items()},
        }
        report["stage_seconds"]["total"] = round(sum(self.board.seconds.values()), 1)
        # the demo's own time: what a set-up stage built once (the day-0 drafter) is not run again
        report["stage_seconds"]["total_after_setup"] = round(
            sum(v for k, v in self.board.seconds.items() if not k.startswith("set-up")), 1
        )
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
        rep.plot_speedups(self.cycles, self.out_dir / "speedups.png")
        rep.plot_heldout_tau(
            report["heldout_tau_by_probe"],
            self.cycles,
            self.out_dir / "heldout_tau.png",
            report["reference_tau"],
        )
        context = {
            "mode": self.plan.mode,
            "target": self.serving.target_model,
            "k": self.plan.k,
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
            "window": self.plan.window,
            "probe_prompts": self.plan.probe_prompts,
            "cycles": self.cycles,
            "notes": self.notes + rep.explain(report, self.plan) + rep.lake_notes(lake),
            "settings": asdict(self.plan) | {"static_steps": self.static_steps},
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
                    self.airflow.fail_run(DAG_ID, self.active_run)
                except (RuntimeError, OSError):
                    pass
            for dag, paused in self.paused_before.items():
                try:
                    self.airflow.set_paused(dag, paused)
                except RuntimeError:
                    pass


def main(
    quick: bool,
    out_dir: Path,
    settings: Settings,
    console: Console | None = None,
    train_steps: int | None = None,
    requests: int | None = None,
    start: str | None = None,
) -> dict[str, Any]:
    """Run the demo with the plan of its mode (resized by ``train_steps`` / ``requests``; ``start``: what F
    and S start from, the mode's own by default)."""
    plan = sized(quick, train_steps, requests, start)
    return Demo(plan, out_dir, console or Console(), settings).run()


def _tau_text(steps: list[int]) -> str:
    """The rolling tau of a progress line; a server that drafted nothing in the phase (the gate's
    no-drafter decision switched speculation off) says so instead of printing nan."""
    tau = rep.pooled_tau([steps])
    return "tau n/a (no draft steps: speculation off)" if tau is None else f"tau {tau:.2f}"
