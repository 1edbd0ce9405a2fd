"""Served drafter weights by version: what the discard term needs to regenerate rejected proposals.

Under greedy drafting a rejected proposal is a deterministic function of the prefix and the weights that
served it, so every served version must be retrievable. Here a directory keyed by version
(``ROOT/<drafter_id>/<version>/`` or ``ROOT/<version>/``, each a vLLM eagle3 dir); the MLflow registry
can sit behind the same ``path``/``load`` interface.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from core.drafter_artifacts import fetch, model_uri
from core.settings import MlflowSettings
from trainer.eagle3_drafter import CONFIG_FILE, Eagle3Drafter


class DrafterStore:
    def __init__(self, root: Path | str, max_loaded: int = 2):
        self.root = Path(root)
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[Path, Eagle3Drafter] = OrderedDict()

    def path(self, drafter_id: str | None, version: str | None) -> Path | None:
        if version is None:
            return None
        for cand in (self.root / (drafter_id or "") / version, self.root / version):
            if (cand / CONFIG_FILE).exists():
                return cand
        return None

    def load(self, drafter_id: str | None, version: str | None) -> Eagle3Drafter | None:
        """The drafter that served (drafter_id, version), or None if this store does not hold it."""
        path = self.path(drafter_id, version)
        if path is None:
            return None
        if path not in self._loaded:
            self._loaded[path] = Eagle3Drafter.from_pretrained(path).eval().requires_grad_(False)
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(path)
        return self._loaded[path]


class RegistryDrafterStore(DrafterStore):
    """Served versions from the MLflow drafter registry, through the shared drafter artifact cache.

    Traces served by a registered drafter carry drafter_id = the registered model name and drafter_version
    = its registry version, which is exactly what ``models:/<drafter_id>/<version>`` resolves.
    """

    def __init__(self, registered_model: str, mlflow: MlflowSettings, max_loaded: int = 2):
        super().__init__(mlflow.artifact_cache_dir, max_loaded)
        self.registered_model = registered_model
        self.mlflow = mlflow
        mlflow.export_credentials()

    def path(self, drafter_id: str | None, version: str | None) -> Path | None:
        from mlflow.exceptions import MlflowException

        if version is None or drafter_id != self.registered_model:
            return None
        try:
            return fetch(model_uri(drafter_id, version), self.root, self.mlflow.tracking_uri)
        except MlflowException:
            return None


def open_store(
    spec: str | Path | None, target_model_id: str, mlflow: MlflowSettings | None
) -> DrafterStore | None:
    """'registry' -> the MLflow registry of ``target_model_id``; a path -> a local version-keyed dir."""
    if spec is None:
        return None
    if str(spec) == "registry":
        if mlflow is None:
            raise ValueError("serving_drafters='registry' needs the MLflow settings of the registry")
        return RegistryDrafterStore(mlflow.drafter_model_name(target_model_id), mlflow)
    return DrafterStore(spec)
