"""Capture decisions and trace records: pure parts of the serving plugin."""

from __future__ import annotations

import pytest
from trace_events import OFFLINE_IDS

from core.settings import KafkaSettings
from producers.capture_policy import capture_decision, sampled
from producers.emitter import Pending
from producers.trace_record import ServingIdentity, TraceEncoder, build_trace_record, request_labels
from producers.vllm_plugin import UnsupportedVllmVersion, check_vllm_version
from schemas import codec
from schemas.registry import TRACE_EVENT, current
from schemas.schema_ids import SchemaIds

IDENTITY = ServingIdentity("node-a", "SmolLM2-135M-Instruct", "7ef915c9bf9d94d8", "eagle3", 3, "drafter-x")


@pytest.mark.parametrize(
    ("extra", "allow", "rate", "expected"),
    [
        (None, None, 1.0, None),
        ({"domain": "code"}, None, 1.0, None),
        ({"flywheel_opt_out": True}, None, 1.0, "opt-out"),
        ({"flywheel_opt_out": "true", "tenant": "acme"}, ["acme"], 1.0, "opt-out"),
        ({"tenant": "acme"}, ["acme", "globex"], 1.0, None),
        ({"tenant": "initech"}, ["acme"], 1.0, "tenant"),
        ({}, ["acme"], 1.0, "tenant"),
        ({"tenant": "acme"}, [], 1.0, "tenant"),
        ({}, None, 0.0, "sampled-out"),
    ],
)
def test_capture_decision(extra, allow, rate, expected):
    assert capture_decision("req-1", extra, allow, rate) == expected


def test_sampling_is_deterministic_per_request_id_and_close_to_the_rate():
    ids = [f"cmpl-{i}" for i in range(20_000)]
    picked = [i for i in ids if sampled(i, 0.25)]
    assert picked == [i for i in ids if sampled(i, 0.25)]
    assert 0.23 < len(picked) / len(ids) < 0.27


def test_labels_come_from_request_metadata():
    assert request_labels({"domain": "code", "tenant": 7}) == ("code", "7", False)
    assert request_labels({"flywheel_opt_out": "yes"}) == (None, None, True)


def _record(**kw):
    args = dict(
        request_id="chatcmpl-1",
        arrival_time_s=1796000000.0,
        first_token_time_s=1796000000.25,
        finish_time_s=1796000001.5,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        seed=None,
        extra_args={"domain": "prose"},
        prompt_token_ids=[1, 2, 3],
        output_token_ids=[4, 5, 6, 7, 8],
        per_step_accepted=[2, 0],
        per_step_drafted=[3, 3],
        finish_reason="length",
        drafter_version=None,
    )
    return build_trace_record(IDENTITY, **(args | kw))


def test_record_encodes_against_the_schema():
    rec = _record()
    key, value = TraceEncoder(OFFLINE_IDS, KafkaSettings().traces_topic)(rec)
    _, decoded = codec.decode(value, OFFLINE_IDS.version_of, expect=TRACE_EVENT)
    assert key == b"chatcmpl-1" and decoded == rec
    assert codec.schema_id(value) == OFFLINE_IDS.id_of(current(TRACE_EVENT), "any")
    assert rec["arrival_time"] == 1_796_000_000_000_000 and rec["first_token_time"] == 1_796_000_000_250_000
    assert (rec["domain"], rec["drafter_version"], rec["num_spec_tokens"]) == ("prose", "initial", 3)


def test_without_a_registry_the_encoder_hands_the_emitter_a_pending_value_and_asks_again_later():
    """Nothing listens on port 9: the id cannot be had, so the emitter gets a value to spill (Pending)."""
    kafka = KafkaSettings(schema_registry_url="http://127.0.0.1:9/apis/ccompat/v7")
    ids = SchemaIds.connect(kafka, timeout_s=1.0)
    encoder = TraceEncoder(ids, kafka.traces_topic)
    rec = _record()
    with pytest.raises(Pending) as e:
        encoder(rec)
    assert e.value.key == b"chatcmpl-1" and "did not answer" in str(e.value)
    assert e.value.value == codec.encode_pending(TRACE_EVENT, rec)
    asked = []
    ids.client.lookup_schema = lambda *a, **kw: asked.append(a)  # a request now would be recorded
    with pytest.raises(Pending, match="no schema id"):  # within the pause: no request at all
        encoder.frame(e.value.value)
    assert asked == []


def test_no_speculation_has_no_drafter():
    ident = ServingIdentity("n", "t", "r", "none", 0, None)
    rec = build_trace_record(
        ident,
        request_id="r",
        arrival_time_s=1.0,
        first_token_time_s=None,
        finish_time_s=2.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        seed=5,
        extra_args=None,
        prompt_token_ids=[1],
        output_token_ids=[2],
        per_step_accepted=None,
        per_step_drafted=None,
        finish_reason="stop",
        drafter_version="3",
    )
    assert (rec["drafter_id"], rec["drafter_version"], rec["num_spec_tokens"], rec["seed"]) == (
        None,
        None,
        0,
        5,
    )


@pytest.mark.parametrize(
    ("version", "ok"),
    [("0.32.0", True), ("0.32.0+cpu", True), ("0.33.1", True), ("0.34.0", False), ("0.31.9", False)],
)
def test_plugin_refuses_unchecked_vllm_versions_with_a_clear_message(version, ok):
    if ok:
        check_vllm_version(version)
    else:
        with pytest.raises(UnsupportedVllmVersion, match=r"DISABLED \(serving is unaffected\)"):
            check_vllm_version(version)
