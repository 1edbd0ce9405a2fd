"""The one definition of each shared thing (core/): tau, drafter artifacts, the hot-swap sequence, settings."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from core import drafter_artifacts as art
from core.settings import CycleSettings, LakeSettings, Settings
from core.tau import pooled_tau, rolling_tau, tau, tau_of
from producers.hot_swap import swap_drafter, swap_drafter_async, swap_steps


def test_tau_by_hand():
    assert tau(6, 4) == pytest.approx(2.5)  # 4 verify steps that accepted 6 drafts: 10 tokens / 4 steps
    assert tau_of([3, 0, 1, 2]) == pytest.approx(2.5)
    assert pooled_tau([[3, 0], [1, 2]]) == pytest.approx(2.5)  # pooled over steps, not averaged per request
    assert pooled_tau([[3], [0, 0, 0]]) == pytest.approx(1.75)  # (3 + 0) / 4 + 1, not mean(4, 1) = 2.5
    assert rolling_tau([[2], [], [0, 0]], window=2) == [3.0, 3.0, 1.0]


def test_no_verify_step_is_no_tau():
    assert tau(0, 0) is None and tau_of([]) is None and pooled_tau([[], []]) is None
    assert rolling_tau([[], [1]], window=1) == [None, 2.0]
    with pytest.raises(ValueError):
        tau(-1, 2)


def test_weights_digest_is_the_concatenation_in_name_order(tmp_path):
    (tmp_path / "b.safetensors").write_bytes(b"second")
    (tmp_path / "a.safetensors").write_bytes(b"first")
    (tmp_path / "config.json").write_text("{}")
    assert art.weights_sha256(tmp_path) == hashlib.sha256(b"firstsecond").hexdigest()
    assert art.weights_sha256(tmp_path / "a.safetensors") == hashlib.sha256(b"first").hexdigest()


def test_fetch_uses_local_drafters_in_place_and_caches_registry_uris_by_version(tmp_path):
    assert art.fetch(str(tmp_path), tmp_path / "cache") == tmp_path
    assert art.fetch(f"file://{tmp_path}", tmp_path / "cache") == tmp_path
    uri = art.model_uri("drafter-T", 7)
    assert uri == "models:/drafter-T/7"
    assert art.cache_path(uri, tmp_path) == tmp_path / "drafter-T" / "7"
    other = art.cache_path("runs:/abc/drafter", tmp_path)
    assert other.parent == tmp_path and other == art.cache_path("runs:/abc/drafter", tmp_path)
    cached = tmp_path / "drafter-T" / "7"
    cached.mkdir(parents=True)
    (cached / art.CONFIG_FILE).write_text("{}")
    assert art.fetch(uri, tmp_path) == cached  # a complete cached copy is reused, no server asked


class _Recorder:
    def __init__(self, fail_at: str | None = None):
        self.calls: list[str] = []
        self.fail_at = fail_at

    def call(self, step, args):
        self.calls.append(step)
        if step == self.fail_at:
            raise RuntimeError(f"{step} failed")


class _AsyncRecorder(_Recorder):
    async def call(self, step, args):  # noqa: D102 - same record, awaited
        super().call(step, args)


SEQUENCE = ["pause", "start_draft_weight_update", "update_weights", "finish_weight_update", "resume"]


def test_the_drafter_inside_a_downloaded_mlflow_model_is_found(tmp_path):
    model = tmp_path / "cache" / "drafter-x" / "3"
    inner = model / "artifacts" / "drafter"
    inner.mkdir(parents=True)
    (model / "MLmodel").write_text("flavors: {}")
    assert art.drafter_dir(model) is None  # incomplete: no config yet
    (inner / "config.json").write_text("{}")
    assert art.drafter_dir(model) == inner
    assert art.fetch("models:/drafter-x/3", tmp_path / "cache") == inner  # cached: no download
    assert art.fetch(str(model), tmp_path / "cache") == inner  # a local model dir too
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert art.drafter_dir(plain) == plain and art.fetch(str(plain), tmp_path) == plain


def test_one_swap_sequence_for_both_transports():
    assert [s for s, _ in swap_steps("/d", "3", "ab")][-1] == "finish_weight_update"
    assert dict(swap_steps("/d", "3", "ab"))["update_weights"] == {
        "update_info": {"path": "/d", "sha256": "ab"}
    }
    http = _Recorder()
    swap_drafter(http, "/d", "3")
    engine = _AsyncRecorder()
    asyncio.run(swap_drafter_async(engine, "/d", "3"))
    assert http.calls == engine.calls == SEQUENCE


def test_a_failed_swap_still_resumes_serving():
    http = _Recorder(fail_at="update_weights")
    with pytest.raises(RuntimeError, match="update_weights failed"):
        swap_drafter(http, "/d", "3")
    assert http.calls == ["pause", "start_draft_weight_update", "update_weights", "resume"]


def test_settings_container_pins_concerns_and_refuses_unknown_ones(tmp_path):
    cycle = CycleSettings(train_max_steps=7)
    settings = Settings(cycle=cycle)
    assert settings.cycle is cycle
    lake = LakeSettings(root=str(tmp_path))
    replaced = settings.replace(lake=lake)
    assert replaced.cycle is cycle and replaced.lake is lake and settings.lake is not lake
    with pytest.raises(TypeError, match="unknown settings"):
        Settings(cycles=cycle)
