"""An authenticated stack (``FLYWHEEL_STACK_AUTH=true``) refuses whoever it does not know, and lets each
principal do its part of the flywheel and nothing else.

The module runs a Kafka broker and an MLflow server of its own with auth on (a fresh state dir, the ports of
``tests/user_state.py`` ``OWN_PORTS``), creates the topics and ACLs with `flywheel topics create`, and drives
them with the flywheel's own clients, each as its principal: a serving node's trace emitter and promotion
listener, the exactly-once ingest into a Delta table, the trainer's registry that promotes a drafter. Each
refusal is asserted by the error the client gets: TOPIC_ or GROUP_AUTHORIZATION_FAILED from the broker,
_AUTHENTICATION for a bad password, MLflow's 401 and PERMISSION_DENIED; a client without SASL is cut off
before any request, so its messages time out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import typer
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from deltalake import DeltaTable
from mlflow.exceptions import MlflowException
from trace_events import encoded, poison_messages, read_dlq, trace
from typer.testing import CliRunner
from user_state import OWN_PORTS, TEST_HOST

from consumers.dead_letter_replay import inspect
from consumers.dead_letters import parse_headers
from consumers.delta_sink import IngestOptions, TraceIngest, consumer_config
from core import process
from core.drafter_artifacts import fetch, weights_sha256
from core.settings import KafkaSettings, LakeSettings, StackSettings
from flywheel.demo.services import register_drafter
from infra import stack
from infra.acls import listed_acls, project_acls
from infra.cli import register
from infra.stack import credentials
from infra.stack.kafka_broker import KafkaBroker
from infra.stack.mlflow_server import MlflowServer
from producers.emitter import TraceEmitter
from producers.promotion_listener import PromotionListener
from producers.trace_record import TraceEncoder
from promotion.drafter_registry import DrafterRegistry
from promotion.promotion_events import build_promotion, publish_promotion
from schemas.schema_ids import SchemaIds

pytestmark = pytest.mark.integration
TARGET = "auth-target"
TRACES = 120
_quiet = logging.getLogger("tests.auth.kafka")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@pytest.fixture(scope="module")
def auth_stack(tmp_path_factory) -> StackSettings:
    """Kafka and MLflow with auth on, started side by side; a service that cannot start fails the module."""
    settings = StackSettings(
        state_dir=tmp_path_factory.mktemp("auth-stack"),
        host=TEST_HOST,
        kafka_port=OWN_PORTS["kafka"],
        kafka_controller_port=OWN_PORTS["kafka_controller"],
        mlflow_port=OWN_PORTS["mlflow"],
        auth=True,
    )
    try:
        with ThreadPoolExecutor(2) as pool:
            started = [
                pool.submit(process.start, s, 240) for s in (KafkaBroker(settings), MlflowServer(settings))
            ]
            for fut in started:
                fut.result()
        yield settings
    finally:
        stack.down(settings, only=["kafka", "mlflow"])


@pytest.fixture(scope="module")
def topics(auth_stack, schema_ids) -> KafkaSettings:
    """`flywheel topics create` on the authenticated stack: it acts as admin and adds the ACLs. The schemas
    go to the suite's registry (``schema_ids``: it runs), which has no auth of its own."""
    env = {
        "FLYWHEEL_STACK_AUTH": "true",
        "FLYWHEEL_STACK_STATE_DIR": str(auth_stack.root),
        "FLYWHEEL_STACK_KAFKA_PORT": str(auth_stack.kafka_port),
        "FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": f"{auth_stack.host}:{auth_stack.kafka_port}",
        "COLUMNS": "200",
    }
    cli = typer.Typer()
    register(cli)
    result = CliRunner().invoke(cli, ["topics", "create"], env=env)
    assert result.exit_code == 0, result.output
    assert "serving" in result.output and "PREFIXED".lower() in result.output
    return KafkaSettings(bootstrap_servers=f"{auth_stack.host}:{auth_stack.kafka_port}")


