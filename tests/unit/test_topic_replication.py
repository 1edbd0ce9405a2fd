"""Replication follows the cluster unless settings pin it (infra.topics.replication)."""

from __future__ import annotations

import pytest

from core.settings import KafkaSettings
from infra.topics import replication


@pytest.mark.parametrize(("brokers", "expected"), [(1, (1, 1)), (2, (2, 1)), (3, (3, 2)), (5, (3, 2))])
def test_defaults_follow_the_cluster(brokers, expected):
    assert replication(KafkaSettings(), brokers) == expected


def test_settings_pin_it_and_impossible_ones_are_refused():
    assert replication(KafkaSettings(replication_factor=2, min_insync_replicas=2), 3) == (2, 2)
    with pytest.raises(ValueError, match="needs at least 3 brokers"):
        replication(KafkaSettings(replication_factor=3), 1)
    with pytest.raises(ValueError, match="exceeds the replication factor"):
        replication(KafkaSettings(replication_factor=2, min_insync_replicas=3), 3)
