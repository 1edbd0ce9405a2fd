"""The schemas kept in this repo: every released version of every event, looked up by name or fingerprint.

``schemas/avro/<event>/v<N>.avsc`` are immutable once released; the highest N is the current version
(the one producers write and readers resolve to). ``fingerprints.json`` pins each released file's
CRC-64-AVRO fingerprint so an edit to a released version fails the tests; the fingerprint is also how a
schema the registry returns for an id is matched to a version here (``schemas.schema_ids``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fastavro import parse_schema
from fastavro.schema import fingerprint, to_parsing_canonical_form

AVRO_DIR = Path(__file__).parent / "avro"
TRACE_EVENT = "trace_event"
DRAFTER_PROMOTION = "drafter_promotion"
WINDOW_ANNOUNCEMENT = "window_announcement"


@dataclass(frozen=True)
class SchemaVersion:
    event: str  # directory name, e.g. "trace_event"
    version: int
    raw: dict[str, Any]  # the .avsc as JSON (with docs)
    parsed: dict[str, Any]  # fastavro-parsed, logical types stripped: timestamps are int microseconds
    fingerprint: bytes  # 8-byte CRC-64-AVRO of the parsing canonical form, little-endian

    @property
    def full_name(self) -> str:
        return f"{self.raw['namespace']}.{self.raw['name']}"


def _strip_logical_types(node: Any) -> Any:
    """Read/write logical types as their base type (timestamp-micros -> int): no datetime objects on the
    hot path, and Arrow builds timestamp columns straight from the integers. The canonical form, hence the
    fingerprint, ignores logical types anyway."""
    if isinstance(node, list):
        return [_strip_logical_types(n) for n in node]
    if isinstance(node, dict):
        return {k: _strip_logical_types(v) for k, v in node.items() if k != "logicalType"}
    return node


def fingerprint_of(raw: Any) -> bytes:
    """CRC-64-AVRO of the parsing canonical form (little-endian, 8 bytes): same schema, same fingerprint."""
    canonical = to_parsing_canonical_form(raw)
    return int(fingerprint(canonical, "CRC-64-AVRO"), 16).to_bytes(8, "little")


@cache
def versions(event: str) -> tuple[SchemaVersion, ...]:
    """All released versions of an event, oldest first."""
    folder = AVRO_DIR / event
    files = sorted(folder.glob("v*.avsc"), key=lambda p: int(re.fullmatch(r"v(\d+)\.avsc", p.name).group(1)))
    if not files:
        raise KeyError(f"no schemas for event {event!r} under {folder}")
    out = []
    for path in files:
        raw = json.loads(path.read_text())
        parsed = parse_schema(_strip_logical_types(raw), _write_hint=False, _force=True)
        out.append(SchemaVersion(event, int(path.stem[1:]), raw, parsed, fingerprint_of(raw)))
    return tuple(out)


def current(event: str) -> SchemaVersion:
    return versions(event)[-1]


@cache
def by_fingerprint() -> dict[bytes, SchemaVersion]:
    return {v.fingerprint: v for event in events() for v in versions(event)}


def events() -> tuple[str, ...]:
    return tuple(sorted(p.name for p in AVRO_DIR.iterdir() if p.is_dir()))
