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
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from core.drafter_artifacts import fetch
from producers import metrics
from producers.hot_swap import EngineSwap, swap_drafter_async
from producers.speculation import switch_engine
from schemas import codec
from schemas.registry import DRAFTER_PROMOTION

log = logging.getLogger("flywheel.hot_swap")
SWAP_TIMEOUT_S = 600


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

    def _consumer(self) -> Consumer:
        node = self.runtime.identity.serving_node
        return Consumer(
            self.runtime.kafka.client_config()
            | {
                "group.id": f"flywheel-swap-{node}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "logger": log,
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
            if promotion is not None and (
                latest is None or promotion["published_at"] >= latest["published_at"]
            ):
                latest = promotion
            if msg.offset() + 1 >= ends[msg.partition()]:
                done.add(msg.partition())
        return latest

    def _decode(self, payload: bytes) -> dict[str, Any] | None:
        try:
            _, promotion = codec.decode(payload, expect=DRAFTER_PROMOTION)
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
        if promotion["action"] == "disable":
            return self.switch(False, promotion)
        if not self.runtime.speculating and not self.switch(True, promotion):
            return False
        version = promotion["drafter_version"]
        current = self.runtime.drafter_version_label(self._engine_version())
        if version == current:
            return True
        started = time.monotonic()
        self.runtime.drafter_ids[version] = promotion["drafter_id"]  # traces of this version carry its id
        try:
            mlflow = self.runtime.mlflow
            path = fetch(promotion["drafter_uri"], mlflow.artifact_cache_dir, mlflow.tracking_uri)
            swap = EngineSwap(self.runtime.engine)
            future = asyncio.run_coroutine_threadsafe(
                swap_drafter_async(swap, path, version, promotion.get("weights_sha256")), self.runtime.loop
            )
            future.result(timeout=SWAP_TIMEOUT_S)
        except Exception as e:
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
