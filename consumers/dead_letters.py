"""Dead letters: messages the ingest cannot use go to ``spec.traces.dlq.v1`` unchanged, with why in headers.

The value and key are the original bytes (so a fixed consumer can re-drive them), and the headers say what
was wrong and where the message came from. Exactly-once covers them through the Delta log: a poison
message's offset is recorded in the txn of the batch it arrived in, and the writer *produces and flushes*
the batch's dead letters before it commits that txn. A crash between the flush and the commit re-reads the
batch, so a dead letter may be sent twice, but it is never lost; dead letters carry their source
coordinates, so duplicates are easy to spot downstream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, Producer

from core.kafka_log import librdkafka_log
from core.settings import KafkaSettings

log = logging.getLogger("flywheel.ingest.dlq")

HEADER_PREFIX = "flywheel."


@dataclass(frozen=True)
class DeadLetter:
    value: bytes
    key: bytes | None
    reason: str  # short stable code, e.g. malformed-avro, unknown-schema, step-count-mismatch
    detail: str
    topic: str
    partition: int
    offset: int
    timestamp_ms: int  # source message timestamp (-1 if none)


def dead_letter_headers(letter: DeadLetter) -> list[tuple[str, bytes]]:
    """Headers of the DLQ message: reason, detail and the source coordinates, all UTF-8 strings."""
    fields = {
        "dlq.reason": letter.reason,
        "dlq.detail": letter.detail,
        "source.topic": letter.topic,
        "source.partition": str(letter.partition),
        "source.offset": str(letter.offset),
        "source.timestamp": str(letter.timestamp_ms),
    }
    return [(HEADER_PREFIX + k, v.encode()) for k, v in fields.items()]


def parse_headers(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """``{"dlq.reason": ..., "source.offset": ...}`` from a DLQ message's headers (for tools and tests)."""
    out = {}
    for k, v in headers or []:
        if k.startswith(HEADER_PREFIX):
            out[k[len(HEADER_PREFIX) :]] = v.decode() if v is not None else ""
    return out


def from_message(message: Any, reason: str, detail: str) -> DeadLetter:
    """A dead letter for a ``confluent_kafka.Message``."""
    _, ts = message.timestamp()
    return DeadLetter(
        message.value() or b"",
        message.key(),
        reason,
        detail,
        message.topic(),
        message.partition(),
        message.offset(),
        ts,
    )


class DeadLetterError(RuntimeError):
    """Some dead letters were not acknowledged: the batch must not be committed."""


class DeadLetterProducer:
    """Idempotent producer for the DLQ, created on first use (no network in ``__init__``)."""

    def __init__(self, kafka: KafkaSettings, topic: str, flush_timeout_s: float = 30.0):
        self.kafka = kafka
        self.topic = topic
        self.flush_timeout_s = flush_timeout_s
        self._producer: Producer | None = None
        self.sent = 0

    def _config(self) -> dict[str, Any]:
        return self.kafka.client_config() | {
            "enable.idempotence": True,
            "compression.type": "zstd",
            "linger.ms": 5,
            "message.max.bytes": 8 * 1024 * 1024,  # dlq topic allows 8 MiB: a 4 MiB trace plus headers fits
            "logger": librdkafka_log(),
        }

    def send(self, letters: list[DeadLetter]) -> None:
        """Produce every letter and wait until the broker acknowledged all of them, else raise."""
        if not letters:
            return
        if self._producer is None:
            self._producer = Producer(self._config())
        failures: list[KafkaError] = []

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                failures.append(err)

        for letter in letters:
            self._produce(letter, on_delivery)
        remaining = self._producer.flush(self.flush_timeout_s)
        if failures or remaining:
            raise DeadLetterError(
                f"{len(failures)} dead letters failed, {remaining} unacknowledged: {failures[:3]}"
            )
        self.sent += len(letters)

    def _produce(self, letter: DeadLetter, on_delivery: Any) -> None:
        while True:
            try:
                self._producer.produce(
                    self.topic,
                    value=letter.value,
                    key=letter.key,
                    headers=dead_letter_headers(letter),
                    on_delivery=on_delivery,
                )
                return
            except BufferError:  # local queue full: let deliveries drain, then retry
                self._producer.poll(0.1)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(self.flush_timeout_s)
            self._producer = None
