"""DrafterPromotion events: built and published by the registry side (`flywheel promote`, `rollback`,
`speculation off`), followed by every serving node (``producers.promotion_listener``). Key = target model id
on a compacted topic, so the newest event per target says what every node should serve."""

from __future__ import annotations

import time
import uuid
from typing import Any

from confluent_kafka import Producer

from core.settings import KafkaSettings
from schemas import codec
from schemas.registry import DRAFTER_PROMOTION, current
from schemas.schema_ids import SchemaIds, subject

# promote: serve this drafter; rollback: serve this earlier champion again; disable: stop speculating (the
# gate measured every drafter slower than no speculation), keeping this champion loaded for the next event
ACTIONS = ("promote", "rollback", "disable")


def build_promotion(
    *,
    action: str,
    target_model_id: str,
    drafter_id: str,
    drafter_version: str,
    drafter_uri: str,
    spec_method: str = "eagle3",
    num_spec_tokens: int = 3,
    target_revision: str | None = None,
    weights_sha256: str | None = None,
    previous_version: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
    if action != "disable" and not weights_sha256:
        raise ValueError(
            f"a {action} event needs weights_sha256: serving nodes refuse weights they cannot verify"
        )
    return {
        "schema_version": current(DRAFTER_PROMOTION).version,
        "event_id": str(uuid.uuid4()),
        "action": action,
        "target_model_id": target_model_id,
        "target_revision": target_revision,
        "drafter_id": drafter_id,
        "drafter_version": str(drafter_version),
        "drafter_uri": drafter_uri,
        "weights_sha256": weights_sha256,
        "spec_method": spec_method,
        "num_spec_tokens": num_spec_tokens,
        "previous_version": previous_version,
        "reason": reason,
        "published_at": int(time.time() * 1_000_000),
    }


def publish_promotion(kafka: KafkaSettings, promotion: dict[str, Any], timeout_s: float = 30.0) -> None:
    """Publish synchronously (a promotion is rare and must not be lost): raises if not acknowledged, or if
    the schema registry does not give the id of the current DrafterPromotion schema."""
    schema_id = SchemaIds.connect(kafka).id_of(current(DRAFTER_PROMOTION), subject(kafka.promotions_topic))
    producer = Producer(kafka.client_config() | {"enable.idempotence": True, "compression.type": "zstd"})
    errors: list[str] = []
    producer.produce(
        kafka.promotions_topic,
        key=promotion["target_model_id"].encode(),
        value=codec.encode(DRAFTER_PROMOTION, promotion, schema_id, check=True),
        on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
    )
    if producer.flush(timeout_s) or errors:
        raise RuntimeError(f"promotion not acknowledged by Kafka: {errors or 'timeout'}")
