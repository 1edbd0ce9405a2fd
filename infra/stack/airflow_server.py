"""Airflow 3 standalone (scheduler, DAG processor, triggerer, API server/UI) with sqlite, on 127.0.0.1:8080.

DAGs come from the repo's ``dags/`` folder. Locally everyone is admin (loopback only, no login); the
``training`` pool (1 slot) serialises drafter fine-tunes as a GPU pool would at scale.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from core.process import ServiceSpec, StackError
from core.settings import StackSettings

DAGS_DIR = Path(__file__).resolve().parents[2] / "dags"
TRAINING_POOL = "training"


def airflow_env(
    home: Path, port: int, host: str = "127.0.0.1", state_dir: Path | None = None
) -> dict[str, str]:
    """Environment for any airflow process of this project (server, CLI, tests)."""
    venv_bin = str(Path(sys.executable).parent)
    env = {"FLYWHEEL_STACK_STATE_DIR": str(state_dir)} if state_dir else {}  # tasks resolve the same paths
    return env | {
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",  # standalone spawns `airflow ...`
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{host}:{port}/execution/",
        "AIRFLOW__API__HOST": host,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "15",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "True",
        # Locally the watcher looks for new windows and drift every minute (cheap: reads the Delta table).
        "FLYWHEEL_WATCH_CRON": os.environ.get("FLYWHEEL_WATCH_CRON", "* * * * *"),
    }


class AirflowStandalone(ServiceSpec):
    name = "airflow"
    stop_timeout_s = 45.0

    def __init__(self, stack: StackSettings):
        super().__init__(stack.root)
        self.host = stack.host
        self.port = stack.airflow_port
        self.home = stack.root / "airflow"

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return [str(Path(sys.executable).parent / "airflow"), "standalone"]

    def env(self) -> dict[str, str]:
        return {**os.environ, **airflow_env(self.home, self.port, self.host, self.state_dir)}

    def healthy(self) -> bool:
        """Healthy = the API answers and scheduler, DAG processor and triggerer report healthy."""
        try:
            body = httpx.get(f"http://{self.address}/api/v2/monitor/health", timeout=3.0).json()
        except (httpx.HTTPError, ValueError):
            return False
        return all(
            body.get(c, {}).get("status") == "healthy"
            for c in ("metadatabase", "scheduler", "triggerer", "dag_processor")
        )

    def after_healthy(self) -> None:
        cmd = [
            str(Path(sys.executable).parent / "airflow"),
            "pools",
            "set",
            TRAINING_POOL,
            "1",
            "drafter fine-tunes",
        ]
        result = subprocess.run(cmd, env=self.env(), capture_output=True, text=True)
        if result.returncode != 0:
            raise StackError(f"could not create the Airflow pool {TRAINING_POOL!r}: {result.stderr[-1000:]}")
