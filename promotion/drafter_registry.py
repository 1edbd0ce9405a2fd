"""MLflow model registry for drafters: one registered model per target, aliases champion/challenger/previous.

A drafter version is an MLflow Model logged by its training run (``trainer.drafter_model``: the vLLM-format
directory as its ``drafter`` artifact, the window as its dataset input), registered with its lineage as
version tags (window, table versions, train run, git SHA, weights checksum, metrics) and a description that
says what it was trained on and, once gated, how it was judged. Every version ever served stays loadable:
``models:/<name>/<version>`` (``mlflow.pyfunc.load_model`` too).

The promotion order is kept in the registered model's ``champion_history`` tag, so ``promote`` and
``rollback`` are single commands that move aliases and publish a DrafterPromotion for the serving nodes.
``disable`` (the gate's "no drafter" decision, or `flywheel speculation off`) keeps the champion alias and
marks the registered model ``speculation=off``; the nodes stop speculating until the next promote or
rollback, which marks it ``on`` again.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from core.drafter_artifacts import cache_path, fetch, model_uri, weights_sha256
from core.settings import KafkaSettings, MlflowSettings
from promotion.promotion_events import build_promotion, publish_promotion

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
HISTORY_TAG = "champion_history"
SPECULATION_TAG = "speculation"  # "off" while the fleet serves without a drafter (a disable event)


class RegistryError(RuntimeError):
    pass


@dataclass(frozen=True)
class DrafterVersion:
    name: str
    version: str
    source: str
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return model_uri(self.name, self.version)


class DrafterRegistry:
    def __init__(self, target_model_id: str, mlflow: MlflowSettings, kafka: KafkaSettings):
        self.mlflow = mlflow
        self.kafka = kafka
        self.target_model_id = target_model_id
        self.name = mlflow.drafter_model_name(target_model_id)
        mlflow.export_credentials()
        self.client = MlflowClient(
            tracking_uri=self.mlflow.tracking_uri, registry_uri=self.mlflow.tracking_uri
        )

    # --- versions -------------------------------------------------------------------------------------

    def _ensure_model(self) -> None:
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(
                self.name,
                description=f"EAGLE-3 drafters for {self.target_model_id}, trained from live traces by spec-flywheel",
                tags={HISTORY_TAG: "[]"},
            )

    def register(
        self,
        run_id: str,
        model_uri: str,
        drafter_dir: Path,
        tags: dict[str, Any],
        *,
        model_id: str | None = None,
        description: str | None = None,
    ) -> DrafterVersion:
        """New version from a training run's logged drafter model (``models:/m-…``, its ``model_id``); it
        becomes the ``challenger``."""
        self._ensure_model()
        all_tags = {k: str(v) for k, v in tags.items()} | {"weights_sha256": weights_sha256(drafter_dir)}
        mv = self.client.create_model_version(
            self.name,
            source=model_uri,
            run_id=run_id,
            tags=all_tags,
            model_id=model_id,
            description=description,
        )
        self.client.set_registered_model_alias(self.name, CHALLENGER, mv.version)
        return self.get(mv.version)

    def describe(self, version: str, text: str, append: bool = True) -> None:
        """Set (or extend, one paragraph per call) the version's description in the registry UI."""
        current = self.client.get_model_version(self.name, str(version)).description or ""
        body = f"{current}\n\n{text}" if append and current else text
        self.client.update_model_version(self.name, str(version), description=body)

    def get(self, version: str) -> DrafterVersion:
        mv = self.client.get_model_version(self.name, str(version))
        return DrafterVersion(self.name, mv.version, mv.source, dict(mv.tags))

    def by_alias(self, alias: str) -> DrafterVersion | None:
        try:
            mv = self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException:
            return None
        return DrafterVersion(self.name, mv.version, mv.source, dict(mv.tags))

    def lineage_head(self) -> DrafterVersion | None:
        """The newest trained version that was not rolled back, promoted or not: where training continues.

        The gate decides what is served, not what is learnt from: a challenger that fell short of the
        champion's measured speedup still carries every step trained so far (Aurora trains continuously and
        gates only deployment). A rolled-back version is a known-bad branch and is skipped.
        """
        versions = self.client.search_model_versions(f"name='{self.name}'")
        for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
            if "window_key" in mv.tags and "rolled_back_at" not in mv.tags:
                return DrafterVersion(self.name, mv.version, mv.source, dict(mv.tags))
        return None

    def training_parent(self, warm_start: str) -> DrafterVersion | None:
        """What the next cycle trains from (None: from scratch). ``champion``: the serving champion.
        ``lineage``: the lineage head; before anything was trained, the champion, a drafter registered by
        hand (a day-0 drafter: the flywheel adapts the off-the-shelf head it started from), unless it is
        tagged ``init=random`` (a random head teaches nothing; from scratch, the vocabulary comes from the
        window)."""
        if warm_start == "champion":
            return self.by_alias("champion")
        if (head := self.lineage_head()) is not None:
            return head
        champion = self.by_alias("champion")
        return champion if champion is not None and champion.tags.get("init") != "random" else None

    def tag(self, version: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, str(version), key, str(value))

    def download(self, version: str) -> Path:
        """Local copy of a version's drafter dir (the shared drafter artifact cache)."""
        return fetch(model_uri(self.name, version), self.mlflow.artifact_cache_dir, self.mlflow.tracking_uri)

    def archive(self) -> str | None:
        """Move this target's drafters out of the way, kept under ``<name>-archived-<UTC time>``: the next
        registered version starts a fresh history at 1. Local copies cached under this name are dropped,
        since the new versions reuse their numbers. None if nothing was registered."""
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            return None
        archived = f"{self.name}-archived-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        self.client.rename_registered_model(self.name, archived)
        shutil.rmtree(
            cache_path(model_uri(self.name, ""), self.mlflow.artifact_cache_dir), ignore_errors=True
        )
        return archived

    # --- promotion ------------------------------------------------------------------------------------

    def history(self) -> list[str]:
        try:
            return json.loads(self.client.get_registered_model(self.name).tags.get(HISTORY_TAG, "[]"))
        except MlflowException:
            return []

    def _set_history(self, history: list[str]) -> None:
        self.client.set_registered_model_tag(self.name, HISTORY_TAG, json.dumps(history))
        self.client.set_registered_model_alias(self.name, CHAMPION, history[-1])
        if len(history) >= 2:
            self.client.set_registered_model_alias(self.name, PREVIOUS, history[-2])
        else:
            try:
                self.client.delete_registered_model_alias(self.name, PREVIOUS)
            except MlflowException:
                pass

    def promote(self, version: str, reason: str | None = None) -> dict[str, Any]:
        """Make ``version`` the champion and tell the serving nodes. Re-running it only re-publishes."""
        version = str(version)
        drafter = self.get(version)
        history = self.history()
        if not history or history[-1] != version:
            history.append(version)
            self._set_history(history)
        previous = history[-2] if len(history) >= 2 else None
        return self._publish("promote", drafter, previous, reason)

    def speculation_off(self) -> bool:
        """Whether the fleet was told to serve without a drafter (the last event was a disable)."""
        try:
            return self.client.get_registered_model(self.name).tags.get(SPECULATION_TAG) == "off"
        except MlflowException:
            return False

    def disable(self, reason: str | None = None) -> dict[str, Any]:
        """Tell the serving nodes to stop speculating (the champion stays the champion and stays loaded)."""
        champion = self.by_alias(CHAMPION)
        if champion is None:
            raise RegistryError(f"{self.name}: no champion, so the flywheel serves no drafter to switch off")
        self.client.set_registered_model_tag(self.name, SPECULATION_TAG, "off")
        return self._publish("disable", champion, champion.version, reason or "speculation switched off")

    def rollback(self, reason: str | None = None) -> dict[str, Any]:
        """Restore the previous champion (one step back in the promotion history) and publish it."""
        history = self.history()
        if len(history) < 2:
            raise RegistryError(f"{self.name}: no previous champion to roll back to (history {history})")
        bad = history.pop()
        self.tag(bad, {"rolled_back_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self._set_history(history)
        return self._publish("rollback", self.get(history[-1]), bad, reason or f"rollback of v{bad}")

    def _publish(
        self, action: str, drafter: DrafterVersion, previous: str | None, reason: str | None
    ) -> dict[str, Any]:
        if action != "disable":  # promote and rollback serve a drafter again
            self.client.set_registered_model_tag(self.name, SPECULATION_TAG, "on")
        event = build_promotion(
            action=action,
            target_model_id=self.target_model_id,
            target_revision=drafter.tags.get("target_revision"),
            drafter_id=self.name,
            drafter_version=drafter.version,
            drafter_uri=drafter.uri,
            weights_sha256=drafter.tags.get("weights_sha256"),
            spec_method=drafter.tags.get("spec_method", "eagle3"),
            num_spec_tokens=int(drafter.tags.get("num_spec_tokens", 3)),
            previous_version=previous,
            reason=reason,
        )
        publish_promotion(self.kafka, event)
        return event
