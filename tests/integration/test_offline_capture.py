"""The plugin also captures `vllm.LLM(...)` (offline batch inference), here with the ngram drafter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from confluent_kafka import Consumer
from trace_events import decode, register_topics

from schemas.registry import TRACE_EVENT

pytestmark = [pytest.mark.integration, pytest.mark.vllm]
K = 4

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        llm = LLM(sys.argv[1], gpu_memory_utilization=0.3, max_model_len=1024, enforce_eager=True,
                  speculative_config={"method": "ngram", "num_speculative_tokens": K_VALUE,
                                      "prompt_lookup_max": 4, "prompt_lookup_min": 2},
                  per_request_spec_decode_metrics="detailed")
        convs = [[{"role": "user", "content": t}] for t in json.loads(sys.argv[2])]
        sps = [SamplingParams(max_tokens=48, temperature=0, extra_args={"domain": "code", "tenant": f"t{i}"})
               for i in range(len(convs))]
        outs = llm.chat(convs, sps)
        print("SERVED=" + json.dumps([[o.request_id, len(o.outputs[0].token_ids)] for o in outs]), flush=True)
    """
).replace("K_VALUE", str(K))

TEXTS = [
    "Repeat this line twice: for i in range(10): print(i)",
    "Complete: def add(a, b):",
    "Write the alphabet in lowercase, separated by commas.",
]


def test_offline_llm_requests_become_traces(kafka_settings, topic_factory, target_model, tmp_path):
    import json

    topic = topic_factory(partitions=2)
    register_topics(kafka_settings.model_copy(update={"traces_topic": topic}))
    env = os.environ | {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "FLYWHEEL_KAFKA_TRACES_TOPIC": topic,
        "FLYWHEEL_SERVING_SPILL_DIR": str(tmp_path / "spill"),
    }
    script = tmp_path / "offline.py"
    script.write_text(SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), str(target_model.path), json.dumps(TEXTS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("SERVED="))
    served = {rid: n for rid, n in json.loads(line.removeprefix("SERVED="))}

    consumer = Consumer(
        kafka_settings.client_config() | {"group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    traces = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(traces) < len(served) + 1:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            traces.append(decode(kafka_settings, msg.value(), TRACE_EVENT))
    consumer.close()

    assert sorted(t["request_id"] for t in traces) == sorted(served), (
        "one trace per request, none lost at exit"
    )
    for t in traces:
        assert (t["spec_method"], t["drafter_id"], t["domain"]) == ("ngram", "ngram", "code")
        assert len(t["output_token_ids"]) == served[t["request_id"]]
        # ngram drafts only where the prompt-lookup matches, so steps without drafts (one token each) are not
        # in the arrays; the arrays can never claim more tokens than were produced (up to K lost at the end).
        claimed = 1 + sum(a + 1 for a in t["per_step_accepted"])
        assert claimed - K <= len(t["output_token_ids"])
        assert all(
            0 <= a <= d <= K for a, d in zip(t["per_step_accepted"], t["per_step_drafted"], strict=True)
        )
    assert {t["tenant"] for t in traces} == {"t0", "t1", "t2"}
