from __future__ import annotations

from core.settings import KafkaSettings, LakeSettings, MlflowSettings, SparkSettings, StackSettings


def test_env_prefix_per_concern(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS", "broker-1:9094")
    monkeypatch.setenv("FLYWHEEL_STACK_KAFKA_PORT", "19092")
    assert KafkaSettings().bootstrap_servers == "broker-1:9094"
    assert StackSettings().kafka_port == 19092


def test_sasl_ssl_pass_through_and_secrets_never_printed(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("FLYWHEEL_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("FLYWHEEL_KAFKA_SASL_USERNAME", "svc-flywheel")
    monkeypatch.setenv("FLYWHEEL_KAFKA_SASL_PASSWORD", "hunter2-very-secret")
    monkeypatch.setenv("FLYWHEEL_KAFKA_SSL_CA_LOCATION", "/etc/ca.pem")
    monkeypatch.setenv("FLYWHEEL_KAFKA_EXTRA", '{"socket.keepalive.enable": "true"}')
    s = KafkaSettings()
    conf = s.client_config()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.password"] == "hunter2-very-secret"
    assert conf["ssl.ca.location"] == "/etc/ca.pem"
    assert conf["socket.keepalive.enable"] == "true"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())


def test_plaintext_config_has_no_security_keys():
    conf = KafkaSettings().client_config()
    assert not any(k.startswith(("sasl.", "ssl.")) for k in conf)


def test_paths_default_under_the_state_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FLYWHEEL_STACK_STATE_DIR", str(tmp_path / "fw"))
    assert LakeSettings().traces_uri == str(tmp_path / "fw" / "lake" / "traces")
    assert LakeSettings(root="s3://bucket/lake").traces_uri == "s3://bucket/lake/traces"


def test_cache_dir_defaults_under_the_state_dir_and_can_be_shared(monkeypatch, tmp_path):
    for name in ("FLYWHEEL_STACK_CACHE_DIR", "FLYWHEEL_SPARK_IVY_DIR", "FLYWHEEL_MLFLOW_ARTIFACT_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLYWHEEL_STACK_STATE_DIR", str(tmp_path / "fw"))
    assert StackSettings().cache_dir == tmp_path / "fw" / "cache"
    assert SparkSettings().ivy_dir == tmp_path / "fw" / "cache" / "ivy"
    monkeypatch.setenv("FLYWHEEL_STACK_CACHE_DIR", str(tmp_path / "shared"))
    assert StackSettings().cache_dir == tmp_path / "shared"  # jars fetched once for several state dirs
    assert SparkSettings().ivy_dir == tmp_path / "shared" / "ivy"
    # drafter copies are keyed by registry name/version, so they stay with the state dir's registry
    assert MlflowSettings().artifact_cache_dir == tmp_path / "fw" / "cache" / "drafters"


def test_lake_storage_options_from_the_s3_settings(monkeypatch):
    assert LakeSettings(root="/data/lake", s3_endpoint="http://127.0.0.1:8333").delta_options() is None
    aws = LakeSettings(root="s3://b/p", s3_conditional_put="").delta_options()
    assert aws == {"aws_region": "us-east-1"}  # AWS itself: the default credential chain, no endpoint
    monkeypatch.setenv("FLYWHEEL_LAKE_ROOT", "s3://lake-bucket/prefix")
    monkeypatch.setenv("FLYWHEEL_LAKE_S3_ENDPOINT", "http://127.0.0.1:8333")
    monkeypatch.setenv("FLYWHEEL_LAKE_S3_ACCESS_KEY_ID", "ak")
    monkeypatch.setenv("FLYWHEEL_LAKE_S3_SECRET_ACCESS_KEY", "sk")
    monkeypatch.setenv("FLYWHEEL_LAKE_STORAGE_OPTIONS", '{"aws_region": "eu-west-1", "timeout": "30s"}')
    lake = LakeSettings()
    assert "sk" not in repr(lake)
    assert lake.delta_options() == {
        "aws_region": "eu-west-1",  # FLYWHEEL_LAKE_STORAGE_OPTIONS wins
        "aws_endpoint_url": "http://127.0.0.1:8333",
        "allow_http": "true",
        "aws_access_key_id": "ak",
        "aws_secret_access_key": "sk",
        "conditional_put": "etag",
        "timeout": "30s",
    }
