"""Capture overhead: serving throughput of stock vLLM with the spec-flywheel plugin vs without it.

Two servers with identical vLLM flags (ngram speculation, detailed per-request metrics) are started; one
has our plugin left out of ``VLLM_PLUGINS`` (an allow-list naming every other installed plugin: stock vLLM
as installed). They are measured **one at a time**: while one
serves a round, the other's whole process group is frozen with SIGSTOP (an idle vLLM engine core polls and
would otherwise take CPU from the one being measured), then thawed for its own round. Rounds alternate in
ABBA order (with, without, without, with, ...) on the same prompts (same seed), after a discarded warm-up
pair, at each concurrency level; the highest level saturates the CPU server.

Two servers started alike are not alike: an A/A of two stock servers here measured 0.968 [0.954, 0.984]
(the first-started one slower). So the run is a crossover: half the rounds with the plugin on the
first-started server, then both restarted with it on the second; the server difference cancels in the
point and is reported (``server_difference``).

Per level: the ratio tokens/s with ÷ without of every round pair, their geometric mean with a 95 % t
interval (``crossover_interval``: the halves' difference removed from the variance), the per-round figures, and p50/p99 request-latency ratios
(pooled over rounds; > 1 means slower with the plugin). After each plugin round (outside the timed window)
the bench reads the plugin's counters at ``/metrics``: events sent and dropped, and the emitter queue's
peak depth. Also: wire bytes per token, the emitter's own capacity in events/s, API-server RSS.

``profile_dir``: after the timed rounds, each server (alone, same load at the highest level) is sampled
with py-spy; the collapsed stacks are written there and summarised: API-server samples with and without
the plugin, and the share of the plugin server's samples in spec-flywheel code, by function.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
from confluent_kafka import Consumer

from core import process
from core.settings import KafkaSettings, ServingSettings, Settings, StackSettings
from evaluation.paired import Interval, ratio_interval, t_quantile
from infra.topics import TopicSpec, admin_client, delete_topics, ensure_topics
from producers.traffic import Phase, TrafficReport, replay
from producers.vllm_server import VllmServer, cpu_environment, serve_args
from schemas.schema_ids import SchemaIds, register_all

LEVELS = (1, 8, 32)
MAX_TOKENS = 96
OUR_PACKAGES = ("producers", "core", "schemas")  # what the plugin runs in the API server


def requests_for(concurrency: int) -> int:
    """Requests per round: enough to keep every slot busy for several turns."""
    return max(6, 2 * concurrency)


def stock_plugins() -> list[str]:
    """The general plugins vLLM would load here, less spec-flywheel's (VLLM_PLUGINS is an allow-list)."""
    from importlib.metadata import entry_points

    return sorted(e.name for e in entry_points(group="vllm.general_plugins") if e.name != "spec_flywheel")


