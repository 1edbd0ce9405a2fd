"""MLflow tracking server: sqlite backend store, artifacts stored locally and served by the server.

With ``FLYWHEEL_STACK_AUTH=true`` it runs MLflow's basic-auth app: every request but ``/health`` needs a
user (401 without one), ``admin`` is its bootstrap admin, and each start makes sure the users of
``infra/stack/credentials.py`` exist with their passwords. Everyone may read (``default_permission =
READ``: serving nodes fetch drafters); a user may change only what it created or was granted, so the
``trainer`` owns the runs and registered models it makes.
"""

from __future__ import annotations

import os
import sys

import httpx

from core.process import ServiceSpec, StackError
from core.settings import StackSettings
from infra.stack import credentials

DEFAULT_PERMISSION = "READ"
AUTH_CACHE_TTL_S = 60


class MlflowServer(ServiceSpec):
    name = "mlflow"
    stop_timeout_s = 15.0

    def __init__(self, stack: StackSettings):
        super().__init__(stack.root)
        self.stack = stack
        self.host = stack.host
        self.port = stack.mlflow_port
        self.home = stack.root / "mlflow"
        self.auth_config = self.home / "basic_auth.ini"

    def prepare(self) -> None:
        (self.home / "artifacts").mkdir(parents=True, exist_ok=True)
        if self.stack.auth:
            self.auth_config.touch(mode=0o600)
            self.auth_config.chmod(0o600)
            self.auth_config.write_text(
                "[mlflow]\n"
                f"default_permission = {DEFAULT_PERMISSION}\n"
                f"database_uri = sqlite:///{self.home / 'basic_auth.db'}\n"
                "admin_username = admin\n"
                f"admin_password = {credentials.password(self.stack, 'admin')}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                # a password check is a PBKDF2 hash (tens of ms): cache good ones, so that a training run
                # logging every step does not pay it per request; a changed password applies within this
                f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n"
            )

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
            *(["--app-name", "basic-auth"] if self.stack.auth else []),
        ]

    def env(self) -> dict[str, str]:
        if not self.stack.auth:
            return dict(os.environ)
        return os.environ | {
            "MLFLOW_AUTH_CONFIG_PATH": str(self.auth_config),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": credentials.password(self.stack, credentials.MLFLOW_FLASK_KEY),
        }

    def healthy(self) -> bool:
        """Healthy = ``GET /health`` answers 200."""
        try:
            return httpx.get(f"http://{self.address}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def after_healthy(self) -> None:
        if self.stack.auth:
            self.ensure_users()

    def ensure_users(self) -> None:
        """Create each MLflow user of the stack, or set its password from the secrets file (idempotent)."""
        admin = ("admin", credentials.password(self.stack, "admin"))
        with httpx.Client(base_url=f"http://{self.address}/api/2.0/mlflow", auth=admin, timeout=30) as http:
            for user in credentials.MLFLOW_USERS:
                body = {"username": user, "password": credentials.password(self.stack, user)}
                resp = http.post("/users/create", json=body)
                if resp.status_code == 400 and "RESOURCE_ALREADY_EXISTS" in resp.text:
                    resp = http.patch("/users/update-password", json=body)
                if resp.status_code >= 400:
                    raise StackError(f"MLflow user {user!r}: {resp.status_code} {resp.text[:300]}")
