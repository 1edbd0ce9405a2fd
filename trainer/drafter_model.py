"""Drafters as MLflow Models: the vLLM-format EAGLE-3 directory inside a pyfunc model, with its lineage.

A drafter version in the registry is an MLflow Model (``MLmodel``, signature, requirements, the Model tab in
the UI) whose artifact ``drafter`` is the directory vLLM loads (``config.json`` + safetensors + the
provenance file). Serving, the trainer's warm start and the evaluation keep resolving ``models:/<name>/<v>``
through :func:`core.drafter_artifacts.fetch`, which finds that directory inside the downloaded model, so
every stage loads exactly the files the registry holds.

``mlflow.pyfunc.load_model(uri).predict(df)`` is an offline replay: for each row of token ids
(``prompt_token_ids``, ``output_token_ids``, e.g. rows of the ``traces`` table) the number of draft tokens
the target accepts at every verify step under greedy verification, and the row's τ (tokens per target
forward, ``core/tau.py``). The target is recomputed from ``params["target_dir"]`` (default: the serving
settings' prepared target), as the trainer does; no activations are stored anywhere.

:func:`log_drafter_model` logs one inside the active run, with the training window as a dataset input
(the Delta table, its version, rows and time range) so the run's Dataset tab and the version's lineage
point at the exact data.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd

from core.drafter_artifacts import CONFIG_FILE, provenance, weights_sha256

ARTIFACT = "drafter"
_EXAMPLE_INPUT = pd.DataFrame({"prompt_token_ids": [[1, 9690, 198]], "output_token_ids": [[504, 3458, 30]]})
_EXAMPLE_OUTPUT = pd.DataFrame({"accepted": [[1, 0]], "tau": [1.5]})
_PARAMS = {"target_dir": "", "num_spec_tokens": 3}


class DrafterModel(mlflow.pyfunc.PythonModel):
    """An EAGLE-3 drafter for vLLM; ``predict`` replays token-id rows against the target (see module)."""

    def load_context(self, context: Any) -> None:
        self.drafter_dir = Path(context.artifacts[ARTIFACT])
        self._drafter = None
        self._target = None
        self._target_dir: Path | None = None

    def _models(self, target_dir: str | None):
        from core.settings import ServingSettings
        from trainer.eagle3_drafter import Eagle3Drafter
        from trainer.target_features import TargetModel

        path = Path(target_dir) if target_dir else ServingSettings().target_dir
        if self._drafter is None:
            self._drafter = Eagle3Drafter.from_pretrained(self.drafter_dir).eval().requires_grad_(False)
        if self._target is None or self._target_dir != path:
            self._target, self._target_dir = TargetModel(path), path
        return self._drafter, self._target

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        import torch

        params = params or {}
        with torch.inference_mode():  # scoped: predict may run inside a process that trains
            return self._replay(model_input, params)

    def _replay(self, model_input: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
        import numpy as np
        import torch

        from core.tau import tau
        from trainer.replay_eval import chain_accepts, drafter_proposals

        drafter, target = self._models(params.get("target_dir"))
        k = int(params.get("num_spec_tokens") or 3)
        rows = []
        for prompt, output in zip(
            model_input["prompt_token_ids"], model_input["output_token_ids"], strict=True
        ):
            prompt, output = list(prompt), list(output)
            if len(output) < 2:
                rows.append({"accepted": [], "tau": None})
                continue
            tokens = torch.from_numpy(np.asarray(prompt + output, dtype=np.int64))
            feats = target.features(tokens, drafter.draft_to_target)
            accepts = chain_accepts(drafter_proposals(drafter, feats, k), feats.argmax, len(prompt))
            rows.append({"accepted": accepts, "tau": tau(sum(accepts), len(accepts))})
        return pd.DataFrame(rows, columns=["accepted", "tau"])


def _requirements() -> list[str]:
    """Pinned from this environment (MLflow would otherwise load the model in a subprocess to infer them)."""
    from importlib.metadata import version

    return [
        f"{p}=={version(p)}" for p in ("mlflow", "torch", "transformers", "safetensors", "pandas", "numpy")
    ]


def window_dataset(window: dict[str, Any]):
    """The training window as an MLflow dataset: a Delta table at a version (no data copied)."""
    from mlflow.data.delta_dataset_source import DeltaDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    version = window.get("table_version")
    source = DeltaDatasetSource(path=window["uri"], delta_table_version=version)
    span = f"{window.get('start') or '-'}..{window.get('end') or '-'}"
    digest = hashlib.sha256(f"{window['uri']}@{version} {span}".encode()).hexdigest()[
        :16
    ]  # stable across runs
    return MetaDataset(source, name=f"traces@v{version} {span}", digest=digest)


def log_drafter_model(drafter_dir: Path, window: dict[str, Any] | None = None, name: str = ARTIFACT) -> Any:
    """Log ``drafter_dir`` as an MLflow Model in the active run (and the window as its dataset input);
    returns mlflow's ``ModelInfo`` (``model_uri`` ``models:/m-…``, ``model_id``) for registration."""
    if not (Path(drafter_dir) / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{drafter_dir} is not a drafter directory (no {CONFIG_FILE})")
    meta = provenance(drafter_dir)
    metadata = {
        "flavor": "eagle3-vllm",
        "weights_sha256": weights_sha256(drafter_dir),
        "steps": meta.get("step"),
        "parent": meta.get("parent"),
        "git_sha": meta.get("git_sha"),
    }
    if window:
        metadata["window"] = {
            k: window.get(k) for k in ("uri", "table_version", "start", "end", "heldout_fraction")
        }
        mlflow.log_input(window_dataset(window), context="training")
    signature = mlflow.models.infer_signature(_EXAMPLE_INPUT, _EXAMPLE_OUTPUT, params=_PARAMS)
    # MLflow keeps an artifact directory under its own base name (artifacts/<name>/), and every reader of a
    # registered version looks in artifacts/drafter/ (core.drafter_artifacts.MODEL_DRAFTER_DIR): a drafter
    # dir named otherwise (the demo's day0/, a user's head) is logged from a copy named drafter/
    with tempfile.TemporaryDirectory(prefix="drafter-model-") as tmp:
        source = Path(drafter_dir)
        if source.name != ARTIFACT:
            source = Path(shutil.copytree(source, Path(tmp) / ARTIFACT))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(
                Path(__file__).with_name("drafter_pyfunc.py")
            ),  # models from code: nothing pickled
            artifacts={ARTIFACT: str(source)},
            signature=signature,
            pip_requirements=_requirements(),
            metadata={k: v for k, v in metadata.items() if v is not None},
        )
