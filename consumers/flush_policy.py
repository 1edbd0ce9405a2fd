"""When to turn buffered messages into a Delta commit: a pure function of what is buffered and for how long.

Size limits keep memory bounded whatever the backlog (the buffer never holds more than ``max_bytes`` of
message values, plus the one batch the writer thread is committing); the age limit bounds how stale the
lake can be when traffic is light. Bigger batches mean fewer, larger Parquet files and commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FlushReason(StrEnum):
    EVENTS = "events"  # max_events messages buffered
    BYTES = "bytes"  # max_bytes of message values buffered
    AGE = "age"  # the oldest buffered message waited max_age_s
    SHUTDOWN = "shutdown"  # stopping, revoked partitions, or a bounded run reached its end


@dataclass(frozen=True)
class FlushPolicy:
    max_events: int = 250_000
    max_bytes: int = 32 * 1024 * 1024
    max_age_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_events < 1 or self.max_bytes < 1 or self.max_age_s <= 0:
            raise ValueError(f"flush limits must be positive: {self}")


def should_flush(
    policy: FlushPolicy, events: int, nbytes: int, age_s: float, stopping: bool = False
) -> FlushReason | None:
    """The reason to flush now, or None to keep buffering. An empty buffer never flushes."""
    if events == 0:
        return None
    if stopping:
        return FlushReason.SHUTDOWN
    if events >= policy.max_events:
        return FlushReason.EVENTS
    if nbytes >= policy.max_bytes:
        return FlushReason.BYTES
    if age_s >= policy.max_age_s:
        return FlushReason.AGE
    return None
