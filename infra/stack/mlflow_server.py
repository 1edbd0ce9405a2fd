"""MLflow tracking server: sqlite backend store, artifacts stored locally and served by the server."""

from __future__ import annotations

import sys

import httpx

from core.process import ServiceSpec
from core.settings import StackSettings


class MlflowServer(ServiceSpec):
    name = "mlflow"
    stop_timeout_s = 15.0

    def __init__(self, stack: StackSettings):
        super().__init__(stack.root)
        self.host = stack.host
        self.port = stack.mlflow_port
        self.home = stack.root / "mlflow"

    def prepare(self) -> None:
        (self.home / "artifacts").mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.home / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.home / "artifacts"),
            "--serve-artifacts",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def healthy(self) -> bool:
        """Healthy = ``GET /health`` answers 200."""
        try:
            return httpx.get(f"http://{self.address}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False
