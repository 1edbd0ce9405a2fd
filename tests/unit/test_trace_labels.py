"""Per-position labels of trace outputs from vLLM's per-step arrays (table-driven), and data helpers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from trainer.trace_window import Label, TraceSequence, output_labels, packs, shuffled

P, A, C, B, U = Label.PLAIN, Label.ACCEPTED, Label.CORRECTION, Label.BONUS, Label.UNKNOWN

# accepted [2, 0, 3] with K=3: 1 prefill token + (2+1) + (0+1) + (3+1) = 9 output tokens
FULL = [P, A, A, C, C, A, A, A, B]
FULL_DEPTH = [-1, 0, 1, 2, 0, 0, 1, 2, 3]

CASES = [
    # (id, n_output, accepted, drafted, method, labels, depth)
    ("eagle3 exact", 9, [2, 0, 3], [3, 3, 3], "eagle3", FULL, FULL_DEPTH),
    ("eagle3 last step cut by max_tokens", 7, [2, 0, 3], [3, 3, 3], "eagle3", FULL[:7], FULL_DEPTH[:7]),
    ("eagle3 cut = all accepted of last step", 6, [2, 0, 3], [3, 3, 3], "eagle3", FULL[:6], FULL_DEPTH[:6]),
    ("eagle3 cut too long to be one step", 5, [2, 0, 3], [3, 3, 3], "eagle3", [P, U, U, U, U], [-1] * 5),
    ("eagle3 more tokens than steps explain", 10, [2, 0, 3], [3, 3, 3], "eagle3", [P] + [U] * 9, [-1] * 10),
    ("short draft is a bonus when all accepted", 3, [1], [1], "eagle3", [P, A, B], [-1, 0, 1]),
    ("zero accepted is a correction at depth 0", 3, [0, 0], [3, 3], "eagle3", [P, C, C], [-1, 0, 0]),
    ("ngram exact alignment", 9, [2, 0, 3], [3, 3, 3], "ngram", FULL, FULL_DEPTH),
    ("ngram with unrecorded draft-free steps", 12, [2, 0, 3], [3, 3, 3], "ngram", [P] + [U] * 11, [-1] * 12),
    ("ngram cut is ambiguous", 8, [2, 0, 3], [3, 3, 3], "ngram", [P] + [U] * 7, [-1] * 8),
    ("no recorded step: every token plain", 4, [], [], "none", [P] * 4, [-1] * 4),
    ("ngram that never matched", 4, [], [], "ngram", [P] * 4, [-1] * 4),
    ("empty output", 0, [], [], "eagle3", [], []),
]


@pytest.mark.parametrize(
    ("n", "accepted", "drafted", "method", "labels", "depth"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_output_labels(n, accepted, drafted, method, labels, depth):
    got_labels, got_depth = output_labels(n, accepted, drafted, method)
    assert got_labels.tolist() == [int(x) for x in labels]
    assert got_depth.tolist() == depth


def test_label_counts_match_the_step_arrays():
    # every recorded step contributes exactly one correction or bonus and a_s accepted tokens
    rng = np.random.default_rng(0)
    accepted = rng.integers(0, 4, size=50).tolist()
    n = 1 + sum(a + 1 for a in accepted)
    labels, _ = output_labels(n, accepted, [3] * 50, "eagle3")
    assert (labels == A).sum() == sum(accepted)
    assert (labels == B).sum() == sum(a == 3 for a in accepted)
    assert (labels == C).sum() == sum(a < 3 for a in accepted)


def _seq(n: int) -> TraceSequence:
    return TraceSequence(
        tokens=np.arange(n), prompt_len=n // 2, labels=np.zeros(n - n // 2), depth=np.zeros(n - n // 2)
    )


def test_packs_respect_the_token_budget_and_keep_sequences_whole():
    seqs = [_seq(n) for n in (300, 500, 400, 900, 100, 2500)]
    got = list(packs(seqs, pack_tokens=1024, max_seq_len=2048))
    assert [[len(s) for s in p] for p in got] == [[300, 500], [400], [900, 100], [2048]]


def test_truncation_cuts_labels_with_tokens():
    s = _seq(10).truncated(7)
    assert len(s.tokens) == 7 and s.prompt_len == 5 and len(s.labels) == 2


def test_shuffle_is_a_seeded_permutation():
    a = list(shuffled(range(100), 10, random.Random(1)))
    b = list(shuffled(range(100), 10, random.Random(1)))
    assert a == b and sorted(a) == list(range(100)) and a != list(range(100))
