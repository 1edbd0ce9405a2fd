"""Which finished requests become traces: per-request opt-out, tenant allow-list, sampling rate.

A pure decision, taken once when the request arrives, so the finish path does no extra work for skipped
requests. Sampling is by a hash of the request id: every node makes the same choice for the same id.
"""

from __future__ import annotations

import zlib
from typing import Any

from producers.trace_record import request_labels


def sampled(request_id: str, rate: float) -> bool:
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    return zlib.crc32(request_id.encode()) / 0xFFFFFFFF < rate


def capture_decision(
    request_id: str, extra_args: dict[str, Any] | None, tenant_allowlist: list[str] | None, sample_rate: float
) -> str | None:
    """None if the request is captured, else the reason it is not (``opt-out``, ``tenant``, ``sampled-out``)."""
    _, tenant, opted_out = request_labels(extra_args)
    if opted_out:
        return "opt-out"
    if tenant_allowlist is not None and tenant not in tenant_allowlist:
        return "tenant"
    if not sampled(request_id, sample_rate):
        return "sampled-out"
    return None
