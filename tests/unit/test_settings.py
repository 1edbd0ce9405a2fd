from __future__ import annotations

from core.settings import KafkaSettings, LakeSettings, StackSettings


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
