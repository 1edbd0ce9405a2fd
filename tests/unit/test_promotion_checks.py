"""The serving node's gate on promotion events (producers.promotion_listener.rejection): forged events are
refused before anything is fetched."""

from __future__ import annotations

import pytest

from producers.promotion_listener import rejection
from promotion.promotion_events import build_promotion

SHA = "ab" * 32
SERVED = ("eagle3-smol", "7")


def _event(action="promote", version="8", uri="models:/eagle3-smol/8", sha=SHA, drafter_id="eagle3-smol"):
    event = build_promotion(
        action=action,
        target_model_id="SmolLM2",
        drafter_id=drafter_id,
        drafter_version=version,
        drafter_uri=uri,
        weights_sha256=SHA,
    )
    event["weights_sha256"] = sha  # forged events need not come from our builder
    return event


def test_a_registry_promotion_to_a_newer_version_passes():
    assert rejection(_event(), SERVED) is None


def test_an_event_without_a_digest_is_refused():
    assert "weights_sha256" in rejection(_event(sha=None), SERVED)
    assert "weights_sha256" in rejection(_event(sha=""), SERVED)


@pytest.mark.parametrize(
    "uri",
    ["s3://evil/drafter", "https://evil.example/drafter", "runs:/abc/drafter", "file:///tmp/x", "drafter"],
)
def test_sources_outside_the_registry_are_refused(uri):
    assert "neither in the configured registry" in rejection(_event(uri=uri), SERVED, allowed_paths=())


def test_local_paths_only_under_an_allowed_directory(tmp_path):
    allowed = tmp_path / "drafters"
    (allowed / "v8").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (allowed / "escape").symlink_to(tmp_path / "elsewhere")
    assert rejection(_event(uri=str(allowed / "v8")), SERVED, [allowed]) is None
    assert rejection(_event(uri=str(allowed / "v8")), SERVED, []) is not None
    assert rejection(_event(uri=str(allowed / ".." / "elsewhere")), SERVED, [allowed]) is not None
    assert rejection(_event(uri=str(allowed / "escape")), SERVED, [allowed]) is not None  # symlink out


def test_a_promote_back_to_an_older_version_is_stale_a_rollback_is_not():
    assert "stale" in rejection(_event(version="6", uri="models:/eagle3-smol/6"), SERVED)
    assert rejection(_event(action="rollback", version="6", uri="models:/eagle3-smol/6"), SERVED) is None
    assert rejection(_event(version="7", uri="models:/eagle3-smol/7"), SERVED) is None  # same: a no-op
    other = _event(version="2", uri="models:/other/2", drafter_id="other")
    assert rejection(other, SERVED) is None  # another drafter's versions do not compare
    assert rejection(_event(version="6"), ("eagle3-smol", "initial")) is None  # a label, not a version


def test_disable_loads_nothing_and_needs_no_digest():
    event = _event(action="disable", sha=None, uri="whatever")
    assert rejection(event, SERVED) is None


def test_the_builder_refuses_promote_and_rollback_without_a_digest():
    for action in ("promote", "rollback"):
        with pytest.raises(ValueError, match="weights_sha256"):
            build_promotion(
                action=action,
                target_model_id="t",
                drafter_id="d",
                drafter_version="1",
                drafter_uri="models:/d/1",
            )
    build_promotion(
        action="disable", target_model_id="t", drafter_id="d", drafter_version="1", drafter_uri="-"
    )
