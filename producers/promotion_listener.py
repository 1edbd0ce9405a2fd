"""Follow ``spec.drafter.promotions.v1`` and hot-swap the promoted drafter into the running engine.

Runs in the serving frontend (``vllm serve``'s API server) as a daemon thread with its own Kafka consumer
(no group offsets: every node reads the whole compacted topic). On start it catches up to the newest
promotion for the served target and applies it if the engine serves something else; after that it applies
each new one. Promotions for another target or another speculative method are ignored.

A swap pauses scheduling (in-flight requests are kept, not aborted), runs vLLM's draft-weight update API
with the ``flywheel_file`` backend, stamps the new weight version, and resumes. If anything fails the
engine keeps serving the previous drafter and the error is logged and counted.

A ``disable`` event (the gate measured every drafter slower than no speculation) switches speculation off
in the engine (``producers.speculation``) and keeps the drafter loaded; the next promote or rollback
switches it on again before swapping.

Anyone who can write to the topic could otherwise make every node load what they like, so an event is
checked before anything is fetched (:func:`rejection`): it must carry the weights' SHA-256 (each worker
verifies it before loading), name a drafter in the configured MLflow registry (``models:/…``) or under a
directory the node allows (``FLYWHEEL_SERVING_DRAFTER_PATHS``), and a ``promote`` must not go back to an
older version of the drafter being served (only a ``rollback`` may). A rejected event is logged with its
reason and counted (``flywheel_drafter_swaps_total{outcome="rejected"}``); the node keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from core.drafter_artifacts import fetch
from core.kafka_log import librdkafka_log
from infra.acls import SWAP_GROUP_PREFIX
from producers import metrics
from producers.hot_swap import EngineSwap, swap_drafter_async
from producers.speculation import switch_engine
from schemas import codec
from schemas.registry import DRAFTER_PROMOTION
from schemas.schema_ids import RegistryUnavailable, SchemaIds

log = logging.getLogger("flywheel.hot_swap")
SWAP_TIMEOUT_S = 600
REGISTRY_RETRY_S = 5.0  # a promotion event waits for the schema registry this long between tries
REGISTRY_SCHEME = "models:/"


def rejection(
    promotion: dict[str, Any],
    served: tuple[str | None, str],
    allowed_paths: Sequence[Path] = (),
) -> str | None:
    """Why a promotion for this node's target must not be applied, or None. ``served`` is the (drafter id,
    version) the engine serves now. Pure: the listener's gate, tested on forged events."""
    if promotion["action"] == "disable":
        return None  # loads nothing; the champion stays loaded
    if not promotion.get("weights_sha256"):
        return "no weights_sha256: the weights could not be verified"
    uri = promotion["drafter_uri"]
    if not uri.startswith(REGISTRY_SCHEME) and not _under(uri, allowed_paths):
        return (
            f"drafter_uri {uri!r} is neither in the configured registry ({REGISTRY_SCHEME}…) nor under an "
            "allowed drafter path"
        )
    served_id, served_version = served
    if (
        promotion["action"] == "promote"
        and promotion["drafter_id"] == served_id
        and _older(promotion["drafter_version"], served_version)
    ):
        return (
            f"stale: promotes v{promotion['drafter_version']} of {served_id} while v{served_version} is "
            "served (going back takes a rollback event)"
        )
    return None


def _under(uri: str, allowed: Sequence[Path]) -> bool:
    """An absolute local path inside an allowed directory (symlinks resolved). URIs with a scheme (s3://,
    file://, runs:/) are not absolute paths."""
    path = Path(uri)
    if not path.is_absolute():
        return False
    real = path.resolve()
    return any(real.is_relative_to(Path(root).resolve()) for root in allowed)


def _older(version: str, than: str) -> bool:
    """Registry versions are integers; labels that are not (an engine's initial drafter) never compare."""
    try:
        return int(version) < int(than)
    except ValueError:
        return False


def start_listener(runtime: Any) -> threading.Thread | None:
    identity = runtime.identity
    if not runtime.serving.follow_promotions or identity is None or identity.spec_method in ("none", "ngram"):
        return None
    if runtime.loop is None:
        log.info("offline engine: promotions are not followed automatically (use producers.hot_swap)")
        return None
    thread = threading.Thread(target=PromotionListener(runtime).run, name="flywheel-promotions", daemon=True)
    thread.start()
    return thread


