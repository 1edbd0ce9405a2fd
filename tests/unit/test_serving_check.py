"""flywheel/serving_check.py's verdict on what a served request left on Kafka (the GPU check's pass rule;
the check itself runs against a real server: infra/gpu-serving-check.sh)."""

from __future__ import annotations

from flywheel.serving_check import problems

RESP = {"id": "chatcmpl-1", "usage": {"completion_tokens": 5}}


def trace(**over) -> dict:
    rec = {
        "output_token_ids": [1, 2, 3, 4, 5],
        "spec_method": "eagle3",
        "per_step_accepted": [1, 2],
        "per_step_drafted": [3, 3],
    }
    return rec | over


def test_one_sound_trace_passes():
    assert problems([RESP], {"chatcmpl-1": [trace()]}, k=3) == []


def test_missing_duplicate_short_and_unspeculated_traces_fail():
    assert problems([RESP], {}, k=3) == ["chatcmpl-1: 0 traces (want 1)"]
    assert problems([RESP], {"chatcmpl-1": [trace(), trace()]}, k=3) == ["chatcmpl-1: 2 traces (want 1)"]
    assert (
        "4 output tokens captured"
        in problems([RESP], {"chatcmpl-1": [trace(output_token_ids=[1] * 4)]}, 3)[0]
    )
    assert "no per-step" in problems([RESP], {"chatcmpl-1": [trace(per_step_accepted=[])]}, 3)[0]
    assert "out of range" in problems([RESP], {"chatcmpl-1": [trace(per_step_accepted=[4, 0])]}, 3)[0]
