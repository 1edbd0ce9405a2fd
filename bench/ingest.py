"""Ingest benchmark: `flywheel ingest` against a bare confluent-kafka consumer on the same topic, same run.

Steps: realistic TraceEvents (bench.realistic_traces) are produced to a fresh topic; a bare consumer reads
the whole topic, `flywheel ingest` ingests it in a subprocess (its own RSS, its own timing from first
message to last commit) into a fresh Delta table, and the bare consumer reads it again; the faster bare
pass is the denominator. Start-up (imports, kernel loading, group join) is outside both timings.
Definitions of the JSON keys:

- ``ingest_ratio``: ingest events/s / bare consume events/s (target >= 0.7);
- ``at_rest_bytes_per_token``: every byte of the table directory (Parquet incl. per-step accept arrays
  and all other columns, plus the Delta log) / (prompt + output tokens) (target <= 2), as the ingest left
  it (live: one file per commit and hour); ``compacted_bytes_per_token``: the same after compacting every
  partition and vacuuming, what each closed hour costs once the ingest's hour compaction rewrote it;
- ``rows``, ``duplicates`` (rows - distinct event ids), ``consumer_peak_rss_mib`` (target < 1024);
- ``ingest_cpu_us_per_event`` / ``bare_consume_cpu_us_per_event``: CPU time (all threads) per event,
  which does not depend on what else the machine runs: with C cores and no other load the ratio cannot
  exceed about C x bare / ingest CPU per event (the broker's own CPU not counted);
- ``decode_only_events_per_s``, ``write_only_events_per_s`` (pyarrow, as the ingest writes) and
  ``write_only_delta_rs_events_per_s`` (write_deltalake, for comparison): single-threaded CPU-bound
  stages measured in-process on the same events, to show what bounds the ratio;
- ``at_rest_bytes_per_token_unigram``: the same events with token ids shuffled (no repeats left for
  zstd to find): a pessimistic bound for traffic less repetitive than the bench corpus.

The event pool is encoded once (fastavro) and replayed with fresh event ids patched in, so producing
hundreds of thousands of events takes seconds. Pool copies are ``pool`` events apart in the topic, far
more than a Parquet page holds, so they do not flatter compression.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from core.settings import Settings
from core.tau import tau

EVENT_ID_AT = 7  # header (5) + schema_version varint (1) + event_id length varint (1)


def _encode_pool(records: list[dict[str, Any]], schema_id: int) -> list[bytes]:
    from schemas import codec
    from schemas.registry import TRACE_EVENT

    placeholder = "0" * 36
    out = []
    for r in records:
        payload = codec.encode(TRACE_EVENT, r | {"event_id": placeholder}, schema_id)
        assert payload[EVENT_ID_AT : EVENT_ID_AT + 36] == placeholder.encode()
        out.append(payload)
    return out


def _with_event_id(payload: bytes, event_id: bytes) -> bytes:
    return payload[:EVENT_ID_AT] + event_id + payload[EVENT_ID_AT + 36 :]


def build_pool(
    n: int, seed: int, console, target_dir: Path, schema_id: int
) -> tuple[list[bytes], np.ndarray, dict[str, Any]]:
    """(encoded events, prompt+output tokens per event, corpus facts); ``schema_id``: the registry's id of
    the current TraceEvent version."""
    from bench.realistic_traces import load_corpus, realistic_record

    with console.status("tokenizing the real-text corpus with the target tokenizer..."):
        corpus = load_corpus(target_dir)
    rng = np.random.default_rng(seed)
    start_us = int((time.time() - 3600) * 1e6)
    records = []
    from rich.progress import track

    for i in track(range(n), description="building events", console=console):
        records.append(realistic_record(rng, corpus, start_us + i * 1000))
    tokens = np.array([len(r["prompt_token_ids"]) + len(r["output_token_ids"]) for r in records])
    accepted = np.concatenate([r["per_step_accepted"] for r in records if r["per_step_accepted"]])
    facts = {
        "corpus_tokens": corpus.tokens,
        "tokens_per_event": float(tokens.mean()),
        "prompt_tokens_per_event": float(np.mean([len(r["prompt_token_ids"]) for r in records])),
        "acceptance_length_tau": tau(int(accepted.sum()), int(accepted.size)),
    }
    return _encode_pool(records, schema_id), tokens, facts


def produce(kafka, topic: str, pool: list[bytes], events: int, console) -> tuple[int, int]:
    """Produce ``events`` messages cycling through ``pool`` with fresh event ids -> (pool indexes used, bytes)."""
    from confluent_kafka import Producer

    producer = Producer(
        kafka.client_config()
        | {"compression.type": "zstd", "linger.ms": 50, "batch.size": 1_000_000, "enable.idempotence": True}
    )
    nbytes = 0
    from rich.progress import track

    for i in track(range(events), description="producing", console=console):
        value = _with_event_id(pool[i % len(pool)], str(uuid.uuid4()).encode())
        nbytes += len(value)
        while True:
            try:
                producer.produce(topic, value=value, key=str(i).encode())
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0, "bench events were not all acknowledged"
    return events, nbytes


def bare_consume_rate(kafka, topic: str, partitions: int, events: int) -> tuple[float, float]:
    """(events/s, CPU us/event) of a plain `consume(10000)` loop over the whole topic, first message to
    last, with librdkafka's defaults."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(kafka.client_config() | {"group.id": f"bench-bare-{uuid.uuid4().hex[:8]}"})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    seen, first, last = 0, None, None
    while seen < events:
        messages = consumer.consume(10_000, timeout=10)
        if not messages:
            raise RuntimeError(f"bare consumer stalled at {seen}/{events}")
        if first is None:
            first, cpu_first = time.perf_counter(), time.process_time()
        seen += len(messages)
        last, cpu_last = time.perf_counter(), time.process_time()
    consumer.close()
    return events / (last - first), (cpu_last - cpu_first) / events * 1e6


