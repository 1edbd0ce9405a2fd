"""Prometheus counters of the capture plugin. They live in prometheus_client's default registry, which
`vllm serve` exposes at /metrics, next to vLLM's own ``vllm:*`` series."""

from __future__ import annotations

from functools import cache


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
    speculating.set(1)
    return events, swaps, speculating, faults


def count_event(outcome: str, n: int = 1) -> None:
    _counters()[0].labels(outcome=outcome).inc(n)


def count_emitter(name: str, n: int = 1) -> None:
    """The emitter's ``on_count``: event outcomes and the faults it survived, each to its own series."""
    if name in _FAULTS:
        _counters()[3].labels(kind=name).inc(n)
    else:
        count_event(name, n)


_FAULTS = frozenset(("io_errors", "restarts"))


def count_swap(outcome: str) -> None:
    _counters()[1].labels(outcome=outcome).inc()


def set_speculating(enabled: bool) -> None:
    _counters()[2].set(int(enabled))


_EMITTER: list = []  # the process's emitter, read by the queue gauges at scrape time


@cache
def _queue_gauges() -> None:
    from prometheus_client import Gauge

    depth = Gauge("flywheel_trace_queue", "Trace events waiting in the emitter's in-memory queue now")
    depth.set_function(lambda: _EMITTER[0].queue_depth() if _EMITTER else 0)
    peak = Gauge("flywheel_trace_queue_peak", "Deepest the emitter's in-memory queue has been (events)")
    peak.set_function(lambda: _EMITTER[0].queue_peak if _EMITTER else 0)


def watch_emitter(emitter) -> None:
    """Export the emitter's queue depth and its peak; read only when /metrics is scraped (nothing on the
    serving path). The gauges are registered once per process; a later emitter replaces the earlier."""
    _EMITTER[:] = [emitter]
    _queue_gauges()
