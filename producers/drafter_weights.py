"""Worker-side weight-transfer backend ``flywheel_file``: load a drafter checkpoint from a directory.

vLLM's draft-weight update API (``start_draft_weight_update`` -> ``update_weights`` ->
``finish_weight_update``) drives this class inside each worker. ``update_info`` is
``{"path": DIR_OR_FILE, "sha256": optional hex of model.safetensors}``.

The new weights are read and checked against the drafter being served (same tensor names and shapes,
expected checksum) *before* the model is touched; the load itself uses vLLM's layerwise reload (on CPU the
linear layers repack their weights, so a plain copy would not take). If loading fails half-way, the
previous checkpoint is loaded back and the error re-raised: a failed swap keeps serving the old drafter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

from core.drafter_artifacts import weights_sha256

log = logging.getLogger("flywheel.drafter_weights")
# Tensors vLLM takes from the target (embeddings) or ignores (t2d): never loaded into the drafter.
SKIPPED = ("embed_tokens", "t2d")


class IncompatibleDrafter(ValueError):
    pass


def _skipped(name: str) -> bool:
    return any(s in name for s in SKIPPED)


def weight_files(path: str | Path) -> list[Path]:
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.exists() for f in files):
        raise IncompatibleDrafter(f"no safetensors weights at {path}")
    return files


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from safetensors headers (no tensor data is read)."""
    shapes = {}
    for f in weight_files(path):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                if not _skipped(name):
                    shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes


def compatibility_problems(new: dict[str, tuple[int, ...]], served: dict[str, tuple[int, ...]]) -> list[str]:
    problems = [f"missing tensor {n}" for n in sorted(served.keys() - new.keys())]
    problems += [f"unexpected tensor {n}" for n in sorted(new.keys() - served.keys())]
    problems += [
        f"{n}: shape {new[n]} != served {served[n]}"
        for n in sorted(new.keys() & served.keys())
        if new[n] != served[n]
    ]
    return problems


def read_weights(path: str | Path, sha256: str | None = None) -> list[tuple[str, torch.Tensor]]:
    files = weight_files(path)
    if sha256 is not None:
        digest = weights_sha256(path)
        if digest != sha256:
            raise IncompatibleDrafter(f"checksum mismatch for {path}: {digest} != expected {sha256}")
    weights = []
    for f in files:
        weights += [(k, v) for k, v in load_file(str(f)).items() if not _skipped(k)]
    return weights


@dataclass
class DrafterFileInit(WeightTransferInitInfo):
    pass


@dataclass
class DrafterFileUpdate(WeightTransferUpdateInfo):
    path: str
    sha256: str | None = None


class DrafterFileWeightTransfer(WeightTransferEngine[DrafterFileInit, DrafterFileUpdate]):
    init_info_cls = DrafterFileInit
    update_info_cls = DrafterFileUpdate
    supports_draft_weight_update = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        spec = self.vllm_config.speculative_config
        self.served_path: str | None = getattr(spec, "model", None) if spec is not None else None

    def init_transfer_engine(self, init_info: DrafterFileInit) -> None:
        pass  # nothing to connect to: weights come from a path

    def start_weight_update(self) -> None:
        pass  # the model is only touched once the new weights passed their checks

    def finish_weight_update(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def receive_weights(self, update_info: DrafterFileUpdate) -> None:
        if self.served_path is None:
            raise IncompatibleDrafter("this engine serves no file-based drafter; nothing to swap")
        problems = compatibility_problems(tensor_shapes(update_info.path), tensor_shapes(self.served_path))
        if problems:
            raise IncompatibleDrafter(
                f"drafter at {update_info.path} does not fit the served one: {problems[:5]}"
            )
        weights = read_weights(update_info.path, update_info.sha256)
        try:
            self._load(weights)
        except Exception:
            log.exception("loading drafter %s failed; restoring %s", update_info.path, self.served_path)
            self._load(read_weights(self.served_path))
            raise
        self.served_path = update_info.path

    def _load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        initialize_layerwise_reload(self.model)
        self.model.load_weights(weights)
        finalize_layerwise_reload(self.model, self.model_config)
