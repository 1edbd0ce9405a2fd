"""Encode/decode events in the Confluent wire format: ``00`` + 4-byte big-endian schema id + Avro body.

The id is the schema registry's (``schemas.schema_ids``), so Kafka Connect, ksqlDB, Flink's
``avro-confluent`` and Confluent's deserializers read our topics as they are. Readers resolve any older
version to the current one (BACKWARD compatibility, enforced by the registry).

A value whose id is not known yet (the registry did not answer when it was encoded) is kept *pending*:
Avro single-object encoding (``C3 01`` + 8-byte CRC-64-AVRO fingerprint + body), which names its schema
without a registry. Pending values only ever live in the serving spill; :func:`frame` turns one into the
wire format once the id is known, before it is produced.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import Any

from fastavro import schemaless_reader, schemaless_writer
from fastavro.validation import ValidationError, validate

from schemas.registry import SchemaVersion, by_fingerprint, current

MAGIC = b"\x00"
HEADER_LEN = 5  # magic + schema id
PENDING_MAGIC = b"\xc3\x01"
PENDING_HEADER_LEN = 10  # C3 01 + fingerprint
_ID = struct.Struct(">I")

NOT_CONFLUENT = "not-confluent-avro"
UNKNOWN_SCHEMA = "unknown-schema"
WRONG_EVENT = "wrong-event-type"
MALFORMED = "malformed-avro"


class DecodeError(ValueError):
    """A message that is not a valid event of ours; ``reason`` is short and stable (goes to the DLQ)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def header(schema_id: int) -> bytes:
    return MAGIC + _ID.pack(schema_id)


def _body(schema: SchemaVersion, record: dict[str, Any], check: bool) -> bytes:
    if check:
        validate(record, schema.parsed, raise_errors=True)
    buf = io.BytesIO()
    schemaless_writer(buf, schema.parsed, record)
    return buf.getvalue()


def encode(event: str, record: dict[str, Any], schema_id: int, *, check: bool = False) -> bytes:
    """Encode with the current version of ``event``, whose registry id is ``schema_id``. ``check``
    validates types first (slower, clearer errors)."""
    return header(schema_id) + _body(current(event), record, check)


def encode_with(schema: SchemaVersion, record: dict[str, Any], schema_id: int) -> bytes:
    """Encode with a specific (possibly older) version: for compatibility tests and replays."""
    return header(schema_id) + _body(schema, record, False)


def encode_pending(event: str, record: dict[str, Any]) -> bytes:
    """The current version of ``event`` framed by its fingerprint: for a spill, while the id is unknown."""
    schema = current(event)
    return PENDING_MAGIC + schema.fingerprint + _body(schema, record, False)


def frame(value: bytes, id_of: Callable[[SchemaVersion], int]) -> bytes:
    """``value`` in the wire format: a pending value gets its schema's id (``id_of`` may raise while the
    registry is away); anything else is returned as it is."""
    if value[:2] != PENDING_MAGIC or len(value) < PENDING_HEADER_LEN:
        return value
    schema = by_fingerprint()[value[2:PENDING_HEADER_LEN]]
    return header(id_of(schema)) + value[PENDING_HEADER_LEN:]


def schema_id(payload: bytes) -> int:
    if len(payload) < HEADER_LEN or payload[:1] != MAGIC:
        raise DecodeError(NOT_CONFLUENT, f"{len(payload)} bytes, header {payload[:HEADER_LEN].hex()!r}")
    return _ID.unpack_from(payload, 1)[0]


def decode(
    payload: bytes, version_of: Callable[[int], SchemaVersion | None], expect: str | None = None
) -> tuple[SchemaVersion, dict[str, Any]]:
    """Decode to the *current* version of the writer's event; ``version_of`` maps a registry id to our
    version (``SchemaIds.version_of``). Raises DecodeError with a stable reason."""
    sid = schema_id(payload)
    writer = version_of(sid)
    if writer is None:
        raise DecodeError(UNKNOWN_SCHEMA, f"schema id {sid} is not a registered version of our schemas")
    if expect is not None and writer.event != expect:
        raise DecodeError(WRONG_EVENT, f"expected {expect}, got {writer.event} v{writer.version}")
    reader = current(writer.event)
    buf = io.BytesIO(payload)
    buf.seek(HEADER_LEN)
    try:
        record = schemaless_reader(buf, writer.parsed, reader.parsed if reader is not writer else None)
    except (EOFError, StopIteration, ValueError, IndexError, UnicodeDecodeError, TypeError) as e:
        raise DecodeError(MALFORMED, f"{type(e).__name__}: {e}") from None
    if buf.tell() != len(payload):
        raise DecodeError(MALFORMED, f"{len(payload) - buf.tell()} trailing bytes")
    return reader, record


__all__ = [
    "DecodeError",
    "ValidationError",
    "decode",
    "encode",
    "encode_pending",
    "encode_with",
    "frame",
    "schema_id",
]
