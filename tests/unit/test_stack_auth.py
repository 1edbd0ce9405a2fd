"""The authenticated stack's configuration, before anything starts: secrets, broker config, ACL table, users.

tests/integration/test_auth.py runs the same against real services.
"""

from __future__ import annotations

import json
from string import Template

import pytest

from consumers.delta_sink import IngestOptions
from core.process import StackError
from core.settings import KafkaSettings, MlflowSettings, StackSettings
from infra.acls import (
    AIRFLOW_GROUP_PREFIX,
    DLQ_READER_GROUP_PREFIX,
    INGEST_GROUP_PREFIX,
    SWAP_GROUP_PREFIX,
    project_acls,
)
from infra.stack import credentials
from infra.stack.airflow_server import AirflowStandalone, kafka_connection
from infra.stack.kafka_broker import INFRA_KAFKA, KafkaBroker
from infra.stack.mlflow_server import MlflowServer


def _stack(tmp_path, auth: bool = True) -> StackSettings:
    return StackSettings(state_dir=tmp_path, kafka_port=19192, kafka_controller_port=19193, auth=auth)


def _properties(text: str) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")]
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), "a key set twice"
    return dict(pairs)


def test_secrets_are_made_once_private_and_random(tmp_path):
    stack = _stack(tmp_path)
    first = credentials.credentials(stack)
    path = credentials.secrets_file(stack)
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert credentials.credentials(stack) == first  # read back, not made again
    values = [v.get_secret_value() for v in first.values()]
    assert len(set(values)) == len(values)
    assert "admin" in repr(first) and values[0] not in repr(first)
    path.chmod(0o644)
    with pytest.raises(StackError, match="readable by others"):
        credentials.credentials(stack)


def test_services_starting_side_by_side_get_the_same_secrets(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    stack = _stack(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: credentials.password(stack, "admin"), range(32)))
    assert len(set(made)) == 1 and made[0] == credentials.password(stack, "admin")


def test_a_principal_is_a_set_of_client_settings(tmp_path):
    stack = _stack(tmp_path)
    conf = credentials.kafka_settings(stack, "serving", KafkaSettings(traces_topic="t")).client_config()
    assert conf["bootstrap.servers"] == "127.0.0.1:19192"
    assert (conf["security.protocol"], conf["sasl.mechanism"], conf["sasl.username"]) == (
        "SASL_PLAINTEXT",
        "SCRAM-SHA-512",
        "serving",
    )
    assert conf["sasl.password"] == credentials.password(stack, "serving")
    with pytest.raises(StackError, match="no Kafka principal"):
        credentials.kafka_settings(stack, "broker")
    env = credentials.principal_env(stack, "trainer")
    assert env["FLYWHEEL_MLFLOW_USERNAME"] == "trainer" and env["FLYWHEEL_KAFKA_SASL_USERNAME"] == "trainer"
    assert "FLYWHEEL_MLFLOW_USERNAME" not in credentials.principal_env(stack, "ingest")


def test_mlflow_credentials_reach_mlflow_clients_through_the_environment(monkeypatch):
    assert MlflowSettings(username=None).client_env() == {}
    settings = MlflowSettings(username="trainer", password="s3cret-s3cret")
    assert "s3cret" not in repr(settings)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    settings.export_credentials()
    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds("http://127.0.0.1:1")  # what MLflow's REST clients send
    assert (creds.username, creds.password) == ("trainer", "s3cret-s3cret")


