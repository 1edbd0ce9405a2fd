"""Prometheus series of the capture plugin. They live in prometheus_client's default registry, which
`vllm serve` exposes at /metrics, next to vLLM's own ``vllm:*`` series.

The series the alert rules watch for lost events (outcomes ``dropped``, ``spill_dropped``, ``failed`` and the
emitter's faults) are created at zero when registered, so a dashboard shows 0 rather than no data before the
first loss; the other outcomes and the swap outcomes appear with their first event, so that their presence
says it happened. Queue depth and spill bytes are read from the emitter only when /metrics is scraped
(nothing on the serving path).
"""

from __future__ import annotations

from functools import cache

EMITTER_FAULTS = ("io_errors", "restarts")
LOSSES = ("dropped", "spill_dropped", "failed")  # the event outcomes that lose an event


@cache
def _counters():
    from prometheus_client import Counter, Gauge

    events = Counter(
        "flywheel_trace_events",
        "Trace events by outcome: sent, spilled, replayed, dropped (queue full), spill_dropped (spill full or"
        " unwritable), failed, skipped (opt-out/sampling/tenant)",
        ["outcome"],
    )
    faults = Counter(
        "flywheel_trace_emitter_faults",
        "Faults the emitter thread survived: io_errors (each OSError), restarts (its loop restarted)",
        ["kind"],
    )
    swaps = Counter(
        "flywheel_drafter_swaps",
        "Drafter hot-swaps and speculation switches by outcome: ok, failed, ignored (another target),"
        " rejected (unverifiable, foreign source or stale)",
        ["outcome"],
    )
    speculating = Gauge(
        "flywheel_speculation_enabled",
        "1 while this node speculates, 0 after a disable event (every measured drafter was slower)",
    )
    served = Gauge(
        "flywheel_served_drafter",
        "The drafter this node serves (always 1; the labels say which): drafter id and registry version",
        ["drafter_id", "version"],
    )
    for counter, labels in ((events, LOSSES), (faults, EMITTER_FAULTS)):
        for label in labels:
            counter.labels(label)
    speculating.set(1)
    return events, swaps, speculating, faults, served


def count_event(outcome: str, n: int = 1) -> None:
    _counters()[0].labels(outcome=outcome).inc(n)


def count_emitter(name: str, n: int = 1) -> None:
    """The emitter's ``on_count``: event outcomes and the faults it survived, each to its own series."""
    if name in EMITTER_FAULTS:
        _counters()[3].labels(kind=name).inc(n)
    else:
        count_event(name, n)


def count_swap(outcome: str) -> None:
    _counters()[1].labels(outcome=outcome).inc()


def set_speculating(enabled: bool) -> None:
    _counters()[2].set(int(enabled))


def set_served_drafter(drafter_id: str, version: str) -> None:
    """On start and after every hot-swap: the one ``flywheel_served_drafter`` series is the served drafter."""
    served = _counters()[4]
    served.clear()
    served.labels(drafter_id=drafter_id, version=version).set(1)


_EMITTER: list = []  # the process's emitter, read by the queue gauges at scrape time


@cache
def _queue_gauges() -> None:
    from prometheus_client import Gauge

    depth = Gauge("flywheel_trace_queue", "Trace events waiting in the emitter's in-memory queue now")
    depth.set_function(lambda: _EMITTER[0].queue_depth() if _EMITTER else 0)
    peak = Gauge("flywheel_trace_queue_peak", "Deepest the emitter's in-memory queue has been (events)")
    peak.set_function(lambda: _EMITTER[0].queue_peak if _EMITTER else 0)
    spill = Gauge(
        "flywheel_trace_spill_bytes",
        "Bytes of trace events in the spill files, waiting for Kafka (capped by FLYWHEEL_SERVING_SPILL_MAX_BYTES)",
    )
    spill.set_function(lambda: _EMITTER[0].spill_bytes() if _EMITTER else 0)


def watch_emitter(emitter) -> None:
    """Export the emitter's queue depth, its peak and the spill's size; read only when /metrics is scraped.
    The gauges are registered once per process; a later emitter replaces the earlier."""
    _EMITTER[:] = [emitter]
    _queue_gauges()


def registered() -> None:
    """Register every series of the plugin now (tests, dashboards checks): they are otherwise registered on
    first use."""
    _counters()
    _queue_gauges()
