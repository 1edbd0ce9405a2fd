"""Served drafter weights by version: what the discard term needs to regenerate rejected proposals.

Under greedy drafting a rejected proposal is a deterministic function of the prefix and the weights that
served it, so every served version must be retrievable. Here a directory keyed by version
(``ROOT/<drafter_id>/<version>/`` or ``ROOT/<version>/``, each a vLLM eagle3 dir); the MLflow registry
can sit behind the same ``path``/``load`` interface.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

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
    """Served versions from the MLflow drafter registry (trainer.registry), downloaded once per version.

    Traces served by a registered drafter carry drafter_id = the registered model name and drafter_version
    = its registry version, which is exactly what ``DrafterRegistry.download`` resolves.
    """

    def __init__(self, registry, cache_dir: Path | str, max_loaded: int = 2):
        super().__init__(cache_dir, max_loaded)
        self.registry = registry

    def path(self, drafter_id: str | None, version: str | None) -> Path | None:
        from mlflow.exceptions import MlflowException

        if version is None or drafter_id != self.registry.name:
            return None
        try:
            return self.registry.download(version, self.root)
        except MlflowException:
            return None


def open_store(spec: str | Path | None, target_model_id: str) -> DrafterStore | None:
    """'registry' -> the MLflow registry of ``target_model_id``; a path -> a local version-keyed dir."""
    if spec is None:
        return None
    if str(spec) == "registry":
        from flywheel.settings import TrainingSettings
        from trainer.registry import DrafterRegistry

        return RegistryDrafterStore(
            DrafterRegistry(target_model_id), TrainingSettings().output_dir / "served"
        )
    return DrafterStore(spec)
