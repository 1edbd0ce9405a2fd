"""What the suite must leave alone: the user's stack (the one `make demo` and `flywheel stack up` use).

``tests/conftest.py`` re-points the whole suite at a stack of its own (state dir and ports, see
``TEST_STACK_ENV``) before any settings are built; this module says where the user's stack lives and
snapshots the parts of it the suite could otherwise change, read-only, so ``test_isolation.py`` can
compare the snapshot from the session's start with the one at its end.
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

from core.settings import StackSettings

REPO = Path(__file__).resolve().parents[1]
TEST_STATE_DIR = REPO / ".flywheel" / "test-stack"
TEST_HOST = "127.0.0.1"
TEST_PORTS = {
    "kafka": 19092,
    "kafka_controller": 19093,
    "registry": 18081,
    "mlflow": 15000,
    "airflow": 18080,
    "s3": 18333,
}
TEST_STACK_ENV = {
    "FLYWHEEL_STACK_STATE_DIR": str(TEST_STATE_DIR),
    "FLYWHEEL_STACK_HOST": TEST_HOST,
    "FLYWHEEL_STACK_KAFKA_PORT": str(TEST_PORTS["kafka"]),
    "FLYWHEEL_STACK_KAFKA_CONTROLLER_PORT": str(TEST_PORTS["kafka_controller"]),
    "FLYWHEEL_STACK_REGISTRY_PORT": str(TEST_PORTS["registry"]),
    "FLYWHEEL_STACK_MLFLOW_PORT": str(TEST_PORTS["mlflow"]),
    "FLYWHEEL_STACK_AIRFLOW_PORT": str(TEST_PORTS["airflow"]),
    "FLYWHEEL_STACK_S3_PORT": str(TEST_PORTS["s3"]),  # its weed master/volume/filer: 18334-6, gRPC 19333-6
    "FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": f"{TEST_HOST}:{TEST_PORTS['kafka']}",
    "FLYWHEEL_KAFKA_SCHEMA_REGISTRY_URL": f"http://{TEST_HOST}:{TEST_PORTS['registry']}/apis/ccompat/v7",
    "FLYWHEEL_MLFLOW_TRACKING_URI": f"http://{TEST_HOST}:{TEST_PORTS['mlflow']}",
}
# Modules that start services of their own (auth on, a standalone Airflow) bind these: never the suite's
# stack above, which another run may be using, nor the user's.
OWN_PORTS = {"kafka": 19192, "kafka_controller": 19193, "registry": 18281, "mlflow": 15100, "airflow": 18180}
# Paths the user may have set on their own; unset, each follows the suite's state dir like the rest (and
# the user's object-store lake settings go with the root: a test lake names its own).
USER_PATH_VARIABLES = (
    "FLYWHEEL_LAKE_ROOT",
    "FLYWHEEL_LAKE_STORAGE_OPTIONS",
    "FLYWHEEL_LAKE_S3_ENDPOINT",
    "FLYWHEEL_LAKE_S3_ACCESS_KEY_ID",
    "FLYWHEEL_LAKE_S3_SECRET_ACCESS_KEY",
    "FLYWHEEL_MLFLOW_ARTIFACT_CACHE_DIR",
    "FLYWHEEL_SERVING_SPILL_DIR",
    "FLYWHEEL_TRAINING_OUTPUT_DIR",
    "FLYWHEEL_SPARK_WAREHOUSE_DIR",
    "FLYWHEEL_SPARK_JVM_LOG",
)
REGISTRY_TABLES = (
    "registered_models",
    "registered_model_tags",
    "registered_model_aliases",
    "model_versions",
    "model_version_tags",
)
_PARTITION_DIR = re.compile(r"^(?!__).+-\d+$")  # '<topic>-<partition>', not internal, not being deleted


def user_stack() -> StackSettings:
    """The user's stack as this shell's environment describes it (before conftest re-points it).

    Unset, the state dir is ``.flywheel`` of the repo: where `make` runs `flywheel stack up` and the demo.
    """
    if os.environ.get("FLYWHEEL_STACK_STATE_DIR"):
        return StackSettings()
    return StackSettings(state_dir=REPO / ".flywheel")


def mlflow_db(stack: StackSettings) -> Path:
    from infra.stack.mlflow_server import MlflowServer

    return MlflowServer(stack).home / "mlflow.db"


def registry_rows(db: Path) -> dict[str, list[tuple]] | None:
    """Every row of the MLflow registry tables, read-only; None if the store does not exist."""
    if not db.exists():
        return None
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as conn:
        present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return {
            table: sorted(conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
            for table in REGISTRY_TABLES
            if table in present
        }


def kafka_partitions(stack: StackSettings) -> set[str] | None:
    """The topic partitions in the user's broker's data dir (``<topic>-<n>``); None if it has none."""
    from infra.stack.kafka_broker import KafkaBroker

    data = KafkaBroker(stack).data_dir
    if not data.is_dir():
        return None
    return {p.name for p in data.iterdir() if p.is_dir() and _PARTITION_DIR.match(p.name)}


def snapshot(stack: StackSettings) -> dict:
    """The user's MLflow registry and Kafka topics, as files on disk (no server is asked)."""
    return {"registry": registry_rows(mlflow_db(stack)), "kafka_partitions": kafka_partitions(stack)}
