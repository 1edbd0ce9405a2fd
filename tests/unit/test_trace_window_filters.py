"""Window target filters, trace temperatures and the lake's storage options, on a real local Delta table."""

from __future__ import annotations

import json
import logging

import deltalake
import pytest
from trace_events import IDENTITY, trace

from bench.offline_traces import lake_rows, write_traces
from trainer.replay_eval import ReplayReport, replay_sequences, same_target
from trainer.trace_window import Window, WindowReader, target_identity

MODEL = IDENTITY.target_model_id
REV_A, REV_B = "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"
# (target_model_id, target_revision, temperature) of each trace, in finish order
TRACES = [
    (MODEL, REV_A, 0.0),
    (MODEL, REV_B, 0.0),
    (MODEL, REV_A, 0.7),
    (MODEL, REV_B, 1.0),
    (MODEL, REV_A, 0.0),
    ("Other-1B", REV_A, 0.7),  # another model that happens to share the revision string
    (MODEL, REV_A, 0.7),
    (MODEL, REV_B, 0.7),
]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> tuple[str, list[dict]]:
    """Two appends (versions 0 and 1) of traces of two revisions, one other model, two temperatures."""
    records = [
        trace(i, target_model_id=m, target_revision=r, temperature=t) for i, (m, r, t) in enumerate(TRACES)
    ]
    uri = str(tmp_path_factory.mktemp("lake") / "traces")
    rows = lake_rows(records)
    write_traces(uri, rows[:4])
    write_traces(uri, rows[4:])
    return uri, records


def _events(records: list[dict], model: str, revision: str) -> set[str]:
    return {
        r["event_id"] for r in records if (r["target_model_id"], r["target_revision"]) == (model, revision)
    }


def test_sequences_carry_target_and_temperature(table):
    uri, records = table
    seqs = list(WindowReader(Window(uri)).sequences())
    assert len(seqs) == len(TRACES)
    by_event = {r["event_id"]: r for r in records}
    for s in seqs:
        rec = by_event[s.event_id]
        assert (s.target_model_id, s.target_revision) == (rec["target_model_id"], rec["target_revision"])
        assert s.temperature == rec["temperature"]  # 0.7 from the float32 column, not 0.699999988
    assert sorted({s.temperature for s in seqs}) == [0.0, 0.7, 1.0]


def test_target_filter_reads_only_that_target(table):
    uri, records = table
    reader = WindowReader(Window(uri, target_model_id=MODEL, target_revision=REV_A))
    seqs = list(reader.sequences())
    assert {s.event_id for s in seqs} == _events(records, MODEL, REV_A)
    assert {(s.target_model_id, s.target_revision) for s in seqs} == {(MODEL, REV_A)}
    assert sorted(s.temperature for s in seqs) == [0.0, 0.0, 0.7, 0.7]
    assert reader.num_rows() == 4
    assert reader.other_target_rows() == 4  # three of revision B, one of the other model
    prov = reader.provenance()
    assert prov["target_model_id"] == MODEL and prov["target_revision"] == REV_A
    assert prov["other_target_rows"] == 4
    # every reader of the window sees the filter: held-out cutoff, token counts, drafter versions
    assert reader.token_counts(49152).sum() == sum(
        len(r["prompt_token_ids"]) + len(r["output_token_ids"])
        for r in records
        if r["event_id"] in _events(records, MODEL, REV_A)
    )

    other = WindowReader(Window(uri, target_revision=REV_B))
    assert {s.event_id for s in other.sequences()} == _events(records, MODEL, REV_B)
    assert sorted(s.temperature for s in other.sequences()) == [0.0, 0.7, 1.0]
    by_model = WindowReader(Window(uri, target_model_id="Other-1B"))
    assert [s.target_model_id for s in by_model.sequences()] == ["Other-1B"]
    assert by_model.other_target_rows() == len(TRACES) - 1