def run_ingest(kafka, lake_root: Path, topic: str, events: int) -> dict[str, Any]:
    stats_path = lake_root.parent / "ingest-stats.json"
    env = os.environ | {
        "FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "FLYWHEEL_LAKE_ROOT": str(lake_root),
    }
    cmd = [
        sys.executable,
        "-m",
        "flywheel.cli",
        "ingest",
        "--topic",
        topic,
        "--group",
        f"bench-{uuid.uuid4().hex[:8]}",
    ]
    cmd += ["--max-events", str(events), "--stats-json", str(stats_path), "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"flywheel ingest failed:\n{done.stderr.decode()[-4000:]}")
    return json.loads(stats_path.read_text())


def table_facts(uri: str) -> dict[str, Any]:
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    table = DeltaTable(uri).to_pyarrow_table(columns=["event_id", "kafka_partition", "kafka_offset"])
    pairs = pc.add(pc.multiply(pc.cast(table["kafka_partition"], "int64"), 1 << 40), table["kafka_offset"])
    data = log = 0
    for folder, _, files in os.walk(uri):
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
        log, data = (log + size, data) if "_delta_log" in folder else (log, data + size)
    return {
        "rows": table.num_rows,
        "duplicates": table.num_rows - pc.count_distinct(table["event_id"]).as_py(),
        "duplicate_offsets": table.num_rows - pc.count_distinct(pairs).as_py(),
        "parquet_bytes": data,
        "delta_log_bytes": log,
    }


def compacted_bytes(uri: str) -> int:
    """Bytes of the table directory once every partition is compacted and the old files vacuumed: what a
    closed hour costs after the ingest's hour compaction (the live figure counts the open hour's files)."""
    from deltalake import DeltaTable

    from consumers.lake_files import delta_writer_properties

    dt = DeltaTable(uri)
    dt.optimize.compact(writer_properties=delta_writer_properties())
    dt.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False, full=True)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(uri) for f in fs)