@pytest.fixture(scope="module")
def served(auth_stack, topics, tmp_path_factory) -> dict[str, int]:
    """A serving node's trace emitter, as ``serving``, hands TRACES events to the broker: its counts."""
    serving = as_(auth_stack, "serving", topics)
    encoder = TraceEncoder(SchemaIds.connect(serving), serving.traces_topic)
    spill = tmp_path_factory.mktemp("spill")
    emitter = TraceEmitter(serving, serving.traces_topic, encoder, spill, frame=encoder.frame)
    for i in range(TRACES):
        emitter.submit(trace(i))
    deadline = time.monotonic() + 30
    while emitter.counts["sent"] < TRACES and time.monotonic() < deadline:
        time.sleep(0.1)
    return emitter.close()


@pytest.fixture
def mlflow_client_state(monkeypatch):
    """MLflow's process-wide client state (credentials and experiment in the environment, the tracking URI,
    the active experiment), put back: later modules talk to the suite's server."""
    import mlflow
    import mlflow.tracking.fluent

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(
        mlflow.tracking.fluent, "_active_experiment_id", mlflow.tracking.fluent._active_experiment_id
    )
    uri = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(uri)


def as_(auth_stack: StackSettings, principal: str, base: KafkaSettings | None = None) -> KafkaSettings:
    return credentials.kafka_settings(auth_stack, principal, base)


def deliver(conf: dict, topic: str, timeout_s: float = 4.0) -> tuple[str, set[str]]:
    """Produce one message (idempotent, as every producer of the flywheel): (its delivery report, the client
    errors on the way). The report is "delivered" or the error's name."""
    errors: set[str] = set()
    reports: list[str] = []
    producer = Producer(
        conf
        | {
            "enable.idempotence": True,
            "message.timeout.ms": int(timeout_s * 1000),
            "error_cb": lambda e: errors.add(e.name()),
            "logger": _quiet,
        }
    )
    producer.produce(
        topic, b"x", on_delivery=lambda err, _m: reports.append(err.name() if err else "delivered")
    )
    producer.flush(timeout_s + 10)
    return (reports or ["no report"])[0], errors


def first_error(conf: dict, topic: str, timeout_s: float = 15.0) -> str | None:
    """Subscribe and return the first error the broker sends the consumer (None: none came)."""
    consumer = Consumer(conf | {"logger": _quiet})
    consumer.subscribe([topic])
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error():
                return msg.error().name()
        return None
    finally:
        consumer.close()


def test_secrets_are_private_and_stay_out_of_the_logs(auth_stack, topics):
    secrets = credentials.credentials(auth_stack)
    path = credentials.secrets_file(auth_stack)
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    for config in (KafkaBroker(auth_stack).properties, MlflowServer(auth_stack).auth_config):
        assert config.stat().st_mode & 0o777 == 0o600, config
    values = [s.get_secret_value() for s in secrets.values()]
    assert len(set(values)) == len(values) and min(map(len, values)) >= 32
    logs = "".join(p.read_text(errors="replace") for p in (auth_stack.root / "logs").glob("*.log"))
    assert not [name for name, value in zip(secrets, values, strict=True) if value in logs]


def test_topics_create_leaves_exactly_the_acl_table(auth_stack, topics):
    admin = AdminClient(as_(auth_stack, "admin").client_config())
    assert sorted(map(str, listed_acls(admin))) == sorted(map(str, project_acls(topics)))


def test_a_client_without_valid_credentials_is_refused(auth_stack, topics):
    serving = as_(auth_stack, "serving", topics)
    plain = {"bootstrap.servers": topics.bootstrap_servers}
    wrong = serving.model_copy(update={"sasl_password": credentials.credentials(auth_stack)["ingest"]})
    unknown = serving.model_copy(update={"sasl_username": "mallory"})
    with ThreadPoolExecutor(3) as pool:  # each waits out its message timeout
        tries = [
            pool.submit(deliver, c, topics.traces_topic)
            for c in (plain, wrong.client_config(), unknown.client_config())
        ]
        (plain_report, _), *with_bad_credentials = [t.result() for t in tries]
    assert plain_report == "_MSG_TIMED_OUT"  # the broker closes every unauthenticated connection
    for report, errors in with_bad_credentials:
        assert report == "_MSG_TIMED_OUT" and "_AUTHENTICATION" in errors
    with pytest.raises(KafkaException, match="_TRANSPORT"):
        AdminClient(plain | {"logger": _quiet}).list_topics(timeout=3)
    # the KRaft listener is no back door: before SASL it answers ApiVersions and nothing else
    controller = {"bootstrap.servers": f"{auth_stack.host}:{auth_stack.kafka_controller_port}"}
    with pytest.raises(KafkaException):
        AdminClient(controller | {"logger": _quiet}).list_topics(timeout=3)


