"""Trainer data on real traces: Delta windows, labels, recomputed target features, regenerated proposals."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import torch
from trainer_data import (
    DRAFTER_ID,
    trace_table_fixture,  # noqa: F401  (registers the session fixture `trace_table`)
)

from trainer.drafter_store import DrafterStore
from trainer.replay_eval import replay_sequences
from trainer.target_features import CachedTarget, TargetModel
from trainer.trace_window import Label, Window, WindowReader, version_order
from trainer.unroll_batch import assemble, regenerate_rejected, target_index

pytestmark = [pytest.mark.integration, pytest.mark.vllm]


@pytest.fixture(scope="module")
def target(target_model) -> TargetModel:
    return TargetModel(target_model.path)


def _utc(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


def test_eagle3_traces_label_every_position(trace_table):
    seqs = list(WindowReader(Window(trace_table.uri)).sequences())
    eagle = [s for s in seqs if s.spec_method == "eagle3"]
    assert len(eagle) >= 12 and {s.domain for s in eagle} == {"code", "prose", "docs"}
    for s in eagle:
        assert (s.labels != Label.UNKNOWN).all(), s.event_id
        a = s.per_step_accepted
        assert (s.labels == Label.ACCEPTED).sum() == sum(a)
        # one target token per recorded step (the last may be cut by max_tokens) plus the prefill token
        assert (s.labels == Label.PLAIN).sum() == 1
        assert len(a) - 1 <= ((s.labels == Label.CORRECTION) | (s.labels == Label.BONUS)).sum() <= len(a)
    ngram = [s for s in seqs if s.spec_method == "ngram"]
    assert len(ngram) >= 30 and sum(sum(s.per_step_accepted) for s in ngram) > 0


def test_window_by_table_versions_time_and_holdout(trace_table):
    recs = trace_table.records
    full = WindowReader(Window(trace_table.uri))
    assert full.version == trace_table.versions[-1] == 2 and full.num_rows() == len(recs)
    on_disk = sum(
        os.path.getsize(os.path.join(r, f))
        for r, _, fs in os.walk(trace_table.uri)
        for f in fs
        if f.endswith(".parquet")
    )
    assert full.trace_bytes == on_disk
    # rows appended after version 0 = the last two appends; snapshot at version 1 = the first two
    after0 = WindowReader(Window(trace_table.uri, after_version=0))
    at1 = WindowReader(Window(trace_table.uri, version=1))
    first = at1.num_rows() - WindowReader(Window(trace_table.uri, version=1, after_version=0)).num_rows()
    assert after0.num_rows() == len(recs) - first and at1.num_rows() < len(recs)
    assert after0.provenance()["after_version"] == 0 and at1.provenance()["table_version"] == 1
    # a time range selects exactly the rows whose finish_time falls in it
    times = sorted(r["finish_time"] for r in recs)
    start, end = _utc(times[10]), _utc(times[30])
    ranged = WindowReader(Window(trace_table.uri, start=start, end=end))
    assert ranged.num_rows() == 20
    # the held-out part is the newest rows
    cutoff = full.holdout_cutoff(0.2)
    train = [s.finish_time for s in full.sequences(end=cutoff)]
    held = [s.finish_time for s in full.sequences(start=cutoff)]
    assert len(held) == pytest.approx(0.2 * len(recs), abs=1) and max(train) < min(held)
    assert version_order(full) == ["initial", "v0"]  # ngram traffic (drafter "initial") came first


def test_target_features_are_the_hidden_states_vllm_hands_eagle3(trace_table, target):
    rec = next(r for r in trace_table.records if r["spec_method"] == "eagle3")
    ids = rec["prompt_token_ids"] + rec["output_token_ids"]
    whole = TargetModel.__new__(TargetModel)
    whole.__dict__ |= target.__dict__ | {"chunk_tokens": 10_000}
    feats = whole.features(ids)
    with torch.inference_mode():
        out = target.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    # aux layer k = residual stream entering layer k = HF hidden_states[k] (vLLM: hidden + residual)
    for i, k in enumerate((2, 15, 27)):
        assert torch.equal(feats.aux[:, i * 576 : (i + 1) * 576], out.hidden_states[k][0])
    assert torch.equal(feats.embeds, out.hidden_states[0][0])
    assert torch.allclose(feats.logp.exp().sum(-1), torch.ones(len(ids)), atol=1e-3)
    # chunked recompute (bounded memory) agrees up to bf16 noise
    chunked = target.features(ids)
    assert (chunked.argmax == feats.argmax).float().mean() > 0.97
    # the greedy traffic is the target's greedy continuation: the recompute agrees with what was served
    P = len(rec["prompt_token_ids"])
    served = torch.tensor(rec["output_token_ids"][1:])
    assert (feats.argmax[P : len(ids) - 1] == served).float().mean() > 0.95
    # restricted to a draft vocabulary the mass is at most 1
    sub = target.features(ids, torch.arange(0, 49152, 7))
    assert (sub.logp.exp().sum(-1) <= 1.0 + 1e-4).all()


def test_feature_cache_returns_the_recompute_and_respects_its_budget(trace_table, target):
    recs = [r for r in trace_table.records if r["spec_method"] == "eagle3"][:2]
    seqs = [torch.tensor(r["prompt_token_ids"] + r["output_token_ids"]) for r in recs]
    draft_ids = torch.arange(0, 49152, 5)
    per_token = 4 * 576 * target.model.dtype.itemsize  # aux (3H) + final hidden (H)
    cache = CachedTarget(target, max_bytes=len(seqs[0]) * per_token)  # room for the first sequence only
    assert cache.config is target.config  # the rest of the target shows through
    fresh = [target.features(s, draft_ids) for s in seqs]
    for _epoch in range(2):
        for s, want in zip(seqs, fresh, strict=True):
            got = cache.features(s, draft_ids)
            for f in ("embeds", "aux", "logp", "argmax"):
                assert torch.equal(getattr(got, f), getattr(want, f)), f
    # epoch 2: the first sequence came from memory, the second (over budget) was recomputed
    assert (cache.hits, cache.misses) == (1, 3)
    assert cache.nbytes == len(seqs[0]) * per_token


def test_serving_drafter_replay_reproduces_recorded_steps(trace_table, target):
    """The v0 head run here proposes what vLLM's v0 proposed: replay gives vLLM's per-step accepts and
    the regenerated proposal at each correction is a token the target did not emit."""
    store = DrafterStore(trace_table.store)
    v0 = store.load(DRAFTER_ID, "v0")
    seqs = [s for s in WindowReader(Window(trace_table.uri)).sequences() if s.spec_method == "eagle3"][:4]
    report = replay_sequences(v0, target, seqs, k=3)
    same = total = 0
    for _, replay, recorded in report.per_trace:
        n = min(len(replay), len(recorded))
        same += sum(a == b for a, b in zip(replay[:n], recorded[:n], strict=True))
        total += n
    assert total > 80 and same / total >= 0.95
    feats = [target.features(torch.from_numpy(s.tokens), v0.draft_to_target) for s in seqs]
    pf = assemble(seqs, feats)
    rejected, mask = regenerate_rejected(pf, 3, store, target_index(v0.draft_to_target, 49152))
    corrections = sum(int(((s.labels == Label.CORRECTION) & (s.depth < 3)).sum()) for s in seqs)
    assert mask.sum() >= 0.95 * corrections
    # each regenerated proposal sits at the slot whose chain drafted a correction position
    ids = v0.draft_to_target[rejected[mask]]
    assert np.isin(ids.numpy(), v0.draft_to_target.numpy()).all()
