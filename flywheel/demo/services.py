"""What the demo talks to: the two demo vLLM servers, the registry, the background ingest, the lake.

Kept apart from the demo's storyline (flywheel/demo/stages.py) so each piece is small and reusable.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from core import process
from core.settings import LakeSettings, ServingSettings, StackSettings
from producers.hot_swap import swap_server
from producers.vllm_server import VllmServer, cpu_environment, serve_args

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
    stack: StackSettings,
    serving: ServingSettings,
    drafter: Path,
    k: int,
    capture: bool,
    follow: bool,
    cpus: str = "auto",
) -> DemoServer:
    """A stock `vllm serve` with our plugin on ``serving.port``: capture and promotion-following switched per
    server. ``cpus``: the cores its engine's OpenMP threads are bound to (vLLM's ``auto`` takes core 0 on
    this box). The plugin runs in the server's own process, so its settings travel as FLYWHEEL_* variables."""
    spill = state / f"spill-{label}"
    serving = serving.model_copy(update={"spill_dir": spill, "node_id": f"demo-{label}"})
    env = cpu_environment(serving) | {
        "VLLM_SERVER_DEV_MODE": "1",  # /weight_info: the demo shows which drafter version serves
        "FLYWHEEL_SERVING_PORT": str(serving.port),
        "FLYWHEEL_SERVING_NODE_ID": f"demo-{label}",
        "FLYWHEEL_SERVING_SPILL_DIR": str(spill),
        "FLYWHEEL_SERVING_CAPTURE_ENABLED": str(capture).lower(),
        "FLYWHEEL_SERVING_FOLLOW_PROMOTIONS": str(follow).lower(),
        "VLLM_CPU_OMP_THREADS_BIND": cpus,
    }
    spec = VllmServer(
        stack.model_copy(update={"state_dir": state / label}),
        serving,
        serve_args(serving, "eagle3", drafter, k),
        env,
    )
    spec.name = f"vllm-demo-{label}"
    return DemoServer(label, spec)


def register_drafter(registry, mlflow_settings, drafter: Path, run_name: str, tags: dict[str, Any]) -> str:
    """Log a drafter dir as an MLflow Model in a run of its own and register it, as a training run does; its
    version."""
    import mlflow

    from trainer.drafter_model import log_drafter_model

    mlflow.set_tracking_uri(mlflow_settings.tracking_uri)
    mlflow.set_experiment(mlflow_settings.experiment)
    with mlflow.start_run(run_name=run_name) as run:
        info = log_drafter_model(drafter)
    tags = tags | {"spec_method": "eagle3"}
    return registry.register(run.info.run_id, info.model_uri, drafter, tags, model_id=info.model_id).version


def copy_head(source: Path, out: Path, meta: dict) -> Path:
    """A copy of the drafter dir ``source`` with ``meta`` added to its flywheel metadata (the demo's own
    drafter id), so that what the demo registers and serves never changes the cached original."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out)
    info = out / "flywheel-drafter.json"
    extra = json.loads(info.read_text()) if info.exists() else {}
    info.write_text(json.dumps(extra | meta, indent=1, default=str))
    return out


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
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                # the demo triggers each cycle itself, on the span it chose: no window announcements, which
                # would start drafter_flywheel runs of their own
                env={**os.environ, "FLYWHEEL_INGEST_ANNOUNCE_WINDOWS": "false"},
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


def _table(lake: LakeSettings):
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(lake.traces_uri, storage_options=lake.delta_options()):
        return None
    return DeltaTable(lake.traces_uri, storage_options=lake.delta_options())


def rows_from(lake: LakeSettings, node: str, since: datetime) -> tuple[int, datetime | None]:
    """Traces of serving node ``node`` that arrived at/after ``since`` (ingest_time, the time windows use):
    count and newest ingest_time."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from schemas.arrow import TRUSTED_TIME_COLUMN as TIME

    table = _table(lake)
    if table is None:
        return 0, None
    flt = (ds.field("serving_node") == node) & (ds.field(TIME) >= since)
    rows = table.to_pyarrow_dataset().to_table(columns=[TIME], filter=flt)
    newest = pc.max(rows[TIME]).as_py() if rows.num_rows else None
    return rows.num_rows, newest


def newest_arrival(lake: LakeSettings) -> datetime | None:
    """The newest ingest_time in the lake (a window ending just after it holds every trace so far)."""
    import pyarrow.compute as pc

    from schemas.arrow import TRUSTED_TIME_COLUMN as TIME

    table = _table(lake)
    if table is None:
        return None
    rows = table.to_pyarrow_dataset().to_table(columns=[TIME])
    return pc.max(rows[TIME]).as_py() if rows.num_rows else None


def lake_bytes_per_token(lake: LakeSettings) -> dict[str, Any]:
    """At-rest cost of the whole traces table: bytes of its live data files / tokens (prompt + output)."""
    import pyarrow.compute as pc

    table = _table(lake)
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