def test_only_admin_manages_topics(auth_stack, topics):
    for principal in ("serving", "ingest", "trainer"):
        admin = AdminClient(as_(auth_stack, principal, topics).client_config() | {"logger": _quiet})
        fut = admin.create_topics([NewTopic(f"rogue-{principal}", 1, 1)], request_timeout=15)
        with pytest.raises(KafkaException) as refused:
            fut[f"rogue-{principal}"].result()
        assert refused.value.args[0].name() == "TOPIC_AUTHORIZATION_FAILED"
        # metadata shows only the topics the principal has rights on
        visible = set(admin.list_topics(timeout=10).topics)
        assert (
            visible
            == {
                "serving": {topics.traces_topic, topics.promotions_topic},
                "ingest": {topics.traces_topic, topics.dlq_topic, topics.windows_topic},
                "trainer": {topics.promotions_topic, topics.windows_topic},
            }[principal]
        )


def test_serving_writes_traces_and_nothing_else(auth_stack, topics, served):
    assert served["sent"] == TRACES and served["spilled"] == served["failed"] == 0, served
    serving = as_(auth_stack, "serving", topics)

    for topic in (serving.promotions_topic, serving.dlq_topic):
        assert deliver(serving.client_config(), topic) == ("TOPIC_AUTHORIZATION_FAILED", set())
    # nor read the traces it writes (other tenants' prompts), in the topic or in the DLQ
    reader = serving.client_config() | {"group.id": "flywheel-swap-peek", "auto.offset.reset": "earliest"}
    assert first_error(reader, serving.traces_topic) == "TOPIC_AUTHORIZATION_FAILED"
    assert first_error(reader, serving.dlq_topic) == "TOPIC_AUTHORIZATION_FAILED"


def test_ingest_runs_as_ingest_and_writes_only_the_dlq(auth_stack, topics, served, schema_ids, tmp_path):
    """The exactly-once sink as ``ingest``: every trace the serving node wrote lands once in the table and
    poison goes to the DLQ (consumer-group READ, an idempotent DLQ producer, read_committed)."""
    poison = poison_messages(encoded([trace(0)], schema_ids)[0], schema_ids)[:3]
    serving = as_(auth_stack, "serving", topics)
    producer = Producer(serving.client_config() | {"enable.idempotence": True, "logger": _quiet})
    for _, _, value in poison:
        producer.produce(serving.traces_topic, value)
    assert producer.flush(30) == 0

    ingest = as_(auth_stack, "ingest", topics)
    lake = LakeSettings(root=str(tmp_path / "lake"))
    stats = TraceIngest(ingest, lake, IngestOptions(until_idle_s=2.0)).run()
    assert (stats.rows, stats.dead_letters) == (TRACES, len(poison))
    rows = DeltaTable(lake.traces_uri).to_pyarrow_table(columns=["request_id"])["request_id"].to_pylist()
    assert sorted(rows) == sorted(trace(i)["request_id"] for i in range(TRACES))
    letters = read_dlq(as_(auth_stack, "admin", topics), topics.dlq_topic)
    assert sorted(parse_headers(m.headers())["dlq.reason"] for m in letters) == sorted(
        r for _, r, _ in poison
    )
    assert inspect(ingest).by_reason == Counter(r for _, r, _ in poison)  # `flywheel dlq inspect`

    assert deliver(ingest.client_config(), ingest.promotions_topic) == ("TOPIC_AUTHORIZATION_FAILED", set())
    assert deliver(ingest.client_config(), ingest.traces_topic) == ("TOPIC_AUTHORIZATION_FAILED", set())
    rogue = consumer_config(ingest, IngestOptions(group="rogue-group"))
    assert first_error(rogue, ingest.traces_topic) == "GROUP_AUTHORIZATION_FAILED"