def stage_rates(pool: list[bytes], tokens: np.ndarray, workdir: Path, schema_id: int) -> dict[str, Any]:
    """Decode-only and write-only rates on the pool, plus the pessimistic (shuffled ids) bytes/token."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    from deltalake import write_deltalake

    from consumers.lake_files import delta_writer_properties, write_data_files
    from consumers.trace_batch import MessageBatch, TraceBatchDecoder
    from schemas.registry import TRACE_EVENT, current
    from schemas.schema_ids import SchemaIds

    decoder = TraceBatchDecoder(SchemaIds(None, {schema_id: current(TRACE_EVENT)}))  # decoding alone
    decoder.warm_up()
    started, batches = time.perf_counter(), []
    for i in range(0, len(pool), 10_000):
        batches.append(decoder.decode(MessageBatch.from_values(pool[i : i + 10_000])).rows)
    decode_s = time.perf_counter() - started
    table = pa.Table.from_batches(batches)

    def pyarrow_write(t: pa.Table, name: str) -> tuple[float, int]:
        root = workdir / name
        root.mkdir()
        began = time.perf_counter()
        actions = write_data_files(t, pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem()), now_ms=0)
        return time.perf_counter() - began, sum(a.size for a in actions)

    write_s, _ = pyarrow_write(table, "pyarrow")
    began = time.perf_counter()
    write_deltalake(
        str(workdir / "delta-rs"),
        table,
        partition_by=["date", "hour"],
        writer_properties=delta_writer_properties(),
    )
    delta_rs_s = time.perf_counter() - began
    rng = np.random.default_rng(0)
    shuffled = table
    for name in ("prompt_token_ids", "output_token_ids"):
        col = table[name].combine_chunks()
        values = col.values.to_numpy().copy()
        rng.shuffle(values)
        i = table.schema.get_field_index(name)
        shuffled = shuffled.set_column(
            i,
            table.schema.field(name),
            pa.ListArray.from_arrays(col.offsets, pa.array(values), type=col.type),
        )
    _, unigram_bytes = pyarrow_write(shuffled, "unigram")
    return {
        "decode_only_events_per_s": len(pool) / decode_s,
        "write_only_events_per_s": len(pool) / write_s,
        "write_only_delta_rs_events_per_s": len(pool) / delta_rs_s,
        "at_rest_bytes_per_token_unigram": unigram_bytes / int(tokens.sum()),
    }


def run(
    settings: Settings,
    events: int = 300_000,
    partitions: int = 6,
    seed: int = 0,
    pool: int = 60_000,
    console=None,
) -> dict:
    """Run the whole benchmark on the configured broker; returns the result dict (see module docstring)."""
    from rich.console import Console

    from infra.topics import TopicSpec, admin_client, delete_topics, ensure_topics, project_topics
    from schemas.registry import TRACE_EVENT, current
    from schemas.schema_ids import SchemaIds, register_all, subject

    console = console or Console(stderr=True)
    kafka = settings.kafka
    ids = SchemaIds.connect(kafka)
    register_all(kafka, ids)  # what `flywheel topics create` registers
    schema_id = ids.id_of(current(TRACE_EVENT), subject(kafka.traces_topic))
    payloads, tokens, facts = build_pool(
        min(pool, events), seed, console, settings.serving.target_dir, schema_id
    )
    topic = f"bench-ingest-{uuid.uuid4().hex[:8]}"
    traces_config = project_topics(kafka)[0].config
    admin = admin_client(kafka)
    ensure_topics(admin, [*project_topics(kafka), TopicSpec(topic, partitions, traces_config)])
    try:
        _, nbytes = produce(kafka, topic, payloads, events, console)
        token_total = int(tokens.sum() * (events // len(payloads)) + tokens[: events % len(payloads)].sum())
        with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
            lake = Path(tmp) / "lake"
            with console.status("bare confluent-kafka consume, flywheel ingest, bare again..."):
                bare = [bare_consume_rate(kafka, topic, partitions, events)]
                ingest = run_ingest(kafka, lake, topic, events)
                bare.append(bare_consume_rate(kafka, topic, partitions, events))
            table = table_facts(str(lake / "traces"))
            table["compacted_bytes"] = compacted_bytes(str(lake / "traces"))
            with console.status("decode-only / write-only rates..."):
                stages = stage_rates(payloads, tokens, Path(tmp), schema_id)
    finally:
        delete_topics(admin, [topic])
    ingest_rate = ingest["events_per_s"]
    bare_rate = max(rate for rate, _ in bare)  # the faster pass: the conservative denominator
    return {
        "ingest_ratio": ingest_rate / bare_rate,
        "at_rest_bytes_per_token": (table["parquet_bytes"] + table["delta_log_bytes"]) / token_total,
        "compacted_bytes_per_token": table["compacted_bytes"] / token_total,
        "events": events,
        "rows": table["rows"],
        "duplicates": table["duplicates"],
        "duplicate_offsets": table["duplicate_offsets"],
        "ingest_events_per_s": ingest_rate,
        "bare_consume_events_per_s": bare_rate,
        "bare_consume_passes_events_per_s": [rate for rate, _ in bare],
        "ingest_cpu_us_per_event": ingest["cpu_us_per_event"],
        "bare_consume_cpu_us_per_event": min(cpu for _, cpu in bare),
        "consumer_peak_rss_mib": ingest["peak_rss_mib"],
        "ingest_commits": ingest["commits"],
        "ingest_seconds": ingest["seconds_first_message_to_last_commit"],
        "topic_bytes": nbytes,
        "event_bytes_mean": nbytes / events,
        "tokens": token_total,
        **table,
        **stages,
        **facts,
        "pool_events": len(payloads),
        "partitions": partitions,
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
    }
