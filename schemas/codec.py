"""Encode/decode events as Avro single-object encoding (Avro spec: ``C3 01`` + 8-byte fingerprint + body).

No schema registry is needed: the fingerprint names the writer schema, every released version lives in
this package, and readers resolve any older version to the current one (BACKWARD compatibility).
Consumers in other languages use their Avro library's single-object decoder with the same .avsc files.
"""

from __future__ import annotations

import io
from typing import Any

from fastavro import schemaless_reader, schemaless_writer
from fastavro.validation import ValidationError, validate

from schemas.registry import SchemaVersion, by_fingerprint, current

MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8


class DecodeError(ValueError):
    """A message that is not a valid event of ours; ``reason`` is short and stable (goes to the DLQ)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def encode(event: str, record: dict[str, Any], *, check: bool = False) -> bytes:
    """Encode with the current version of ``event``. ``check`` validates types first (slower, clearer errors)."""
    schema = current(event)
    if check:
        validate(record, schema.parsed, raise_errors=True)
    buf = io.BytesIO()
    buf.write(MAGIC)
    buf.write(schema.fingerprint)
    schemaless_writer(buf, schema.parsed, record)
    return buf.getvalue()


def encode_with(schema: SchemaVersion, record: dict[str, Any]) -> bytes:
    """Encode with a specific (possibly older) version: for compatibility tests and replays."""
    buf = io.BytesIO(MAGIC + schema.fingerprint)
    buf.seek(HEADER_LEN)
    schemaless_writer(buf, schema.parsed, record)
    return buf.getvalue()


def writer_schema(payload: bytes) -> SchemaVersion:
    if len(payload) < HEADER_LEN or payload[:2] != MAGIC:
        raise DecodeError("not-avro-single-object", f"{len(payload)} bytes, header {payload[:2].hex()!r}")
    try:
        return by_fingerprint()[payload[2:HEADER_LEN]]
    except KeyError:
        raise DecodeError("unknown-schema", f"fingerprint {payload[2:HEADER_LEN].hex()}") from None


def decode(payload: bytes, expect: str | None = None) -> tuple[SchemaVersion, dict[str, Any]]:
    """Decode to the *current* version of the writer's event. Raises DecodeError with a stable reason."""
    writer = writer_schema(payload)
    if expect is not None and writer.event != expect:
        raise DecodeError("wrong-event-type", f"expected {expect}, got {writer.event} v{writer.version}")
    reader = current(writer.event)
    buf = io.BytesIO(payload)
    buf.seek(HEADER_LEN)
    try:
        record = schemaless_reader(buf, writer.parsed, reader.parsed if reader is not writer else None)
    except (EOFError, StopIteration, ValueError, IndexError, UnicodeDecodeError, TypeError) as e:
        raise DecodeError("malformed-avro", f"{type(e).__name__}: {e}") from None
    if buf.tell() != len(payload):
        raise DecodeError("malformed-avro", f"{len(payload) - buf.tell()} trailing bytes")
    return reader, record


__all__ = ["DecodeError", "ValidationError", "decode", "encode", "encode_with", "writer_schema"]
