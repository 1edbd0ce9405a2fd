"""Capture overhead: serving throughput of stock vLLM with the spec-flywheel plugin vs without it.

Two servers with identical vLLM flags (ngram speculation, detailed per-request metrics) run side by side;
one has the plugin disabled (``VLLM_PLUGINS=""``). Traffic alternates between them in rounds, so both see
the same machine state; the ratio is the median over rounds, per concurrency level.
Also: wire bytes per token (the broker's log segments of a fresh topic ÷ captured tokens), the emitter's
own capacity in events/s, and the API-server RSS of both servers.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import Consumer

from core import process
from core.settings import KafkaSettings, ServingSettings, Settings, StackSettings
from infra.topics import TopicSpec, admin_client, delete_topics, ensure_topics
from producers.traffic import Phase, replay
from producers.vllm_server import VllmServer, cpu_environment, serve_args


def _server(
    stack: StackSettings, serving: ServingSettings, port: int, topic: str, kafka: KafkaSettings, plugin: bool
) -> VllmServer:
    state = stack.root / "bench-capture"
    serving = serving.model_copy(update={"port": port, "spill_dir": state / f"spill-{port}"})
    env = cpu_environment(serving) | {
        "FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "FLYWHEEL_KAFKA_TRACES_TOPIC": topic,
        "FLYWHEEL_SERVING_SPILL_DIR": str(serving.spill_dir),
        "FLYWHEEL_SERVING_FOLLOW_PROMOTIONS": "false",
    }
    if not plugin:
        env["VLLM_PLUGINS"] = ""  # an allow-list naming no plugin: stock vLLM
    spec = VllmServer(
        stack.model_copy(update={"state_dir": state / f"server-{port}"}),
        serving,
        serve_args(serving, "ngram", None, 3),
        env,
    )
    spec.name = f"vllm-{port}"
    return spec


async def _round(url: str, model: str, domain: str, requests: int, concurrency: int, seed: int) -> float:
    report = await replay(
        url, model, [Phase(domain, requests)], concurrency=concurrency, max_tokens=96, seed=seed
    )
    if any(not r.ok for r in report.results):
        raise RuntimeError(f"requests failed against {url}")
    return report.output_tokens_per_s


def _topic_bytes(stack: StackSettings, topic: str) -> int:
    data = stack.root / "kafka" / "data"
    return sum(f.stat().st_size for d in data.glob(f"{topic}-*") for f in d.glob("*.log"))


def _captured_tokens(kafka: KafkaSettings, topic: str) -> tuple[int, int, int]:
    from schemas import codec

    consumer = Consumer(
        kafka.client_config() | {"group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    events = tokens = payload = 0
    idle_until = time.monotonic() + 10
    while time.monotonic() < idle_until:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        idle_until = time.monotonic() + 3
        _, rec = codec.decode(msg.value())
        events += 1
        tokens += len(rec["prompt_token_ids"]) + len(rec["output_token_ids"])
        payload += len(msg.value())
    consumer.close()
    return events, tokens, payload


def emitter_capacity(kafka: KafkaSettings, topic: str, records: list[dict[str, Any]], spill: Path) -> float:
    """Events/s the capture path (encode + produce + ack) sustains on its own thread."""
    from producers.emitter import TraceEmitter
    from producers.trace_record import encode_trace

    emitter = TraceEmitter(kafka, topic, encode_trace, spill, max_queue=len(records) + 1)
    started = time.perf_counter()
    for rec in records:
        emitter.submit(rec)
    while emitter.counts["sent"] < len(records):
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    emitter.close()
    return len(records) / elapsed


def run(
    settings: Settings, rounds: int = 3, requests_per_round: int = 16, concurrencies: tuple[int, ...] = (1, 8)
) -> dict[str, Any]:
    stack, kafka, serving = settings.stack, settings.kafka, settings.serving
    state = stack.root / "bench-capture"
    topic = f"bench-capture-{uuid.uuid4().hex[:8]}"
    admin = admin_client(kafka)
    ensure_topics(admin, [TopicSpec(topic, 3, {"compression.type": "producer"})])
    with_plugin = _server(stack, serving, 8021, topic, kafka, plugin=True)
    without = _server(stack, serving, 8022, topic, kafka, plugin=False)
    model = serving.target_model
    result: dict[str, Any] = {"rounds": rounds, "requests_per_round": requests_per_round}
    try:
        for spec in (with_plugin, without):
            process.start(spec, timeout_s=1500)
        asyncio.run(_round(f"http://{with_plugin.address}", model, "code", 4, 4, 99))  # warm both
        asyncio.run(_round(f"http://{without.address}", model, "code", 4, 4, 99))
        for c in concurrencies:
            ratios, on, off = [], [], []
            for r in range(rounds):
                for spec, sink in (
                    ((with_plugin, on), (without, off)) if r % 2 == 0 else ((without, off), (with_plugin, on))
                ):
                    sink.append(
                        asyncio.run(_round(f"http://{spec.address}", model, "code", requests_per_round, c, r))
                    )
                ratios.append(on[-1] / off[-1])
            result[f"tokens_per_s_with_plugin_c{c}"] = statistics.median(on)
            result[f"tokens_per_s_without_plugin_c{c}"] = statistics.median(off)
            result[f"throughput_ratio_c{c}"] = statistics.median(ratios)
        result["throughput_ratio"] = min(result[f"throughput_ratio_c{c}"] for c in concurrencies)
        result["rss_mib_api_server_with_plugin"] = (
            psutil.Process(process.read_pid(with_plugin)).memory_info().rss / 2**20
        )
        result["rss_mib_api_server_without_plugin"] = (
            psutil.Process(process.read_pid(without)).memory_info().rss / 2**20
        )
    finally:
        for spec in (with_plugin, without):
            process.stop(spec)  # stopping flushes the emitter
    events, tokens, payload = _captured_tokens(kafka, topic)
    result.update(
        {
            "events": events,
            "captured_tokens": tokens,
            "avro_bytes_per_token": payload / tokens if tokens else None,
            "wire_bytes_per_token": _topic_bytes(stack, topic) / tokens if tokens else None,
        }
    )
    sample = _sample_records(kafka, topic, 2000)
    result["events_per_s"] = (
        emitter_capacity(kafka, topic, sample, state / "spill-capacity") if sample else None
    )
    delete_topics(admin, [topic])
    return result


def _sample_records(kafka: KafkaSettings, topic: str, n: int) -> list[dict[str, Any]]:
    """Real captured traces, repeated to n, for the emitter capacity run."""
    from schemas import codec

    consumer = Consumer(
        kafka.client_config() | {"group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    recs: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(recs) < 200:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            recs.append(codec.decode(msg.value())[1])
    consumer.close()
    return [dict(recs[i % len(recs)], event_id=str(uuid.uuid4())) for i in range(n)] if recs else []
