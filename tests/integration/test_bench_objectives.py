"""`flywheel bench objectives` on the suite's trace table: every objective trains from the same parent and
is judged on the held-out traces (offline replay; served tau is the benchmark's own run, not the suite's)."""

from __future__ import annotations

import pytest
from trainer_data import (
    trace_table_fixture,  # noqa: F401  (registers the session fixture `trace_table`)
    trained_drafter_fixture,  # noqa: F401  (registers the session fixture `trained_drafter`)
)

from core.settings import Settings

pytestmark = [pytest.mark.integration]


def test_each_objective_trains_from_the_parent_and_is_judged_on_heldout(trace_table, trained_drafter):
    from bench.objectives import OBJECTIVES, run

    result = run(Settings(), trace_table.uri, trained_drafter, steps=2, served=False)
    assert set(result["objectives"]) == set(OBJECTIVES)
    losses = {o: set(r["losses"]) for o, r in result["objectives"].items()}
    assert losses == {
        "kl": {"forward_kl"},
        "acceptance": {"forward_kl", "acceptance"},
        "rl": {"forward_kl", "rl_acceptance", "reference_kl"},
    }
    for objective, r in result["objectives"].items():
        assert r["replay_tau"]["all"] >= 1.0, objective  # held-out traces were replayed
        assert r["final"]["loss"] > 0 and r["served_tau"] is None
    assert "rl.reward" in result["objectives"]["rl"]["final"]  # the sampled chains' accepted length
    # two steps at a small learning rate barely move a trained parent: every head stays near its tau
    parent = result["parent"]["replay_tau"]["all"]
    assert all(abs(r["replay_tau"]["all"] - parent) < 0.5 for r in result["objectives"].values())
    assert result["best_replay"] in OBJECTIVES
