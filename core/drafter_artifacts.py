"""Drafter artifacts: the one place a drafter directory is fetched, digested and described.

A drafter is a vLLM-format EAGLE-3 directory (``config.json`` + ``*.safetensors`` + the provenance file
``flywheel-drafter.json``); a registered version is an MLflow Model that carries it as its ``drafter``
artifact (``trainer.drafter_model``). Every stage that needs one locally (the serving plugin on a promotion, the
trainer's discard term, the served evaluation, the demo) resolves its URI through :func:`fetch`, which
keeps one cache keyed by URI; every stage that checks one uses :func:`weights_sha256`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
PROVENANCE_FILE = "flywheel-drafter.json"
MODEL_DRAFTER_DIR = (
    "artifacts",
    "drafter",
)  # where a registered MLflow Model keeps it (trainer.drafter_model)


def drafter_dir(root: Path) -> Path | None:
    """The drafter directory at ``root``: the root itself (a plain drafter dir) or the ``drafter`` artifact
    of an MLflow Model downloaded there; None if neither is complete."""
    for candidate in (root, root.joinpath(*MODEL_DRAFTER_DIR)):
        if (candidate / CONFIG_FILE).exists():
            return candidate
    return None


def model_uri(registered_model: str, version: str | int) -> str:
    """The registry URI of a drafter version: what promotion events carry and :func:`fetch` resolves."""
    return f"models:/{registered_model}/{version}"


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a drafter dir (sorted by name), or ``[path]`` for a single file."""
    path = Path(path)
    return sorted(path.glob("*.safetensors")) if path.is_dir() else [path]


def weights_sha256(path: str | Path) -> str:
    """sha256 over the drafter's safetensors files, concatenated in name order (what promotions carry)."""
    digest = hashlib.sha256()
    for f in weight_files(path):
        with f.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def provenance(path: str | Path) -> dict[str, Any]:
    """What the trainer recorded about a drafter (window, steps, git SHA, ...); empty if it has no record."""
    file = Path(path) / PROVENANCE_FILE
    return json.loads(file.read_text()) if file.exists() else {}


def _is_local(uri: str) -> bool:
    return uri.startswith("file://") or ("://" not in uri and not uri.startswith(("models:", "runs:")))


def cache_path(uri: str, cache_dir: Path) -> Path:
    """Where :func:`fetch` keeps ``uri``: ``<cache>/<model>/<version>`` for registry URIs, else by URI hash."""
    if uri.startswith("models:/"):
        name, _, version = uri[len("models:/") :].partition("/")
        return cache_dir / name / version
    return cache_dir / f"uri-{uuid.uuid5(uuid.NAMESPACE_URL, uri).hex}"


def fetch(uri: str | Path, cache_dir: Path, tracking_uri: str | None = None) -> Path:
    """A local directory holding the drafter at ``uri``.

    A local path or ``file://`` URI is used where it is. Anything else (``models:/name/version``,
    ``runs:/``, ``mlflow-artifacts:/``, ``s3://`` ...) is downloaded once through MLflow into ``cache_dir``
    and reused; the download lands in a temporary dir and is renamed into place, so a crash never leaves a
    half-written drafter in the cache.
    """
    uri = str(uri)
    if _is_local(uri):
        local = Path(uri.removeprefix("file://"))
        return drafter_dir(local) or local
    dst = cache_path(uri, cache_dir)
    if (cached := drafter_dir(dst)) is not None:
        return cached
    import mlflow.artifacts

    source = uri
    if uri.startswith("models:/"):
        # resolved by the configured server's registry: download_artifacts alone would ask the process's
        # default registry (a local sqlite file in a fresh process such as an Airflow task)
        from mlflow import MlflowClient

        name, _, version = uri[len("models:/") :].partition("/")
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        source = client.get_model_version_download_uri(name, version)
    tmp = dst.with_name(f"{dst.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir(parents=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking_uri
        )
        try:
            Path(local).rename(dst)  # a directory source lands as tmp/<its name>
        except OSError:
            if drafter_dir(dst) is None:  # another process won the race with the same content
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = drafter_dir(dst)
    if found is None:
        raise FileNotFoundError(
            f"{uri} holds no drafter (no {CONFIG_FILE}, nor an MLflow Model's drafter artifact)"
        )
    return found
