"""The serving check of a vLLM release: stock `vllm serve` of the target with the plugin and an EAGLE-3
drafter, real requests, every one captured as a TraceEvent on Kafka with its per-step accept counts.

``python -m flywheel.serving_check --drafter DIR [--requests 16]`` runs in an environment with the vLLM under
test and this package (infra/gpu-serving-check.sh builds one for the serving image's CUDA release on a GPU
machine); it starts the server with the same arguments `flywheel serve` uses, on uuid-named topics of the
broker ``FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS`` names (deleted afterwards), and exits 0 only when each request
became exactly one trace that accounts for its output tokens, with the plugin's counters agreeing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated

import httpx
import typer

from core.settings import KafkaSettings, ServingSettings

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "def is_palindrome(s: str) -> bool:",
    "List three uses of a prism.",
]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: vLLM exited with {proc.returncode} before it was healthy (see its log)")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit(f"error: vLLM was not healthy within {timeout_s:.0f} s")


def traces_of(
    kafka: KafkaSettings, want: set[str], timeout_s: float = 60.0, linger_s: float = 2.0
) -> dict[str, list[dict]]:
    """Every trace on the traces topic whose request id is in ``want``, decoded by the registry's ids: waits
    until all are there (or ``timeout_s``), then ``linger_s`` more to catch duplicates."""
    from confluent_kafka import Consumer

    from schemas import codec
    from schemas.registry import TRACE_EVENT
    from schemas.schema_ids import SchemaIds

    ids = SchemaIds.connect(kafka)
    consumer = Consumer(
        kafka.client_config() | {"group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([kafka.traces_topic])
    found: dict[str, list[dict]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if want <= found.keys():
                deadline = min(deadline, time.monotonic() + linger_s)
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            _, rec = codec.decode(msg.value(), ids.version_of, expect=TRACE_EVENT)
            if rec["request_id"] in want:
                found.setdefault(rec["request_id"], []).append(rec)
    finally:
        consumer.close()
    return found


def problems(responses: list[dict], traces: dict[str, list[dict]], k: int) -> list[str]:
    """What is wrong with the capture of ``responses`` (empty: every request is one sound trace)."""
    out = []
    for resp in responses:
        recs = traces.get(resp["id"], [])
        if len(recs) != 1:
            out.append(f"{resp['id']}: {len(recs)} traces (want 1)")
            continue
        rec = recs[0]
        accepted, drafted = rec["per_step_accepted"], rec["per_step_drafted"]
        if len(rec["output_token_ids"]) != resp["usage"]["completion_tokens"]:
            out.append(
                f"{resp['id']}: {len(rec['output_token_ids'])} output tokens captured, served {resp['usage']['completion_tokens']}"
            )
        if rec["spec_method"] != "eagle3" or not accepted or len(accepted) != len(drafted):
            out.append(f"{resp['id']}: no per-step speculation arrays ({rec['spec_method']})")
        elif not all(0 <= a <= d <= k for a, d in zip(accepted, drafted, strict=True)):
            out.append(f"{resp['id']}: accept counts out of range")
    return out


def main(
    drafter: Annotated[Path, typer.Option(help="an EAGLE-3 drafter directory (vLLM's eagle3 format)")],
    requests: Annotated[int, typer.Option(min=1, help="chat requests to serve and find on the topic")] = 16,
    k: Annotated[int, typer.Option(min=1, help="speculative tokens per step")] = 3,
    port: Annotated[int, typer.Option(help="loopback port of the server")] = 8041,
    start_timeout_s: Annotated[float, typer.Option(help="how long vLLM may take to start")] = 1200.0,
    log: Annotated[Path, typer.Option(help="the server's log")] = Path("serving-check.log"),
) -> None:
    """Serve the target with the plugin and a drafter; every request must arrive on Kafka as one trace."""
    from infra.topics import TopicSpec, admin_client, delete_topics, ensure_topics
    from producers.vllm_server import serve_args
    from schemas.schema_ids import SchemaIds, register_all

    if not (drafter / "config.json").exists():
        raise typer.BadParameter(
            f"{drafter} has no config.json: not a drafter directory", param_hint="--drafter"
        )
    suffix = uuid.uuid4().hex[:8]
    kafka = KafkaSettings(
        traces_topic=f"check-traces-{suffix}", promotions_topic=f"check-promotions-{suffix}"
    )
    admin = admin_client(kafka)
    ensure_topics(
        admin,
        [
            TopicSpec(kafka.traces_topic, 1),
            TopicSpec(kafka.promotions_topic, 1, {"cleanup.policy": "compact"}),
        ],
    )
    # as `flywheel topics create` does: the plugin needs the schema ids under the topics' subjects
    register_all(kafka, SchemaIds.connect(kafka))
    serving = ServingSettings(host="127.0.0.1", port=port)
    env = os.environ | {
        "VLLM_PLUGINS": "spec_flywheel",
        "FLYWHEEL_KAFKA_TRACES_TOPIC": kafka.traces_topic,
        "FLYWHEEL_KAFKA_PROMOTIONS_TOPIC": kafka.promotions_topic,
        "FLYWHEEL_SERVING_PORT": str(port),
    }
    args = serve_args(serving, "eagle3", drafter.resolve(), k)
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "producers.vllm_server", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_healthy(url, proc, start_timeout_s)
        responses = []
        for i in range(requests):
            payload = {
                "model": serving.target_model,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": 48,
                "temperature": 0,
                "vllm_xargs": {"domain": "check"},
            }
            resp = httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=300)
            resp.raise_for_status()
            responses.append(resp.json())
        traces = traces_of(kafka, {r["id"] for r in responses}, timeout_s=120)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        delete_topics(admin, [kafka.traces_topic, kafka.promotions_topic])
    import vllm

    wrong = problems(responses, traces, k)
    counters = {
        line.split('outcome="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("flywheel_trace_events_total{")
    }
    if not counters:
        wrong.append(
            "the plugin's flywheel_trace_events_total is missing from /metrics: the plugin did not load"
        )
    wrong += [f"{n:.0f} events {kind}" for kind, n in counters.items() if kind != "sent" and n > 0]
    summary = {
        "vllm": vllm.__version__,
        "requests": requests,
        "traces": sum(map(len, traces.values())),
        "events": counters,
    }
    print(json.dumps(summary, indent=2))
    if wrong:
        print("serving check FAILED:", *wrong, sep="\n  ")
        raise typer.Exit(1)
    print(
        f"serving check passed: vLLM {vllm.__version__}, {requests} requests, each one trace with its accept counts"
    )


if __name__ == "__main__":
    typer.run(main)
