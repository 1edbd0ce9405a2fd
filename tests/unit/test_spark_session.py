"""consumers.spark_session without a JVM: packages, session properties, Kafka source options, light import."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

from consumers.spark_session import kafka_source_options, session_conf, spark_packages
from core.settings import KafkaSettings, SparkSettings


def test_packages_follow_the_installed_pyspark():
    spark = importlib.metadata.version("pyspark")
    assert spark_packages(kafka=False, avro=False) == []
    assert spark_packages(kafka=True, avro=True) == [
        f"org.apache.spark:spark-sql-kafka-0-10_2.13:{spark}",
        f"org.apache.spark:spark-avro_2.13:{spark}",
    ]


def test_session_conf_from_settings(monkeypatch, tmp_path):
    for name in [n for n in os.environ if n.startswith("FLYWHEEL_SPARK_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("FLYWHEEL_STACK_CACHE_DIR", raising=False)  # the suite shares the user's cache
    monkeypatch.setenv("FLYWHEEL_STACK_STATE_DIR", str(tmp_path / "fw"))
    monkeypatch.setenv("FLYWHEEL_SPARK_CONF", '{"spark.sql.shuffle.partitions": "8"}')
    settings = SparkSettings()
    conf = session_conf(settings, "app")
    assert conf["spark.jars.ivy"] == str(tmp_path / "fw" / "cache" / "ivy")
    assert settings.jvm_log == tmp_path / "fw" / "logs" / "spark.log"
    assert conf["spark.sql.warehouse.dir"] == str(tmp_path / "fw" / "spark-warehouse")  # not ./
    assert conf["spark.master"] == "local[2]" and conf["spark.ui.enabled"] == "false"
    assert conf["spark.sql.session.timeZone"] == "UTC"  # date/hour partitions are UTC
    assert "spark.sql.parquet.enableNestedColumnVectorizedReader" not in conf  # stock readers work
    assert conf["spark.sql.shuffle.partitions"] == "8"  # extra properties win
    assert conf["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"


def test_kafka_source_options_carry_the_security_settings():
    plain = kafka_source_options(KafkaSettings(bootstrap_servers="b:9092"))
    assert plain == {"kafka.bootstrap.servers": "b:9092", "kafka.security.protocol": "PLAINTEXT"}
    secure = kafka_source_options(
        KafkaSettings(
            bootstrap_servers="b:9094",
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="svc",
            sasl_password="pw",
            ssl_ca_location="/etc/ca.pem",
        )
    )
    assert secure["kafka.sasl.mechanism"] == "SCRAM-SHA-512"
    assert secure["kafka.sasl.jaas.config"] == (
        'org.apache.kafka.common.security.scram.ScramLoginModule required username="svc" password="pw";'
    )
    assert (secure["kafka.ssl.truststore.type"], secure["kafka.ssl.truststore.location"]) == (
        "PEM",
        "/etc/ca.pem",
    )


def test_importing_flywheel_spark_does_not_import_pyspark():
    code = "import sys, consumers.spark_session; assert 'pyspark' not in sys.modules, 'pyspark imported'"
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)


def test_s3_lake_adds_hadoop_aws_of_the_bundled_hadoop_and_s3a_settings():
    from consumers.spark_session import bundled_hadoop_version, lake_conf
    from core.settings import LakeSettings

    hadoop = bundled_hadoop_version()
    assert spark_packages(kafka=False, avro=False, s3=True) == [f"org.apache.hadoop:hadoop-aws:{hadoop}"]
    assert any(
        p.name == f"hadoop-client-api-{hadoop}.jar"
        for p in (Path(__import__("pyspark").__file__).parent / "jars").iterdir()
    )
    assert lake_conf(LakeSettings(root="/data/lake")) == {}
    conf = lake_conf(
        LakeSettings(
            root="s3://b/p",
            s3_endpoint="http://127.0.0.1:8333",
            s3_access_key_id="ak",
            s3_secret_access_key="sk",
        )
    )
    assert conf["spark.hadoop.fs.s3.impl"] == "org.apache.hadoop.fs.s3a.S3AFileSystem"
    assert conf["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:8333"
    assert conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] == "false"
    assert conf["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert (conf["spark.hadoop.fs.s3a.access.key"], conf["spark.hadoop.fs.s3a.secret.key"]) == ("ak", "sk")
