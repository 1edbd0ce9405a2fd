"""Build a TraceEvent record (a dict matching schemas/avro/trace_event) from what vLLM knows of a request.

Pure functions: the vLLM plugin calls them on the serving path, tests and tools call them on
``RequestOutput`` objects from ``vllm.LLM``. Timestamps are int microseconds since the epoch (UTC).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from producers.emitter import Pending
from schemas import codec
from schemas.registry import TRACE_EVENT, SchemaVersion, current
from schemas.schema_ids import RETRY_AFTER_S, RegistryUnavailable, SchemaIds, subject

SCHEMA_VERSION = current(TRACE_EVENT).version
INITIAL_DRAFTER_VERSION = "initial"


@dataclass(frozen=True)
class ServingIdentity:
    """What a serving node stamps on every trace: who served, with which target and drafter."""

    serving_node: str
    target_model_id: str
    target_revision: str
    spec_method: str  # "none" without speculation
    num_spec_tokens: int
    drafter_id: str | None  # None without speculation


def micros(seconds: float | None) -> int | None:
    return None if seconds is None else int(round(seconds * 1_000_000))


def request_labels(extra_args: dict[str, Any] | None) -> tuple[str | None, str | None, bool]:
    """(domain, tenant, opted_out) from request metadata (OpenAI ``vllm_xargs`` -> SamplingParams.extra_args)."""
    extra = extra_args or {}
    opted_out = str(extra.get("flywheel_opt_out", "")).lower() in ("1", "true", "yes")
    domain = extra.get("domain")
    tenant = extra.get("tenant")
    return (None if domain is None else str(domain)), (None if tenant is None else str(tenant)), opted_out


def _as_list(ids: Any) -> list[int]:
    """Lists are kept as they are (no copy on the serving path: the caller hands over lists it is done
    with); other sequences (tuples, arrays) become lists."""
    return ids if type(ids) is list else list(ids)


def build_trace_record(
    identity: ServingIdentity,
    *,
    request_id: str,
    arrival_time_s: float,
    first_token_time_s: float | None,
    finish_time_s: float,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    extra_args: dict[str, Any] | None,
    prompt_token_ids: list[int],
    output_token_ids: list[int],
    per_step_accepted: list[int] | None,
    per_step_drafted: list[int] | None,
    finish_reason: str,
    drafter_version: str | None,
    capture_sample_rate: float = 1.0,
) -> dict[str, Any]:
    domain, tenant, _ = request_labels(extra_args)
    speculative = identity.spec_method != "none"
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": str(uuid.uuid4()),
        "request_id": request_id,
        "arrival_time": micros(arrival_time_s),
        "first_token_time": micros(first_token_time_s),
        "finish_time": micros(finish_time_s),
        "serving_node": identity.serving_node,
        "target_model_id": identity.target_model_id,
        "target_revision": identity.target_revision,
        "drafter_id": identity.drafter_id if speculative else None,
        "drafter_version": (drafter_version or INITIAL_DRAFTER_VERSION) if speculative else None,
        "spec_method": identity.spec_method,
        "num_spec_tokens": identity.num_spec_tokens if speculative else 0,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "top_k": int(top_k),
        "seed": seed,
        "prompt_token_ids": _as_list(prompt_token_ids),
        "output_token_ids": _as_list(output_token_ids),
        "per_step_accepted": _as_list(per_step_accepted or []),
        "per_step_drafted": _as_list(per_step_drafted or []),
        "finish_reason": finish_reason,
        "domain": domain,
        "tenant": tenant,
        "capture_sample_rate": float(capture_sample_rate),
    }


class TraceEncoder:
    """record -> (Kafka key, value) on the emitter thread: key = request id (spreads load, keeps one
    request's retries together), value in the Confluent wire format with the registry id of the current
    TraceEvent version under the topic's subject (looked up once). While that id cannot be had (registry
    away, or the schema not registered yet) it raises :class:`Pending` with the value in pending form, and
    asks the registry again only after a pause; ``frame`` turns spilled pending values into messages."""

    def __init__(self, ids: SchemaIds, topic: str):
        self.ids = ids
        self.subject = subject(topic)
        self._retry_at = 0.0

    def _id_of(self, version: SchemaVersion) -> int:
        if time.monotonic() < self._retry_at:
            raise Pending(f"no schema id for {version.event} v{version.version} under {self.subject} yet")
        try:
            return self.ids.id_of(version, self.subject)
        except (RegistryUnavailable, LookupError) as e:
            self._retry_at = time.monotonic() + RETRY_AFTER_S
            raise Pending(str(e)) from None

    def __call__(self, record: dict[str, Any]) -> tuple[bytes, bytes]:
        key = record["request_id"].encode()
        try:
            return key, codec.encode(TRACE_EVENT, record, self._id_of(current(TRACE_EVENT)))
        except Pending as e:
            raise Pending(str(e), key, codec.encode_pending(TRACE_EVENT, record)) from None

    def frame(self, value: bytes) -> bytes:
        return codec.frame(value, self._id_of)


def record_from_request_output(
    identity: ServingIdentity,
    output: Any,
    *,
    drafter_version: str | None = None,
    arrival_time_s: float | None = None,
    finish_time_s: float | None = None,
    sampling_params: Any = None,
) -> dict[str, Any]:
    """A TraceEvent record from a finished ``vllm.RequestOutput`` (offline ``LLM.generate``/``chat``)."""
    import time

    completion = output.outputs[0]
    metrics = completion.spec_decode_metrics
    sp = sampling_params
    now = time.time()
    return build_trace_record(
        identity,
        request_id=str(output.request_id),
        arrival_time_s=arrival_time_s or now,
        first_token_time_s=None,
        finish_time_s=finish_time_s or now,
        temperature=getattr(sp, "temperature", 1.0) if sp else 1.0,
        top_p=getattr(sp, "top_p", 1.0) if sp else 1.0,
        top_k=getattr(sp, "top_k", 0) if sp else 0,
        seed=getattr(sp, "seed", None) if sp else None,
        extra_args=getattr(sp, "extra_args", None) if sp else None,
        prompt_token_ids=list(output.prompt_token_ids),
        output_token_ids=list(completion.token_ids),
        per_step_accepted=list(metrics.per_step_accepted) if metrics else [],
        per_step_drafted=list(metrics.per_step_drafted) if metrics else [],
        finish_reason=str(completion.finish_reason or "abort"),
        drafter_version=drafter_version,
    )