def test_target_filter_combines_with_versions_and_held_out_split(table):
    uri, records = table
    appended = WindowReader(Window(uri, after_version=0, target_revision=REV_A))
    assert {s.event_id for s in appended.sequences()} == {
        r["event_id"] for r in records[4:] if r["target_revision"] == REV_A
    }
    kept = WindowReader(Window(uri, target_revision=REV_A, heldout_fraction=0.5, heldout="exclude"))
    held = WindowReader(Window(uri, target_revision=REV_A, heldout_fraction=0.5, heldout="only"))
    both = {s.event_id for s in kept.sequences()} | {s.event_id for s in held.sequences()}
    assert both == {r["event_id"] for r in records if r["target_revision"] == REV_A}
    assert kept.num_rows() + held.num_rows() == 5


def test_unfiltered_window_of_mixed_targets_warns(table, caplog):
    uri, _ = table
    reader = WindowReader(Window(uri))
    with caplog.at_level(logging.WARNING, logger="flywheel.trainer"):
        targets = reader.targets()
    assert targets == {(MODEL, REV_A): 4, (MODEL, REV_B): 3, ("Other-1B", REV_A): 1}
    assert "mixes 3 targets" in caplog.text
    assert reader.other_target_rows() == 0 and reader.provenance()["other_target_rows"] == 0


def test_a_target_absent_from_the_window_fails_clearly(table):
    uri, _ = table
    WindowReader(Window(uri, target_model_id=MODEL, target_revision=REV_A)).require_target_rows()
    reader = WindowReader(Window(uri, target_model_id=MODEL, target_revision="cccccccccccccccc"))
    assert reader.num_rows() == 0
    with pytest.raises(ValueError, match=f"no traces of target {MODEL}@cccccccccccccccc.*{REV_B}: 3 rows"):
        reader.require_target_rows()


def test_storage_options_reach_every_delta_table(table, monkeypatch):
    uri, _ = table
    opened: list[dict | None] = []

    class SpyTable(deltalake.DeltaTable):
        def __init__(self, *args, storage_options=None, **kwargs):
            opened.append(storage_options)
            super().__init__(*args, storage_options=storage_options, **kwargs)

    monkeypatch.setattr(deltalake, "DeltaTable", SpyTable)
    options = {"timeout": "120s"}  # a real object-store option (ignored by the local store)
    window = Window(uri, after_version=0, storage_options=options, target_revision=REV_A)
    reader = WindowReader(window)
    assert len(opened) == 2 and all(o == options for o in opened)  # the snapshot and the after_version one
    assert reader.num_rows() == 3 and reader.table._storage_options == options
    # credentials stay out of logs and provenance
    assert "120s" not in repr(window) and "120s" not in json.dumps(reader.provenance())


def test_target_identity_is_the_dir_name_and_manifest_revision(tmp_path):
    model = tmp_path / "SmolLM2-135M-Instruct"
    model.mkdir()
    assert target_identity(model) == ("SmolLM2-135M-Instruct", None)
    (model / "flywheel-manifest.json").write_text(json.dumps({"revision": REV_A}))
    assert target_identity(str(model)) == ("SmolLM2-135M-Instruct", REV_A)


def test_replay_skips_other_targets(table):
    uri, _ = table
    seqs = list(WindowReader(Window(uri)).sequences())
    a, b = (next(s for s in seqs if s.target_revision == r) for r in (REV_A, REV_B))
    assert same_target(a, MODEL, REV_A) and not same_target(b, MODEL, REV_A)
    assert same_target(b, MODEL, None) and not same_target(b, "Other-1B", None)  # revision unknown: by id
    assert same_target(b, MODEL, "unknown")  # capture's placeholder decides nothing

    class Target:  # never asked for features: every sequence is another target's
        model_id, revision = MODEL, "dddddddddddddddd"

        def features(self, *args):
            raise AssertionError("replayed another target's trace")

    report = replay_sequences(None, Target(), seqs, k=3)
    assert isinstance(report, ReplayReport) and report.other_target == len(TRACES) and not report.per_trace
