"""What the demo talks to: Airflow's REST API, the two demo vLLM servers, the background ingest, the lake.

Kept apart from the demo's storyline (flywheel/demo.py) so each piece is small and reusable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from core import process
from core.settings import LakeSettings, ServingSettings, StackSettings
from producers.hot_swap import swap_server
from producers.vllm_server import VllmServer, cpu_environment, serve_args

DAG_ID = "drafter_flywheel"
DONE_STATES = {"success", "failed"}


class AirflowClient:
    """The few Airflow 3 REST calls the demo needs (/api/v2; the local standalone makes everyone admin)."""

    def __init__(self, base_url: str):
        self.http = httpx.Client(base_url=base_url, timeout=30.0)
        try:  # simple auth manager with all-admins hands out a token without credentials
            token = self.http.get("/auth/token").json()["access_token"]
            self.http.headers["Authorization"] = f"Bearer {token}"
        except (httpx.HTTPError, ValueError, KeyError):
            pass

    def _ok(self, resp: httpx.Response) -> Any:
        if resp.status_code >= 400:
            raise RuntimeError(f"Airflow API {resp.request.method} {resp.request.url}: {resp.text[:500]}")
        return resp.json() if resp.content else None

    def get(self, path: str) -> Any:
        """Any GET of the REST API (``/api/v2/...``), raising with Airflow's message on an error."""
        return self._ok(self.http.get(path))

    def is_paused(self, dag_id: str) -> bool:
        return bool(self._ok(self.http.get(f"/api/v2/dags/{dag_id}"))["is_paused"])

    def set_paused(self, dag_id: str, paused: bool) -> None:
        self._ok(self.http.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": paused}))

    def wait_dag_parsed(self, dag_id: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while self.http.get(f"/api/v2/dags/{dag_id}").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Airflow has not parsed DAG {dag_id} after {timeout_s:.0f}s")
            time.sleep(2)

    def trigger(self, dag_id: str, conf: dict[str, Any], run_id: str) -> str:
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf, "note": "flywheel demo"}
        return self._ok(self.http.post(f"/api/v2/dags/{dag_id}/dagRuns", json=body))["dag_run_id"]

    def fail_run(self, dag_id: str, run_id: str) -> None:
        """Mark a run failed (its running tasks are stopped), e.g. when the demo is interrupted."""
        self._ok(self.http.patch(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}", json={"state": "failed"}))

    def active_runs(self, dag_id: str) -> list[str]:
        """Ids of the DAG's queued or running runs."""
        body = self._ok(
            self.http.get(f"/api/v2/dags/{dag_id}/dagRuns", params={"state": ["queued", "running"]})
        )
        return [r["dag_run_id"] for r in body["dag_runs"]]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self._ok(self.http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"))["state"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        body = self._ok(self.http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"))
        return {t["task_id"]: t["state"] for t in body["task_instances"]}

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        resp = self.http.get(
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
        )
        if resp.status_code == 404:
            return None
        value = self._ok(resp).get("value")
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value


def task_line(states: dict[str, str | None], order: list[str]) -> str:
    """``window ✓  train ▶  evaluate ·`` for the live stage line."""
    marks = {"success": "✓", "running": "▶", "failed": "✗", "skipped": "–", "upstream_failed": "✗"}
    return "  ".join(f"{t} {marks.get(states.get(t) or '', '·')}" for t in order if t in states)


# --- the demo's serving nodes ----------------------------------------------------------------------


@dataclass
class DemoServer:
    label: str
    spec: VllmServer

    @property
    def url(self) -> str:
        return f"http://{self.spec.address}"

    def load_drafter(self, drafter: Path, label: str) -> None:
        """Swap the drafter through vLLM's draft-weight update routes (dev mode)."""
        swap_server(self.url, drafter, label)

    def weight_version(self) -> str:
        """The served drafter's version label ("initial" until the first hot-swap, as traces say)."""
        try:
            version = httpx.get(f"{self.url}/weight_info", timeout=10).json().get("weight_version")
        except (httpx.HTTPError, ValueError):
            return "unknown"
        return "initial" if version in (None, "default") else str(version)


def demo_server(
    label: str,
    state: Path,
    port: int,
    drafter: Path,
    k: int,
    kv_gib: int,
    capture: bool,
    follow: bool,
    cpus: str = "auto",
) -> DemoServer:
    """A stock `vllm serve` with our plugin: capture and promotion-following switched per server.
    ``cpus``: the cores its engine's OpenMP threads are bound to (vLLM's ``auto`` takes core 0 on this box)."""
    spill = state / f"spill-{label}"
    serving = ServingSettings(port=port, spill_dir=spill, kv_cache_space_gib=kv_gib, node_id=f"demo-{label}")
    env = cpu_environment(serving) | {
        "VLLM_SERVER_DEV_MODE": "1",  # /weight_info: the demo shows which drafter version serves
        "FLYWHEEL_SERVING_PORT": str(port),
        "FLYWHEEL_SERVING_NODE_ID": f"demo-{label}",
        "FLYWHEEL_SERVING_SPILL_DIR": str(spill),
        "FLYWHEEL_SERVING_CAPTURE_ENABLED": str(capture).lower(),
        "FLYWHEEL_SERVING_FOLLOW_PROMOTIONS": str(follow).lower(),
        "VLLM_CPU_OMP_THREADS_BIND": cpus,
    }
    spec = VllmServer(
        StackSettings(state_dir=state / label), serving, serve_args(serving, "eagle3", drafter, k), env
    )
    spec.name = f"vllm-demo-{label}"
    return DemoServer(label, spec)


def random_head(target_dir: Path, out: Path, draft_vocab_size: int, seed: int, meta: dict) -> Path:
    """A randomly initialised EAGLE-3 head for the target (what the flywheel starts from)."""
    import torch

    from trainer.eagle3_drafter import Eagle3Config, Eagle3Drafter

    torch.manual_seed(seed)
    config = Eagle3Config.from_target(json.loads((target_dir / "config.json").read_text()), draft_vocab_size)
    return Eagle3Drafter(config).save_pretrained(out, extra=meta)


# --- background ingest -----------------------------------------------------------------------------


class BackgroundIngest:
    """`flywheel ingest` as a child process for the length of the demo (SIGTERM flushes and exits)."""

    def __init__(self, log: Path, flush_latency_s: float):
        self.log = log
        self.flush_latency_s = flush_latency_s
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "flywheel.cli", "ingest", "--no-progress", "--log-level", "WARNING"]
        cmd += ["--flush-latency-s", str(self.flush_latency_s)]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 60) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# --- the lake --------------------------------------------------------------------------------------


