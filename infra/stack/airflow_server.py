"""Airflow 3 standalone (scheduler, DAG processor, triggerer, API server/UI) with sqlite, on 127.0.0.1:8080.

DAGs come from the repo's ``dags/`` folder. The triggerer runs the AssetWatcher that turns the ingest's
window announcements into ``trace_windows`` asset events; its Kafka connection is ``kafka_connection``. Locally everyone is admin (loopback only, no login) unless
``FLYWHEEL_STACK_AUTH=true``: then the simple auth manager knows three users, ``admin``, ``operator`` (op)
and ``viewer``, with the passwords of ``infra/stack/credentials.py``, the REST API wants a token from
``POST /auth/token``, and the tasks act as the ``trainer`` principal on Kafka and MLflow. The ``training``
pool (1 slot) serialises drafter fine-tunes as a GPU pool would at scale.

Which DAGs run is a setting per DAG (``StackSettings.*_active``; Airflow itself pauses every new DAG): the
standalone's processes get those settings in their environment, so the DAG files create each DAG in its
state (``is_paused_upon_creation``), and every start (``flywheel stack up``) pauses or unpauses the DAGs
Airflow already knows to match them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from core.process import ServiceSpec, StackError
from core.settings import KafkaSettings, StackSettings
from infra.acls import AIRFLOW_GROUP_PREFIX
from infra.airflow_client import AirflowClient
from infra.stack import credentials

DAGS_DIR = Path(__file__).resolve().parents[2] / "dags"
TRAINING_POOL = "training"


def airflow_env(
    home: Path,
    port: int,
    host: str = "127.0.0.1",
    state_dir: Path | None = None,
    passwords_file: Path | None = None,
) -> dict[str, str]:
    """Environment for any airflow process of this project (server, CLI, tests). ``passwords_file``: log-ins
    of the users in AIRFLOW_ROLES (``{user: password}``) instead of everyone being admin."""
    venv_bin = str(Path(sys.executable).parent)
    env = {"FLYWHEEL_STACK_STATE_DIR": str(state_dir)} if state_dir else {}  # tasks resolve the same paths
    if passwords_file is not None:
        env |= {
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(
                f"{user}:{role}" for user, role in credentials.AIRFLOW_ROLES.items()
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file),
        }
    return env | {
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",  # standalone spawns `airflow ...`
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": str(passwords_file is None),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{host}:{port}/execution/",
        "AIRFLOW__API__HOST": host,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "15",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "True",
    }


def kafka_connection(kafka: KafkaSettings) -> dict[str, str]:
    """``AIRFLOW_CONN_FLYWHEEL_KAFKA`` (the triggerer's consumer of window announcements, dags/flywheel_assets.py)
    and the topic it watches (and the registry its ids are decoded by), from ``kafka``. Its group (``flywheel-airflow-windows``) starts at the earliest
    retained announcement and then resumes where it committed; the trigger commits each message it read."""
    extra = kafka.client_config() | {
        "group.id": f"{AIRFLOW_GROUP_PREFIX}windows",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": "false",
    }
    return {
        "AIRFLOW_CONN_FLYWHEEL_KAFKA": json.dumps({"conn_type": "kafka", "extra": extra}),
        "FLYWHEEL_KAFKA_WINDOWS_TOPIC": kafka.windows_topic,
        "FLYWHEEL_KAFKA_SCHEMA_REGISTRY_URL": kafka.schema_registry_url,  # the triggerer decodes by its ids
    }


@dataclass(frozen=True)
class DagState:
    dag_id: str
    paused: bool | None  # None: Airflow has not parsed the DAG yet
    active: bool  # what the settings want

    @property
    def state(self) -> str:
        return "not parsed yet" if self.paused is None else "paused" if self.paused else "active"


class AirflowStandalone(ServiceSpec):
    name = "airflow"
    stop_timeout_s = 45.0

    def __init__(self, stack: StackSettings, kafka: KafkaSettings | None = None):
        """``kafka``: the broker whose window announcements the triggerer watches (default: the one the tasks
        use, as ``trainer`` on an authenticated stack)."""
        super().__init__(stack.root)
        self.stack = stack
        self.kafka = kafka
        self.host = stack.host
        self.port = stack.airflow_port
        self.home = stack.root / "airflow"
        self.dags_active = stack.dags_active()
        self.passwords_file = self.home / "simple_auth_manager_passwords.json" if stack.auth else None

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if self.passwords_file is not None:  # the auth manager generates passwords only for users not in it
            self.passwords_file.touch(mode=0o600)
            self.passwords_file.chmod(0o600)
            secrets = credentials.credentials(self.stack)
            users = {user: secrets[user].get_secret_value() for user in credentials.AIRFLOW_ROLES}
            self.passwords_file.write_text(json.dumps(users) + "\n")

    def command(self) -> list[str]:
        return [str(Path(sys.executable).parent / "airflow"), "standalone"]

    def env(self) -> dict[str, str]:
        # the DAG processor reads the same *_active settings as this spec (is_paused_upon_creation)
        active = {f"FLYWHEEL_STACK_{d.upper()}_ACTIVE": str(on).lower() for d, on in self.dags_active.items()}
        airflow = airflow_env(self.home, self.port, self.host, self.state_dir, self.passwords_file)
        tasks = {}  # tasks train, register drafters and publish promotions: the trainer's principal
        if self.stack.auth:
            tasks = {"FLYWHEEL_STACK_AUTH": "true"} | credentials.principal_env(self.stack, "trainer")
        kafka = self.kafka
        if kafka is None:
            kafka = credentials.kafka_settings(self.stack, "trainer") if self.stack.auth else KafkaSettings()
        return {**os.environ, **airflow, **active, **tasks, **kafka_connection(kafka)}

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
        self.apply_dag_states()

    def client(self, user: str = "admin") -> AirflowClient:
        """A REST client, logged in as ``user`` when auth is on."""
        if not self.stack.auth:
            return AirflowClient(f"http://{self.address}")
        return AirflowClient(f"http://{self.address}", user, credentials.password(self.stack, user))

    def dag_states(self) -> list[DagState]:
        """Each flywheel DAG: paused or not in Airflow, and what its setting wants."""
        client = self.client()
        return [DagState(d, client.paused_or_none(d), on) for d, on in self.dags_active.items()]

    def apply_dag_states(self) -> list[DagState]:
        """Pause or unpause every DAG Airflow knows so it matches its setting; a DAG not parsed yet is
        created in that state by its file (is_paused_upon_creation). Returns the states after."""
        client, out = self.client(), []
        for st in self.dag_states():
            if st.paused is not None and st.paused == st.active:
                try:
                    client.set_paused(st.dag_id, not st.active)
                except RuntimeError as e:
                    raise StackError(
                        f"could not {'un' if st.active else ''}pause DAG {st.dag_id}: {e}"
                    ) from e
                st = DagState(st.dag_id, not st.active, st.active)
            out.append(st)
        return out
