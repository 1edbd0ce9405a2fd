"""Speculation off/on is vLLM's dynamic speculative decoding set to K=0 for every batch size: checked on a
real vLLM scheduler's lookup (the switch on a running engine is checked in test_serving_capture)."""

from __future__ import annotations

from types import SimpleNamespace

from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

from producers.speculation import UTILITY, install_engine_core_utility, set_speculation


def scheduler(lookup=None, k=3, max_num_seqs=4):
    return SimpleNamespace(
        num_spec_tokens=k,
        dynamic_sd_lookup=lookup,
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
    )


def test_off_schedules_zero_draft_tokens_at_every_batch_size_and_on_restores_the_start():
    s = scheduler()
    assert set_speculation(s, False) == 0
    assert s.dynamic_sd_lookup == [0] * 5  # index = running batch size, as vLLM's scheduler reads it
    assert set_speculation(s, False) == 0  # idempotent
    assert set_speculation(s, True) == 3 and s.dynamic_sd_lookup is None  # the static K again


def test_a_configured_dynamic_schedule_survives_off_and_on():
    lookup = build_dynamic_sd_schedule_lookup(
        [(1, 2, 3), (3, 4, 1)], vllm_max_batch_size=4, vllm_num_speculative_tokens=3
    )
    s = scheduler(list(lookup))
    set_speculation(s, False)
    set_speculation(s, True)
    assert s.dynamic_sd_lookup == lookup


def test_an_engine_without_speculation_has_nothing_to_switch():
    s = scheduler(k=0)
    assert set_speculation(s, False) == 0 and s.dynamic_sd_lookup is None


def test_the_plugin_gives_engine_core_the_utility_method():
    from vllm.v1.engine.core import EngineCore

    install_engine_core_utility()
    assert callable(getattr(EngineCore, UTILITY))
