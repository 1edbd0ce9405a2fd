"""Clear errors before anything starts: missing Java/Maven, a port someone else holds."""

from __future__ import annotations

import socket

import pytest

from core import process
from core.settings import StackSettings
from infra.stack.kafka_broker import KafkaBroker, require_tool
from infra.stack.mlflow_server import MlflowServer


def test_missing_tool_names_the_tool_and_the_fix(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(process.StackError, match=r"`java` was not found on PATH.*openjdk"):
        require_tool("java", "Install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless).")


def test_port_taken_by_another_process_is_reported(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        spec = MlflowServer(StackSettings(state_dir=tmp_path, mlflow_port=port))
        with pytest.raises(process.StackError, match=rf"port 127.0.0.1:{port} is already taken by pid \d+"):
            process.start(spec, timeout_s=5)
    assert not spec.pid_file.exists()


def test_kafka_checks_both_listener_ports(tmp_path):
    broker = KafkaBroker(StackSettings(state_dir=tmp_path, kafka_port=19092, kafka_controller_port=19093))
    assert broker.ports() == [19092, 19093]


def test_status_of_a_never_started_service_is_stopped(tmp_path):
    st = process.status(MlflowServer(StackSettings(state_dir=tmp_path, mlflow_port=1)))
    assert (st.running, st.healthy, st.state) == (False, False, "stopped")


def test_down_with_an_empty_selection_stops_nothing(tmp_path):
    from infra import stack

    settings = StackSettings(state_dir=tmp_path)
    spec = stack.service("mlflow", settings)
    spec.pid_file.parent.mkdir(parents=True)
    spec.pid_file.write_text(str(__import__("os").getpid()))  # "running": this very process
    assert stack.down(settings, only=[]) == []
    assert spec.pid_file.exists()
