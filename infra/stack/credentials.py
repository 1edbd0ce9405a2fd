"""Who is who on an authenticated local stack (``FLYWHEEL_STACK_AUTH=true``), and their secrets.

Each flywheel process acts as one principal, and the services know only these:

| principal  | Kafka (SCRAM-SHA-512; ACLs in ``infra/acls.py``)          | MLflow (basic-auth app)            | Airflow  |
|------------|-----------------------------------------------------------|------------------------------------|----------|
| admin      | super user: topics, ACLs, the stack's health checks        | admin                              | admin    |
| serving    | writes traces; reads promotions (groups flywheel-swap-*)   | READ (the default): fetch drafters | -        |
| ingest     | reads traces (groups flywheel-ingest*); writes, reads the DLQ | -                               | -        |
| trainer    | writes promotions                                          | creates runs and registered models, MANAGE on what it created | - |
| operator   | -                                                          | -                                  | op       |
| viewer     | -                                                          | -                                  | viewer   |

The broker itself uses two more, both Kafka super users: ``broker`` (SCRAM, its own inter-broker listener)
and ``controller`` (PLAIN on the KRaft controller listener, whose SCRAM store it is). Airflow's tasks run as
``trainer`` (they train, register and publish promotions).

Passwords are random and made once per state dir, in ``<state_dir>/secrets/credentials.json`` (0600, dir
0700); nothing else holds them in clear but the config files the services read (also 0600). A process
picks its principal through its environment, like any deployment: ``eval "$(flywheel stack credentials
serving)"`` exports ``FLYWHEEL_KAFKA_SASL_*`` and ``FLYWHEEL_MLFLOW_USERNAME``/``PASSWORD``; in code,
:func:`kafka_settings` and :func:`mlflow_settings` give the settings of a principal.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from pathlib import Path

from pydantic import SecretStr

from core.process import StackError
from core.settings import KafkaSettings, MlflowSettings, StackSettings

KAFKA_PRINCIPALS = ("admin", "serving", "ingest", "trainer")
BROKER_PRINCIPAL, CONTROLLER_PRINCIPAL = "broker", "controller"
MLFLOW_USERS = ("serving", "trainer")  # besides admin, the auth app's bootstrap admin
AIRFLOW_ROLES = {"admin": "admin", "operator": "op", "viewer": "viewer"}
SASL_MECHANISM = "SCRAM-SHA-512"
MLFLOW_FLASK_KEY = "mlflow-flask-secret-key"  # signs the auth app's CSRF tokens: one key for every worker
_SECRETS = (*KAFKA_PRINCIPALS, BROKER_PRINCIPAL, CONTROLLER_PRINCIPAL, *AIRFLOW_ROLES, MLFLOW_FLASK_KEY)


def secrets_file(stack: StackSettings) -> Path:
    return stack.root / "secrets" / "credentials.json"


def credentials(stack: StackSettings) -> dict[str, SecretStr]:
    """Every principal's password (and the stack's keys), made on first use and then read back. Under a lock:
    services starting side by side must not each make (and hand their server) passwords of their own."""
    path = secrets_file(stack)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    with open(path.parent / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        known = _read(path)
        missing = [name for name in _SECRETS if name not in known]
        if missing:
            known |= {name: secrets.token_urlsafe(24) for name in missing}
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(known, f, indent=2)
            tmp.replace(path)
    return {name: SecretStr(value) for name, value in known.items()}


def _read(path: Path) -> dict[str, str]:
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return {}
    if mode & 0o077:
        raise StackError(f"{path} is readable by others (mode {mode:o}): `chmod 600 {path}`")
    return json.loads(path.read_text())


def password(stack: StackSettings, name: str) -> str:
    return credentials(stack)[name].get_secret_value()


def _require(principal: str, known: tuple[str, ...], what: str) -> None:
    if principal not in known:
        raise StackError(f"{principal!r} is no {what} principal; valid: {', '.join(known)}")


def kafka_settings(stack: StackSettings, principal: str, base: KafkaSettings | None = None) -> KafkaSettings:
    """``base`` (default: from the environment) as ``principal`` on the stack's broker."""
    _require(principal, KAFKA_PRINCIPALS, "Kafka")
    return (base or KafkaSettings()).model_copy(
        update={
            "bootstrap_servers": f"{stack.host}:{stack.kafka_port}",
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": SASL_MECHANISM,
            "sasl_username": principal,
            "sasl_password": credentials(stack)[principal],
        }
    )


def mlflow_settings(
    stack: StackSettings, principal: str, base: MlflowSettings | None = None
) -> MlflowSettings:
    """``base`` (default: from the environment) as ``principal`` on the stack's tracking server."""
    _require(principal, ("admin", *MLFLOW_USERS), "MLflow")
    return (base or MlflowSettings()).model_copy(
        update={
            "tracking_uri": f"http://{stack.host}:{stack.mlflow_port}",
            "username": principal,
            "password": credentials(stack)[principal],
        }
    )


def principal_env(stack: StackSettings, principal: str) -> dict[str, str]:
    """The FLYWHEEL_* variables that make a process act as ``principal`` on the stack."""
    _require(principal, KAFKA_PRINCIPALS, "Kafka")
    env = {
        "FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": f"{stack.host}:{stack.kafka_port}",
        "FLYWHEEL_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "FLYWHEEL_KAFKA_SASL_MECHANISM": SASL_MECHANISM,
        "FLYWHEEL_KAFKA_SASL_USERNAME": principal,
        "FLYWHEEL_KAFKA_SASL_PASSWORD": password(stack, principal),
    }
    if principal in ("admin", *MLFLOW_USERS):
        env |= {
            "FLYWHEEL_MLFLOW_TRACKING_URI": f"http://{stack.host}:{stack.mlflow_port}",
            "FLYWHEEL_MLFLOW_USERNAME": principal,
            "FLYWHEEL_MLFLOW_PASSWORD": password(stack, principal),
        }
    return env
