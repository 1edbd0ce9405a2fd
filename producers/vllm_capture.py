"""Capture hook: every finished request of a stock vLLM frontend becomes one TraceEvent on Kafka.

Installed by the plugin (``producers.vllm_plugin``) into the process that owns vLLM's OutputProcessor
(the API server of ``vllm serve``, or the ``vllm.LLM`` process). Capture must cost nothing per step or per
token, so it hooks only calls that happen once per request, in ``vllm.v1.engine.output_processor``:

- ``RequestState.from_new_request`` — remembers the request's SamplingParams and decides capture
  (opt-out, tenant, sampling) once, on arrival;
- ``OutputProcessor._update_stats_from_finished`` — called exactly once per finished request, after stop
  strings are applied and the final output is made: builds the record and hands it to the non-blocking
  emitter;
- ``OutputProcessor.abort_requests`` — requests aborted from the frontend (client gone) finish there
  instead: each aborted state is captured with finish reason ``abort``.

Every output path (LLM, AsyncLLM, streaming or not) goes through these; the spec-decode metrics, the
weight-version spans and vLLM's own request stats (arrival, first-token latency) are on the state there.
The record keeps references to vLLM's token lists (the state is done with them) and is encoded on the
emitter's thread. Everything the hook does is wrapped so that a capture bug can never fail a request.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

from core.settings import KafkaSettings, MlflowSettings, ServingSettings
from producers import metrics
from producers.capture_policy import capture_decision
from producers.emitter import TraceEmitter
from producers.trace_record import INITIAL_DRAFTER_VERSION, ServingIdentity, TraceEncoder, build_trace_record
from schemas.schema_ids import SchemaIds

log = logging.getLogger("flywheel.capture")
DRAFTER_METADATA = "flywheel-drafter.json"  # written next to an exported drafter: id and registry version
_VLLM_DEFAULT_VERSION = "default"  # EngineCore's weight version before any update


def target_revision(model_dir: str) -> str:
    """Revision of the served target: the manifest written by `flywheel models prepare`, if any."""
    from core.target_model import read_manifest

    manifest = read_manifest(Path(model_dir))
    return manifest["revision"] if manifest else "unknown"


def drafter_metadata(drafter_dir: str | None) -> dict[str, Any]:
    if not drafter_dir:
        return {}
    try:
        return json.loads((Path(drafter_dir) / DRAFTER_METADATA).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class CaptureRuntime:
    """Per-process state of the plugin: identity of this serving node, the emitter, drafter versions."""

    def __init__(self, serving: ServingSettings, kafka: KafkaSettings, mlflow: MlflowSettings) -> None:
        self.serving = serving
        self.kafka = kafka
        self.mlflow = mlflow
        mlflow.export_credentials()  # the promotion listener fetches drafters from the registry
        self.identity: ServingIdentity | None = None
        self.initial_version = INITIAL_DRAFTER_VERSION
        self.drafter_ids: dict[str, str] = {}  # engine weight version -> drafter id
        self.speculating = True  # False after a disable event: traces are labelled as served without one
        self.engine: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._emitter: TraceEmitter | None = None
        self._lock = threading.Lock()

    # --- engine --------------------------------------------------------------------------------------

    def attach_engine(self, engine: Any) -> None:
        """Called once the frontend engine (AsyncLLM or LLMEngine) exists: learn who we are."""
        config = engine.vllm_config
        model_config = config.model_config
        spec = config.speculative_config
        served = model_config.served_model_name
        served = served[0] if isinstance(served, (list, tuple)) else served
        method = spec.method if spec is not None else "none"
        drafter_dir = getattr(spec, "model", None) if spec is not None else None
        meta = drafter_metadata(drafter_dir)
        if spec is None:
            drafter_id = None
        elif meta.get("drafter_id"):
            drafter_id = meta["drafter_id"]
        elif drafter_dir and method not in ("ngram", "suffix"):
            drafter_id = Path(drafter_dir).name
        else:
            drafter_id = method
        self.initial_version = str(meta.get("drafter_version", INITIAL_DRAFTER_VERSION))
        self.identity = ServingIdentity(
            serving_node=self.serving.node_id or socket.gethostname(),
            target_model_id=str(served or Path(model_config.model).name),
            target_revision=target_revision(model_config.model),
            spec_method=method,
            num_spec_tokens=spec.num_speculative_tokens if spec is not None else 0,
            drafter_id=drafter_id,
        )
        if drafter_id is not None:
            metrics.set_served_drafter(drafter_id, self.initial_version)
        self.engine = engine
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None
        log.info("spec-flywheel capture on %s: %s", self.identity.serving_node, self.identity)

    def drafter_version_label(self, engine_version: str | None) -> str:
        if engine_version in (None, _VLLM_DEFAULT_VERSION):
            return self.initial_version
        return engine_version

    def drafter_id_for(self, label: str) -> str | None:
        return self.drafter_ids.get(label, self.identity.drafter_id if self.identity else None)

    @property
    def emitter(self) -> TraceEmitter:
        if self._emitter is None:
            with self._lock:
                if self._emitter is None:
                    # the encoder asks the registry on the emitter thread, never on a request's
                    encoder = TraceEncoder(SchemaIds.connect(self.kafka), self.kafka.traces_topic)
                    self._emitter = TraceEmitter(
                        self.kafka,
                        self.kafka.traces_topic,
                        encoder,
                        self.serving.spill_dir,
                        max_queue=self.serving.queue_max_events,
                        on_count=metrics.count_emitter,
                        spill_max_bytes=self.serving.spill_max_bytes,
                        frame=encoder.frame,
                    )
                    metrics.watch_emitter(self._emitter)
                    # On exit: flush what Kafka takes within the timeout, spill the rest for the next process.
                    atexit.register(self._emitter.close)
        return self._emitter

    # --- requests ------------------------------------------------------------------------------------

    def on_new_request(self, state: Any, request: Any) -> None:
        sp = request.sampling_params
        state._fw_sp = sp
        if not self.serving.capture_enabled or sp is None or getattr(state, "streaming_input", False):
            state._fw_skip = "disabled"
            return
        state._fw_skip = capture_decision(
            request.external_req_id or request.request_id,
            sp.extra_args,
            self.serving.tenant_allowlist,
            self.serving.sample_rate,
        )

    def on_finished(self, state: Any, finish_reason: Any) -> None:
        skip = getattr(state, "_fw_skip", "untracked")
        if skip is not None:
            metrics.count_event("skipped")
            return
        if self.identity is None or state.detokenizer is None:
            return
        sp = state._fw_sp
        spec = state.spec_decode_metrics
        starts = state.weight_version_starts
        label = self.drafter_version_label(starts[-1][0] if starts else None)
        request_id = state.external_req_id
        if state.parent_req is not None:  # n > 1: one trace per sample
            request_id = f"{request_id}#{state.request_index}"
        identity = self.identity
        drafter_id = self.drafter_id_for(label)
        if not self.speculating:  # speculation switched off: no drafter served this request
            identity = ServingIdentity(
                **{**identity.__dict__, "spec_method": "none", "num_spec_tokens": 0, "drafter_id": None}
            )
            spec = None
        elif drafter_id != identity.drafter_id:
            identity = ServingIdentity(**{**identity.__dict__, "drafter_id": drafter_id})
        stats = state.stats  # None when vLLM runs with --disable-log-stats: no first-token time then
        first_token_s = None
        if stats is not None and stats.first_token_latency > 0:
            first_token_s = stats.arrival_time + stats.first_token_latency
        record = build_trace_record(
            identity,
            request_id=request_id,
            arrival_time_s=stats.arrival_time if stats is not None else state._fw_arrival_s,
            first_token_time_s=first_token_s,
            finish_time_s=time.time(),
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k,
            seed=sp.seed,
            extra_args=sp.extra_args,
            prompt_token_ids=state.prompt_token_ids or [],
            output_token_ids=state.detokenizer.output_token_ids,
            per_step_accepted=spec.per_step_accepted if spec is not None else None,
            per_step_drafted=spec.per_step_drafted if spec is not None else None,
            finish_reason=str(finish_reason),
            drafter_version=label,
            capture_sample_rate=self.serving.sample_rate,
        )
        self.emitter.submit(record)


RUNTIME: CaptureRuntime | None = None  # built by install(), the plugin's entry point


HOOKS = {  # what install() wraps: class name in vllm.v1.engine.output_processor -> methods
    "RequestState": ("from_new_request",),
    "OutputProcessor": ("_update_stats_from_finished", "abort_requests"),
}


def install(output_processor_module: Any, engine_classes: list[type]) -> None:
    """Wrap the once-per-request methods (and the engine constructors) once per process; settings come
    from FLYWHEEL_*."""
    global RUNTIME
    state_cls = output_processor_module.RequestState
    processor_cls = output_processor_module.OutputProcessor
    if getattr(state_cls, "_flywheel_capture", False):
        return
    RUNTIME = CaptureRuntime(ServingSettings(), KafkaSettings(), MlflowSettings())
    state_cls._flywheel_capture = True
    original_from_new = state_cls.from_new_request.__func__
    original_finished = processor_cls._update_stats_from_finished
    original_abort = processor_cls.abort_requests

    def from_new_request(cls, tokenizer, request, *args, **kwargs):
        state = original_from_new(cls, tokenizer, request, *args, **kwargs)
        try:
            state._fw_arrival_s = request.arrival_time
            RUNTIME.on_new_request(state, request)
        except Exception:
            log.exception("trace capture failed on a new request (serving continues)")
            state._fw_skip = "error"
        return state

    def _capture(req_state, finish_reason) -> None:
        # once per state: aborting a parallel-sampling parent aborts its children in a nested call, and
        # both calls return the children
        if getattr(req_state, "_fw_captured", False):
            return
        req_state._fw_captured = True
        try:
            RUNTIME.on_finished(req_state, finish_reason)
        except Exception:
            log.exception("trace capture failed on a finished request (serving continues)")
            metrics.count_event("failed")

    def _update_stats_from_finished(self, req_state, finish_reason, *args, **kwargs):
        _capture(req_state, finish_reason)
        return original_finished(self, req_state, finish_reason, *args, **kwargs)

    def abort_requests(self, request_ids, *args, **kwargs):
        states = dict(self.request_states)  # abort_requests pops the states it aborts
        aborted = original_abort(self, request_ids, *args, **kwargs)
        for request_id in aborted:
            req_state = states.get(request_id)
            if req_state is not None:
                _capture(req_state, "abort")
        return aborted

    state_cls.from_new_request = classmethod(from_new_request)
    processor_cls._update_stats_from_finished = _update_stats_from_finished
    processor_cls.abort_requests = abort_requests

    for engine_cls in engine_classes:
        _wrap_init(engine_cls)


def _wrap_init(engine_cls: type) -> None:
    original_init = engine_cls.__init__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        try:
            RUNTIME.attach_engine(self)
            from producers.promotion_listener import start_listener

            start_listener(RUNTIME)
        except Exception:
            log.exception("spec-flywheel could not attach to the engine; capture and hot-swap are off")

    engine_cls.__init__ = __init__