def _table():
    from deltalake import DeltaTable

    lake = LakeSettings()
    if not DeltaTable.is_deltatable(lake.traces_uri, storage_options=lake.storage_options or None):
        return None
    return DeltaTable(lake.traces_uri, storage_options=lake.storage_options or None)


def rows_from(node: str, since: datetime) -> tuple[int, datetime | None]:
    """Traces of serving node ``node`` that finished at/after ``since``: count and newest finish_time."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    table = _table()
    if table is None:
        return 0, None
    flt = (ds.field("serving_node") == node) & (ds.field("finish_time") >= since)
    rows = table.to_pyarrow_dataset().to_table(columns=["finish_time"], filter=flt)
    newest = pc.max(rows["finish_time"]).as_py() if rows.num_rows else None
    return rows.num_rows, newest


def newest_finish() -> datetime | None:
    import pyarrow.compute as pc

    table = _table()
    if table is None:
        return None
    rows = table.to_pyarrow_dataset().to_table(columns=["finish_time"])
    return pc.max(rows["finish_time"]).as_py() if rows.num_rows else None


def window_minutes_since(start: datetime) -> float:
    """CycleSettings.window_minutes that makes the DAG's window start exactly at ``start``.

    pick_window ends the window 1 µs after the newest trace of the table and spans window_minutes back.
    """
    newest = newest_finish()
    if newest is None:
        raise RuntimeError("the traces table is empty")
    return (newest + timedelta(microseconds=1) - start).total_seconds() / 60.0


def lake_bytes_per_token() -> dict[str, Any]:
    """At-rest cost of the whole traces table: bytes of its live data files / tokens (prompt + output)."""
    import pyarrow.compute as pc

    table = _table()
    if table is None:
        return {"trace_bytes_per_token": None}
    import pyarrow as pa

    actions = pa.table(table.get_add_actions(flatten=True))
    nbytes = int(pc.sum(actions.column("size_bytes")).as_py() or 0)
    rows = table.to_pyarrow_dataset().to_table(columns=["prompt_token_ids", "output_token_ids"])
    tokens = sum(
        int(pc.sum(pc.list_value_length(rows[c])).as_py() or 0)
        for c in ("prompt_token_ids", "output_token_ids")
    )
    return {
        "trace_bytes_per_token": nbytes / tokens if tokens else None,
        # the same rows as one file with the ingest's Parquet settings: what hourly compaction converges to
        "trace_bytes_per_token_compacted": _one_file_bytes(table) / tokens if tokens else None,
        "table_bytes": nbytes,
        "table_files": actions.num_rows,
        "table_rows": rows.num_rows,
        "table_tokens": tokens,
        "table_version": table.version(),
    }


def _one_file_bytes(table) -> int:
    import tempfile

    import pyarrow.parquet as pq

    from consumers.lake_files import parquet_options

    rows = table.to_pyarrow_dataset().to_table()
    with tempfile.TemporaryDirectory(prefix="demo-compact-") as tmp:
        path = Path(tmp) / "traces.parquet"
        pq.write_table(rows, path, **parquet_options())
        return path.stat().st_size


def utc_now() -> datetime:
    return datetime.now(UTC)


def run_id(prefix: str) -> str:
    return f"{prefix}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:4]}"


def stop_servers(servers: list[VllmServer]) -> None:
    for s in servers:
        process.stop(s)


class BackgroundStarts:
    """Start servers one after the other in a thread (engine starts take minutes; the demo goes on)."""

    def __init__(self, servers: list[VllmServer], timeout_s: float = 1500):
        import threading

        self.servers = servers
        self.errors: dict[str, str] = {}
        self.done: set[str] = set()
        self.cancelled = False
        self.thread = threading.Thread(target=self._run, args=(timeout_s,), name="demo-starts", daemon=True)
        self.thread.start()

    def _run(self, timeout_s: float) -> None:
        for s in self.servers:
            if self.cancelled:
                return
            try:
                process.start(s, timeout_s=timeout_s)
                self.done.add(s.name)
            except Exception as e:  # reported by wait(); the Airflow task retries eval servers itself
                self.errors[s.name] = str(e)

    def cancel(self) -> None:
        """Start nothing more (the one starting now is stopped by whoever stops the servers)."""
        self.cancelled = True

    def wait(self, name: str, on_wait=None) -> None:
        while name not in self.done:
            if name in self.errors:
                raise RuntimeError(f"{name} failed to start: {self.errors[name]}")
            if on_wait is not None:
                on_wait()
            time.sleep(2)
