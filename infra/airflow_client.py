"""A small client of Airflow 3's REST API (``/api/v2``): what the demo and the tests need to drive DAGs on
the local stack's Airflow (pause state, triggers with params, run and task states, XComs)."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

DONE_STATES = {"success", "failed"}


class AuthError(RuntimeError):
    """Airflow refused the log-in."""


class AirflowClient:
    """The few Airflow 3 REST calls the demo needs (/api/v2), logged in as ``username`` if given, else with
    the token the simple auth manager hands anyone when everyone is admin (the open local stack)."""

    def __init__(self, base_url: str, username: str | None = None, password: str | None = None):
        self.http = httpx.Client(base_url=base_url, timeout=30.0)
        if username is not None:
            resp = self.http.post("/auth/token", json={"username": username, "password": password or ""})
            if resp.status_code >= 400:
                raise AuthError(
                    f"Airflow refused the log-in of {username!r}: {resp.status_code} {resp.text[:200]}"
                )
            self.http.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"
            return
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

    def paused_or_none(self, dag_id: str) -> bool | None:
        """Whether the DAG is paused; None while Airflow has not parsed it yet (it is unknown)."""
        resp = self.http.get(f"/api/v2/dags/{dag_id}")
        if resp.status_code == 404:
            return None
        return bool(self._ok(resp)["is_paused"])

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