def test_mlflow_refuses_anonymous_and_wrong_credentials(auth_stack):
    api = f"http://{auth_stack.host}:{auth_stack.mlflow_port}/api/2.0/mlflow/experiments/search"
    params = {"max_results": 1}
    assert httpx.get(api, params=params, timeout=10).status_code == 401
    wrong = ("admin", credentials.password(auth_stack, "trainer"))
    assert httpx.get(api, params=params, auth=wrong, timeout=10).status_code == 401
    assert httpx.get(api, params=params, auth=("mallory", "x" * 16), timeout=10).status_code == 401
    admin = ("admin", credentials.password(auth_stack, "admin"))
    assert httpx.get(api, params=params, auth=admin, timeout=10).status_code == 200
    assert (
        httpx.get(f"http://{auth_stack.host}:{auth_stack.mlflow_port}/health", timeout=10).status_code == 200
    )


def test_trainer_promotes_and_serving_follows_but_cannot_promote(
    auth_stack, topics, tmp_path, mlflow_client_state
):
    """trainer: a run that logs the drafter as an MLflow Model (as training does), a registered version,
    promote = aliases + a promotion on Kafka. serving: reads the promotion as the listener does and fetches
    the drafter from the registry, but moves no alias and publishes no promotion."""
    drafter = tmp_path / "drafter"
    drafter.mkdir()
    (drafter / "config.json").write_text(json.dumps({"architectures": ["Eagle3LlamaForCausalLM"]}))
    (drafter / "model.safetensors").write_bytes(hashlib.sha256(b"weights").digest() * 64)

    mlflow_base = {"artifact_cache_dir": tmp_path / "cache"}
    trainer_mlflow = credentials.mlflow_settings(auth_stack, "trainer").model_copy(update=mlflow_base)
    trainer = DrafterRegistry(TARGET, trainer_mlflow, as_(auth_stack, "trainer", topics))
    version = register_drafter(trainer, trainer_mlflow, drafter, "auth-test", {})  # as a training run does
    event = trainer.promote(version, reason="auth test")

    serving_kafka = as_(auth_stack, "serving", topics)
    runtime = SimpleNamespace(
        kafka=serving_kafka,
        identity=SimpleNamespace(serving_node="node-a", target_model_id=TARGET, spec_method="eagle3"),
        serving=SimpleNamespace(drafter_paths=[]),
    )
    listener = PromotionListener(runtime)
    consumer = listener._consumer()
    try:
        listener._assign_when_topic_exists(consumer)
        followed = listener._catch_up(consumer)
    finally:
        consumer.close()
    assert followed is not None and followed["event_id"] == event["event_id"]

    serving_mlflow = credentials.mlflow_settings(auth_stack, "serving").model_copy(update=mlflow_base)
    serving = DrafterRegistry(TARGET, serving_mlflow, serving_kafka)
    assert serving.by_alias("champion").version == version
    local = fetch(followed["drafter_uri"], tmp_path / "serving-cache", serving_mlflow.tracking_uri)
    assert weights_sha256(local) == followed["weights_sha256"] == weights_sha256(drafter)
    with pytest.raises(MlflowException) as denied:
        serving.promote(version)
    assert denied.value.error_code == "PERMISSION_DENIED"
    with pytest.raises(RuntimeError, match="TOPIC_AUTHORIZATION_FAILED"):
        publish_promotion(serving_kafka, build_promotion(**_promotion_fields(event)), timeout_s=10)


def _promotion_fields(event: dict) -> dict:
    keep = ("action", "target_model_id", "drafter_id", "drafter_version", "drafter_uri", "weights_sha256")
    return {k: event[k] for k in keep}


def test_stack_tools_act_as_admin(auth_stack):
    rows = [r for r in stack.status(auth_stack) if r.name in ("kafka", "mlflow")]
    assert all(r.healthy for r in rows)  # the health checks log in as admin
    pids = {r.name: r.pid for r in rows}
    again = stack.up(auth_stack, only=["kafka", "mlflow"])  # idempotent: users exist, passwords re-set
    assert {r.name: r.pid for r in again} == pids
    assert not KafkaBroker(auth_stack.model_copy(update={"auth": False})).healthy()  # open client: refused