def test_broker_config_with_auth_has_no_open_listener(tmp_path):
    stack = _stack(tmp_path)
    broker = KafkaBroker(stack)
    broker.home.mkdir(parents=True)
    broker._render_properties()
    assert broker.properties.stat().st_mode & 0o777 == 0o600
    props = _properties(broker.properties.read_text())
    assert props["listeners"] == "CLIENT://127.0.0.1:19192,CONTROLLER://127.0.0.1:19193"
    assert props["listener.security.protocol.map"] == "CLIENT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT"
    assert props["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == "User:admin;User:broker;User:controller"
    assert (
        credentials.password(stack, "broker") in props["listener.name.client.scram-sha-512.sasl.jaas.config"]
    )
    assert props["log.dirs"] == str(broker.data_dir)  # the rest of server.properties is kept
    scram = broker._scram_args()
    assert scram[::2] == ["--add-scram"] * 5 and scram[1].startswith("SCRAM-SHA-512=[name=admin,password=")


def test_broker_config_without_auth_is_the_template(tmp_path):
    broker = KafkaBroker(_stack(tmp_path, auth=False))
    broker.home.mkdir(parents=True)
    broker._render_properties()
    expected = Template((INFRA_KAFKA / "server.properties").read_text()).substitute(
        host="127.0.0.1", port=19192, controller_port=19193, data_dir=broker.data_dir
    )
    assert broker.properties.read_text() == expected
    assert not credentials.secrets_file(broker.stack).exists()


def test_auth_on_an_open_data_dir_is_refused(tmp_path):
    broker = KafkaBroker(_stack(tmp_path))
    broker.data_dir.mkdir(parents=True)
    (broker.data_dir / "meta.properties").write_text("formatted without SCRAM users")
    with pytest.raises(StackError, match="formatted without SCRAM users"):
        broker.prepare()


def test_acl_table_and_the_groups_the_components_use():
    kafka = KafkaSettings()
    grants = {
        (b.principal, b.operation.name, b.name, b.resource_pattern_type.name) for b in project_acls(kafka)
    }
    assert grants == {
        ("User:serving", "WRITE", kafka.traces_topic, "LITERAL"),
        ("User:serving", "READ", kafka.promotions_topic, "LITERAL"),
        ("User:serving", "READ", SWAP_GROUP_PREFIX, "PREFIXED"),
        ("User:ingest", "READ", kafka.traces_topic, "LITERAL"),
        ("User:ingest", "READ", INGEST_GROUP_PREFIX, "PREFIXED"),
        ("User:ingest", "WRITE", kafka.dlq_topic, "LITERAL"),
        ("User:ingest", "READ", kafka.dlq_topic, "LITERAL"),
        ("User:ingest", "READ", DLQ_READER_GROUP_PREFIX, "PREFIXED"),
        ("User:ingest", "WRITE", kafka.windows_topic, "LITERAL"),
        ("User:trainer", "WRITE", kafka.promotions_topic, "LITERAL"),
        ("User:trainer", "READ", kafka.windows_topic, "LITERAL"),
        ("User:trainer", "READ", AIRFLOW_GROUP_PREFIX, "PREFIXED"),
    }
    assert IngestOptions().group.startswith(INGEST_GROUP_PREFIX)
    connection = json.loads(kafka_connection(kafka)["AIRFLOW_CONN_FLYWHEEL_KAFKA"])  # Airflow's triggerer
    assert connection["extra"]["group.id"].startswith(AIRFLOW_GROUP_PREFIX)


def test_mlflow_runs_the_basic_auth_app_only_with_auth(tmp_path):
    assert "--app-name" not in MlflowServer(_stack(tmp_path / "open", auth=False)).command()
    server = MlflowServer(_stack(tmp_path))
    server.prepare()
    assert server.command()[-2:] == ["--app-name", "basic-auth"]
    ini = server.auth_config.read_text()
    assert "default_permission = READ" in ini and credentials.password(server.stack, "admin") in ini
    assert server.auth_config.stat().st_mode & 0o777 == 0o600
    env = server.env()
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(server.auth_config) and env["MLFLOW_FLASK_SERVER_SECRET_KEY"]


def test_airflow_has_users_with_auth_and_everyone_is_admin_without(tmp_path):
    open_env = AirflowStandalone(_stack(tmp_path / "open", auth=False)).env()
    assert open_env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "True"
    assert "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE" not in open_env

    spec = AirflowStandalone(_stack(tmp_path))
    spec.prepare()
    env = spec.env()
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "False"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == "admin:admin,operator:op,viewer:viewer"
    passwords = json.loads(spec.passwords_file.read_text())
    assert passwords == {u: credentials.password(spec.stack, u) for u in ("admin", "operator", "viewer")}
    assert spec.passwords_file.stat().st_mode & 0o777 == 0o600
    # tasks act as the trainer, and so does the triggerer's consumer of window announcements
    assert env["FLYWHEEL_KAFKA_SASL_USERNAME"] == env["FLYWHEEL_MLFLOW_USERNAME"] == "trainer"
    watcher = json.loads(env["AIRFLOW_CONN_FLYWHEEL_KAFKA"])["extra"]
    assert watcher["sasl.username"] == "trainer" and watcher["security.protocol"] == "SASL_PLAINTEXT"
    assert "sasl.username" not in json.loads(open_env["AIRFLOW_CONN_FLYWHEEL_KAFKA"])["extra"]


def test_credentials_command_prints_a_principals_exports(tmp_path):
    import typer
    from typer.testing import CliRunner

    from infra.cli import register

    cli = typer.Typer()
    register(cli)
    env = {"FLYWHEEL_STACK_STATE_DIR": str(tmp_path), "FLYWHEEL_STACK_AUTH": "true"}
    shown = CliRunner().invoke(cli, ["stack", "credentials", "ingest"], env=env)
    assert shown.exit_code == 0, shown.output
    exports = dict(line.removeprefix("export ").split("=", 1) for line in shown.output.splitlines())
    assert exports["FLYWHEEL_KAFKA_SASL_USERNAME"] == "ingest"
    assert exports["FLYWHEEL_KAFKA_SASL_PASSWORD"] == credentials.password(
        StackSettings(state_dir=tmp_path), "ingest"
    )
    assert CliRunner().invoke(cli, ["stack", "credentials", "mallory"], env=env).exit_code == 1
    off = CliRunner().invoke(
        cli, ["stack", "credentials", "ingest"], env=env | {"FLYWHEEL_STACK_AUTH": "false"}
    )
    assert off.exit_code == 1 and "auth is off" in off.output