def _server(
    stack: StackSettings,
    serving: ServingSettings,
    port: int,
    topic: str,
    kafka: KafkaSettings,
    plugin: bool,
    extra_env: dict[str, str] | None = None,
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
        env["VLLM_PLUGINS"] = ",".join(stock_plugins())  # every installed vLLM plugin but ours
    env |= extra_env or {}
    spec = VllmServer(
        stack.model_copy(update={"state_dir": state / f"server-{port}"}),
        serving,
        serve_args(serving, "ngram", None, 3),
        env,
    )
    spec.name = f"vllm-{port}"
    return spec


def _signal(spec: VllmServer, sig: signal.Signals) -> None:
    pid = process.read_pid(spec)
    if pid is not None:
        os.killpg(os.getpgid(pid), sig)


@contextmanager
def alone(active: VllmServer, others: list[VllmServer]):
    """Run with ``others`` frozen (SIGSTOP on their process groups); everything is thawed on the way out."""
    for spec in others:
        _signal(spec, signal.SIGSTOP)
    _signal(active, signal.SIGCONT)
    time.sleep(0.2)  # let the thawed server's threads settle
    try:
        yield
    finally:
        for spec in others:
            _signal(spec, signal.SIGCONT)


def _round(url: str, model: str, requests: int, concurrency: int, seed: int) -> TrafficReport:
    report = asyncio.run(
        replay(
            url, model, [Phase("code", requests)], concurrency=concurrency, max_tokens=MAX_TOKENS, seed=seed
        )
    )
    if any(not r.ok for r in report.results):
        raise RuntimeError(
            f"requests failed against {url}: {[r.error for r in report.results if not r.ok][:3]}"
        )
    return report


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def plugin_counters(url: str) -> dict[str, float]:
    """The plugin's own series at /metrics: events by outcome, emitter queue depth and its peak."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        m = re.match(r'^(flywheel_trace_\w+?)(?:_total)?(?:\{outcome="(\w+)"\})? ([0-9.e+-]+)$', line)
        if m:
            out[m.group(1) + (f"_{m.group(2)}" if m.group(2) else "")] = float(m.group(3))
    return out


def crossover_interval(halves: list[list[float]], confidence: float = 0.95) -> Interval:
    """Ratio and t interval of a crossover: each half has the plugin on the other server, so a difference
    between the two servers shifts the halves' log ratios in opposite directions. The point is the mean
    of the halves' mean log ratios (the server difference cancels); the variance is the within-half one
    (the half effect removed), with n - halves degrees of freedom."""
    nonempty = [h for h in halves if h]
    if len(nonempty) == 1:
        return ratio_interval(nonempty[0], confidence)
    logs = [[math.log(r) for r in half] for half in nonempty]
    n = sum(len(h) for h in logs)
    means = [sum(h) / len(h) for h in logs]
    centre = sum(means) / len(means)
    dof = n - len(logs)
    if dof < 1:
        return Interval(math.exp(centre), 0.0, math.inf, n, confidence)
    var = sum((x - m) ** 2 for h, m in zip(logs, means, strict=True) for x in h) / dof
    se = math.sqrt(var / len(logs) ** 2 * sum(1 / len(h) for h in logs))
    half = t_quantile(confidence, dof) * se
    return Interval(math.exp(centre), math.exp(centre - half), math.exp(centre + half), n, confidence)


def summarise_level(on: list[list[TrafficReport]], off: list[list[TrafficReport]]) -> dict[str, Any]:
    """Paired ratios of one concurrency level; ``on[h][i]`` pairs with ``off[h][i]``, h the crossover half."""
    ratios = [
        [a.output_tokens_per_s / b.output_tokens_per_s for a, b in zip(ho, hf, strict=True)]
        for ho, hf in zip(on, off, strict=True)
    ]
    interval = crossover_interval(ratios)
    flat_on = [r for h in on for r in h]
    flat_off = [r for h in off for r in h]
    tps_on = [r.output_tokens_per_s for r in flat_on]
    tps_off = [r.output_tokens_per_s for r in flat_off]
    lat_on = [x.latency_s for r in flat_on for x in r.results]
    lat_off = [x.latency_s for r in flat_off for x in r.results]
    half_ratios = [ratio_interval(h).point for h in ratios if h]
    return {
        "throughput_ratio": interval.point,
        "throughput_ratio_ci_low": interval.low,
        "throughput_ratio_ci_high": interval.high,
        "pairs": interval.n,
        "half_ratios": half_ratios,  # plugin on the first-started server, then on the second
        "server_difference": (
            math.sqrt(half_ratios[0] / half_ratios[1]) if len(half_ratios) == 2 else None
        ),  # first-started server's tokens/s ÷ the second's, the plugin's effect cancelled
        "tokens_per_s_with_plugin": statistics.median(tps_on),
        "tokens_per_s_without_plugin": statistics.median(tps_off),
        "latency_p50_ratio": percentile(lat_on, 50) / percentile(lat_off, 50),
        "latency_p99_ratio": percentile(lat_on, 99) / percentile(lat_off, 99),
        "latency_p50_s_with_plugin": percentile(lat_on, 50),
        "latency_p99_s_with_plugin": percentile(lat_on, 99),
        "rounds_tokens_per_s_with_plugin": [round(x, 2) for x in tps_on],
        "rounds_tokens_per_s_without_plugin": [round(x, 2) for x in tps_off],
    }


def measure_level(
    with_plugin: VllmServer,
    without: VllmServer,
    model: str,
    concurrency: int,
    rounds: int,
    requests: int,
    progress: Callable[[str], None],
) -> tuple[list[TrafficReport], list[TrafficReport], dict[str, float]]:
    """ABBA rounds after a discarded warm-up pair; returns both arms' rounds and the plugin's counters."""
    on: list[TrafficReport] = []
    off: list[TrafficReport] = []
    peak = 0.0
    before = plugin_counters(f"http://{with_plugin.address}")
    for r in range(-1, rounds):  # round -1: warm-up pair, discarded
        order = ((with_plugin, on), (without, off))
        if r % 2 == 1:
            order = order[::-1]
        for spec, sink in order:
            with alone(spec, [s for s in (with_plugin, without) if s is not spec]):
                report = _round(
                    f"http://{spec.address}", model, requests, concurrency, seed=1000 * concurrency + r
                )
                if spec is with_plugin:
                    counters = plugin_counters(f"http://{spec.address}")
                    peak = max(peak, counters.get("flywheel_trace_queue_peak", 0.0))
            if r >= 0:
                sink.append(report)
        if r >= 0:
            progress(
                f"c={concurrency} round {r + 1}/{rounds}: "
                f"{on[-1].output_tokens_per_s:.1f} vs {off[-1].output_tokens_per_s:.1f} tok/s"
            )
    after = plugin_counters(f"http://{with_plugin.address}")

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    counters = {
        "emitter_queue_peak": peak,
        "emitter_dropped": delta("flywheel_trace_events_dropped"),
        "emitter_sent": delta("flywheel_trace_events_sent"),
    }
    return on, off, counters


# --- profile -------------------------------------------------------------------------------------------


def _repo_root() -> str:
    import producers

    return str(Path(producers.__file__).resolve().parent.parent)


def profile_server(
    spec: VllmServer, model: str, concurrency: int, requests: int, out: Path, duration_s: int
) -> Path:
    """Sample the API-server process with py-spy (non-blocking, 100 Hz) while it serves a round."""
    pid = process.read_pid(spec)
    spy = Path(sys.executable).with_name("py-spy")
    cmd = [
        str(spy), "record", "--pid", str(pid), "--duration", str(duration_s), "--rate", "100",
        "--nonblocking", "--format", "raw", "--full-filenames", "-o", str(out),
    ]  # fmt: skip
    sampler = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:  # keep it under load for the whole sampling window
        _round(f"http://{spec.address}", model, requests, concurrency, seed=7)
    _, err = sampler.communicate(timeout=duration_s + 60)
    if sampler.returncode != 0:
        raise RuntimeError(f"py-spy failed on pid {pid}: {err.strip()[-500:]}")
    return out


def collapsed(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) format: ``frame;frame;...;leaf count`` per line."""
    out = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out.append((stack.split(";"), int(count)))
    return out


def ours(frame: str, root: str) -> bool:
    """A frame in the plugin's code (``func (/repo/producers/x.py:12)``). ``producers/vllm_server.py`` is
    the launcher that calls vLLM's own CLI: it is the outermost frame of everything and no plugin cost."""
    return f"({root}/producers/vllm_server.py:" not in frame and any(
        f"({root}/{pkg}/" in frame for pkg in OUR_PACKAGES
    )


def summarise_profile(with_path: Path, without_path: Path, root: str, top: int = 12) -> dict[str, Any]:
    """Samples of both API servers; in the plugin's: those with a spec-flywheel frame, by innermost such frame."""
    on, off = collapsed(with_path), collapsed(without_path)
    total_on = sum(n for _, n in on)
    total_off = sum(n for _, n in off)
    by_function: Counter[str] = Counter()
    for stack, n in on:
        mine = [f for f in stack if ours(f, root)]
        if mine:
            by_function[mine[-1].replace(root + "/", "")] += n
    in_ours = sum(by_function.values())
    return {
        "samples_with_plugin": total_on,
        "samples_without_plugin": total_off,
        "api_server_cpu_ratio": total_on / total_off if total_off else None,
        "flywheel_samples": in_ours,
        "flywheel_share": in_ours / total_on if total_on else None,
        "flywheel_top_functions": dict(by_function.most_common(top)),
    }


# --- wire and emitter -------------------------------------------------------------------------------------


def _topic_bytes(stack: StackSettings, topic: str) -> int:
    data = stack.root / "kafka" / "data"
    return sum(f.stat().st_size for d in data.glob(f"{topic}-*") for f in d.glob("*.log"))


def _read_topic(kafka: KafkaSettings, topic: str, limit: int | None = None) -> list[bytes]:
    consumer = Consumer(
        kafka.client_config() | {"group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    values: list[bytes] = []
    idle_until = time.monotonic() + 10
    while time.monotonic() < idle_until and (limit is None or len(values) < limit):
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        idle_until = time.monotonic() + 3
        values.append(msg.value())
    consumer.close()
    return values


def emitter_capacity(
    kafka: KafkaSettings, topic: str, records: list[dict[str, Any]], spill: Path, timeout_s: float = 120.0
) -> float:
    """Events/s the capture path (encode + produce + ack) sustains on its own thread."""
    from producers.emitter import TraceEmitter
    from producers.trace_record import TraceEncoder

    shutil.rmtree(spill, ignore_errors=True)  # a stale spill would be replayed first and counted
    encoder = TraceEncoder(SchemaIds.connect(kafka), topic)  # the id under the bench topic's subject
    emitter = TraceEmitter(kafka, topic, encoder, spill, max_queue=len(records) + 1, frame=encoder.frame)
    started = time.perf_counter()
    for rec in records:
        emitter.submit(rec)
    deadline = time.monotonic() + timeout_s
    while emitter.counts["sent"] + emitter.counts["replayed"] < len(records):
        if time.monotonic() > deadline:
            emitter.close()
            raise RuntimeError(f"the emitter sent {emitter.counts} of {len(records)} events in {timeout_s} s")
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    emitter.close()
    return len(records) / elapsed


def _wire(stack: StackSettings, kafka: KafkaSettings, topic: str, state: Path) -> dict[str, Any]:
    from schemas import codec

    values = _read_topic(kafka, topic)
    ids = SchemaIds.connect(kafka)
    records = [codec.decode(v, ids.version_of)[1] for v in values]
    tokens = sum(len(r["prompt_token_ids"]) + len(r["output_token_ids"]) for r in records)
    sample = (
        # 20k events: the emitter serves delivery reports every 0.25 s while librdkafka holds messages, a
        # fixed ~0.3 s to the last acknowledgement that 2k events (0.15 s of work) would be dominated by
        [dict(records[i % len(records)], event_id=str(uuid.uuid4())) for i in range(20_000)]
        if records
        else []
    )
    return {
        "events": len(records),
        "captured_tokens": tokens,
        "avro_bytes_per_token": sum(map(len, values)) / tokens if tokens else None,
        "wire_bytes_per_token": _topic_bytes(stack, topic) / tokens if tokens else None,
        "events_per_s": emitter_capacity(kafka, topic, sample, state / "spill-capacity") if sample else None,
    }


# --- the run --------------------------------------------------------------------------------------------


def run(
    settings: Settings,
    rounds: int = 10,
    levels: tuple[int, ...] = LEVELS,
    requests_per_round: int | None = None,
    profile_dir: Path | None = None,
    profile_s: int = 30,
    plugin_env: dict[str, str] | None = None,
    crossover: bool = True,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """``crossover``: measure in two halves, the plugin on the first-started server (port 8021), then both
    restarted with it on the second (8022): a difference between the two servers themselves cancels.
    ``plugin_env``: extra environment of the plugin server only, for controls (e.g.
    ``VLLM_PLUGINS=<the others>``: an A/A of two stock servers)."""
    stack, kafka, serving = settings.stack, settings.kafka, settings.serving
    state = stack.root / "bench-capture"
    topic = f"bench-capture-{uuid.uuid4().hex[:8]}"
    admin = admin_client(kafka)
    ensure_topics(admin, [TopicSpec(topic, 3, {"compression.type": "producer"})])
    # what `flywheel topics create` does for a topic: without its subject the plugin has no schema id and
    # spills every event (the bench would time the spill, not capture)
    register_all(kafka.model_copy(update={"traces_topic": topic}), SchemaIds.connect(kafka))
    model = serving.target_model
    halves = (False, True) if crossover else (False,)
    per_half = math.ceil(rounds / len(halves))
    result: dict[str, Any] = {
        "rounds": per_half * len(halves),
        "method": "servers measured one at a time (the other SIGSTOPped), ABBA order, same prompts, "
        "warm-up pair discarded; crossover: half the rounds with the plugin on each server; 95 % t interval "
        "of the per-round-pair log ratio with the halves' server difference removed",
        "plugin_env": plugin_env or {},
        "load_average_start": os.getloadavg(),
    }
    raw: dict[int, dict[str, Any]] = {
        c: {"on": [], "off": [], "peak": 0.0, "dropped": 0.0, "sent": 0.0} for c in levels
    }
    for swapped in halves:
        with_plugin = _server(stack, serving, 8022 if swapped else 8021, topic, kafka, True, plugin_env)
        without = _server(stack, serving, 8021 if swapped else 8022, topic, kafka, False)
        servers = sorted([with_plugin, without], key=lambda spec: spec.port)  # start order: 8021 first
        try:
            for spec in servers:
                progress(f"starting {spec.name} ({'plugin' if spec is with_plugin else 'stock'})")
                process.start(spec, timeout_s=1500)
            for c in levels:
                n = requests_per_round or requests_for(c)
                on, off, counters = measure_level(with_plugin, without, model, c, per_half, n, progress)
                raw[c]["on"].append(on)
                raw[c]["off"].append(off)
                raw[c]["peak"] = max(raw[c]["peak"], counters["emitter_queue_peak"])
                raw[c]["dropped"] += counters["emitter_dropped"]
                raw[c]["sent"] += counters["emitter_sent"]
            if not swapped:
                for name, spec in (("with_plugin", with_plugin), ("without_plugin", without)):
                    result[f"rss_mib_api_server_{name}"] = (
                        psutil.Process(process.read_pid(spec)).memory_info().rss / 2**20
                    )
            if profile_dir is not None and swapped == halves[-1]:
                profile_dir.mkdir(parents=True, exist_ok=True)
                c = max(levels)
                paths = {}
                for spec in servers:
                    label = "with-plugin" if spec is with_plugin else "without-plugin"
                    progress(f"profiling {label} for {profile_s} s at c={c}")
                    with alone(spec, [s for s in servers if s is not spec]):
                        paths[label] = profile_server(
                            spec, model, c, requests_for(c), profile_dir / f"{label}.txt", profile_s
                        )
                result["profile"] = summarise_profile(
                    paths["with-plugin"], paths["without-plugin"], _repo_root()
                )
                result["profile"]["files"] = {k: str(v) for k, v in paths.items()}
        finally:
            for spec in servers:
                _signal(spec, signal.SIGCONT)
                process.stop(spec)  # stopping flushes the emitter
    per_level = {}
    for c in levels:
        level = summarise_level(raw[c]["on"], raw[c]["off"])
        per_level[f"c{c}"] = level | {
            "concurrency": c,
            "requests_per_round": requests_per_round or requests_for(c),
            "emitter_queue_peak": raw[c]["peak"],
            "emitter_dropped": raw[c]["dropped"],
            "emitter_sent": raw[c]["sent"],
        }
        progress(f"c={c}: {level['throughput_ratio']:.4f} "
                 f"[{level['throughput_ratio_ci_low']:.4f}, {level['throughput_ratio_ci_high']:.4f}]")  # fmt: skip
    result["levels"] = per_level
    result["throughput_ratio"] = min(v["throughput_ratio"] for v in per_level.values())
    result["throughput_ratio_ci_low"] = min(v["throughput_ratio_ci_low"] for v in per_level.values())
    result["load_average_end"] = os.getloadavg()
    result.update(_wire(stack, kafka, topic, state))
    delete_topics(admin, [topic])
    sent = sum(v["emitter_sent"] for v in per_level.values())
    if not result["events"] or not sent:
        raise RuntimeError(
            f"the plugin server captured nothing onto {topic} ({result['events']} events on the topic, "
            f"{sent:.0f} sent by the emitter): the ratios above time something else; see its log under {state}"
        )
    return result