class PromotionListener:
    def __init__(self, runtime: Any):
        self.runtime = runtime
        self.topic = runtime.kafka.promotions_topic
        self.ids = SchemaIds.connect(runtime.kafka)

    def _consumer(self) -> Consumer:
        node = self.runtime.identity.serving_node
        return Consumer(
            self.runtime.kafka.client_config()
            | {
                "group.id": f"{SWAP_GROUP_PREFIX}{node}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "logger": librdkafka_log(),
            }
        )

    def run(self) -> None:
        consumer = self._consumer()
        try:
            self._assign_when_topic_exists(consumer)
            latest = self._catch_up(consumer)
            if latest is not None:
                self.apply(latest)
            while True:
                msg = consumer.poll(1.0)
                if msg is None or msg.error():
                    continue
                promotion = self._decode(msg.value())
                if promotion is not None:
                    self.apply(promotion)
        except Exception:
            log.exception("promotion listener stopped; this node will not hot-swap drafters")
        finally:
            consumer.close()

    def _assign_when_topic_exists(self, consumer: Consumer) -> None:
        while True:
            try:
                meta = consumer.list_topics(self.topic, timeout=5)
                partitions = meta.topics[self.topic].partitions
                if partitions and meta.topics[self.topic].error is None:
                    consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
                    return
            except KafkaException:
                pass
            time.sleep(5)

    def _catch_up(self, consumer: Consumer) -> dict[str, Any] | None:
        """Read to the end of the compacted topic; return the newest promotion for our target."""
        ends = {}
        for tp in consumer.assignment():
            _, high = consumer.get_watermark_offsets(tp, timeout=10)
            ends[tp.partition] = high
        latest = None
        done = {p for p, high in ends.items() if high == 0}
        while len(done) < len(ends):
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            promotion = self._decode(msg.value())
            if (
                promotion is not None
                and rejection(promotion, (None, ""), self.runtime.serving.drafter_paths) is None
                and (latest is None or promotion["published_at"] >= latest["published_at"])
            ):  # a forged newest event must not hide the real champion from a node that starts
                latest = promotion
            if msg.offset() + 1 >= ends[msg.partition()]:
                done.add(msg.partition())
        return latest

    def _decode(self, payload: bytes) -> dict[str, Any] | None:
        """The promotion if it is readable and meant for this node's target and method, else None."""
        while True:
            try:
                _, promotion = codec.decode(payload, self.ids.version_of, expect=DRAFTER_PROMOTION)
                break
            except RegistryUnavailable as e:  # the event waits for the registry (off the request path)
                log.warning("%s; the promotion event waits for it", e)
                time.sleep(REGISTRY_RETRY_S)
            except codec.DecodeError as e:
                log.error("unreadable promotion event ignored: %s", e)
                metrics.count_swap("ignored")
                return None
        identity = self.runtime.identity
        if (
            promotion["target_model_id"] != identity.target_model_id
            or promotion["spec_method"] != identity.spec_method
        ):
            metrics.count_swap("ignored")
            return None
        return promotion

    def apply(self, promotion: dict[str, Any]) -> bool:
        current = self.runtime.drafter_version_label(self._engine_version())
        current_id = self.runtime.drafter_id_for(current)
        reason = rejection(promotion, (current_id, current), self.runtime.serving.drafter_paths)
        if reason is not None:
            metrics.count_swap("rejected")
            log.error(
                "promotion %s of %s v%s REJECTED, still serving %s v%s: %s",
                promotion["event_id"],
                promotion["drafter_id"],
                promotion["drafter_version"],
                current_id,
                current,
                reason,
            )
            return False
        if promotion["action"] == "disable":
            return self.switch(False, promotion)
        if not self.runtime.speculating and not self.switch(True, promotion):
            return False
        version = promotion["drafter_version"]
        if (promotion["drafter_id"], version) == (current_id, current):
            return True
        started = time.monotonic()
        previous_id = self.runtime.drafter_ids.get(version)
        self.runtime.drafter_ids[version] = promotion["drafter_id"]  # traces of this version carry its id
        try:
            mlflow = self.runtime.mlflow
            path = fetch(promotion["drafter_uri"], mlflow.artifact_cache_dir, mlflow.tracking_uri)
            swap = EngineSwap(self.runtime.engine)
            future = asyncio.run_coroutine_threadsafe(
                swap_drafter_async(swap, path, version, promotion["weights_sha256"]), self.runtime.loop
            )
            future.result(timeout=SWAP_TIMEOUT_S)
        except Exception as e:
            if previous_id is None:
                self.runtime.drafter_ids.pop(version, None)
            else:
                self.runtime.drafter_ids[version] = previous_id
            metrics.count_swap("failed")
            log.error(
                "hot-swap to %s v%s FAILED, still serving v%s: %s",
                promotion["drafter_id"],
                version,
                current,
                e,
            )
            return False
        metrics.count_swap("ok")
        metrics.set_served_drafter(promotion["drafter_id"], version)
        log.warning(
            "hot-swapped drafter %s v%s -> v%s (%s) in %.1fs",
            promotion["drafter_id"],
            current,
            version,
            promotion["action"],
            time.monotonic() - started,
        )
        return True

    def switch(self, enabled: bool, promotion: dict[str, Any]) -> bool:
        """Speculation on or off in the engine; the capture labels later traces accordingly."""
        if self.runtime.speculating == enabled:
            return True
        try:
            future = asyncio.run_coroutine_threadsafe(
                switch_engine(self.runtime.engine, enabled), self.runtime.loop
            )
            future.result(timeout=SWAP_TIMEOUT_S)
        except Exception as e:
            metrics.count_swap("failed")
            log.error("switching speculation %s FAILED: %s", "on" if enabled else "off", e)
            return False
        self.runtime.speculating = enabled
        metrics.count_swap("ok")
        metrics.set_speculating(enabled)
        log.warning(
            "speculation %s (%s: %s)",
            "ON" if enabled else "OFF",
            promotion["action"],
            promotion.get("reason") or "-",
        )
        return True

    def _engine_version(self) -> str | None:
        future = asyncio.run_coroutine_threadsafe(self.runtime.engine.get_weight_version(), self.runtime.loop)
        return future.result(timeout=30)
