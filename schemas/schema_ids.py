"""The schema registry's ids of the schemas kept in this repo, both ways, cached (an id never changes).

Every message carries its writer schema's registry id (Confluent wire format, ``schemas.codec``). The ids
are the registry's, so code never pins them: a producer looks its version's id up under its topic's
subject (``<topic>-value``, the Confluent TopicNameStrategy), a consumer asks what an id it has not seen
is and accepts it only if it is one of our released versions (matched by CRC-64-AVRO fingerprint of the
parsing canonical form, which ignores docs and formatting). ``flywheel topics create`` registers every
released version (:func:`register_all`), oldest first, with compatibility BACKWARD enforced by the registry.

A registry that does not answer raises :class:`RegistryUnavailable` (callers decide: the serving emitter
spills, the ingest stops and resumes from its committed offsets); an id the registry does not know, or
knows as another schema, is ``None`` (a poison message: dead letter).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from schemas.registry import (
    DRAFTER_PROMOTION,
    TRACE_EVENT,
    WINDOW_ANNOUNCEMENT,
    SchemaVersion,
    by_fingerprint,
    fingerprint_of,
    versions,
)

COMPATIBILITY = "BACKWARD"
RETRY_AFTER_S = 1.0  # a registry that did not answer is asked again only after this (no request storms)


class KafkaSettings(Protocol):
    """What these functions read of ``core.settings.KafkaSettings`` (schemas sits below core)."""

    schema_registry_url: str
    traces_topic: str
    promotions_topic: str
    windows_topic: str


class RegistryUnavailable(RuntimeError):
    """The schema registry did not answer (down, unreachable, 5xx)."""


def subject(topic: str) -> str:
    """The value subject of a topic (TopicNameStrategy): what Confluent serdes, Connect and ksqlDB use."""
    return f"{topic}-value"


def topic_events(kafka: KafkaSettings) -> dict[str, str]:
    """Topic -> the event its values are. The DLQ holds other topics' values as they came (their ids)."""
    return {
        kafka.traces_topic: TRACE_EVENT,
        kafka.promotions_topic: DRAFTER_PROMOTION,
        kafka.windows_topic: WINDOW_ANNOUNCEMENT,
    }


def avro_schema(version: SchemaVersion) -> Schema:
    return Schema(json.dumps(version.raw), "AVRO")


@dataclass(frozen=True)
class Registered:
    subject: str
    version: int  # our vN
    schema_id: int


class SchemaIds:
    """Registry ids <-> our schema versions. ``client=None`` knows only ``known`` (offline: benchmarks and
    unit tests); one per process or thread is enough, lookups are cached for good."""

    def __init__(self, client: SchemaRegistryClient | None, known: dict[int, SchemaVersion] | None = None):
        self.client = client
        self.versions: dict[int, SchemaVersion | None] = dict(known or {})
        self.ids: dict[tuple[str, bytes], int] = {}
        self._retry_at = 0.0

    @classmethod
    def connect(cls, kafka: KafkaSettings, timeout_s: float = 5.0) -> SchemaIds:
        conf = {"url": kafka.schema_registry_url, "timeout": timeout_s, "max.retries": 1}
        return cls(SchemaRegistryClient(conf))

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``; None if not found (404), ValueError for another refusal (a 409: incompatible),
        RegistryUnavailable for no answer."""
        if self.client is None:
            return None
        if time.monotonic() < self._retry_at:
            raise RegistryUnavailable(f"schema registry unavailable ({what}); retrying shortly")
        try:
            return fn()
        except SchemaRegistryError as e:
            if e.http_status_code == 404:
                return None
            if e.http_status_code < 500:
                raise ValueError(f"the schema registry refused to {what}: {e.error_message}") from None
            error: Exception = e
        except Exception as e:  # connection refused, timeout, DNS: the client's transport errors
            error = e
        self._retry_at = time.monotonic() + RETRY_AFTER_S
        raise RegistryUnavailable(f"schema registry did not answer ({what}): {error}") from error

    def id_of(self, version: SchemaVersion, subject_name: str) -> int:
        """The registry id of ``version`` under ``subject_name``; LookupError if it is not registered there."""
        key = (subject_name, version.fingerprint)
        if key not in self.ids and self.client is None:  # offline: the one id ``known`` gives the version
            self.ids[key] = next((i for i, v in self.versions.items() if v == version), -1)
            if self.ids[key] < 0:
                del self.ids[key]
                raise LookupError(f"{version.event} v{version.version} has no id in this offline table")
        if key not in self.ids:
            found = self._call(
                f"look up {subject_name}",
                lambda: self.client.lookup_schema(subject_name, avro_schema(version)),
            )
            if found is None:
                raise LookupError(
                    f"{version.event} v{version.version} is not registered under {subject_name!r}: "
                    "run `flywheel topics create` (it registers every schema version)"
                )
            self.ids[key] = found.schema_id
            self.versions[found.schema_id] = version
        return self.ids[key]

    def version_of(self, schema_id: int) -> SchemaVersion | None:
        """Our schema version the id stands for, or None if the registry has no such id or it is not ours."""
        if schema_id not in self.versions:
            schema = self._call(f"get schema id {schema_id}", lambda: self.client.get_schema(schema_id))
            self.versions[schema_id] = _ours(schema)
        return self.versions[schema_id]


def _ours(schema: Schema | None) -> SchemaVersion | None:
    if schema is None or (schema.schema_type or "AVRO") != "AVRO":
        return None
    try:
        return by_fingerprint().get(fingerprint_of(json.loads(schema.schema_str)))
    except (ValueError, KeyError, TypeError):  # not JSON, or not a schema fastavro can put in canonical form
        return None


def register_all(kafka: KafkaSettings, ids: SchemaIds) -> list[Registered]:
    """Register every released version of each topic's event under its subject, oldest first, with the
    subject's compatibility set to BACKWARD first: the registry refuses a version old data cannot be read
    with. Idempotent (registering a registered schema returns its id)."""
    out = []
    for topic, event in topic_events(kafka).items():
        name = subject(topic)
        ids._call(
            f"set compatibility of {name}", lambda n=name: ids.client.set_compatibility(n, COMPATIBILITY)
        )
        for version in versions(event):
            what = f"register {event} v{version.version} under {name}"
            schema_id = ids._call(
                what, lambda n=name, v=version: ids.client.register_schema(n, avro_schema(v))
            )
            ids.ids[(name, version.fingerprint)] = schema_id
            ids.versions[schema_id] = version
            out.append(Registered(name, version.version, schema_id))
    return out


def known_ids(kafka: KafkaSettings, ids: SchemaIds) -> dict[int, SchemaVersion]:
    """Registry id -> version, for every released version of each topic's event (looked up, so every one
    must be registered: `flywheel topics create`). For readers that cannot ask per message (Spark)."""
    return {
        ids.id_of(version, subject(topic)): version
        for topic, event in topic_events(kafka).items()
        for version in versions(event)
    }
