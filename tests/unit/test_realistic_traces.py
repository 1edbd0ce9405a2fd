"""The benchmark's synthetic traces are internally consistent (no tokenizer needed: a tiny corpus)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.realistic_traces import TokenCorpus, accept_steps, realistic_record
from schemas import codec
from schemas.registry import TRACE_EVENT, current


@pytest.mark.parametrize("output_len", [0, 1, 2, 3, 7, 100, 256])
@pytest.mark.parametrize("rate", [0.0, 0.6, 1.0])
def test_accept_steps_explain_the_output_length(output_len, rate):
    accepted, drafted = accept_steps(np.random.default_rng(output_len), output_len, rate, k=3)
    assert len(accepted) == len(drafted) and all(d == 3 for d in drafted)
    assert all(0 <= a <= 3 for a in accepted)
    if output_len <= 1:
        assert accepted == []
        return
    emitted = 1 + sum(a + 1 for a in accepted)
    assert emitted >= output_len > emitted - (accepted[-1] + 1)  # only the last step may be cut off
    if rate == 1.0:
        assert set(accepted) == {3}
    if rate == 0.0:
        assert set(accepted) == {0}


def test_realistic_record_is_a_valid_trace_event():
    rng = np.random.default_rng(0)
    corpus = TokenCorpus(
        streams={d: np.arange(1000, 6000, dtype=np.int32) for d in ("code", "prose", "docs")},
        prompt_lengths={d: np.array([20, 80, 300], dtype=np.int32) for d in ("code", "prose", "docs")},
        template_head=[1, 9690, 198],
        template_tail=[2, 198, 1, 520, 198],
        eos_id=2,
    )
    for i in range(50):
        record = realistic_record(rng, corpus, 1_796_000_000_000_000 + i)
        payload = codec.encode(TRACE_EVENT, record, 1, check=True)
        _, decoded = codec.decode(payload, {1: current(TRACE_EVENT)}.get)
        assert decoded == record
        out = record["output_token_ids"]
        assert record["finish_reason"] == "length" or out[-1] == corpus.eos_id
        assert record["prompt_token_ids"][:3] == corpus.template_head
        assert record["arrival_time"] < record["first_token_time"] < record["finish_time"]
