"""`flywheel stack up --kafka-brokers N`: each node's rendered config, names, ports and data dirs."""

from __future__ import annotations

import pytest

from core.process import StackError
from core.settings import StackSettings
from infra import stack
from infra.stack.kafka_broker import KafkaBroker


def _stack(tmp_path, brokers: int, auth: bool = False) -> StackSettings:
    return StackSettings(
        state_dir=tmp_path, kafka_port=29092, kafka_controller_port=29093, kafka_brokers=brokers, auth=auth
    )


def _props(broker: KafkaBroker) -> dict[str, str]:
    broker.home.mkdir(parents=True, exist_ok=True)
    broker._render_properties()
    lines = broker.properties.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def test_one_broker_keeps_the_single_node_layout(tmp_path):
    [kafka] = [s for s in stack.services(_stack(tmp_path, 1)) if isinstance(s, KafkaBroker)]
    assert (kafka.name, kafka.home, kafka.ports()) == ("kafka", tmp_path / "kafka", [29092, 29093])
    props = _props(kafka)
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:29093"
    assert "controller.quorum.voters" not in props
    assert stack.bootstrap_servers(_stack(tmp_path, 1)) == "127.0.0.1:29092"


def test_three_nodes_form_one_static_quorum(tmp_path):
    settings = _stack(tmp_path, 3)
    nodes = [s for s in stack.services(settings) if isinstance(s, KafkaBroker)]
    assert [n.name for n in nodes] == ["kafka", "kafka-2", "kafka-3"]
    assert [n.ports() for n in nodes] == [[29092, 29093], [29094, 29095], [29096, 29097]]
    assert [n.data_dir for n in nodes] == [tmp_path / "kafka" / f"node-{i}" / "data" for i in (1, 2, 3)]
    assert stack.bootstrap_servers(settings) == "127.0.0.1:29092,127.0.0.1:29094,127.0.0.1:29096"
    props = _props(nodes[1])
    assert props["node.id"] == "2"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:29093,2@127.0.0.1:29095,3@127.0.0.1:29097"
    assert "controller.quorum.bootstrap.servers" not in props
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:29094,CONTROLLER://127.0.0.1:29095"
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor"):
        assert props[key] == "3"
    assert props["default.replication.factor"] == "3"
    assert props["min.insync.replicas"] == props["transaction.state.log.min.isr"] == "2"


def test_down_finds_the_nodes_a_bigger_up_started(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "kafka-3.pid").write_text("999999999")
    names = [s.name for s in stack.services(_stack(tmp_path, 1))]
    assert names[:3] == ["kafka", "kafka-2", "kafka-3"]


def test_auth_with_a_cluster_is_refused(tmp_path):
    with pytest.raises(StackError, match="runs one Kafka broker"):
        KafkaBroker(_stack(tmp_path, 3, auth=True), node=2).prepare()


def test_up_refuses_auth_with_a_cluster_before_starting_anything(tmp_path):
    with pytest.raises(StackError, match="runs one Kafka broker"):
        stack.up(_stack(tmp_path, 3, auth=True), only=["kafka"])
    assert not (tmp_path / "run").exists()
