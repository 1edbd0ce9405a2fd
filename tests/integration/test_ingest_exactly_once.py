"""Exactly-once on the real broker and real Delta: SIGKILL at random moments, and a rebalance mid-stream.

`flywheel ingest` runs as a subprocess with small flushes (many commits), so kills land between any two
steps: decoding, producing dead letters, writing Parquet, committing. After every run the table must hold
each event once: rows == produced, event_id unique, (kafka_partition, kafka_offset) unique.

The kill and zombie tests run on a local lake and on the suite's S3 server (the ``lake`` fixture): on S3 a
commit is a put with If-None-Match, which the zombie writers race on.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from lakes import commits, open_table
from trace_events import encoded, ingest_env, poison_messages, produce, read_dlq, trace

from consumers.dead_letters import parse_headers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pycache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("pycache"))


SMALL_BATCHES = ["--consume-batch", "25", "--flush-events", "50", "--flush-latency-s", "0.2"]


def ingest_cmd(group: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flywheel.cli", "ingest", "--group", group, "--no-progress", *extra]


def assert_exactly_once(lake, expected_ids: set[str]) -> pa.Table:
    rows = open_table(lake).to_pyarrow_table(columns=["event_id", "kafka_partition", "kafka_offset"])
    assert rows.num_rows == len(expected_ids), "rows != events produced"
    assert set(rows["event_id"].to_pylist()) == expected_ids, "missing or unexpected events"
    pairs = pc.count_distinct(
        pc.binary_join_element_wise(
            pc.cast(rows["kafka_partition"], pa.string()), pc.cast(rows["kafka_offset"], pa.string()), ":"
        )
    )
    assert pairs.as_py() == rows.num_rows, "a (partition, offset) appears twice"
    return rows


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    kafka_settings, schema_ids, topic_factory, tmp_path, pycache, lake
):
    topic, dlq = topic_factory(partitions=3), topic_factory(prefix="dlq")
    records = [trace(i) for i in range(3000)]
    values = encoded(records, schema_ids)
    poison = [v for _, _, v in poison_messages(values[0], schema_ids)]
    rng = random.Random(20261201)
    for v in poison:
        values.insert(rng.randrange(len(values)), v)
    produce(kafka_settings, topic, values)
    expected = {r["event_id"] for r in records}
    env = ingest_env(kafka_settings, topic, dlq, lake, pycache)
    cmd = ingest_cmd(
        "kill-test", "--instance-id", "kill-test-0", "--session-timeout-ms", "6000", *SMALL_BATCHES
    )

    kills, extra = 0, 0
    give_up = time.monotonic() + 300
    while kills < 10:
        assert time.monotonic() < give_up, f"only {kills} kills in 300 s"
        before = commits(lake)
        proc = subprocess.Popen(cmd + ["--until-idle-s", "2"], env=env, stderr=subprocess.PIPE)
        if rng.random() < 0.3:  # sometimes during start-up or the first batch, whatever it is doing
            time.sleep(rng.uniform(0.5, 3.0))
        else:  # usually mid-stream: after this process committed, at a random point of what follows
            deadline = time.monotonic() + 90
            while commits(lake) == before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.25))
        if proc.poll() is not None:  # it finished the topic before the kill: give it more to do
            assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
            more = [trace(10_000 + extra + i) for i in range(300)]
            extra += len(more)
            produce(kafka_settings, topic, encoded(more, schema_ids))
            expected |= {r["event_id"] for r in more}
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1

    stats_path = tmp_path / "final.json"
    final = subprocess.run(
        cmd + ["--until-idle-s", "3", "--stats-json", str(stats_path)],
        env=env,
        capture_output=True,
        timeout=180,
    )
    assert final.returncode == 0, final.stderr.decode()[-3000:]
    assert kills >= 10
    assert_exactly_once(lake, expected)
    dead = read_dlq(kafka_settings, dlq)
    # a kill between the DLQ flush and the Delta commit may send a dead letter twice, never lose one
    sources = {
        (int(h["source.partition"]), int(h["source.offset"]))
        for h in map(parse_headers, (m.headers() for m in dead))
    }
    assert len(sources) == len(poison) <= len(dead)
    print(
        json.dumps(
            {
                "kills": kills,
                "events": len(expected),
                "dead_letters_sent": len(dead),
                "final": json.loads(stats_path.read_text()),
            }
        )
    )


@pytest.mark.parametrize("lake", ["local"], indirect=True)  # a group protocol test: the store adds nothing
def test_two_consumers_rebalance_mid_stream(
    kafka_settings, schema_ids, topic_factory, tmp_path, pycache, lake
):
    topic, dlq = topic_factory(partitions=4), topic_factory(prefix="dlq")
    records = [trace(i) for i in range(3000)]
    values = encoded(records, schema_ids)
    env = ingest_env(kafka_settings, topic, dlq, lake, pycache)

    def stream() -> None:  # keeps producing while consumers join and leave
        for i in range(0, len(values), 150):
            produce(kafka_settings, topic, values[i : i + 150])
            time.sleep(0.3)

    producer = threading.Thread(target=stream)
    producer.start()
    a_stats, b_stats = tmp_path / "a.json", tmp_path / "b.json"
    a = subprocess.Popen(
        ingest_cmd("rebalance", *SMALL_BATCHES, "--stats-json", str(a_stats)), env=env, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 90
    while commits(lake) < 3 and time.monotonic() < deadline:  # A is ingesting alone
        time.sleep(0.05)
    b = subprocess.Popen(
        ingest_cmd(
            "rebalance",
            *SMALL_BATCHES,
            "--until-idle-s",
            "4",
            "--stats-json",
            str(b_stats),
            "--log-level",
            "INFO",
        ),
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    b_log: list[str] = []

    def follow_b() -> None:
        for line in b.stderr:
            b_log.append(line)

    threading.Thread(target=follow_b, daemon=True).start()
    deadline = time.monotonic() + 90
    while not any(re.search(r"assigned \{\d", line) for line in b_log) and time.monotonic() < deadline:
        time.sleep(0.1)  # B joined and a cooperative rebalance moved some of A's partitions to it
    time.sleep(1.0)  # both ingest side by side for a moment
    a.send_signal(signal.SIGTERM)  # A flushes, leaves the group; B takes every partition
    _, a_err = a.communicate(timeout=90)
    assert a.returncode == 0, a_err.decode()[-3000:]
    producer.join()
    b.wait(timeout=180)
    assert b.returncode == 0, "".join(b_log)[-3000:]

    assert_exactly_once(lake, {r["event_id"] for r in records})
    a_rows, b_rows = json.loads(a_stats.read_text())["rows"], json.loads(b_stats.read_text())["rows"]
    assert a_rows > 0 and b_rows > 0 and a_rows + b_rows == len(records)
    assignments = [line for line in b_log if re.search(r"assigned \{\d", line)]
    assert len(assignments) >= 2, (
        f"B should get partitions when it joins and again when A leaves: {assignments}"
    )


def test_zombie_writers_on_one_table_still_write_each_event_once(
    kafka_settings, schema_ids, topic_factory, tmp_path, pycache, lake
):
    """Two consumers in *different* groups (think: a zombie after a split brain) both read every partition
    and race to commit the same offsets; the txn check and commit conflicts must make exactly one win each
    time, and the loser re-seek from the table (the reset path). Both are running before the first event
    is produced, and events arrive while they run, so the race is provoked, and asserted to have happened."""
    topic, dlq = topic_factory(partitions=2), topic_factory(prefix="dlq")
    records = [trace(i) for i in range(2000)]
    env = ingest_env(kafka_settings, topic, dlq, lake, pycache)
    logs = [tmp_path / f"{n}.log" for n in range(2)]
    runs = [
        subprocess.Popen(
            ingest_cmd(
                f"zombie-{n}",
                *SMALL_BATCHES,
                "--until-idle-s",
                "5",
                "--stats-json",
                str(tmp_path / f"{n}.json"),
                "--log-level",
                "INFO",
            ),
            env=env,
            stderr=logs[n].open("w"),
        )
        for n in range(2)
    ]
    deadline = time.monotonic() + 120
    while not all(re.search(r"assigned \{\d", log.read_text()) for log in logs):
        assert time.monotonic() < deadline, "both zombies should own both partitions before traffic starts"
        assert all(run.poll() is None for run in runs), "an ingest exited before traffic started"
        time.sleep(0.2)
    for i in range(0, len(records), 100):  # a live stream: both keep finding new events to commit
        produce(kafka_settings, topic, encoded(records[i : i + 100], schema_ids))
        time.sleep(0.2)
    for n, run in enumerate(runs):
        run.wait(timeout=180)
        assert run.returncode == 0, logs[n].read_text()[-3000:]
    assert_exactly_once(lake, {r["event_id"] for r in records})
    stats = [json.loads((tmp_path / f"{n}.json").read_text()) for n in range(2)]
    print(json.dumps({"zombie_stats": stats}))
    assert sum(s["rows"] for s in stats) == len(records)
    assert sum(s["conflicts"] for s in stats) >= 1, "the race this test provokes never happened"
    assert all(s["resets"] >= s["conflicts"] for s in stats), "a lost commit must re-seek from the table"
