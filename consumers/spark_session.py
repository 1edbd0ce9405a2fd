"""Spark for analysts: the one Delta-enabled SparkSession, Kafka source options and Avro decoding.

Notebooks, tests and jobs all call ``delta_spark_session``. Jars (delta-spark, and for Kafka work
spark-sql-kafka + spark-avro) come from Maven Central through Ivy into ``SparkSettings.ivy_dir``
(``<state dir>/cache/ivy``): the first session on a machine downloads them, later ones resolve from that
cache in a second or two. pyspark is imported inside the functions so importing this module stays light.

Kafka messages use the Confluent wire format (``schemas.codec``): ``00`` + the writer schema's 4-byte
big-endian schema registry id + the Avro body. ``decode_events`` checks the header and decodes the body with
``from_avro`` using the writer version the id stands for (:func:`schemas.schema_ids.known_ids`, asked of the
registry when the query is built), resolved to the current version (BACKWARD compatibility), so a topic
holding several versions reads as one schema.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.settings import KafkaSettings, LakeSettings, SparkSettings
from schemas.codec import HEADER_LEN, MAGIC, MALFORMED, NOT_CONFLUENT, UNKNOWN_SCHEMA, WRONG_EVENT
from schemas.registry import TRACE_EVENT, SchemaVersion, current

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

SCALA = "2.13"  # pyspark 4.x is built for Scala 2.13 only

# decode_status values (the same reason codes the ingest writes to the DLQ headers)
DECODED = "ok"


def spark_packages(*, kafka: bool, avro: bool, s3: bool = False) -> list[str]:
    """Maven coordinates besides delta-spark (which ``configure_spark_with_delta_pip`` adds)."""
    import importlib.metadata

    spark = importlib.metadata.version("pyspark")
    packages = []
    if kafka:
        packages.append(f"org.apache.spark:spark-sql-kafka-0-10_{SCALA}:{spark}")
    if avro:
        packages.append(f"org.apache.spark:spark-avro_{SCALA}:{spark}")
    if s3:  # S3A must match the Hadoop that pyspark bundles (and brings the AWS SDK v2 bundle)
        packages.append(f"org.apache.hadoop:hadoop-aws:{bundled_hadoop_version()}")
    return packages


def bundled_hadoop_version() -> str:
    """The Hadoop version of pyspark's own client jars (``hadoop-client-api-<version>.jar``)."""
    import pyspark

    jars = sorted((Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar"))
    if not jars:
        raise RuntimeError("pyspark bundles no hadoop-client-api jar: cannot pick a matching hadoop-aws")
    return jars[-1].stem.removeprefix("hadoop-client-api-")


def lake_conf(lake: LakeSettings) -> dict[str, str]:
    """Hadoop S3A properties for a lake on S3, from the same settings delta-rs reads
    (``LakeSettings.delta_options``); empty for a local lake. ``s3://`` URIs, the ones the ingest writes
    and the windows name, are served by S3A too."""
    if not lake.on_s3:
        return {}
    conf = {
        "fs.s3.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        "fs.s3a.endpoint.region": lake.s3_region,
    }
    if lake.s3_endpoint:  # an S3-compatible server: path-style buckets, plain HTTP when the URL says so
        conf |= {
            "fs.s3a.endpoint": lake.s3_endpoint,
            "fs.s3a.path.style.access": "true",
            "fs.s3a.connection.ssl.enabled": str(lake.s3_endpoint.startswith("https://")).lower(),
        }
    if lake.s3_access_key_id and lake.s3_secret_access_key:
        conf |= {
            "fs.s3a.aws.credentials.provider": "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
            "fs.s3a.access.key": lake.s3_access_key_id,
            "fs.s3a.secret.key": lake.s3_secret_access_key.get_secret_value(),
        }
    return {f"spark.hadoop.{k}": v for k, v in conf.items()}


def session_conf(settings: SparkSettings, app_name: str) -> dict[str, str]:
    """Every Spark property the session is built with (except spark.jars.packages)."""
    return {
        "spark.app.name": app_name,
        "spark.master": settings.master,
        "spark.driver.memory": settings.driver_memory,
        "spark.jars.ivy": str(settings.ivy_dir),
        "spark.sql.warehouse.dir": str(settings.warehouse_dir),
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": str(settings.shuffle_partitions),
        # date/hour partitions and every time bucket are UTC, whatever the machine's zone
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        # the log replay of a small table does not need 50 tasks
        "spark.databricks.delta.snapshotPartitions": str(settings.shuffle_partitions),
    } | settings.conf


def delta_spark_session(
    app_name: str,
    settings: SparkSettings,
    *,
    kafka: bool = False,
    avro: bool | None = None,
    conf: dict[str, str] | None = None,
    lake: LakeSettings | None = None,
) -> SparkSession:
    """A SparkSession with Delta Lake (and, with ``kafka``, the Kafka source and ``from_avro``).

    ``avro`` defaults to ``kafka`` (decoding the topics needs it). ``lake`` on S3 adds hadoop-aws and the
    S3A settings of :func:`lake_conf`. Packages are fixed when the JVM starts: an already running session of
    this process is returned as is, so ask for ``kafka=True`` (and the lake) first.
    The JVM's own output goes to ``settings.jvm_log``; a JVM that fails to start raises with its tail.
    """
    from delta import configure_spark_with_delta_pip
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", settings.local_ip)
    settings.ivy_dir.mkdir(parents=True, exist_ok=True)
    builder = SparkSession.builder
    s3 = lake is not None and lake.on_s3
    every = session_conf(settings, app_name) | (lake_conf(lake) if s3 else {}) | (conf or {})
    for key, value in every.items():
        builder = builder.config(key, value)
    packages = spark_packages(kafka=kafka, avro=kafka if avro is None else avro, s3=s3)
    builder = configure_spark_with_delta_pip(builder, extra_packages=packages)
    if SparkContext._gateway is not None:  # this process already runs a JVM: nothing is spawned
        spark = builder.getOrCreate()
    else:
        try:
            with _jvm_output_to(settings.jvm_log):
                spark = builder.getOrCreate()
        except Exception as e:
            tail = "".join(settings.jvm_log.read_text(errors="replace").splitlines(keepends=True)[-30:])
            raise RuntimeError(f"Spark did not start: {e}\nlast lines of {settings.jvm_log}:\n{tail}") from e
    spark.sparkContext.setLogLevel(settings.log_level)
    return spark


@contextlib.contextmanager
def _jvm_output_to(log: Path) -> Iterator[None]:
    """Point fds 1 and 2 at ``log`` while the JVM is spawned: it inherits them, so Ivy's resolution report
    and log4j's console lines land in the log instead of a notebook cell or the test output."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with log.open("ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def kafka_source_options(kafka: KafkaSettings) -> dict[str, str]:
    """``kafka.*`` options of Spark's Kafka source from the same settings librdkafka clients use.

    Java client equivalents of the librdkafka security settings: SASL PLAIN/SCRAM credentials become a
    JAAS line, a PEM CA file becomes a PEM truststore. Anything else goes through ``conf`` on the reader.
    """
    opts = {
        "kafka.bootstrap.servers": kafka.bootstrap_servers,
        "kafka.security.protocol": kafka.security_protocol,
    }
    if kafka.sasl_mechanism:
        opts["kafka.sasl.mechanism"] = kafka.sasl_mechanism
        if kafka.sasl_username and kafka.sasl_password:
            module = (
                "org.apache.kafka.common.security.plain.PlainLoginModule"
                if kafka.sasl_mechanism == "PLAIN"
                else "org.apache.kafka.common.security.scram.ScramLoginModule"
            )
            secret = kafka.sasl_password.get_secret_value()
            opts["kafka.sasl.jaas.config"] = (
                f'{module} required username="{kafka.sasl_username}" password="{secret}";'
            )
    if kafka.ssl_ca_location:
        opts["kafka.ssl.truststore.type"] = "PEM"
        opts["kafka.ssl.truststore.location"] = kafka.ssl_ca_location
    return opts


def _binary(data: bytes) -> Column:
    from pyspark.sql import functions as F

    return F.lit(bytearray(data))


def decode_events(
    kafka_df: DataFrame, ids: dict[int, SchemaVersion], event: str = TRACE_EVENT, column: str = "event"
) -> DataFrame:
    """Kafka source rows -> the same rows plus ``column`` (the decoded record as a struct of the current
    schema version, null if undecodable), ``decode_status`` (``ok`` or a DLQ reason code) and ``schema_id``
    (the registry id in the header). ``ids``: registry id -> our version, every one the query should
    read (``schemas.schema_ids.known_ids``); any other id is ``unknown-schema``.

    Malformed Avro bodies decode to null (from_avro PERMISSIVE) instead of failing the query. The ingest is
    stricter: it also rejects trailing bytes after a complete body and decodable but invalid events
    (consumers/trace_rules.py), which this function does not check.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.avro.functions import from_avro

    reader = current(event).raw
    header_ok = (F.length("value") >= HEADER_LEN) & (F.substring("value", 1, len(MAGIC)) == _binary(MAGIC))
    schema_id = F.conv(F.hex(F.substring("value", len(MAGIC) + 1, HEADER_LEN - len(MAGIC))), 16, 10).cast(
        "long"
    )
    body = F.expr(f"substring(value, {HEADER_LEN + 1})")
    options = {"mode": "PERMISSIVE", "avroSchema": json.dumps(reader)}
    ours = sorted(i for i, v in ids.items() if v.event == event)
    if not ours:
        raise ValueError(f"no schema id of {event} given: pass schemas.schema_ids.known_ids(...)")
    decoded: Any = None
    for sid in ours:
        this = header_ok & (schema_id == sid)
        value = from_avro(body, json.dumps(ids[sid].raw), options)
        decoded = F.when(this, value) if decoded is None else decoded.when(this, value)
    # PERMISSIVE turns a body it cannot read into a struct of nulls: a null in a required field marks it
    required = [f["name"] for f in reader["fields"] if not isinstance(f["type"], list)]
    malformed = F.lit(False)
    for name in required:
        malformed = malformed | F.col(f"_decoded.{name}").isNull()
    others = sorted(i for i, v in ids.items() if v.event != event)
    status = (
        F.when(F.col("value").isNull() | ~header_ok, F.lit(NOT_CONFLUENT))
        .when(schema_id.isin(*others), F.lit(WRONG_EVENT))
        .when(~schema_id.isin(*ours), F.lit(UNKNOWN_SCHEMA))
        .when(F.col("_decoded").isNull() | malformed, F.lit(MALFORMED))
        .otherwise(F.lit(DECODED))
    )
    return (
        kafka_df.withColumn("_decoded", decoded)
        .withColumn("decode_status", status)
        .withColumn(column, F.when(F.col("decode_status") == DECODED, F.col("_decoded")))
        .withColumn("schema_id", F.when(header_ok, schema_id))
        .drop("_decoded")
    )
